"""`loratool merge`/`unmerge` against PEFT's merge_and_unload and the formula W + s * scaling * B @ A."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import edit_tensors, file_digest, load_model, peft_adapter, tiny_model
from safetensors.torch import load_file

from loratool.formats import load_adapter
from loratool.io.checkpoint import open_checkpoint
from loratool.math.linalg import lora_delta, unit_of_rounding
from loratool.ops.merge import merge, unmerge
from loratool.ops.merge import stream as merge_stream

WEIGHTS = "adapter_model.safetensors"
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"], "gpt2": ["c_attn", "c_fc", "c_proj"]}


def state(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k) for k in ck.keys()}


def make(tmp_path: Path, kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, name: str = "adapter", **cfg):
    base_dir = tmp_path / f"base-{kind}-{str(dtype)[6:]}"
    if not base_dir.exists():
        tiny_model(kind, dtype=dtype).save_pretrained(base_dir)
    cfg.setdefault("r", 4)
    cfg.setdefault("alpha", 8)
    targets = cfg.pop("targets", TARGETS[kind])
    pm = peft_adapter(load_model(kind, base_dir, dtype), targets, seed=seed, **cfg)
    pm.save_pretrained(tmp_path / name)
    return base_dir, tmp_path / name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block", [None, 37], ids=["whole", "blocks-of-rows"])
def test_merge_equals_peft_merge_and_unload(
    tmp_path: Path, kind: str, dtype: torch.dtype, block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``block``: the CPU merge walks each weight in blocks of rows; 37 elements makes them ragged."""
    from peft import PeftModel

    if block is not None:
        monkeypatch.setattr(merge_stream, "BLOCK_ELEMENTS", block)
    base, adapter = make(tmp_path, kind, dtype, use_rslora=True, rank_pattern={"v_proj": 2, "c_fc": 2})
    merge(base, [adapter], output=tmp_path / "ours", show_progress=False)
    ours = state(tmp_path / "ours")
    peft = PeftModel.from_pretrained(load_model(kind, base, dtype), adapter).merge_and_unload().state_dict()
    changed = 0
    base_state = state(base)
    # The error bound of W + s * sum_k B_ik A_kj is set by the size of the operands, |W| + |s| *
    # sum_k |B_ik A_kj|, not by a result (or a delta) that may cancel. Blocks of rows sum the
    # rank-r products in another order than PEFT does, so only this bound is meaningful.
    operands = {k: w.double().abs() for k, w in base_state.items()}
    for path, m in load_adapter(adapter).modules.items():
        operands[path + ".weight"] += lora_delta(m.lora_A.abs(), m.lora_B.abs(), abs(m.scaling), m.kind).double()
    for k, v in ours.items():
        ref = peft[k]
        assert v.dtype == ref.dtype == dtype, k
        err = (v.double() - ref.double()).abs()
        scale = torch.maximum(operands[k], ref.double().abs())
        if dtype == torch.float32:
            assert float((err / scale.clamp_min(1e-30)).max()) <= 1e-6, k
        else:  # PEFT rounds the delta to bf16 before adding; we add in float32 and round once
            assert float((err / unit_of_rounding(scale, dtype)).max()) <= 1.0, k
        changed += not torch.equal(v, base_state[k])
    assert changed >= 6


