"""Mixture-of-experts adapters and PEFT features loratool does not read yet: a clear refusal,
never a silent misreading (PEFT's target_parameters adapter holds E experts in one factor pair)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratool.adapter import Adapter, LoraModule
from loratool.errors import LoraToolError
from loratool.formats import save_adapter
from loratool.ops.validate import validate


def gpt_oss(tmp_path: Path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                             head_dim=8, layer_types=["full_attention"])  # fmt: skip
    model = tf.GptOssForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "base")
    return model


def expert_adapter(model, params=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), *, seed=0, **config):
    """A PEFT adapter on gpt-oss's 3-D experts (target_parameters) and on q_proj, lora_B random."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(target_modules=["q_proj"], target_parameters=list(params), **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return pm.eval()


def state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_target_parameters_adapters_read_merge_and_round_trip_as_peft(tmp_path: Path, cli) -> None:
    import transformers as tf
    from peft import PeftModel

    from loratool.formats import load_adapter

    model = gpt_oss(tmp_path)
    pm = expert_adapter(model, r=2, lora_alpha=4, rank_pattern={"down_proj": 4})
    pm.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pm(ids).logits
    assert validate(tmp_path / "adapter").valid
    a = load_adapter(tmp_path / "adapter")
    experts = {p: m for p, m in a.modules.items() if m.expert is not None}
    assert len(experts) == 8 and a.modules["model.layers.0.mlp.experts.gate_up_proj.3"].rank == 2
    assert a.modules["model.layers.0.mlp.experts.down_proj.0"].rank == 4  # rank_pattern on the parameter name
    shown = json.loads(cli("inspect", tmp_path / "adapter", "--json").stdout)
    assert len(shown["modules"]) == 9  # 2 parameters x 4 experts + q_proj

    assert cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged", "--quiet").exit_code == 0
    oracle = pm.merge_and_unload().state_dict()
    for key, value in state(tmp_path / "merged").items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6, msg=key)

    # loratool's own PEFT output of it (experts joined again) loads in PEFT with the same logits
    assert cli("convert", tmp_path / "adapter", "--to", "peft", "-o", tmp_path / "again").exit_code == 0
    base = tf.GptOssForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, str(tmp_path / "again")).eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # unmerge takes it out again
    assert cli("unmerge", tmp_path / "merged", tmp_path / "adapter", "-o", tmp_path / "back", "--quiet").exit_code == 0
    for key, value in state(tmp_path / "back").items():
        torch.testing.assert_close(value, state(tmp_path / "base")[key], rtol=0, atol=1e-6, msg=key)
    res = cli("convert", tmp_path / "adapter", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert res.exit_code == 1 and "3-D expert" in res.output


def test_extract_on_3d_experts_writes_peft_target_parameters(tmp_path: Path) -> None:
    import transformers as tf
    from peft import PeftModel

    from loratool.ops.combine import combine
    from loratool.ops.extract import extract
    from loratool.ops.merge import merge

    model = gpt_oss(tmp_path)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        experts = model.model.layers[0].mlp.experts
        experts.gate_up_proj[1:].add_(0.02 * torch.randn(experts.gate_up_proj[1:].shape, generator=g))  # expert 0 as is
        experts.down_proj.add_(0.02 * torch.randn(experts.down_proj.shape, generator=g))
        model.model.layers[0].self_attn.q_proj.weight.add_(0.02 * torch.randn(32, 32, generator=g))
    model.save_pretrained(tmp_path / "ft")
    result = extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / "adapter", rank=32, show_progress=False)
    modules = {r.module for r in result.report}
    assert (
        "model.layers.0.mlp.experts.gate_up_proj.3" in modules and "model.layers.0.mlp.experts.down_proj.0" in modules
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.mlp.experts.gate_up_proj",
    ]
    # PEFT loads it and its merge is loratool's, which is the fine-tune (rank 32 holds every expert delta)
    base = tf.GptOssForCausalLM.from_pretrained(tmp_path / "base").eval()
    oracle = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    merge(tmp_path / "base", [tmp_path / "adapter"], output=tmp_path / "merged", show_progress=False)
    ft = state(tmp_path / "ft")
    for key, value in state(tmp_path / "merged").items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(value, ft[key], rtol=0, atol=1e-4, msg=key)
    # resize works per expert, and PEFT loads the result
    from loratool.ops.combine import resize

    resize(tmp_path / "adapter", output=tmp_path / "small", rank=2, show_progress=False)
    small = PeftModel.from_pretrained(tf.GptOssForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "small"))
    assert small.base_model.model.model.layers[0].mlp.experts.lora_A["default"].weight.shape[0] == 2 * 4
    # combine works per expert: cat of two is the sum of their deltas
    combine([tmp_path / "adapter", (tmp_path / "adapter", -1.0)], output=tmp_path / "zero", show_progress=False)
    merge(tmp_path / "base", [tmp_path / "zero"], output=tmp_path / "same", show_progress=False)
    for key, value in state(tmp_path / "same").items():
        torch.testing.assert_close(value, state(tmp_path / "base")[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("field", ["alora_invocation_tokens", "layer_replication"])
def test_features_peft_does_not_merge_are_refused(tmp_path: Path, fixtures: Path, field: str) -> None:
    from loratool.ops.merge import merge

    g = torch.Generator().manual_seed(0)
    module = LoraModule(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 4.0)
    a = Adapter(modules={"model.layers.0.self_attn.q_proj": module})
    save_adapter(a, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = [1, 2] if field == "alora_invocation_tokens" else [[0, 2]]
    config_path.write_text(json.dumps(config))
    with pytest.raises(LoraToolError, match=field):
        merge(fixtures / "llama-base", [tmp_path / "adapter"], output=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_per_expert_weights_extract_and_merge_back_to_the_fine_tune(tmp_path: Path, cli) -> None:
    """Qwen3-MoE checkpoints store each expert's gate/up/down as its own 2-D weight (transformers
    fuses them in memory only); with the router they are plain modules to every command. At full
    rank the merged adapter gives the fine-tune back (PEFT cannot load per-expert modules on
    transformers 5's fused experts, so the oracle is the fine-tune itself)."""
    import transformers as tf
    from helpers import logits

    config = tf.Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                               num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=128, head_dim=8, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    tf.Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "base")
    ft = tf.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "base").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in ft.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj, layer.mlp.gate.weight):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(tmp_path / "ft")
    res = cli(
        "extract", tmp_path / "base", tmp_path / "ft", "-r", "32", "-o", tmp_path / "adapter", "--quiet", "--json"
    )
    assert res.exit_code == 0, res.output
    modules = {m["module"] for m in json.loads(res.stdout)["modules"]}
    assert "model.layers.1.mlp.experts.3.down_proj" in modules and "model.layers.0.mlp.gate" in modules
    inspected = json.loads(cli("inspect", tmp_path / "adapter", "--json").stdout)
    assert len(inspected["modules"]) == 2 * (4 * 3 + 1)  # experts x (gate, up, down) + router, per layer
    assert cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged", "--quiet").exit_code == 0
    merged = tf.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), logits(ft), rtol=1e-4, atol=1e-4)


