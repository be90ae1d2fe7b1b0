"""A scaling that is not a finite number is refused wherever it can enter (PEFT's lora_alpha and
alpha_pattern, mlx-lm's scale, kohya's alpha tensor), by validate and by every command that would
compute with it: torch's addmm with alpha=nan behaves as alpha=1, so a NaN merged silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


def peft_with(tmp_path: Path, fixtures: Path, where: str) -> Path:
    out = tmp_path / f"peft-{where}"
    shutil.copytree(fixtures / "llama-peft-adapter", out)
    config = json.loads((out / "adapter_config.json").read_text())
    if where == "lora_alpha":
        config["lora_alpha"] = float("nan")
    else:
        config["alpha_pattern"] = {**(config.get("alpha_pattern") or {}), "q_proj": float("inf")}
    (out / "adapter_config.json").write_text(json.dumps(config))  # Python writes NaN/Infinity happily
    return out


def mlx_with_nan_scale(tmp_path: Path, fixtures: Path, cli) -> Path:
    out = tmp_path / "mlx"
    assert cli("convert", fixtures / "llama-peft-adapter", "--to", "mlx", "-o", out).exit_code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    config["lora_parameters"]["scale"] = float("nan")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def kohya_with_nan_alpha(tmp_path: Path, fixtures: Path) -> Path:
    out = tmp_path / "kohya.safetensors"
    ts = load_file(str(fixtures / "llama-kohya.safetensors"))
    key = next(k for k in ts if k.endswith(".alpha"))
    ts[key] = torch.tensor(float("nan"))
    save_file(ts, str(out))
    return out


@pytest.fixture(params=["lora_alpha", "alpha_pattern", "mlx_scale", "kohya_alpha"])
def bad_adapter(request, tmp_path: Path, fixtures: Path, cli) -> Path:
    if request.param == "mlx_scale":
        return mlx_with_nan_scale(tmp_path, fixtures, cli)
    if request.param == "kohya_alpha":
        return kohya_with_nan_alpha(tmp_path, fixtures)
    return peft_with(tmp_path, fixtures, request.param)


def test_validate_calls_a_non_finite_scaling_invalid(bad_adapter: Path, cli) -> None:
    r = cli("validate", bad_adapter, "--json")
    assert r.exit_code == 1, r.stdout + r.stderr
    json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"--json wrote {c}, which is not JSON"))
    assert "Traceback" not in r.stderr


def test_merge_and_convert_refuse_a_non_finite_scaling(bad_adapter: Path, tmp_path: Path, fixtures: Path, cli) -> None:
    for args in (
        ["merge", fixtures / "llama-base", bad_adapter, "-o", tmp_path / "merged"],
        ["unmerge", fixtures / "llama-base", bad_adapter, "-o", tmp_path / "merged"],
        ["convert", bad_adapter, "--to", "peft", "--base", fixtures / "llama-base", "-o", tmp_path / "converted"],
    ):
        r = cli(*args)
        assert r.exit_code == 1, (args[0], r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "loratool bug" not in r.stderr, r.stderr
        assert not (tmp_path / "merged").exists() and not (tmp_path / "converted").exists()


def test_the_message_names_the_module_and_the_fix(tmp_path: Path, fixtures: Path, cli) -> None:
    from loratool.errors import MetadataError
    from loratool.formats import load_adapter

    with pytest.raises(MetadataError) as e:  # refused as it is read, by the config's schema, naming the field
        load_adapter(peft_with(tmp_path, fixtures, "alpha_pattern"), lazy=True)
    assert "$.alpha_pattern.q_proj" in str(e.value) and "give a finite number" in str(e.value)
    with pytest.raises(MetadataError) as e:  # an mlx scale has no schema field: its modules are named
        load_adapter(mlx_with_nan_scale(tmp_path, fixtures, cli), lazy=True)
    assert "tensor 'model.layers.0.mlp.down_proj'" in str(e.value) and "to a finite number" in str(e.value)
