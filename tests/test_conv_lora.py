"""Conv2d LoRA (PEFT's Conv2d layout, kohya's LoCon), #33 item 2: the delta
``(B.flatten(1) @ A.flatten(1)).reshape(out, in, kh, kw)`` through inspect, validate, merge, unmerge,
combine, resize, convert and extract, each against PEFT itself. Conv1d and Conv3d LoRA stay refused
by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_deltas
from safetensors.torch import load_file, save_file

from loratool.cli import cli

peft = pytest.importorskip("peft")


class Net(torch.nn.Module):
    """A 3x3 and a 1x1 convolution and a linear layer, as a UNet block has them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.pointwise = torch.nn.Conv2d(8, 6, 1)
        self.proj = torch.nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pointwise(torch.relu(self.conv(x)))  # (n, 6, h, w)
        return self.proj(h.mean(dim=(2, 3)))


def save(net: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def run(*args: object) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if "--json" in args else {}


def peft_adapter(net: Net, out: Path, seed: int, **config: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    lora = peft.LoraConfig(target_modules=["conv", "pointwise", "proj"], init_lora_weights=False, **config)
    model = peft.get_peft_model(copy.deepcopy(net), lora)
    model.save_pretrained(out)
    return model


@pytest.fixture
def base(tmp_path: Path) -> tuple[Net, Path]:
    torch.manual_seed(0)
    net = Net()
    return net, save(net, tmp_path / "base")


def test_peft_conv_adapter_merges_and_unmerges_as_peft(tmp_path: Path, base) -> None:  # type: ignore[no-untyped-def]
    net, folder = base
    model = peft_adapter(net, tmp_path / "a", 1, r=2, lora_alpha=4, rank_pattern={"pointwise": 3})
    info = {m["module"]: m for m in run("inspect", tmp_path / "a", "--json")["modules"]}
    assert info["conv"]["kind"] == "conv2d" and info["conv"]["shape"] == [8, 4, 3, 3]
    assert info["pointwise"]["shape"] == [6, 8, 1, 1] and info["pointwise"]["rank"] == 3
    run("validate", tmp_path / "a", "--base", folder)
    run("merge", folder, tmp_path / "a", "-o", tmp_path / "merged", "-q")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = model.merge_and_unload().state_dict()
    for key, tensor in want.items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-6, atol=1e-6)
    assert not torch.equal(merged["conv.weight"], net.conv.weight)
    run("unmerge", tmp_path / "merged", tmp_path / "a", "-o", tmp_path / "restored", "-q")
    restored = load_file(str(tmp_path / "restored" / "model.safetensors"))
    for key, tensor in net.state_dict().items():
        torch.testing.assert_close(restored[key], tensor, rtol=0, atol=1e-6)


def test_kohya_locon_merges_and_converts_to_a_peft_adapter_peft_loads(tmp_path: Path, base) -> None:  # type: ignore[no-untyped-def]
    net, folder = base
    torch.manual_seed(2)
    down, up = torch.randn(2, 4, 3, 3), torch.randn(8, 2, 1, 1)
    save_file({"lora_unet_conv.lora_down.weight": down, "lora_unet_conv.lora_up.weight": up,
               "lora_unet_conv.alpha": torch.tensor(3.0)}, str(tmp_path / "locon.safetensors"))  # fmt: skip
    want = net.conv.weight + 1.5 * (up.flatten(1) @ down.flatten(1)).reshape(8, 4, 3, 3)  # alpha / r = 3 / 2
    run("merge", folder, tmp_path / "locon.safetensors", "-o", tmp_path / "merged", "-q")
    torch.testing.assert_close(load_file(str(tmp_path / "merged" / "model.safetensors"))["conv.weight"], want)
    run("convert", tmp_path / "locon.safetensors", "--to", "peft", "--base", folder, "-o", tmp_path / "p", "-q")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "p")
    torch.testing.assert_close(peft_deltas(loaded)["conv"].float(), want - net.conv.weight, rtol=1e-5, atol=1e-6)
    run("convert", tmp_path / "p", "--to", "kohya", "-o", tmp_path / "back.safetensors", "-q")
    back = {k.rsplit(".", 2)[-2]: v for k, v in load_file(str(tmp_path / "back.safetensors")).items() if "conv" in k}
    torch.testing.assert_close(back["lora_down"], down)
    torch.testing.assert_close(back["lora_up"], up)


def test_extract_a_conv_finetune_gives_peft_the_finetune(tmp_path: Path, base) -> None:  # type: ignore[no-untyped-def]
    net, folder = base
    ft = copy.deepcopy(net)
    torch.manual_seed(3)
    with torch.no_grad():  # rank-2 changes of the flattened kernels, (out, in * kh * kw)
        ft.conv.weight.add_((torch.randn(8, 2) @ torch.randn(2, 36)).reshape(8, 4, 3, 3) * 0.1)
        ft.pointwise.weight.add_((torch.randn(6, 2) @ torch.randn(2, 8)).reshape(6, 8, 1, 1) * 0.1)
        ft.proj.weight.add_(torch.randn(6, 2) @ torch.randn(2, 6) * 0.1)
    result = run("extract", folder, save(ft, tmp_path / "ft"), "-r", "2", "-o", tmp_path / "a", "--json", "-q")
    kinds = {m["module"]: (m["kind"], m["shape"]) for m in result["modules"]}
    assert kinds["conv"] == ("conv2d", [8, 4, 3, 3]) and kinds["pointwise"] == ("conv2d", [6, 8, 1, 1])
    assert max(m["relative_error"] for m in result["modules"]) < 1e-5
    run("validate", tmp_path / "a", "--base", folder)  # its provenance record included (kind conv2d)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "a")
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ft(x), rtol=1e-5, atol=1e-5)