def test_untransposed_3d_experts_merge_as_peft(tmp_path: Path, monkeypatch) -> None:
    """Qwen3-MoE's fused experts are (E, out, in) in memory (transformers: not is_transposed); a
    checkpoint that stores them so takes a target_parameters adapter as PEFT merges it. Each experts
    parameter goes to the writer before it is merged, and is written an expert at a time."""
    import transformers as tf
    from safetensors.torch import save_file

    from loratool.ops.merge import merge
    from loratool.stream.pipeline import BackgroundWriter

    handed: list[tuple[str, int]] = []
    write = BackgroundWriter.write

    def recorded(self, name, tensor, *args, pieces=None, **kwargs):  # type: ignore[no-untyped-def]
        if pieces is not None:
            handed.append((name, pieces.count))
        write(self, name, tensor, *args, pieces=pieces, **kwargs)

    monkeypatch.setattr(BackgroundWriter, "write", recorded)

    config = tf.Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                               num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=64, head_dim=8, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(config).eval()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps(config.to_dict()))
    pm = expert_adapter(model, r=2, lora_alpha=4, use_rslora=True)
    pm.save_pretrained(tmp_path / "adapter")
    merge(tmp_path / "base", [tmp_path / "adapter"], output=tmp_path / "merged", show_progress=False)
    oracle = pm.merge_and_unload().state_dict()
    merged = state(tmp_path / "merged")
    assert merged["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 32, 32)
    for key, value in merged.items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6, msg=key)
    assert sorted(handed) == [(f"model.layers.0.mlp.experts.{p}", 4) for p in ("down_proj", "gate_up_proj")]
    # an error at an experts parameter's second expert stops the merge with it, the writer (handed the
    # parameter) not left waiting for the rest
    from loratool.errors import NonFiniteError
    from loratool.ops.merge import stream as merge_stream

    handed.clear()
    calls, merge_rows = [], merge_stream.merge_rows

    def failing(w, *args, **kwargs):  # type: ignore[no-untyped-def]
        if handed:
            calls.append(1)
            if len(calls) == 2:
                raise NonFiniteError("made up for the test", key="expert 1")
        return merge_rows(w, *args, **kwargs)

    monkeypatch.setattr(merge_stream, "merge_rows", failing)
    with pytest.raises(NonFiniteError, match="made up"):
        merge(tmp_path / "base", [tmp_path / "adapter"], output=tmp_path / "stopped", show_progress=False)
    assert not (tmp_path / "stopped").exists() and len(handed) == 1 and len(calls) == 2


