"""Vision-language checkpoints, whose tensor names transformers renames on load (#33 item 1).

On disk Qwen2-VL holds ``model.layers.0...`` and ``visual...``, LLaVA and Gemma 3
``language_model.model.layers.0...``, ``vision_tower...`` and ``multi_modal_projector...``; the
loaded model (and so every PEFT adapter) names them ``model.language_model.layers.0...``,
``model.visual...``, ``model.vision_tower...``. loratool reads such checkpoints under the model's
names (arch.LIVE_NAMES) wherever names meet, and refuses a family whose renaming it does not know.
Oracles: transformers' own models (their state dicts) and PEFT's merge_and_unload, on tiny models
built from the config classes, with adapters on the language model and the vision tower."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import file_digest, peft_adapter

from loratool import arch
from loratool.cli import cli

tf = pytest.importorskip("transformers")
pytest.importorskip("peft")


def qwen2_vl(version: str = "2"):  # type: ignore[no-untyped-def]
    rope = {"type": "mrope", "mrope_section": [1, 1, 2]}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, rope_scaling=rope)  # fmt: skip
    if version == "2":
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
                      spatial_merge_size=1, temporal_patch_size=1, in_channels=3)  # fmt: skip
        return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(text_config=text, vision_config=vision))
    vision = dict(depth=1, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, in_channels=3, fullatt_block_indexes=[0],
                  window_size=4)  # fmt: skip
    return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def llava():  # type: ignore[no-untyped-def]
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128)  # fmt: skip
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=8, patch_size=4)  # fmt: skip
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(text_config=text, vision_config=vision, image_token_index=3))


def gemma3():  # type: ignore[no-untyped-def]
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, head_dim=8)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=8,
                  patch_size=4)  # fmt: skip
    return tf.Gemma3ForConditionalGeneration(
        tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    )


def llama4():  # type: ignore[no-untyped-def]
    text = dict(hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=8, num_local_experts=2,
                interleave_moe_layer_step=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=8,
                  patch_size=4, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)  # fmt: skip
    return tf.Llama4ForConditionalGeneration(tf.Llama4Config(text_config=text, vision_config=vision))


# family -> (the model, LoRA targets on both the language model and the vision tower)
FAMILIES: dict[str, tuple[Callable[[], torch.nn.Module], list[str]]] = {
    "qwen2_vl": (qwen2_vl, ["q_proj", "v_proj", "qkv", "fc1"]),
    "qwen2_5_vl": (lambda: qwen2_vl("2.5"), ["q_proj", "v_proj", "qkv", "down_proj"]),
    "llava": (llava, ["q_proj", "v_proj", "fc1", "linear_1"]),
    "gemma3": (gemma3, ["q_proj", "v_proj", "fc1"]),
    "llama4": (llama4, ["q_proj", "v_proj", "fc1"]),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    """(name, model, its folder as save_pretrained writes it, the LoRA targets)."""
    make, targets = FAMILIES[request.param]
    torch.manual_seed(0)
    model = make().eval()
    folder = tmp_path_factory.mktemp(request.param) / "base"
    model.save_pretrained(folder)
    return request.param, model, folder, targets


def on_disk(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def as_live(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rules = arch.live_name_rules(json.loads((folder / "config.json").read_text()))
    assert rules is not None
    return {arch.live_name(rules, k): v for k, v in tensors.items()}


def test_the_renaming_is_transformers_own(family) -> None:  # type: ignore[no-untyped-def]
    """Every tensor on disk, renamed by loratool's rules, is the model's tensor of that name (the
    live model may hold more: an output layer tied to the embedding is not saved)."""
    name, model, folder, _ = family
    live = model.state_dict()
    renamed = as_live(folder, on_disk(folder))
    assert set(renamed) <= set(live), sorted(set(renamed) - set(live))[:5]
    for key, tensor in renamed.items():
        assert torch.equal(tensor, live[key]), key
    missing = set(live) - set(renamed)
    assert missing <= {"lm_head.weight"}, sorted(missing)[:5]


def test_merge_and_unmerge_agree_with_peft(tmp_path: Path, family) -> None:  # type: ignore[no-untyped-def]
    name, model, folder, targets = family
    pm = peft_adapter(copy.deepcopy(model), targets, r=2, alpha=4, seed=1)
    pm.save_pretrained(tmp_path / "adapter")
    vision = [p for p in json.loads(_inspect(tmp_path / "adapter"))["modules"] if arch.is_vision_module(p["module"])]
    assert vision, "the adapter has modules on the vision side too"
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "adapter"), "--base", str(folder)])
    assert result.exit_code == 0, result.output
    before = file_digest(folder)
    result = CliRunner().invoke(cli, ["merge", str(folder), str(tmp_path / "adapter"), "-o", str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0, result.output
    merged = on_disk(tmp_path / "m")
    assert set(merged) == set(on_disk(folder))  # written under the names on disk, as the base was
    want = pm.merge_and_unload().state_dict()
    for key, tensor in as_live(folder, merged).items():
        torch.testing.assert_close(tensor, want[key], rtol=1e-5, atol=1e-6, msg=key)
    result = CliRunner().invoke(cli, ["unmerge", str(tmp_path / "m"), str(tmp_path / "adapter"), "-o",
                                      str(tmp_path / "u"), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    for key, tensor in on_disk(tmp_path / "u").items():
        torch.testing.assert_close(tensor, on_disk(folder)[key], rtol=0, atol=1e-6, msg=key)
    assert file_digest(folder) == before


def test_extract_writes_the_models_names_so_peft_applies_it(tmp_path: Path, family) -> None:  # type: ignore[no-untyped-def]
    """extract wrote an adapter named after the tensors on disk, which PEFT loaded as a no-op."""
    from peft import PeftModel

    name, model, folder, targets = family
    donor = peft_adapter(copy.deepcopy(model), targets, r=2, alpha=2, seed=2).merge_and_unload()
    ft = copy.deepcopy(model)
    ft.load_state_dict(donor.state_dict())
    ft.save_pretrained(tmp_path / "ft")
    result = CliRunner().invoke(cli, ["extract", str(folder), str(tmp_path / "ft"), "-r", "2", "-o",
                                      str(tmp_path / "a"), "-q", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    modules = [m["module"] for m in json.loads(result.output)["modules"]]
    assert modules and all(m in dict(model.named_modules()) for m in modules)
    assert any(arch.is_vision_module(m) for m in modules)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").merge_and_unload().state_dict()
    for key, tensor in ft.state_dict().items():
        torch.testing.assert_close(loaded[key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a")(input_ids=ids).logits
        torch.testing.assert_close(peft_logits, ft(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_registry_and_vllm_see_the_models_names(tmp_path: Path, family) -> None:  # type: ignore[no-untyped-def]
    name, model, folder, targets = family
    peft_adapter(copy.deepcopy(model), targets, r=2, alpha=4, seed=3).save_pretrained(tmp_path / "adapter")
    runner = CliRunner()
    assert runner.invoke(cli, ["registry", "add", str(tmp_path / "adapter"), "--name", name]).exit_code == 0
    listed = runner.invoke(cli, ["registry", "ls", "--base", str(folder), "--json"])
    assert listed.exit_code == 0 and name in listed.output, listed.output
    report = runner.invoke(cli, ["validate", str(tmp_path / "adapter"), "--runtime", "vllm", "--json"])
    assert report.exit_code == 1 and "not to vision towers" in report.output


def test_a_family_whose_renaming_is_unknown_is_refused_by_name(tmp_path: Path) -> None:
    """Not written under names PEFT would load as nothing: extract, merge, validate --base say why."""
    torch.manual_seed(0)
    model = qwen2_vl().eval()
    model.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config.update(model_type="future_vl", architectures=["FutureVLForConditionalGeneration"])
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    shutil.copytree(tmp_path / "base", tmp_path / "ft")
    peft_adapter(copy.deepcopy(model), ["q_proj"], r=2, alpha=4).save_pretrained(tmp_path / "adapter")
    runner = CliRunner()
    for args in (["extract", tmp_path / "base", tmp_path / "ft", "-r", "2", "-o", tmp_path / "x"],
                 ["merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "x"],
                 ["validate", tmp_path / "adapter", "--base", tmp_path / "base"]):  # fmt: skip
        result = runner.invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1, result.output
        assert "FutureVLForConditionalGeneration" in result.output and "Traceback" not in result.output
        assert not (tmp_path / "x").exists()


def _inspect(adapter: Path) -> str:
    result = CliRunner().invoke(cli, ["inspect", str(adapter), "--json"])
    assert result.exit_code == 0, result.output
    return result.output


def test_kohya_names_and_analyze_resolve_to_the_models_names(tmp_path: Path, family) -> None:  # type: ignore[no-untyped-def]
    """A kohya file from elsewhere (no recorded paths) names modules by underscores; with --base they
    become the model's module paths, which PEFT applies."""
    from loratool import analyze, load_adapter

    name, model, folder, targets = family
    pm = peft_adapter(copy.deepcopy(model), targets, r=2, alpha=4, seed=4)
    pm.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import save_file

    a = load_adapter(tmp_path / "adapter")
    kohya = {}
    for path, m in a.modules.items():
        prefix = "lora_" + path.replace(".", "_")
        kohya |= {f"{prefix}.lora_down.weight": m.lora_A, f"{prefix}.lora_up.weight": m.lora_B,
                  f"{prefix}.alpha": torch.tensor(m.alpha)}  # fmt: skip
    save_file(kohya, str(tmp_path / "k.safetensors"))
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "k.safetensors"), "--to", "peft", "--base",
                                      str(folder), "-o", str(tmp_path / "p"), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(load_adapter(tmp_path / "p").modules) == sorted(a.modules)
    r = analyze(tmp_path / "adapter", base=folder, show_progress=False)
    assert not r.warnings and all(m.amplification for m in r.modules)