def test_two_adapters_merge_to_the_sum(tmp_path: Path, cli) -> None:
    base, a1 = make(tmp_path, "llama", seed=1, name="a1")
    _, a2 = make(tmp_path, "llama", seed=2, name="a2", r=2, alpha=3)
    r = cli("merge", base, a1, f"{a2}:-0.5", "-o", tmp_path / "m", "-q", "--json")
    assert r.exit_code == 0, r.stderr
    got, w = state(tmp_path / "m"), state(base)
    expected = {k: v.clone() for k, v in w.items()}
    for path, scale in ((a1, 1.0), (a2, -0.5)):
        for mpath, m in load_adapter(path).modules.items():
            expected[mpath + ".weight"] += scale * lora_delta(m.lora_A, m.lora_B, m.scaling, m.kind)
    for k in w:
        assert torch.allclose(got[k], expected[k], rtol=1e-6, atol=1e-7), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_then_unmerge_returns_the_base(tmp_path: Path, dtype: torch.dtype) -> None:
    base, adapter = make(tmp_path, "llama", dtype)
    merge(base, [adapter], output=tmp_path / "m", show_progress=False)
    res = unmerge(tmp_path / "m", [adapter], output=tmp_path / "u", check=base, show_progress=False)
    w, u = state(base), state(tmp_path / "u")
    if dtype == torch.float32:
        for k in w:
            assert torch.allclose(u[k], w[k], rtol=1e-6, atol=1e-7), k
        assert res.check.relative_diff < 1e-6
    # one unit of rounding per element at most, measured and asserted
    assert res.check.max_rounding_units <= 1.0
    assert res.check.elements == sum(v.numel() for v in w.values())
    if dtype != torch.float32:
        assert res.check.elements_differing > 0  # bf16/fp16 round trips are not bit-exact: say so


def test_unmerge_max_units_makes_the_check_a_gate(tmp_path: Path, cli) -> None:
    """--max-units turns --check into a gate for pipelines: a round trip within it writes as before and names
    the tensor farthest from the base; one past it (an adapter taken out that was never merged) exits 1 with
    that tensor, writing nothing."""
    base, adapter = make(tmp_path, "llama", torch.bfloat16)
    _, other = make(tmp_path, "llama", torch.bfloat16, seed=5, name="other")
    merge(base, [adapter], output=tmp_path / "m", show_progress=False)
    r = cli("unmerge", tmp_path / "m", adapter, "-o", tmp_path / "u", "--check", base, "--max-units", "1", "--json")
    assert r.exit_code == 0, r.stderr
    check = json.loads(r.stdout)["check"]
    assert 0 < check["max_rounding_units"] <= 1
    w, m, u = state(base), state(tmp_path / "m"), state(tmp_path / "u")

    def units_of(k: str) -> float:  # the definition: in units of rounding at the larger of the base and merged values
        unit = unit_of_rounding(torch.maximum(w[k].abs(), m[k].abs()).double(), torch.bfloat16)
        return float(((u[k].double() - w[k].double()).abs() / unit).max())

    units = {k: units_of(k) for k in w if w[k].is_floating_point()}
    assert check["max_rounding_units"] == max(units.values()) == units[check["worst_tensor"]]  # it, or one as far

    r = cli("unmerge", tmp_path / "m", other, "-o", tmp_path / "u2", "--check", base, "--max-units", "1")
    assert r.exit_code == 1 and "more than --max-units 1" in r.stderr and "nothing was written" in r.stderr
    assert "model.layers." in r.stderr and not (tmp_path / "u2").exists()
    r = cli("unmerge", tmp_path / "m", adapter, "-o", tmp_path / "u3", "--max-units", "1")
    assert r.exit_code == 2 and "--max-units needs --check" in r.stderr and not (tmp_path / "u3").exists()