def test_expert_adapters_fit_their_base_in_validate_and_the_registry(tmp_path: Path) -> None:
    from loratool.registry.ops import list_entries, register

    model = gpt_oss(tmp_path)
    expert_adapter(model, r=2, lora_alpha=4).save_pretrained(tmp_path / "adapter")
    report = validate(tmp_path / "adapter", base=tmp_path / "base")
    assert report.valid, report.problems
    register(tmp_path / "adapter", name="experts")
    assert [e.ref for e in list_entries(base=tmp_path / "base")] == ["experts@v1"]  # (E, in, out) as stored
    import transformers as tf

    torch.manual_seed(0)
    wider = tf.GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                            head_dim=8, layer_types=["full_attention"])  # fmt: skip
    tf.GptOssForCausalLM(wider).save_pretrained(tmp_path / "other")
    problems = {p.path for p in validate(tmp_path / "adapter", base=tmp_path / "other").problems}
    assert "base/model.layers.0.mlp.experts.gate_up_proj.0" in problems
    assert list_entries(base=tmp_path / "other") == []


def test_experts_stored_as_integers_are_refused_as_other_weights_are(tmp_path: Path, cli) -> None:
    """A 3-D experts parameter stored as integers (a quantized base whose config is lost) is refused by
    merge and named by validate --base, as a 2-D weight is: merge had rounded the experts' deltas into it."""
    from helpers import edit_tensors

    model = gpt_oss(tmp_path)
    expert_adapter(model, params=("mlp.experts.down_proj",)).save_pretrained(tmp_path / "adapter")
    key = "model.layers.0.mlp.experts.down_proj"
    edit_tensors(tmp_path / "base" / "model.safetensors", lambda ts: ts.update({key: ts[key].to(torch.int8)}))
    problems = {p.path: p.message for p in validate(tmp_path / "adapter", base=tmp_path / "base").problems}
    assert problems and all(
        path.startswith(f"base/{key}.") and "not floating point" in m for path, m in problems.items()
    )
    res = cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m")
    assert res.exit_code == 1 and "not floating point" in res.stderr and key in res.stderr
    assert not (tmp_path / "m").exists()