def _tied(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A tiny vision-language model whose output layer is its input embedding (one parameter)."""
    torch.manual_seed(0)
    config = make().config
    config.tie_word_embeddings = True
    model = type(make())(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


@pytest.mark.parametrize("make", [gemma3, qwen2_vl], ids=["gemma3", "qwen2_vl"])
def test_a_tied_head_is_the_embedding_in_extract_merge_and_validate(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    """Gemma 3 and Qwen2.5-VL 3B tie their head to the embedding. A fine-tune that changed the embedding
    changed the head too: extract adds the head's LoRA, so PEFT gives the fine-tune's logits (it gave
    the base's head before), and merge adds that delta to the one matrix once. A LoRA on the head alone
    is refused by name, as for a text model (it was refused as an adapter for another model)."""
    from peft import PeftModel

    model = _tied(make)
    model.save_pretrained(tmp_path / "base")
    ft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if name.endswith(("embed_tokens.weight", "q_proj.weight")) and "language_model" in name:
                p += 0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
    ft.save_pretrained(tmp_path / "ft")
    runner = CliRunner()
    result = runner.invoke(cli, ["extract", str(tmp_path / "base"), str(tmp_path / "ft"), "-r", "2", "-o",
                                 str(tmp_path / "a"), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = ft(input_ids=ids).logits
        served = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a")(input_ids=ids).logits
        torch.testing.assert_close(served, want, rtol=1e-4, atol=1e-4)
        result = runner.invoke(cli, ["merge", str(tmp_path / "base"), str(tmp_path / "a"), "-o", str(tmp_path / "m"),
                                     "-q"])  # fmt: skip
        assert result.exit_code == 0, result.output
        merged = type(model).from_pretrained(tmp_path / "m").eval()(input_ids=ids).logits
        torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)

    peft_adapter(copy.deepcopy(model), ["q_proj", "lm_head"], r=2, alpha=4).save_pretrained(tmp_path / "head")
    for args in (["merge", tmp_path / "base", tmp_path / "head", "-o", tmp_path / "x"],
                 ["validate", tmp_path / "head", "--base", tmp_path / "base"]):  # fmt: skip
        result = runner.invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1, result.output
        assert "ties" in result.output and "to its input embedding" in result.output, result.output
        assert "another model" not in result.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("make", [gemma3, qwen2_vl, lambda: qwen2_vl("2.5"), llava, llama4],
                         ids=["gemma3", "qwen2_vl", "qwen2_5_vl", "llava", "llama4"])  # fmt: skip
@pytest.mark.parametrize("outer", [None, True, False])
@pytest.mark.parametrize("inner", [None, True, False])
def test_the_tie_is_read_as_transformers_reads_it(make, outer, inner) -> None:  # type: ignore[no-untyped-def]
    """config.json's tie, at the top or (pre-v5 saves) in text_config, or neither: transformers' own
    config class is the oracle."""
    data = make().config.to_dict()
    data.pop("tie_word_embeddings", None)
    data["text_config"].pop("tie_word_embeddings", None)
    if outer is not None:
        data["tie_word_embeddings"] = outer
    if inner is not None:
        data["text_config"]["tie_word_embeddings"] = inner
    loaded = tf.AutoConfig.for_model(**copy.deepcopy(data))
    assert arch.ties_word_embeddings(data) == bool(loaded.tie_word_embeddings), (data["model_type"], outer, inner)


def test_mlx_lm_is_refused_by_name(tmp_path: Path, family) -> None:  # type: ignore[no-untyped-def]
    """mlx-lm serves a vision-language model's language part under its checkpoint's names
    (``language_model.model...``): an adapter written under transformers' names loaded as an error
    ("not an adapter parameter") after convert and validate had passed it."""
    name, model, folder, targets = family
    peft_adapter(copy.deepcopy(model), targets, r=2, alpha=4, seed=5).save_pretrained(tmp_path / "adapter")
    for args in (["convert", tmp_path / "adapter", "--to", "mlx", "-o", tmp_path / "mlx"],
                 ["validate", tmp_path / "adapter", "--runtime", "mlx"]):  # fmt: skip
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1 and "a vision-language model's module" in result.output, result.output
    assert not (tmp_path / "mlx").exists()


@pytest.mark.parametrize("fmt", ["fp8-block", "int4-sym", "nvfp4-compressed"])
@pytest.mark.parametrize("make", [gemma3, qwen2_vl], ids=["gemma3", "qwen2_vl"])
def test_quantized_checkpoints_merge_extract_and_validate(tmp_path: Path, make, fmt: str) -> None:  # type: ignore[no-untyped-def]
    """FP8 and 4-bit vision-language checkpoints (RedHat's FP8-dynamic Qwen2.5-VL and Gemma 3, NVFP4
    and W4A16 ones) were refused. The renamed view lies over the packed one: a dequantized merge is
    PEFT's merge into the dequantized base, an in-place one keeps the layout and the adapter, and
    unmerge restores the base within the two roundings, and extract against the quantized base recovers
    the delta."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_fp8 import dequantized_state, fp8_checkpoint
    from test_lowbit import make_quantized

    from loratool.io.checkpoint import open_checkpoint
    from loratool.io.logical import model_view

    torch.manual_seed(0)
    model = make().eval()
    model.save_pretrained(tmp_path / "f32")
    if fmt == "fp8-block":
        fp8_checkpoint(tmp_path / "f32", tmp_path / "q", "block")
    else:
        make_quantized(tmp_path / "f32", tmp_path / "q", fmt)
    base = copy.deepcopy(model)
    if fmt == "fp8-block":  # the FP8 weights dequantized by the format's definition (test_fp8's reference)
        dequantized = as_live(
            tmp_path / "f32", {k: v.float() for k, v in dequantized_state(tmp_path / "q", "block").items()}
        )
    else:
        with open_checkpoint(tmp_path / "q") as ck:
            view = model_view(ck)  # the packed weights dequantized (held to the producer's in test_lowbit)
            dequantized = {k: view.get(k).float() for k in view.keys()}
    base.load_state_dict(dequantized, strict=False)
    peft_adapter(copy.deepcopy(base), ["q_proj", "v_proj", "down_proj"], r=2, alpha=4, seed=1).save_pretrained(
        tmp_path / "a"
    )
    want = PeftModel.from_pretrained(base, tmp_path / "a").merge_and_unload().state_dict()
    run("merge", tmp_path / "q", tmp_path / "a", "-o", tmp_path / "m32", "--dtype", "float32")
    got = as_live(tmp_path / "f32", on_disk(tmp_path / "m32"))
    adapted = [k for k in got if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]
    assert adapted
    for key in adapted:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5 * float(want[key].abs().max()), msg=key)
    rule = ["--rounding", "stochastic"]  # each element within a grid step of its target (subspace moves more)
    merged = json.loads(run("merge", tmp_path / "q", tmp_path / "a", "-o", tmp_path / "m", "--json", *rule))
    assert merged["quantization"]["kept"] > 0.9
    before, after = (
        load_file(str(tmp_path / "q" / "model.safetensors")),
        load_file(str(tmp_path / "m" / "model.safetensors")),
    )
    assert sorted(before) == sorted(after) and all(before[k].dtype == after[k].dtype for k in before)
    back = json.loads(run("unmerge", tmp_path / "m", tmp_path / "a", "-o", tmp_path / "u", "--check", tmp_path / "q",
                          "--json", *rule))  # fmt: skip
    assert back["check"]["max_rounding_units"] <= 2.0  # the merge's rounding and the unmerge's, each within a step
    run("validate", tmp_path / "a", "--base", tmp_path / "q")
    if fmt != "fp8-block":  # the mixed config names modules; which names its loaders match is not checked
        requantized = CliRunner().invoke(cli, ["merge", str(tmp_path / "q"), str(tmp_path / "a"), "--requantize",
                                               "fp8", "-o", str(tmp_path / "rq")])  # fmt: skip
        assert requantized.exit_code == 1 and "vision-language" in requantized.output and not (tmp_path / "rq").exists()
    extracted = json.loads(run("extract", tmp_path / "q", tmp_path / "m32", "-r", "2", "-o", tmp_path / "x", "--json"))
    assert max(m["relative_error"] for m in extracted["modules"]) < 1e-5


def run(*args: object) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout
