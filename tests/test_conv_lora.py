"""Convolution LoRA (PEFT's Conv2d layout, kohya's LoCon) is refused by name, as #33 item 2 found
it was not: "lora_A and lora_B do not share a rank" (they do; the factors are 4-D), and kohya conv
factors flattened to 2-D and written as a PEFT adapter that PEFT then refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratool.cli import cli

peft = pytest.importorskip("peft")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.proj = torch.nn.Linear(8, 8)


@pytest.fixture
def conv_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = Net()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    config = peft.LoraConfig(target_modules=["conv", "proj"], r=2, lora_alpha=4, init_lora_weights=False)
    peft.get_peft_model(net, config).save_pretrained(tmp_path / "adapter")
    kohya = {"lora_conv.lora_down.weight": torch.randn(2, 4, 3, 3), "lora_conv.lora_up.weight": torch.randn(8, 2, 1, 1),
             "lora_conv.alpha": torch.tensor(2.0)}  # fmt: skip
    save_file(kohya, str(tmp_path / "locon.safetensors"))
    return tmp_path / "base", tmp_path / "adapter", tmp_path / "locon.safetensors"


@pytest.mark.parametrize("command", ["inspect", "validate", "validate-base", "merge", "convert-kohya", "merge-kohya"])
def test_conv_lora_is_refused_by_name(tmp_path: Path, conv_pair, command: str) -> None:  # type: ignore[no-untyped-def]
    base, adapter, locon = conv_pair
    out = tmp_path / "out"
    args = {
        "inspect": ["inspect", str(adapter)],
        "validate": ["validate", str(adapter)],
        "validate-base": ["validate", str(adapter), "--base", str(base)],
        "merge": ["merge", str(base), str(adapter), "-o", str(out)],
        "convert-kohya": ["convert", str(locon), "--to", "peft", "--base", str(base), "-o", str(out)],
        "merge-kohya": ["merge", str(base), str(locon), "-o", str(out)],
    }[command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "a convolution LoRA (4-D factors" in result.output and "Traceback" not in result.output
    assert "do not share a rank" not in result.output and not out.exists()


@pytest.mark.parametrize("bias_changed", [False, True])
def test_keep_full_stores_what_peft_needs_to_load_a_kept_module(tmp_path: Path, bias_changed: bool) -> None:
    """A conv weight kept whole goes with its bias (unchanged or not): PEFT's modules_to_save loads
    every parameter of the module, and crashed on the weight alone (KeyError ... conv.bias)."""
    from peft import PeftModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base_net, ft_net = Net(), Net()
    ft_net.load_state_dict(base_net.state_dict())
    with torch.no_grad():
        ft_net.conv.weight.add_(0.1 * torch.randn_like(ft_net.conv.weight))
        ft_net.proj.weight.add_(torch.randn(8, 2) @ torch.randn(2, 8))  # rank 2: a LoRA module beside the kept one
        if bias_changed:
            ft_net.conv.bias.add_(0.5)
    for name, net in (("base", base_net), ("ft", ft_net)):
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / name / "model.safetensors"))
    args = ["extract", str(tmp_path / "base"), str(tmp_path / "ft"), "-r", "2", "--keep-full", r"^conv\.",
            "-o", str(tmp_path / "a"), "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_net), tmp_path / "a")
    x = torch.randn(1, 4, 5, 5)
    y = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.base_model.model.conv(x), ft_net.conv(x))
        torch.testing.assert_close(loaded.base_model.model.proj(y), ft_net.proj(y), rtol=1e-4, atol=1e-4)
