"""CUDA paths give the CPU's results (skipped cleanly where there is no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratool.formats import load_adapter
from loratool.io.checkpoint import open_checkpoint
from loratool.math.linalg import lora_delta, randomized_svd
from loratool.ops.combine import combine
from loratool.ops.extract import extract
from loratool.ops.merge import merge

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def deltas(path: Path) -> dict[str, torch.Tensor]:
    return {p: lora_delta(m.lora_A, m.lora_B, m.scaling, m.kind) for p, m in load_adapter(path).modules.items()}


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_extract_on_cuda_matches_cpu(tmp_path: Path, fixtures: Path, svd: str) -> None:
    for device in ("cpu", "cuda"):
        extract(fixtures / "llama-base", fixtures / "llama-ft", output=tmp_path / device, rank=4, svd=svd,
                device=device, show_progress=False)  # fmt: skip
    cpu, gpu = deltas(tmp_path / "cpu"), deltas(tmp_path / "cuda")
    for k in cpu:
        assert torch.allclose(cpu[k], gpu[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("krylov", [True, False])
def test_randomized_svd_on_cuda_matches_cpu(krylov: bool) -> None:
    """The fixtures' matrices are too small for block Krylov's basis: a Llama-sized one takes both
    paths (the same sketch, from a CPU generator, on each device)."""
    g = torch.Generator().manual_seed(0)
    m = (torch.randn(2048, 64, generator=g) * torch.arange(1, 65) ** -0.5) @ torch.randn(64, 1536, generator=g)
    m += 1e-2 * torch.randn(2048, 1536, generator=g)
    cpu, gpu = (randomized_svd(m.to(d), 16, generator=torch.Generator().manual_seed(1), krylov=krylov)
                for d in ("cpu", "cuda"))  # fmt: skip
    assert torch.allclose(cpu.S, gpu.S.cpu(), rtol=1e-4)
    low = lambda t: (t.U * t.S) @ t.Vh  # noqa: E731
    assert torch.allclose(low(cpu), low(gpu).cpu(), rtol=1e-3, atol=1e-4 * float(cpu.S[0]))


def test_merge_on_cuda_matches_cpu(tmp_path: Path, fixtures: Path) -> None:
    for device in ("cpu", "cuda"):
        merge(fixtures / "llama-ft", [fixtures / "llama-peft-adapter"], output=tmp_path / device, device=device,
              show_progress=False)  # fmt: skip
    with open_checkpoint(tmp_path / "cpu") as a, open_checkpoint(tmp_path / "cuda") as b:
        for k in a.keys():
            assert torch.allclose(a.get(k), b.get(k), rtol=1e-6, atol=1e-7), k


def test_combine_on_cuda_matches_cpu(tmp_path: Path, fixtures: Path) -> None:
    sources = [(fixtures / "llama-peft-adapter", 1.0), (fixtures / "llama-peft-adapter", -0.25)]
    for device in ("cpu", "cuda"):
        combine(sources, output=tmp_path / device, method="svd", rank=3, device=device, show_progress=False)
    cpu, gpu = deltas(tmp_path / "cpu"), deltas(tmp_path / "cuda")
    for k in cpu:
        assert torch.allclose(cpu[k], gpu[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_analyze_on_cuda_matches_cpu(fixtures: Path, svd: str) -> None:
    from loratool.ops.analyze import analyze

    cpu, gpu = (
        analyze(fixtures / "llama-base", fixtures / "llama-ft", svd=svd, device=d, show_progress=False)  # type: ignore[arg-type]
        for d in ("cpu", "cuda")
    )
    for a, b in zip(cpu.modules, gpu.modules):
        assert a.module == b.module and a.rank_for_energy == b.rank_for_energy
        assert a.singular_values == pytest.approx(b.singular_values, rel=1e-4, abs=1e-6)
        assert a.amplification == pytest.approx(b.amplification, rel=1e-3)


def test_ties_svd_on_cuda_matches_cpu(tmp_path: Path, fixtures: Path) -> None:
    sources = [(fixtures / "llama-peft-adapter", 1.0), (fixtures / "llama-peft-adapter", -0.25)]
    for device in ("cpu", "cuda"):
        combine(sources, output=tmp_path / device, method="ties_svd", density=0.5, rank=3, device=device,
                show_progress=False)  # fmt: skip
    cpu, gpu = deltas(tmp_path / "cpu"), deltas(tmp_path / "cuda")
    for k in cpu:
        assert torch.allclose(cpu[k], gpu[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("rounding", ["subspace", "stochastic", "nearest"])
def test_fp8_merge_on_cuda_matches_cpu(tmp_path: Path, fixtures: Path, rounding: str) -> None:
    """Scales to float32 rounding, values within one FP8 rounding unit (the sums round apart)."""
    from loratool.quant.fp8 import dequantize_fp8
    from loratool.quant.layout import Fp8Scheme

    for device in ("cpu", "cuda"):
        merge(fixtures / "llama-fp8-block", [fixtures / "llama-peft-adapter"], output=tmp_path / device,
              device=device, rounding=rounding, show_progress=False)  # fmt: skip
    scheme = Fp8Scheme("block", (24, 24))
    with open_checkpoint(tmp_path / "cpu") as a, open_checkpoint(tmp_path / "cuda") as b:
        for k in a.keys():
            if a.get(k).dtype != torch.float8_e4m3fn:
                assert torch.allclose(a.get(k).float(), b.get(k).float(), rtol=1e-6, atol=1e-12), k
                continue
            sa, sb = a.get(k + "_scale_inv"), b.get(k + "_scale_inv")
            grid = dequantize_fp8(torch.full_like(a.get(k), 32.0), sa, scheme)  # the largest FP8 step: 32 in [256, 448]
            assert (dequantize_fp8(a.get(k), sa, scheme) - dequantize_fp8(b.get(k), sb, scheme)).abs().le(grid).all()


def test_the_stochastic_stream_and_rounding_are_the_same_bits_on_cuda() -> None:
    from loratool.quant.rounding import GRIDS, round_to_grid, uniforms

    u_cpu, u_gpu = uniforms(12345, 7, 64, 300), uniforms(12345, 7, 64, 300, "cuda")
    assert torch.equal(u_cpu, u_gpu.cpu())
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 50
    for dtype in GRIDS:
        assert torch.equal(round_to_grid(x, dtype, u_cpu), round_to_grid(x.cuda(), dtype, u_gpu).cpu()), dtype


@pytest.mark.parametrize("fmt", ["nvfp4-compressed", "int4-asym"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "subspace"])
def test_packed_4bit_merges_on_cuda_match_cpu(tmp_path: Path, fmt: str, rounding: str) -> None:
    """The packed path runs on the merge's device: the same codes as on the CPU but where float32
    sums in another order land a value on the other side of a midpoint, and the same kept."""
    from helpers import load_model, peft_adapter, tiny_model
    from test_lowbit import PROJ, dequantized, make_quantized

    tiny_model("llama").save_pretrained(tmp_path / "base")
    peft_adapter(load_model("llama", tmp_path / "base"), list(PROJ), r=4, alpha=8, seed=3).save_pretrained(
        tmp_path / "adapter")  # fmt: skip
    make_quantized(tmp_path / "base", tmp_path / "q", fmt)
    kept = {}
    for device in ("cpu", "cuda"):
        r = merge(tmp_path / "q", [tmp_path / "adapter"], output=tmp_path / device, device=device,
                  rounding=rounding, min_kept=0.0, show_progress=False)  # fmt: skip
        kept[device] = r.quantization["kept"]
    assert kept["cpu"] == pytest.approx(kept["cuda"], abs=2e-3)
    cpu, gpu = dequantized(tmp_path / "cpu", fmt), dequantized(tmp_path / "cuda", fmt)
    for k in cpu:
        same = float((cpu[k] == gpu[k]).float().mean())
        assert same > (0.999 if rounding != "subspace" else 0.95), (k, same)  # subspace carries any flip along a row