def test_expert_deltas_are_read_one_expert_at_a_time(tmp_path: Path) -> None:
    """extract's reader hands a 3-D parameter over as per-expert deltas: the same numbers and norm
    as the whole difference, and a NaN named with its side (bench_moe measures the memory)."""
    from safetensors.torch import save_file

    from loratool.errors import NonFiniteError
    from loratool.io.checkpoint import open_checkpoint
    from loratool.stream.deltas import DeltaReader, ExpertDeltas
    from loratool.stream.pipeline import BufferPool

    g = torch.Generator().manual_seed(11)
    base = torch.randn(6, 12, 10, generator=g).to(torch.bfloat16)
    ft = (base.float() + 0.01 * torch.randn(6, 12, 10, generator=g)).to(torch.bfloat16)
    ft[2] = base[2]  # an expert left alone
    for name, t in (("b", base), ("f", ft)):
        (tmp_path / name).mkdir()
        save_file({"experts.gate_up_proj": t}, str(tmp_path / name / "model.safetensors"))
    with open_checkpoint(tmp_path / "b") as b, open_checkpoint(tmp_path / "f") as f:
        d = DeltaReader(b, f, torch.device("cpu"), BufferPool(), experts_apart=True)("experts.gate_up_proj")
        whole = ft.float() - base.float()
        assert isinstance(d.delta, ExpertDeltas) and d.delta.shape == whole.shape
        assert all(torch.equal(d.delta[e], whole[e]) for e in range(6)) and not d.delta[2].any()
        assert d.norm == pytest.approx(float(whole.norm()), rel=1e-6)
        plain = DeltaReader(b, f, torch.device("cpu"), BufferPool())("experts.gate_up_proj")
        assert isinstance(plain.delta, torch.Tensor) and torch.equal(plain.delta, whole)
    bad = ft.clone()
    bad[4, 3, 1] = float("nan")
    save_file({"experts.gate_up_proj": bad}, str(tmp_path / "f" / "model.safetensors"))
    with open_checkpoint(tmp_path / "b") as b, open_checkpoint(tmp_path / "f") as f:
        with pytest.raises(NonFiniteError, match="fine-tune holds NaN"):
            DeltaReader(b, f, torch.device("cpu"), BufferPool(), experts_apart=True)("experts.gate_up_proj")


def _moe_stored_apart(kind: str, tmp_path: Path):
    """A tiny MoE saved by transformers, which stores the experts apart on disk (fused in memory)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                  head_dim=8, tie_word_embeddings=False)  # fmt: skip
    if kind == "qwen3_moe":  # non-square experts: gate_up (E, 2*12, 32), down (E, 32, 12)
        config = tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=12, num_experts=4,
                                   num_experts_per_tok=2, **common)  # fmt: skip
        model = tf.Qwen3MoeForCausalLM(config).eval()
    else:
        config = tf.MixtralConfig(intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, **common)
        model = tf.MixtralForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "base")
    return type(model)


@pytest.mark.parametrize(("kind", "apart"), [("qwen3_moe", "mlp.experts.1.up_proj"),
                                             ("mixtral", "block_sparse_moe.experts.1.w3")])  # fmt: skip
def test_target_parameters_adapters_merge_into_experts_stored_apart_as_peft(tmp_path: Path, cli, kind, apart) -> None:
    """An adapter trained on transformers' fused experts merges into the checkpoint as published,
    one expert weight at a time (gate rows, then up rows, of gate_up_proj): loaded back, it equals
    PEFT's merge_and_unload; unmerge gives the base back."""
    cls = _moe_stored_apart(kind, tmp_path)
    assert f"model.layers.0.{apart}.weight" in state(tmp_path / "base")  # as published: experts apart
    model = cls.from_pretrained(tmp_path / "base").eval()
    pm = expert_adapter(model, r=2, lora_alpha=6, use_rslora=True, rank_pattern={"down_proj": 3})
    pm.save_pretrained(tmp_path / "adapter")
    assert validate(tmp_path / "adapter", base=tmp_path / "base").valid
    from loratool.registry.ops import list_entries, register

    register(tmp_path / "adapter", name="experts")
    assert [e.ref for e in list_entries(base=tmp_path / "base")] == ["experts@v1"]  # fits, from headers alone
    r = cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert set(state(tmp_path / "merged")) == set(state(tmp_path / "base"))  # the layout kept
    oracle = pm.merge_and_unload().state_dict()
    merged = cls.from_pretrained(tmp_path / "merged").state_dict()
    before = cls.from_pretrained(tmp_path / "base").state_dict()
    changed = 0
    for key, value in oracle.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)
        changed += "experts" in key and not torch.equal(value, before[key])
    assert changed == 4  # gate_up_proj and down_proj of both layers
    r = cli("unmerge", tmp_path / "merged", tmp_path / "adapter", "-o", tmp_path / "restored", "--quiet")
    assert r.exit_code == 0, r.stderr
    base, restored = state(tmp_path / "base"), state(tmp_path / "restored")
    for key, value in base.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=1e-6, msg=key)