def test_combine_and_resize_are_exact_on_conv_modules(tmp_path: Path, base) -> None:  # type: ignore[no-untyped-def]
    net, folder = base
    one = peft_deltas(peft_adapter(net, tmp_path / "a", 4, r=2, lora_alpha=4))
    two = peft_deltas(peft_adapter(net, tmp_path / "b", 5, r=2, lora_alpha=2))
    run("combine", tmp_path / "a", f"{tmp_path / 'b'}:-0.5", "--method", "svd", "-r", "4", "-o", tmp_path / "c", "-q")
    combined = peft_deltas(peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "c"))
    for module in ("conv", "pointwise", "proj"):
        torch.testing.assert_close(combined[module], one[module] - 0.5 * two[module], rtol=1e-5, atol=1e-6)
    run("resize", tmp_path / "a", "-r", "1", "-o", tmp_path / "r1", "-q")
    resized = peft_deltas(peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "r1"))
    flat = one["conv"].reshape(8, -1)  # the best rank-1 approximation of the flattened kernel
    u, s, vh = torch.linalg.svd(flat)
    torch.testing.assert_close(resized["conv"].reshape(8, -1), s[0] * u[:, :1] @ vh[:1], rtol=1e-5, atol=1e-6)


def test_runtimes_without_conv_lora_refuse_it_by_name(tmp_path: Path, base) -> None:  # type: ignore[no-untyped-def]
    net, folder = base
    peft_adapter(net, tmp_path / "a", 6, r=2, lora_alpha=4)
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "a"), "--to", "mlx", "-o", str(tmp_path / "m")])
    assert result.exit_code == 1 and "Conv2d" in result.output and not (tmp_path / "m").exists()
    report = CliRunner().invoke(cli, ["validate", str(tmp_path / "a"), "--runtime", "vllm", "--json"])
    assert report.exit_code == 1 and "Conv2d module(s)" in report.output


def test_conv1d_lora_is_refused_by_name(tmp_path: Path) -> None:
    """3-D factors (PEFT's Conv1d): named, never read as a matrix or as 'ranks that disagree'."""
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                            "target_modules": ["conv"]}))  # fmt: skip
    factors = {"base_model.model.conv.lora_A.weight": torch.randn(2, 4, 3),
               "base_model.model.conv.lora_B.weight": torch.randn(8, 2, 1)}  # fmt: skip
    save_file(factors, str(folder / "adapter_model.safetensors"))
    for args in (["inspect", str(folder)], ["validate", str(folder)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "Conv1d or Conv3d LoRA" in result.output, result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize("bias_changed", [False, True])
def test_keep_full_stores_what_peft_needs_to_load_a_kept_module(tmp_path: Path, bias_changed: bool) -> None:
    """A conv weight kept whole (left out of LoRA by --exclude) goes with its bias, unchanged or not:
    PEFT's modules_to_save loads every parameter of the module, and crashed on the weight alone
    (KeyError ... conv.bias)."""
    from peft import PeftModel

    torch.manual_seed(0)
    base_net, ft_net = Net(), Net()
    ft_net.load_state_dict(base_net.state_dict())
    with torch.no_grad():
        ft_net.conv.weight.add_(0.1 * torch.randn_like(ft_net.conv.weight))
        ft_net.proj.weight.add_(torch.randn(6, 2) @ torch.randn(2, 6))  # rank 2: a LoRA module beside the kept one
        if bias_changed:
            ft_net.conv.bias.add_(0.5)
    save(base_net, tmp_path / "base")
    save(ft_net, tmp_path / "ft")
    run("extract", tmp_path / "base", tmp_path / "ft", "-r", "2", "--exclude", r"^conv$", "--keep-full", r"^conv\.",
        "-o", tmp_path / "a", "-q")  # fmt: skip
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_net), tmp_path / "a")
    x = torch.randn(1, 4, 5, 5)
    y = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded.base_model.model.conv(x), ft_net.conv(x))
        torch.testing.assert_close(loaded.base_model.model.proj(y), ft_net.proj(y), rtol=1e-4, atol=1e-4)


def test_analyze_sees_a_conv_kernel_as_extract_factors_it(tmp_path: Path, base) -> None:  # type: ignore[no-untyped-def]
    from loratool import analyze, extract

    net, folder = base
    ft = copy.deepcopy(net)
    torch.manual_seed(7)
    with torch.no_grad():
        ft.conv.weight.add_(0.1 * torch.randn_like(ft.conv.weight))
    save(ft, tmp_path / "ft")
    spectrum = analyze(folder, tmp_path / "ft", top_k=8, show_progress=False).modules
    factors = extract(folder, tmp_path / "ft", output=tmp_path / "a", rank=4, show_progress=False).report
    assert [(m.module, m.kind, m.shape) for m in spectrum] == [("conv", "conv2d", (8, 4, 3, 3))]
    s = torch.linalg.svdvals((ft.conv.weight - net.conv.weight).reshape(8, -1).double())
    torch.testing.assert_close(torch.tensor(spectrum[0].singular_values, dtype=torch.float64), s, rtol=1e-4, atol=0)
    assert factors[0].energy_kept == pytest.approx(float(s[:4].square().sum() / s.square().sum()), rel=1e-5)