def test_sharded_input_gives_identically_sharded_output(tmp_path: Path, fixtures: Path) -> None:
    merge(fixtures / "llama-ft", [fixtures / "llama-peft-adapter"], output=tmp_path / "m", show_progress=False)
    src = json.loads((fixtures / "llama-ft" / "model.safetensors.index.json").read_text())
    out = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert out["weight_map"] == src["weight_map"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(
        p.name for p in (fixtures / "llama-ft").iterdir()
    )
    lora = load_file(str(fixtures / "llama-peft-adapter" / "adapter_model.safetensors"))
    adapted = {k.removeprefix("base_model.model.").replace(".lora_A", "") for k in lora if ".lora_A" in k}
    for shard in set(src["weight_map"].values()):
        names = list(load_file(str(tmp_path / "m" / shard)))
        before = list(load_file(str(fixtures / "llama-ft" / shard)))
        # the same tensors; those the merge leaves as they are first (the writer copies them while the rest
        # are computed), each group in the input's order
        assert names == [k for k in before if k not in adapted] + [k for k in before if k in adapted]
    assert any(k in adapted for k in src["weight_map"])
    assert (tmp_path / "m" / "config.json").read_text() == (fixtures / "llama-ft" / "config.json").read_text()


def test_a_shard_with_nothing_to_compute_is_written_first(tmp_path: Path, fixtures: Path, monkeypatch) -> None:
    """A shard the adapter does not reach is written first, while the others' results are computed (a
    head alone in the last shard was copied after the last result); its bytes and the merge's are as
    before."""
    from helpers import adapter_deltas
    from safetensors.torch import save_file

    from loratool.io.writer import SafetensorsStreamWriter

    lora = load_file(str(fixtures / "llama-peft-adapter" / "adapter_model.safetensors"))
    kept = {k: v for k, v in lora.items() if ".layers.0.self_attn." in k}  # all in the first shard, one scaling
    cfg = json.loads((fixtures / "llama-peft-adapter" / "adapter_config.json").read_text())
    modules = sorted({k.removeprefix("base_model.model.").split(".lora_")[0] for k in kept})
    cfg.update(rank_pattern={}, alpha_pattern={}, target_modules=modules)
    (tmp_path / "first").mkdir()
    save_file(kept, str(tmp_path / "first" / "adapter_model.safetensors"))
    (tmp_path / "first" / "adapter_config.json").write_text(json.dumps(cfg))
    opened: list[str] = []
    init = SafetensorsStreamWriter.__init__

    def recorded(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(path.name)
        init(self, path, *args, **kwargs)

    monkeypatch.setattr(SafetensorsStreamWriter, "__init__", recorded)
    merge(fixtures / "llama-ft", [tmp_path / "first"], output=tmp_path / "m", show_progress=False)
    assert opened == ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"]
    deltas = adapter_deltas(tmp_path / "first")
    for shard in opened:
        got, base = load_file(str(tmp_path / "m" / shard)), load_file(str(fixtures / "llama-ft" / shard))
        assert got.keys() == base.keys()
        for k, w in base.items():
            want = (w.double() + deltas[k]).to(w.dtype) if k in deltas else w
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6, msg=k)
    assert any(k in deltas for k in load_file(str(tmp_path / "m" / opened[1])))


def test_kohya_adapter_with_scale(tmp_path: Path, fixtures: Path) -> None:
    merge(
        fixtures / "llama-base",
        [(fixtures / "llama-kohya.safetensors", 0.5)],
        output=tmp_path / "m",
        show_progress=False,
    )
    got, w = state(tmp_path / "m"), state(fixtures / "llama-base")
    kohya = load_file(str(fixtures / "llama-kohya.safetensors"))
    key = "model.layers.1.mlp.gate_proj.weight"
    prefix = "lora_model_layers_1_mlp_gate_proj"
    up, down, alpha = kohya[f"{prefix}.lora_up.weight"], kohya[f"{prefix}.lora_down.weight"], kohya[f"{prefix}.alpha"]
    expected = w[key] + 0.5 * (alpha / 4) * (up @ down)
    assert torch.allclose(got[key], expected, rtol=1e-6, atol=1e-7)


def test_provenance_in_every_shard(tmp_path: Path, fixtures: Path) -> None:
    from loratool.metadata.provenance import decode

    def sha256_file(p: Path) -> str:  # the oracle: hashlib over the bytes, not loratool's mmap reader
        return hashlib.sha256(p.read_bytes()).hexdigest()

    merge(fixtures / "llama-ft", [fixtures / "llama-peft-adapter"], output=tmp_path / "m", show_progress=False)
    with open_checkpoint(tmp_path / "m") as ck:
        for meta in ck.metadata.values():
            rec = decode(meta)
            assert rec["operation"] == "merge"
            digests = {Path(i["path"]).name: i["sha256"] for i in rec["inputs"]}
            assert digests["model-00001-of-00002.safetensors"] == sha256_file(
                fixtures / "llama-ft" / "model-00001-of-00002.safetensors"
            )
            assert digests["adapter_model.safetensors"] == sha256_file(
                fixtures / "llama-peft-adapter" / "adapter_model.safetensors"
            )


# -- refusals: exit 1, a message, nothing written --------------------------------------------------------
def _edit_config(adapter: Path, **changes) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def _refused(cli, tmp_path: Path, args: list, message: str) -> None:
    before = file_digest(tmp_path)
    r = cli(*args, "-o", tmp_path / "out", "-q")
    assert r.exit_code == 1, r.stdout
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    assert file_digest(tmp_path) == before


def test_refuses_base_rewriting_adapters(tmp_path: Path, cli) -> None:
    base, adapter = make(tmp_path, "llama")
    _edit_config(adapter, init_lora_weights="pissa_niter_4")
    _refused(cli, tmp_path, ["merge", base, adapter], "rewritten base weight")


def test_refuses_to_unmerge_dora(tmp_path: Path, cli) -> None:
    base, adapter = make(tmp_path, "llama", use_dora=True)
    _refused(cli, tmp_path, ["unmerge", base, adapter], "DoRA adapters (use_dora) cannot be unmerged")


def test_refuses_adapter_for_another_model(tmp_path: Path, cli, fixtures: Path) -> None:
    _, adapter = make(tmp_path, "gpt2")
    _refused(cli, tmp_path, ["merge", fixtures / "llama-base", adapter], "Is this adapter for another model?")


def test_refuses_shape_mismatch(tmp_path: Path, cli) -> None:
    base, adapter = make(tmp_path, "llama")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(adapter / WEIGHTS, lambda ts: ts.__setitem__(key, torch.zeros(40, 4)))
    _refused(
        cli,
        tmp_path,
        ["merge", base, adapter],
        "tensor 'model.layers.0.self_attn.q_proj.weight': the adapter's linear module does not fit",
    )


def test_refuses_non_finite_factors_naming_the_adapter_tensor(tmp_path: Path, cli) -> None:
    base, adapter = make(tmp_path, "llama")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    edit_tensors(adapter / WEIGHTS, lambda ts: ts[key].__setitem__((0, 0), float("inf")))
    for command in ("merge", "unmerge"):
        _refused(cli, tmp_path, [command, base, adapter],
                 "tensor 'model.layers.1.mlp.down_proj.lora_A': holds NaN or Inf")  # fmt: skip


def test_non_finite_base_is_blamed_on_the_base(tmp_path: Path, cli) -> None:
    base, adapter = make(tmp_path, "llama")
    edit_tensors(
        base / "model.safetensors",
        lambda ts: ts["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("nan")),
    )
    _refused(cli, tmp_path, ["merge", base, adapter],
             "tensor 'model.layers.1.mlp.down_proj.weight': the base checkpoint holds NaN or Inf")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)  # the compiled check, torch's
def test_non_finite_check_base_is_refused(tmp_path: Path, cli, dtype: torch.dtype) -> None:
    """A NaN in --check BASE made the relative difference NaN, the largest one pass it by, and --json
    fail to serialize; it is bad input, named."""
    base, adapter = make(tmp_path, "llama", dtype)
    merge(base, [adapter], output=tmp_path / "m", show_progress=False)
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    edit_tensors(
        reference / "model.safetensors",
        lambda ts: ts["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("nan")),
    )
    for json_flag in ([], ["--json"]):
        _refused(cli, tmp_path, ["unmerge", tmp_path / "m", adapter, "--check", reference, *json_flag],
                 "tensor 'model.layers.1.mlp.down_proj.weight': --check BASE holds NaN or Inf")  # fmt: skip


def test_all_linear_leaves_out_the_output_layer_as_peft_does(tmp_path: Path, cli) -> None:
    """target_modules "all-linear" is every linear layer but the output layer in PEFT: an lm_head LoRA
    in such an adapter does not load there (PEFT's merge leaves lm_head as it was), and loratool merged it."""
    from peft import PeftModel

    base, adapter = make(tmp_path, "llama", targets=["q_proj", "lm_head"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": "all-linear"}))
    peft = PeftModel.from_pretrained(load_model("llama", base), adapter).merge_and_unload().state_dict()
    assert torch.equal(peft["lm_head.weight"], state(base)["lm_head.weight"])
    _refused(cli, tmp_path, ["merge", base, adapter], "tensors/lm_head: has LoRA weights but target_modules does not")


def test_layers_to_transform_narrows_suffixes_not_whole_names_as_peft_does(tmp_path: Path) -> None:
    """PEFT applies layers_to_transform to target names matched as suffixes; a target that names a module
    whole (lm_head, which has no layer) is adapted anyway, and its factors merge."""
    from peft import PeftModel

    base, adapter = make(tmp_path, "llama", targets=["q_proj", "lm_head"], layers_to_transform=[0])
    assert sorted(load_adapter(adapter).modules) == ["lm_head", "model.layers.0.self_attn.q_proj"]
    merge(base, [adapter], output=tmp_path / "ours", show_progress=False)
    peft = PeftModel.from_pretrained(load_model("llama", base), adapter).merge_and_unload().state_dict()
    ours = state(tmp_path / "ours")
    assert not torch.equal(ours["lm_head.weight"], state(base)["lm_head.weight"])
    for k, v in ours.items():
        assert torch.allclose(v, peft[k], rtol=1e-6, atol=1e-7), k


def test_an_integer_base_weight_is_refused(tmp_path: Path, cli) -> None:
    """A LoRA module on an integer weight (no quantization_config to say how to read it) was merged and
    cast back to int32, which rounded the whole delta away."""
    base, adapter = make(tmp_path, "llama")
    key = "model.layers.1.mlp.down_proj.weight"
    edit_tensors(base / "model.safetensors", lambda ts: ts.__setitem__(key, (ts[key] * 100).to(torch.int32)))
    for command in ("merge", "unmerge"):
        _refused(cli, tmp_path, [command, base, adapter], f"tensor '{key}': the base weight is I32, not floating point")


def test_overflow_from_a_huge_scale_says_so(tmp_path: Path, cli) -> None:
    """scaling * B @ A reaches ~200 here, so scale 1e37 overflows float32 in any order of evaluation
    (at scale 1e38 and ~0.2, the true sums are finite: only the CPU's order of the product overflowed)."""
    base, adapter = make(tmp_path, "llama")
    edit_tensors(adapter / WEIGHTS, lambda ts: ts.update({k: v * 1000 for k, v in ts.items() if "lora_B" in k}))
    _refused(cli, tmp_path, ["merge", base, f"{adapter}:1e37"], "adding the adapter overflowed float32")


@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_a_scale_whose_factor_float32_cannot_hold_is_refused_by_module(tmp_path: Path, cli, command: str) -> None:
    """scale * scaling multiplies each product in float32: past its range (a finite 1e39 here) the
    merge said "This is a loratool bug" (torch refused the factor); now the module is named, before any work."""
    base, adapter = make(tmp_path, "llama")
    _refused(cli, tmp_path, [command, base, f"{adapter}:1e39"], "times this module's scaling")
    _refused(cli, tmp_path, [command, base, f"{adapter}:-1e39"], "is past float32's range (+-3.40282e+38)")


def test_refuses_float16_overflow(tmp_path: Path, cli) -> None:
    """Finite in float32 but past float16's largest value: written as Inf, so refused."""
    base, adapter = make(tmp_path, "llama", dtype=torch.float16)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    edit_tensors(adapter / WEIGHTS, lambda ts: ts[key].__setitem__((0, 0), 60000.0))
    _refused(cli, tmp_path, ["merge", base, f"{adapter}:100"],
             "tensor 'model.layers.1.mlp.down_proj.weight': the merged weight does not fit float16")  # fmt: skip


def test_a_tensor_written_as_read_that_float16_cannot_hold_is_refused(tmp_path: Path, cli) -> None:
    """--dtype float16 casts the tensors no adapter touches too: one holding a finite value past float16's
    range (here the final norm) would be written as Inf, so it is refused by name (merge and unmerge had
    written it); bfloat16 holds it."""
    from safetensors.torch import load_file

    base, adapter = make(tmp_path, "llama")
    edit_tensors(base / "model.safetensors", lambda ts: ts["model.norm.weight"].__setitem__(0, 1e5))
    for command in ("merge", "unmerge"):
        _refused(cli, tmp_path, [command, base, adapter, "--dtype", "float16"],
                 "tensor 'model.norm.weight': holds 100000, beyond float16's range")  # fmt: skip
    res = cli("merge", base, adapter, "--dtype", "bfloat16", "-o", tmp_path / "bf16", "-q")
    norm = load_file(str(tmp_path / "bf16" / "model.safetensors"))["model.norm.weight"]
    assert res.exit_code == 0 and float(norm[0]) == float(torch.tensor(1e5).to(torch.bfloat16))  # 99840


def test_failure_midway_leaves_no_output_and_inputs_intact(tmp_path: Path, fixtures: Path, monkeypatch) -> None:
    from loratool.io import writer as output

    written = []
    real = output.SafetensorsStreamWriter.write

    def failing(self, name, tensor):
        if len(written) == 5:
            raise OSError("No space left on device (simulated)")
        written.append(name)
        return real(self, name, tensor)

    monkeypatch.setattr(output.SafetensorsStreamWriter, "write", failing)
    before = file_digest(fixtures)
    with pytest.raises(OSError, match="simulated"):
        merge(fixtures / "llama-ft", [fixtures / "llama-peft-adapter"], output=tmp_path / "m", show_progress=False)
    assert list(tmp_path.iterdir()) == []
    assert file_digest(fixtures) == before


def test_output_equal_to_input_is_refused(tmp_path: Path, cli) -> None:
    base, adapter = make(tmp_path, "llama")
    r = cli("merge", base, adapter, "-o", base, "--force")
    assert r.exit_code == 1 and "the output would replace the input" in r.stderr


@pytest.mark.parametrize(
    "kind, config",
    [("gpt2", {"lora_bias": True}), ("llama", {"modules_to_save": ["norm"]})],
    ids=["lora_bias", "modules_to_save"],
)
def test_biases_and_whole_modules_merge_as_peft_does(tmp_path: Path, kind: str, config: dict) -> None:
    from peft import PeftModel

    base, adapter = make(tmp_path, kind, **config)

    def give_values(ts: dict[str, torch.Tensor]) -> None:
        g = torch.Generator().manual_seed(1)
        for k in ts:
            if k == "base_model.model.model.norm.weight":  # give the saved module a value of its own
                ts[k] = ts[k] + 0.5
            elif k.endswith("lora_B.bias"):  # PEFT starts lora_B.bias at zero
                ts[k] = torch.randn(ts[k].shape, generator=g) * 0.1

    edit_tensors(adapter / WEIGHTS, give_values)
    merge(base, [adapter], output=tmp_path / "ours", show_progress=False)
    ours = state(tmp_path / "ours")
    peft = PeftModel.from_pretrained(load_model(kind, base), adapter).merge_and_unload().state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], state(base)[k])]
    assert any(k.endswith(".bias") for k in changed) or "model.norm.weight" in changed
    for k, v in ours.items():
        assert torch.allclose(v, peft[k], rtol=1e-6, atol=1e-7), k


def test_a_float32_modules_to_save_tensor_merges_into_a_bf16_base_as_peft_loads_it(tmp_path: Path) -> None:
    """PEFT saves modules_to_save as trained (float32 here); loaded into a bfloat16 model each is
    cast to the parameter's dtype. The merge stopped with "does not match the declared layout
    (expected [32] BF16, got [32] F32)" (a merge/unmerge round-trip sweep found it); now it writes
    what PEFT's merge_and_unload gives, in the base's dtype."""
    from peft import PeftModel

    base = tmp_path / "base"
    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(base)
    pm = peft_adapter(load_model("llama", base), ["q_proj"], r=2, alpha=4, modules_to_save=["norm"])
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.01)  # off the base's values, float32 (the model was loaded as float32)
    pm.save_pretrained(tmp_path / "adapter")
    assert load_file(str(tmp_path / "adapter" / WEIGHTS))["base_model.model.model.norm.weight"].dtype == torch.float32
    merge(base, [tmp_path / "adapter"], output=tmp_path / "ours", show_progress=False)
    ours = state(tmp_path / "ours")
    peft = PeftModel.from_pretrained(load_model("llama", base, torch.bfloat16), tmp_path / "adapter")
    want = peft.merge_and_unload().state_dict()
    assert all(ours[k].dtype == torch.bfloat16 for k in ours)
    norms = [k for k in ours if "norm" in k]
    assert norms and all(torch.equal(ours[k], want[k]) for k in norms), norms
    assert not torch.equal(ours["model.norm.weight"], state(base)["model.norm.weight"])
    # into --dtype float32 the trained values stay as trained, as PEFT's merge into a float32 model keeps them
    merge(base, [tmp_path / "adapter"], output=tmp_path / "f32", dtype="float32", show_progress=False)
    trained = load_file(str(tmp_path / "adapter" / WEIGHTS))["base_model.model.model.norm.weight"]
    assert torch.equal(state(tmp_path / "f32")["model.norm.weight"], trained)


