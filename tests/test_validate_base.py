"""`validate --base`: an adapter that matches nothing, or only part, of a model is invalid, by name."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loratool.formats import load_adapter, save_adapter
from loratool.ops.validate import validate


def test_an_adapter_fits_its_base(fixtures: Path, cli) -> None:
    for adapter in ("llama-peft-adapter", "llama-kohya.safetensors"):
        assert validate(fixtures / adapter, base=fixtures / "llama-base").valid
    res = cli("validate", fixtures / "llama-peft-adapter", "--base", fixtures / "llama-base", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["valid"]


def test_an_adapter_for_another_model_is_named(fixtures: Path, cli) -> None:
    report = validate(fixtures / "llama-peft-adapter", base=fixtures / "gpt2-base")
    messages = [str(p) for p in report.problems]
    assert "base: no module of the adapter fits" in messages[0] and "another model" in messages[0]
    assert len(messages) == 1 + len(load_adapter(fixtures / "llama-peft-adapter").modules)
    res = cli("validate", fixtures / "llama-peft-adapter", "--base", fixtures / "gpt2-base")
    assert res.exit_code == 1 and "model.layers.0.self_attn.q_proj" in res.output


def test_a_partial_match_and_wrong_shapes_are_each_named(tmp_path: Path, fixtures: Path) -> None:
    adapter = load_adapter(fixtures / "llama-peft-adapter")
    adapter.modules["model.layers.7.self_attn.q_proj"] = adapter.modules["model.layers.0.self_attn.q_proj"]
    wide = adapter.modules["model.layers.1.mlp.down_proj"]
    wide.lora_A = torch.zeros(wide.rank, 96)  # down_proj is (32, 64) in the base
    adapter.whole = {"lm_head.weight": torch.zeros(126, 32)}  # the base's vocabulary is 128 (a grown one fits)
    save_adapter(adapter, tmp_path / "a")
    problems = {p.path: p.message for p in validate(tmp_path / "a", base=fixtures / "llama-base").problems}
    assert "adapt nothing" in problems["base/model.layers.7.self_attn.q_proj"]
    assert "[32, 64]" in problems["base/model.layers.1.mlp.down_proj"]
    assert "vocabulary sizes differ" in problems["base/lm_head.weight"]
    assert "base" not in problems  # most modules fit


def test_a_base_weight_that_is_not_floating_point_is_named(tmp_path: Path, fixtures: Path, cli) -> None:
    """A base weight stored as integers or booleans (a quantized checkpoint whose config is lost) is invalid
    for the module that targets it, as merge refuses it (validate --base had called it valid)."""
    import shutil

    from helpers import edit_tensors

    key = "model.layers.0.self_attn.q_proj.weight"
    for dtype in (torch.int8, torch.bool):
        base = tmp_path / str(dtype)
        shutil.copytree(fixtures / "llama-base", base)
        edit_tensors(base / "model.safetensors", lambda ts, dtype=dtype: ts.update({key: ts[key].to(dtype)}))
        problems = {p.path: p.message for p in validate(fixtures / "llama-peft-adapter", base=base).problems}
        assert list(problems) == ["base/model.layers.0.self_attn.q_proj"], problems
        assert "not floating point" in problems["base/model.layers.0.self_attn.q_proj"]
        res = cli("merge", base, fixtures / "llama-peft-adapter", "-o", tmp_path / "m")
        assert res.exit_code == 1 and "not floating point" in res.stderr and not (tmp_path / "m").exists()


def test_a_base_quantized_in_a_way_loratool_does_not_read_is_named_once(fixtures: Path) -> None:
    """A bitsandbytes base (a QLoRA adapter's) is one problem naming its quantization, not a misfit for
    every module (its packed weights' shapes are not the model's: validate had called the adapter one
    for another model)."""
    report = validate(fixtures / "llama-peft-adapter", base=fixtures / "llama-bnb-like")
    assert [p.path for p in report.problems] == ["base"]
    assert "bitsandbytes" in report.problems[0].message and "another model" not in report.problems[0].message
    assert validate(fixtures / "llama-peft-adapter", base=fixtures / "llama-gptq-like").valid  # read, dequantized