def test_experts_stored_apart_that_do_not_fit_are_refused(tmp_path: Path, cli) -> None:
    cls = _moe_stored_apart("qwen3_moe", tmp_path)
    pm = expert_adapter(cls.from_pretrained(tmp_path / "base").eval(), r=2, lora_alpha=4)
    pm.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import save_file

    ts = state(tmp_path / "base")
    ts["model.layers.1.mlp.experts.2.up_proj.weight"] = torch.zeros(10, 32)  # not the 12 rows gate_up needs
    save_file(ts, str(tmp_path / "base" / "model.safetensors"))
    r = cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged")
    assert r.exit_code == 1 and "per-expert weights" in r.stderr and "experts.2" in r.stderr, r.stderr
    assert not (tmp_path / "merged").exists()
    problems = {p.path for p in validate(tmp_path / "adapter", base=tmp_path / "base").problems}
    assert problems == {"base/model.layers.1.mlp.experts.gate_up_proj.2"}
    from loratool.registry.ops import list_entries, register

    register(tmp_path / "adapter", name="experts")
    assert list_entries(base=tmp_path / "base") == []


def test_a_3d_experts_parameter_kept_whole_is_the_fine_tunes(tmp_path: Path) -> None:
    """--keep-full on an experts parameter that is not factored stores the fine-tune's tensor as is."""
    from safetensors.torch import load_file, save_file

    from loratool.ops.extract import extract

    g = torch.Generator().manual_seed(12)
    base = {"model.layers.0.mlp.experts.down_proj": torch.randn(4, 8, 6, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g)}  # fmt: skip
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    for name, ts in (("b", base), ("f", ft)):
        (tmp_path / name).mkdir()
        save_file(ts, str(tmp_path / name / "model.safetensors"))
    extract(tmp_path / "b", tmp_path / "f", output=tmp_path / "a", rank=2, exclude="experts", keep_full="experts",
            show_progress=False)  # fmt: skip
    stored = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    kept = [k for k in stored if "experts.down_proj" in k]
    assert len(kept) == 1 and torch.equal(stored[kept[0]], ft["model.layers.0.mlp.experts.down_proj"])


def test_reading_an_experts_adapter_for_its_headers_costs_torch_no_symbolic_shapes(tmp_path: Path) -> None:
    """validate, inspect and `validate --base` read an adapter lazily (factors as ``meta`` tensors). Each
    expert's factors were cloned from the stacked ones there, and cloning a strided meta view makes torch
    import its symbolic shapes (sympy: about 0.3 s, in every validate and merge of an experts adapter)."""
    from helpers import SYMBOLIC_SHAPES, main_in_a_process

    model = gpt_oss(tmp_path)
    expert_adapter(model, r=2, lora_alpha=4).save_pretrained(tmp_path / "adapter")
    out = main_in_a_process(["validate", tmp_path / "adapter"], ["inspect", tmp_path / "adapter"],
                            ["validate", tmp_path / "adapter", "--base", tmp_path / "base"],
                            then=SYMBOLIC_SHAPES)  # fmt: skip
    assert "symbolic shapes: False" in out, out


def test_a_runtime_without_expert_layers_names_each_parameter_once(tmp_path: Path) -> None:
    """`validate --runtime mlx` of an experts adapter: one problem for each 3-D parameter, not one for each
    of its experts (a gpt-oss-120b adapter on both parameters would list 9,216)."""
    model = gpt_oss(tmp_path)
    expert_adapter(model, r=2, lora_alpha=4).save_pretrained(tmp_path / "adapter")
    report = validate(tmp_path / "adapter", runtimes=["mlx"])
    experts = [p for p in report.problems if "3-D expert" in p.message]
    assert [p.path for p in experts] == ["runtime/mlx/model.layers.0.mlp.experts.down_proj",
                                         "runtime/mlx/model.layers.0.mlp.experts.gate_up_proj"]  # fmt: skip
    assert all("(4 experts adapted here)" in p.message for p in experts)