@pytest.mark.parametrize("kind, flag", [("llama", True), ("gpt2", False)])
def test_fan_in_fan_out_goes_by_the_layer_as_in_peft(tmp_path: Path, kind: str, flag: bool) -> None:
    """PEFT sets fan_in_fan_out by the layer's class (False for nn.Linear, True for GPT-2's Conv1D),
    whatever adapter_config.json says; a Llama adapter saying True was merged transposed into its
    square weights (q_proj, o_proj), silently unlike PEFT's merge."""
    from peft import PeftModel

    base, adapter = make(tmp_path, kind)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": flag}))
    merge(base, [adapter], output=tmp_path / "ours", show_progress=False)
    ours = state(tmp_path / "ours")
    with warnings.catch_warnings():  # PEFT says it overrides the flag
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(load_model(kind, base), adapter).merge_and_unload().state_dict()
    square = [k for k, v in ours.items() if v.dim() == 2 and v.shape[0] == v.shape[1] and "emb" not in k]
    assert square and any(not torch.equal(ours[k], state(base)[k]) for k in square)
    for k, v in ours.items():
        assert torch.allclose(v, peft[k], rtol=1e-6, atol=1e-7), k


@pytest.mark.parametrize("kind, flag", [("llama", "--fan-in-fan-out"), ("gpt2", "--no-fan-in-fan-out")])
def test_a_fan_in_fan_out_option_that_contradicts_the_model_is_refused(tmp_path: Path, fixtures: Path, cli,
                                                                        kind: str, flag: str) -> None:  # fmt: skip
    """PEFT goes by the layer's class: `extract --no-fan-in-fan-out` of GPT-2 wrote an adapter PEFT
    could not load (and would read transposed on a square weight), `merge --fan-in-fan-out` into a
    Llama added transposed deltas to its square weights. Refused, naming the model type; where
    config.json has no model_type the option decides, and the adapter is the one the model's own
    convention gives."""
    base, adapter = make(tmp_path / "m", kind)
    for command in ("merge", "unmerge"):
        _refused(cli, tmp_path, [command, base, adapter, flag], f"{flag} contradicts config.json: a {kind} model")
    pair = [fixtures / f"{kind}-base", fixtures / f"{kind}-ft"]
    _refused(cli, tmp_path, ["extract", *pair, "-r", "4", flag], f"{flag} contradicts config.json")
    for p, folder in zip(pair, ("b", "f")):  # the same pair with no model_type: the option is the only word
        shutil.copytree(p, tmp_path / folder)
        config = json.loads((tmp_path / folder / "config.json").read_text())
        config.pop("model_type")
        (tmp_path / folder / "config.json").write_text(json.dumps(config))
    right = "--no-fan-in-fan-out" if flag == "--fan-in-fan-out" else "--fan-in-fan-out"
    assert cli("extract", *pair, "-r", "4", "-o", tmp_path / "want", "-q").exit_code == 0
    assert cli("extract", tmp_path / "b", tmp_path / "f", "-r", "4", right, "-o", tmp_path / "got", "-q").exit_code == 0
    want, got = (load_file(str(tmp_path / n / WEIGHTS)) for n in ("want", "got"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_merge_equals_peft(tmp_path: Path, kind: str) -> None:
    from peft import PeftModel

    targets = ["q_proj", "v_proj", "down_proj", "lm_head"] if kind == "llama" else ["c_attn", "c_fc"]
    base, adapter = make(tmp_path, kind, use_dora=True, targets=targets)

    def move_magnitudes(ts: dict[str, torch.Tensor]) -> None:  # off their initial norms, so the rescaling shows
        g = torch.Generator().manual_seed(3)
        for k in ts:
            if "lora_magnitude_vector" in k:
                ts[k] = ts[k] * (1 + 0.1 * torch.rand(ts[k].shape, generator=g))

    edit_tensors(adapter / WEIGHTS, move_magnitudes)
    merge(base, [adapter], output=tmp_path / "ours", show_progress=False)
    ours = state(tmp_path / "ours")
    peft = PeftModel.from_pretrained(load_model(kind, base), adapter).merge_and_unload().state_dict()
    changed = 0
    for k, v in ours.items():
        assert torch.allclose(v, peft[k], rtol=1e-5, atol=1e-6), (k, float((v - peft[k]).abs().max()))
        changed += not torch.equal(v, state(base)[k])
    assert changed >= 4


def test_dora_refuses_a_scale_and_company(tmp_path: Path, cli) -> None:
    base, dora = make(tmp_path, "llama", use_dora=True, name="dora", targets=["q_proj"])
    _, other = make(tmp_path, "llama", name="other", seed=2)
    _refused(cli, tmp_path, ["merge", base, f"{dora}:0.5"], "a DoRA adapter merges at scale 1 only (got 0.5)")
    _refused(cli, tmp_path, ["merge", base, dora, other], "a DoRA module and another adapter change this weight")


def test_a_replacement_has_no_scale(tmp_path: Path, cli) -> None:
    """modules_to_save holds trained tensors, not deltas: at adapter:0.5 (or a combine weight of 0.5)
    the LoRA was scaled and the replacement written in full, silently. Refused now; PEFT's saved base
    layer of a LoRA'd embedding is no replacement, and still merges at any scale."""
    base, adapter = make(tmp_path, "llama", targets=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    for args in (["merge", base, f"{adapter}:0.5", "-o", tmp_path / "out"],
                 ["combine", f"{adapter}:0.5", "-o", tmp_path / "out"]):  # fmt: skip
        r = cli(*args)
        assert r.exit_code == 1 and "Traceback" not in r.stderr, r.output
        assert "replaces 'lm_head.weight' whole (modules_to_save)" in r.stderr and not (tmp_path / "out").exists()
    assert cli("merge", base, adapter, "-o", tmp_path / "one").exit_code == 0
    _, embedding = make(tmp_path, "llama", targets=["q_proj", "embed_tokens"], name="embedding")
    assert "model.embed_tokens.weight" in load_adapter(embedding).whole  # PEFT saved the base layer
    assert cli("merge", base, f"{embedding}:0.5", "-o", tmp_path / "half").exit_code == 0
    full = cli("merge", base, embedding, "-o", tmp_path / "full")
    assert full.exit_code == 0
    before, half, whole = state(base), state(tmp_path / "half"), state(tmp_path / "full")
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(half[key] - before[key], 0.5 * (whole[key] - before[key]), rtol=1e-5, atol=1e-6)


def test_an_adapter_at_scale_0_changes_nothing_and_says_so(tmp_path: Path, cli) -> None:
    """adapter:0 was reported as changing the tensors it computed (tensors_changed 6 of a no-op)."""
    base, adapter = make(tmp_path, "llama")
    r = cli("merge", base, f"{adapter}:0", "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["tensors_changed"] == 0 and any("scale 0 adds nothing" in w for w in result["warnings"])
    assert all(torch.equal(t, state(base)[k]) for k, t in state(tmp_path / "out").items())
    assert cli("merge", base, f"{adapter}:0", "no-such-adapter", "-o", tmp_path / "x").exit_code == 1
