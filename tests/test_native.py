"""The compiled kernels (loratool/quant/csrc via loratool.quant.native) against torch's own float8
conversions and against the torch passes of merge_fp8_rows and of the packed 4-bit requantization:
the same codes and scales, bit for bit."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest
import torch

from loratool.host import torch_threads
from loratool.math.linalg import row_factors
from loratool.quant import fp8 as linalg
from loratool.quant import native, packed
from loratool.quant.fp8 import dequantize_fp8, merge_fp8_rows, quantize_fp8
from loratool.quant.layout import Fp8Scheme, PackedScheme, PackedWeight
from loratool.quant.rounding import subspace_of

FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.fixture(params=[2, 1, 0], ids=["avx512", "avx2", "portable"])
def kernels(request: pytest.FixtureRequest) -> Iterator[native.Fp8Kernels]:
    """The kernels with each of their SIMD levels that the CPU has, and with the portable C alone."""
    k = native.fp8_kernels()
    if k is None:
        pytest.skip("the FP8 kernels are not built here (no C compiler at install, or LORATOOL_NATIVE=0)")
    if k.simd_level(request.param) != request.param:
        k.simd_level(native.SIMD_BEST)
        pytest.skip(f"no SIMD level {request.param} for this CPU")
    try:
        yield k
    finally:
        k.simd_level(native.SIMD_BEST)


def test_the_kernels_are_built_where_a_c_compiler_is() -> None:
    """Installing with a compiler on PATH builds them (hatch_build.py): a broken build would
    otherwise pass every other test here by skipping it."""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on PATH")
    if "0" in (os.environ.get("LORATOOL_NATIVE"), os.environ.get("LORATOOL_BUILD_NATIVE")):
        pytest.skip("turned off by LORATOOL_NATIVE=0 or LORATOOL_BUILD_NATIVE=0")
    assert native.fp8_kernels() is not None


def values_around_every_code(dtype: torch.dtype, n: int = 200_000) -> torch.Tensor:
    """Random magnitudes over the format's whole range and beyond, every finite code, the midpoints
    between neighbours (ties) and the floats either side of each, signed zeros and float32 subnormals."""
    g = torch.Generator().manual_seed(0)
    top = float(torch.finfo(dtype).max)
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[grid.isfinite()].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    spread = torch.exp2(torch.empty(n).uniform_(-30, 18, generator=g))  # past both formats' largest
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-39, top, -top, top * 1.01, -top * 4])
    return torch.cat([grid, mids, mids.nextafter(up), mids.nextafter(down), spread * signs, special])


@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3fn", "e5m2"])
def test_encode_rounds_as_torch_converts(kernels: native.Fp8Kernels, dtype: torch.dtype) -> None:
    """Codes of w / scale equal torch's clamp-then-convert, ties to even, saturation and subnormals
    included; the returned error is the float64 sum of squares (to float32 summation accuracy)."""
    top = float(torch.finfo(dtype).max)
    x = values_around_every_code(dtype)
    for scale in (1.0, 3.0e-3, 0.7):  # a division that rounds, as in a merge
        w = (x * scale).view(1, -1)
        s = torch.full((1, 1), scale)
        q = torch.empty(w.shape, dtype=dtype)
        error_sq = kernels.encode(w, q, 0, s, (1, w.shape[1]))
        want = (w / scale).clamp(-top, top).to(dtype)
        assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
        exact = ((w.double() / scale).abs() - want.double().abs()).square().sum() * scale**2
        assert error_sq == pytest.approx(float(exact), rel=1e-5)


@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3fn", "e5m2"])
def test_decode_gives_every_code_as_torch_does(kernels: native.Fp8Kernels, dtype: torch.dtype) -> None:
    """Every byte, Inf and NaN included (e4m3fn's NaN codes come out as +-480, as in the torch passes,
    which settle them first), times a scale of each tile: subnormal scales, and scales so large that
    the SIMD path's 256 x scale would overflow (it leaves those to the portable one)."""
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).repeat(3, 1)  # (3, 256), tiles of (1, 100)
    scale = torch.tensor([[1.0, 0.5, 3.0], [2.0**-20, 2.0**121, 7.0], [3.0e38, 1e-44, 2.0**119]])
    out = torch.empty(3, 256)
    assert kernels.decode(codes, out, 0, scale, (1, 100)) == (dtype == torch.float8_e4m3fn)  # NaN codes seen
    want = codes.float()
    if dtype == torch.float8_e4m3fn:
        want = torch.where(want.isnan(), torch.where(want.signbit(), -480.0, 480.0), want)
    want = want * scale.repeat_interleave(100, dim=1)[:, :256]
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))
    assert not kernels.decode(codes[:, :100].contiguous(), torch.empty(3, 100), 0, scale, (1, 100))  # 0x00..0x63


@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3fn", "e5m2"])
def test_scales_are_tile_maxima_over_the_top_and_flag_inf_and_nan(kernels: native.Fp8Kernels, dtype) -> None:
    """As torch's amax, division and where give them: one per tile (ragged both ways), 1 for zeros."""
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    w[4:, 8:] = 0.0  # the last tile all zeros
    scale = torch.full((2, 3), -1.0)  # tiles of (4, 4)
    assert kernels.scales(w, 0, (4, 4), dtype, scale)
    amax = torch.nn.functional.pad(w.abs(), (0, 2, 0, 2)).view(2, 4, 3, 4).amax(dim=(1, 3))
    want = amax / torch.finfo(dtype).max
    assert torch.equal(scale, torch.where(want > 0, want, torch.ones_like(want))) and scale[1, 2] == 1.0
    for bad in (float("nan"), float("-inf")):
        w[5, 1] = bad
        assert not kernels.scales(w, 0, (4, 4), dtype, scale)


def _merge(q, s, scheme, terms, check=None, key=None, space=None):
    q_out, s_out = torch.empty_like(q), torch.empty_like(s)
    kept = merge_fp8_rows(q, s, scheme, terms, q_out, s_out, check, key=key, space=space)
    return q_out, s_out, kept


CASES = {
    "block-ragged": (Fp8Scheme("block", (16, 8)), (70, 44), (5, 6), torch.float8_e4m3fn, torch.float32),
    "block-128": (Fp8Scheme("block", (128, 128)), (300, 260), (3, 3), torch.float8_e4m3fn, torch.float32),
    "channel": (Fp8Scheme("channel"), (70, 44), (70, 1), torch.float8_e4m3fn, torch.float32),
    "e5m2": (Fp8Scheme("block", (16, 8)), (70, 44), (5, 6), torch.float8_e5m2, torch.float32),
    "bf16-scales": (Fp8Scheme("block", (16, 8)), (70, 44), (5, 6), torch.float8_e4m3fn, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("rule", ["nearest", "stochastic", "subspace"])
def test_merge_fp8_rows_gives_the_bytes_of_the_torch_passes(monkeypatch, kernels, case: str, threads: int,
                                                            rule: str) -> None:  # fmt: skip
    """Native steps (on one thread, and spread over threads in steps of a few block rows) write the
    codes and scales the torch passes write, by each rounding rule (stochastic: the same draws;
    subspace: the same feedback, in the same order), and report the same kept sums."""
    scheme, shape, scale_shape, dtype, scale_dtype = CASES[case]
    g = torch.Generator().manual_seed(5)
    q, s = quantize_fp8(torch.randn(shape, generator=g), scheme, dtype, scale_shape)
    s = s.to(scale_dtype)
    terms = [
        row_factors(torch.randn(3, shape[1], generator=g), torch.randn(shape[0], 3, generator=g) * 0.1, 0.5, "linear"),
        row_factors(torch.randn(2, shape[1], generator=g), torch.randn(shape[0], 2, generator=g) * 0.1, -1.5, "linear"),
    ]
    monkeypatch.setitem(linalg._GROUP_ELEMENTS, "cpu", 2 * 16 * shape[1])  # several steps, several batches
    key = 0xC0FFEE if rule == "stochastic" else None
    space = subspace_of([t.right for t in terms]) if rule == "subspace" else None
    with torch_threads(threads):
        fast_q, fast_s, fast = _merge(q, s, scheme, terms, key=key, space=space)
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    assert native.fp8_kernels() is None
    with torch_threads(threads):
        slow_q, slow_s, slow = _merge(q, s, scheme, terms, key=key, space=space)
    assert torch.equal(fast_q.view(torch.uint8), slow_q.view(torch.uint8))
    assert torch.equal(fast_s, slow_s) and fast_s.dtype == scale_dtype
    assert fast.dd == pytest.approx(slow.dd, rel=1e-5) and fast.ee == pytest.approx(slow.ee, rel=1e-5)
    assert abs(fast.ed - slow.ed) <= 1e-5 * (slow.dd * slow.ee) ** 0.5  # a sum that cancels: on its scale
    base = dequantize_fp8(q, s, scheme).double()
    delta = sum(t.factor * (t.left.double() @ t.right.double()) for t in terms)
    written = dequantize_fp8(fast_q, fast_s, scheme).double()
    assert fast.ee == pytest.approx(float((written - base - delta).square().sum()), rel=1e-4)
    assert fast.dd == pytest.approx(float(delta.square().sum()), rel=1e-4)
    kept = float(((written - base) * delta).sum() / delta.square().sum())
    assert fast.kept == pytest.approx(kept, abs=1e-5)
    if rule == "subspace":  # the feedback moved the error out of the terms' input span
        basis, _ = torch.linalg.qr(torch.cat([t.right for t in terms]).double().T)
        err = written - base - delta
        assert float((err @ basis).norm()) < 0.25 * float(err.norm())


@pytest.mark.parametrize(("dtype", "value"), [(torch.float8_e4m3fn, 320.0), (torch.float8_e5m2, 40960.0)])
def test_subnormal_scales_saturate_as_the_torch_passes_do(
    monkeypatch, kernels, dtype: torch.dtype, value: float
) -> None:
    scheme = Fp8Scheme("block", (4, 4))
    q, s = torch.full((4, 4), value).to(dtype), torch.full((1, 1), 2.0**-148)  # see test_linalg's twin
    terms = [row_factors(torch.zeros(1, 4), torch.zeros(4, 1), 1.0, "linear")]
    fast_q, fast_s, _ = _merge(q, s, scheme, terms)
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    slow_q, slow_s, _ = _merge(q, s, scheme, terms)
    assert torch.equal(fast_q.view(torch.uint8), slow_q.view(torch.uint8)) and torch.equal(fast_s, slow_s)


def test_a_step_with_inf_is_left_to_the_torch_passes(monkeypatch, kernels) -> None:
    """A merged Inf reaches ``check`` as before; without a check the bytes are the torch passes' own."""
    scheme = Fp8Scheme("block", (16, 8))
    q, s = quantize_fp8(torch.randn(64, 16, generator=torch.Generator().manual_seed(2)), scheme,
                        torch.float8_e4m3fn, (4, 2))  # fmt: skip
    b = torch.zeros(64, 1)
    b[40, 0] = 3e38  # overflows one step (rows 32..63) to Inf
    terms = [row_factors(torch.full((1, 16), 3.0), b, 1.0, "linear")]
    monkeypatch.setitem(linalg._GROUP_ELEMENTS, "cpu", 32 * 16)

    seen = []

    def check(strip: torch.Tensor) -> None:
        seen.append(strip.clone())
        raise ValueError("not finite")

    with pytest.raises(ValueError, match="not finite"):
        _merge(q, s, scheme, terms, check)
    assert len(seen) == 1 and seen[0].isinf().any()
    fast_q, fast_s, _ = _merge(q, s, scheme, terms)
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    slow_q, slow_s, _ = _merge(q, s, scheme, terms)
    assert torch.equal(fast_q.view(torch.uint8), slow_q.view(torch.uint8))
    assert torch.equal(fast_s.nan_to_num(-1.0), slow_s.nan_to_num(-1.0))


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_a_nan_code_in_the_base_is_left_to_the_torch_passes(monkeypatch, kernels, code: int) -> None:
    """e4m3fn's NaN codes decode to finite numbers: ``check`` sees the dequantized base, and without a
    check the bytes are the torch passes' own."""
    scheme = Fp8Scheme("block", (16, 8))
    q, s = quantize_fp8(torch.randn(64, 16, generator=torch.Generator().manual_seed(3)), scheme,
                        torch.float8_e4m3fn, (4, 2))  # fmt: skip
    q.view(torch.uint8)[50, 3] = code
    terms = [row_factors(torch.ones(1, 16), torch.full((64, 1), 0.01), 1.0, "linear")]
    monkeypatch.setitem(linalg._GROUP_ELEMENTS, "cpu", 32 * 16)
    seen = []

    def check(w: torch.Tensor) -> None:
        seen.append(w)
        raise ValueError("not finite")

    with pytest.raises(ValueError, match="not finite"):
        _merge(q, s, scheme, terms, check)
    assert seen[0].shape == (64, 16) and seen[0][50, 3].isnan() and seen[0].isnan().sum() == 1
    fast_q, fast_s, _ = _merge(q, s, scheme, terms)
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    slow_q, slow_s, _ = _merge(q, s, scheme, terms)
    assert torch.equal(fast_q.view(torch.uint8), slow_q.view(torch.uint8)) and torch.equal(fast_s, slow_s)


def test_a_build_that_disagrees_with_torch_is_not_used(monkeypatch, kernels) -> None:
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setattr(native.Fp8Kernels, "agrees_with_torch", lambda self: False)
    with pytest.warns(RuntimeWarning, match="disagrees with torch"):
        assert native.fp8_kernels() is None


def test_a_4bit_merge_does_not_pay_for_the_fp8_checks_nor_an_fp8_one_twice(monkeypatch, kernels) -> None:
    """The library as loaded serves the packed passes after their own check alone; the FP8 passes'
    check runs at the first FP8 use, once a loaded library."""
    monkeypatch.setattr(native, "_loaded", [])
    asked: list[int] = []
    checked = native.Fp8Kernels.agrees_with_torch
    monkeypatch.setattr(native.Fp8Kernels, "agrees_with_torch", lambda self: asked.append(1) or checked(self))
    monkeypatch.setattr(packed, "_checked", {})
    w, parts, _ = _packed_case("int4-sym-bf16", 37, 200)
    assert packed.requantize_native(w, parts, _terms(37, 200, 0.01), key=None) is not None
    assert asked == []
    assert native.fp8_kernels() is not None and native.fp8_kernels() is native.library()
    assert asked == [1]


# each dtype's largest value, past it, its subnormals, its ties, the smallest bfloat16 subnormal's step
HALF_EDGES = {
    torch.bfloat16: [0.0, -0.0, 3.3895e38, -3.39e38, 3.4e38, 1e-39, -3e-45, 1.00390625, -1.01171875, 2.0**-133],
    torch.float16: [0.0, -0.0, 65504.0, -65504.0, 65503.0, 6.1e-5, -5.96e-8, 2.9e-8, 1.00048828125, -1.00146484375],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("stream", [None, 0x5EED], ids=["nearest", "stochastic"])
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (3, 17), (300, 270), (70, 512)])
def test_16_bit_rounding_gives_the_bits_of_the_torch_passes(kernels, dtype, stream, rows: int, cols: int) -> None:
    """``merge --dtype bfloat16`` (or float16) from a quantized base: the compiled rounding (rows split
    across the cores, runs of 16 lanes and a ragged tail) writes rounding.quantize_values' bits, over the
    dtype's whole range (its subnormals, its ties, its largest value), with the kept sums of Kept.of."""
    from loratool.quant.rounding import Kept, quantize_values, uniforms

    g = torch.Generator().manual_seed(rows * cols)
    top = float(torch.finfo(dtype).max) if dtype == torch.float16 else 3.4e38  # merges refuse more than float16's
    spread = torch.logspace(-44, 38, rows * cols).view(rows, cols)
    x = (torch.randn(rows, cols, generator=g) * spread).clamp(-top, top)
    edges = torch.tensor(HALF_EDGES[dtype])
    x.view(-1)[: min(x.numel(), edges.numel())] = edges[: x.numel()]
    before = x + torch.randn(rows, cols, generator=g) * 1e-3
    out = torch.empty(rows, cols, dtype=dtype)
    kept = native.rounded_half(x, before, out, stream, row0=5)
    want = quantize_values(x, dtype, uniforms(stream, 5, rows, cols) if stream is not None else None)
    assert kept is not None and torch.equal(out.view(torch.int16), want.view(torch.int16))
    x = torch.randn(rows, cols, generator=g) * 0.02  # the kept sums where their squares fit float32, as merges need
    before = x + torch.randn(rows, cols, generator=g) * 1e-3
    kept = native.rounded_half(x, before, out, stream, row0=5)
    want = quantize_values(x, dtype, uniforms(stream, 5, rows, cols) if stream is not None else None)
    oracle = Kept.of(x - before, x - want.float())
    assert kept is not None and torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert (kept.dd, kept.ed, kept.ee) == pytest.approx((oracle.dd, oracle.ed, oracle.ee), rel=1e-5)


def test_16_bit_rounding_is_left_to_torch_where_the_kernels_do_not_take_it(monkeypatch, kernels) -> None:
    x = torch.randn(4, 8)
    assert native.rounded_half(x, x, torch.empty(4, 8, dtype=torch.float32), None) is None  # not 16 bits
    assert native.rounded_half(x.T, x.T, torch.empty(8, 4, dtype=torch.bfloat16), None) is None  # not contiguous
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setattr(native.Fp8Kernels, "half_agrees_with_torch", lambda self: False)
    with pytest.warns(RuntimeWarning, match="disagrees with torch's bfloat16 and float16 rounding"):
        assert native.rounded_half(x, x, torch.empty(4, 8, dtype=torch.float16), None) is None


def test_a_build_of_another_version_is_not_used(monkeypatch, kernels) -> None:
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setattr(native.Fp8Kernels, "ABI", 0)
    with pytest.warns(RuntimeWarning, match="another version"):
        assert native.fp8_kernels() is None


@pytest.mark.parametrize(
    ("scheme", "scale_shape"),
    [(Fp8Scheme("block", (24, 8)), (9, 6)), (Fp8Scheme("channel"), (200,)), (Fp8Scheme("tensor"), ())],
    ids=["block", "channel", "tensor"],
)
@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3fn", "e5m2"])
def test_dequantize_fp8_gives_the_bytes_of_the_torch_passes(monkeypatch, kernels, scheme, scale_shape, dtype) -> None:
    """Decoded on every core (spans of rows that start inside a tile of 24), into a fresh tensor or ``out``."""
    g = torch.Generator().manual_seed(6)
    q = torch.randint(0, 256, (200, 44), dtype=torch.uint8, generator=g).view(dtype)  # every kind of code, NaN too
    s = torch.rand(scale_shape, generator=g) + 0.5
    fast = linalg.dequantize_fp8(q, s, scheme)
    into = torch.empty(200, 44)
    assert linalg.dequantize_fp8(q, s, scheme, out=into) is into
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    slow = linalg.dequantize_fp8(q, s, scheme)
    for got in (fast, into, linalg.dequantize_fp8(q, s, scheme, out=torch.empty(200, 44))):
        assert torch.equal(got.isnan(), slow.isnan()) and got.isnan().any()
        assert torch.equal(got.nan_to_num(0.0).view(torch.int32), slow.nan_to_num(0.0).view(torch.int32))


@pytest.mark.parametrize(
    ("scheme", "scale_shape"),
    [(Fp8Scheme("block", (16, 8)), (5, 6)), (Fp8Scheme("channel"), (70, 1)), (Fp8Scheme("tensor"), (1,))],
    ids=["block", "channel", "tensor"],
)
def test_quantize_fp8_by_the_subspace_rule_gives_the_bytes_of_torch(monkeypatch, kernels, scheme, scale_shape) -> None:
    """A whole weight (per-tensor scales, DoRA) rounded by the kernels, one tile per scale, as by
    torch's reference."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(70, 44, generator=g)
    space = subspace_of([torch.randn(3, 44, generator=g)])
    fast_q, fast_s = quantize_fp8(w, scheme, torch.float8_e4m3fn, scale_shape, space=space)
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    slow_q, slow_s = quantize_fp8(w, scheme, torch.float8_e4m3fn, scale_shape, space=space)
    assert torch.equal(fast_q.view(torch.uint8), slow_q.view(torch.uint8)) and torch.equal(fast_s, slow_s)


@pytest.mark.parametrize("threads", [1, 2])
def test_unmerge_check_in_one_pass_gives_the_figures_of_the_torch_passes(monkeypatch, threads: int) -> None:
    """lt_check_bf16 (unmerge --check of bfloat16 weights): the same largest difference, units of
    rounding and count of differing elements as RoundTripCheck's torch passes, bit for bit, and the
    same relative difference up to the order of the sums; zeros of both signs, subnormals, values
    whose rounding unit is the smallest normal's, and a ragged tail among them."""
    from loratool.ops.merge import check

    if native.fp8_kernels() is None:
        pytest.skip("the compiled kernels are not built here (no C compiler at install, or LORATOOL_NATIVE=0)")
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(3001, 97, generator=g) * 0.02).to(torch.bfloat16)
    base.view(-1)[:6] = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 2.0**-126, 65504.0])
    delta = torch.randn(3001, 4, generator=g) @ torch.randn(4, 97, generator=g) * 1e-3
    merged = (base.float() + delta).to(torch.bfloat16)
    restored = (merged.float() - delta).to(torch.bfloat16)
    restored.view(-1)[1] = 0.0  # +0 for -0: equal values
    restored.view(-1)[2] = -1e-40  # a subnormal's sign flipped: it differs
    with torch_threads(threads):
        fast = check.RoundTripCheck()
        fast.add(restored, base, merged)
        monkeypatch.setattr(check.RoundTripCheck, "_native", lambda self, *tensors: False)
        torch_passes = check.RoundTripCheck()
        torch_passes.add(restored, base, merged)
    assert fast.elements_differing == torch_passes.elements_differing > 0
    assert fast.max_abs_diff == torch_passes.max_abs_diff and fast.max_rounding_units == torch_passes.max_rounding_units
    assert fast.relative_diff == pytest.approx(torch_passes.relative_diff, rel=1e-5)
    assert fast.elements == torch_passes.elements == base.numel()


# -- packed low-bit weights (csrc/lowbit.c) ----------------------------------------------------------
def _packed_case(fmt: str, rows: int, cols: int) -> tuple[PackedWeight, dict[str, torch.Tensor], torch.Tensor]:
    """A packed weight of ``fmt`` quantized from random values (a few rows and one group all zero,
    NVFP4 and int groups that end short of a whole, int groups of an odd length), its parts, and the
    float32 values it came from."""
    g = torch.Generator().manual_seed(len(fmt) * rows + cols)
    w0 = torch.randn(rows, cols, generator=g) * 0.02
    w0[3] = 0.0
    w0[5, :16] = 0.0
    if fmt == "mxfp4":
        like = {"codes": torch.empty(rows, -(-cols // 32), 16, dtype=torch.uint8),
                "scale": torch.empty(rows, -(-cols // 32), dtype=torch.uint8)}  # fmt: skip
        scheme = PackedScheme("mxfp4", 32)
    elif fmt.startswith("nvfp4"):
        like = {"codes": torch.empty(rows, -(-cols // 16) * 8, dtype=torch.uint8),
                "scale": torch.empty(rows, -(-cols // 16), dtype=torch.float8_e4m3fn),
                "global": torch.empty(1)}  # fmt: skip
        scheme = PackedScheme("nvfp4", 16, divide=fmt == "nvfp4-ct")
    else:  # "int4-sym-bf16", "int4-asym-f32", "int8-sym-bf16", "int4-asym-bf16-g128" (groups of 64 unless said)
        _, kind, scale, *size = fmt.split("-")
        bits, dtype = int(fmt[3]), {"bf16": torch.bfloat16, "f32": torch.float32}[scale]
        group = int(size[0][1:]) if size else 64
        like = {"codes": torch.empty(rows, -(-cols * bits // 32), dtype=torch.int32),
                "scale": torch.empty(rows, -(-cols // group), dtype=dtype),
                "shape": torch.tensor([rows, cols])}  # fmt: skip
        scheme = PackedScheme("int", group, bits, kind == "sym")
    names = {role: f"w.{role}" for role in like}
    w = PackedWeight("w", (rows, cols), names, scheme)
    return w, packed.requantize(w, w0, like, keep_scales=False).parts, w0


LOWBIT = [
    "mxfp4",
    "nvfp4-ct",
    "nvfp4-modelopt",
    "int4-sym-bf16",
    "int4-asym-f32",
    "int8-sym-bf16",
    "int4-asym-bf16-g128",
    "int4-sym-f32-g33",
    "int8-asym-f32-g33",
]


def _terms(rows: int, cols: int, size: float, rank: int = 3) -> packed.LowRank:
    """Random terms whose delta is about ``size`` times the norm of _packed_case's values."""
    g = torch.Generator().manual_seed(7 * rows + cols)
    return packed.LowRank(torch.randn(rows, rank, generator=g) * (0.02 * size / max(rank, 1) ** 0.5),
                          torch.randn(rank, cols, generator=g))  # fmt: skip


def _torch_delta(terms: packed.LowRank) -> torch.Tensor:
    return packed._torch_delta(terms.left, terms.right, torch.empty(terms.left.shape[0], terms.right.shape[1]))


@pytest.mark.parametrize("fmt", LOWBIT)
@pytest.mark.parametrize("rule", ["nearest", "stochastic"])
@pytest.mark.parametrize("size", [0.003, 0.3])
@pytest.mark.parametrize("wide", [False, True])
def test_a_packed_merge_gives_the_bytes_of_the_torch_passes(kernels, fmt: str, rule: str, size: float,
                                                            wide: bool) -> None:  # fmt: skip
    """requantize_native (the delta formed from the terms, the base decoded and the delta added,
    requantized with the scales kept where they fit, the rows spread over the cores) writes the
    codes, scales and zero points of packed.requantize, by both rules (stochastic: the same draws),
    at a small delta (scales kept) and a large one (many groups rescaled), on rows of one chunk
    and of several (a short one last, whose delta takes each of the product's paths: two vectors,
    sixteen columns, single columns); and reports its kept sums."""
    cols = (1056 if wide else 96) if fmt.startswith("mx") else (1116 if wide else 200)
    _check_native_merge(fmt, rule, size, rows=11 if wide else 37, cols=cols, rank=17 if wide else 3)


@pytest.mark.parametrize(
    "fmt", ["mxfp4", "nvfp4-ct", "nvfp4-modelopt", "int4-sym-bf16-g16", "int4-asym-f32-g32", "int4-sym-bf16",
            "int4-asym-bf16-g128", "int4-sym-f32-g128"],
)  # fmt: skip
@pytest.mark.parametrize("rule", ["nearest", "stochastic"])
@pytest.mark.parametrize("size", [0.003, 0.3])
def test_rows_of_whole_groups_give_the_bytes_of_the_torch_passes(kernels, fmt: str, rule: str, size: float) -> None:
    """Rows of whole 4-bit groups of 16, 32, 64 or 128 (each chunk of columns whole: with AVX-512 the
    encode pass takes each group through in vector registers, csrc/lowbit.c's fused_chunk) give the
    codes, scales, zero points and kept sums of packed.requantize too, a row of zeros among them."""
    _check_native_merge(fmt, rule, size, rows=13, cols=1024, rank=16)


def _check_native_merge(fmt: str, rule: str, size: float, *, rows: int, cols: int, rank: int) -> None:
    w, parts, _ = _packed_case(fmt, rows, cols)
    terms = _terms(rows, cols, size, rank=rank)
    key = 0xBEEF if rule == "stochastic" else None
    before = packed.dequantize(w, parts)
    try:
        slow = packed.requantize(w, before + _torch_delta(terms), parts, before=before, key=key, row0=64)
    except packed.NeedsFreshScales:  # the tensor scale no longer serves: the kernels say so too
        with pytest.raises(packed.NeedsFreshScales):
            packed.requantize_native(w, parts, terms, key=key, row0=64)
        return
    fast = packed.requantize_native(w, parts, terms, key=key, row0=64)
    assert fast is not None
    assert fast.parts.keys() == slow.parts.keys()
    for role, t in slow.parts.items():
        got = fast.parts[role]
        assert got.dtype == t.dtype and got.shape == t.shape, role
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), role  # fmt: skip
    assert fast.kept.dd == pytest.approx(slow.kept.dd, rel=1e-5)
    assert fast.kept.ee == pytest.approx(slow.kept.ee, rel=1e-5)
    assert abs(fast.kept.ed - slow.kept.ed) <= 1e-5 * (slow.kept.dd * slow.kept.ee) ** 0.5
    changed = int((fast.parts["scale"].view(torch.uint8) != parts["scale"].view(torch.uint8)).sum())
    assert changed > 0 or size < 0.1  # the large delta takes the quantizer's new scales somewhere


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4-ct", "int4-asym-bf16-g128"])
@pytest.mark.parametrize("rule", ["nearest", "stochastic"])
def test_blocks_of_rows_on_any_number_of_cores_give_the_same_bytes_and_sums(monkeypatch, kernels, fmt: str,
                                                                           rule: str) -> None:  # fmt: skip
    """The encode pass takes a weight's rows in blocks (packed.ENCODE_BLOCK_ROWS), each core the next
    block as it comes free: on one, two or three cores, every block (a short one last) gets the bytes
    of the torch passes, and the kept sums (each block's own, added in the blocks' order) are the
    same to the last bit. A block that is not finite stops them all: the torch passes then."""
    rows, cols = 37, 1024
    monkeypatch.setattr(packed, "ENCODE_BLOCK_ROWS", 5)  # eight blocks, the last of two rows
    w, parts, _ = _packed_case(fmt, rows, cols)
    terms = _terms(rows, cols, 0.3, rank=16)
    key = 0xBEEF if rule == "stochastic" else None
    before = packed.dequantize(w, parts)
    slow = packed.requantize(w, before + _torch_delta(terms), parts, before=before, key=key, row0=64)
    kept = set()
    for cores in (1, 2, 3):
        monkeypatch.setattr(native, "available_cores", lambda cores=cores: cores)
        fast = packed.requantize_native(w, parts, terms, key=key, row0=64)
        assert fast is not None
        for role, t in slow.parts.items():
            assert torch.equal(fast.parts[role].view(torch.uint8), t.view(torch.uint8)), (cores, role)
        kept.add((fast.kept.dd, fast.kept.ed, fast.kept.ee))
    assert len(kept) == 1
    assert next(iter(kept))[0] == pytest.approx(slow.kept.dd, rel=1e-5)
    terms.left[31, 2] = float("nan")  # in the seventh block
    assert packed.requantize_native(w, parts, terms, key=key, row0=64) is None


def test_requantizations_begun_on_the_kernel_threads_give_what_the_call_gives(kernels) -> None:
    """packed.start_native returns at once, its work queued behind what was begun before it on the
    kernel threads; finish() gives requantize_native's codes, scales and kept sums, or its answers
    (None where not finite, NeedsFreshScales); cancel() stops one and waits for its cores."""
    w, parts, _ = _packed_case("nvfp4-ct", 37, 1024)
    jobs = []
    for seed in range(3):  # begun one after another, before any is waited for
        terms = _terms(37, 1024, 0.01 * (1 + seed), rank=16)
        started = packed.start_native(w, parts, terms, key=seed, codes_into=torch.empty_like(parts["codes"]))
        assert started is not None
        jobs.append((terms, seed, started))
    for terms, seed, started in jobs:
        got, want = started.finish(), packed.requantize_native(w, parts, terms, key=seed)
        assert got is not None and want is not None
        assert all(torch.equal(got.parts[r].view(torch.uint8), want.parts[r].view(torch.uint8)) for r in want.parts)
        assert (got.kept.dd, got.kept.ed, got.kept.ee) == (want.kept.dd, want.kept.ed, want.kept.ee)
    terms = _terms(37, 1024, 0.3, rank=16)
    terms.left[30, 1] = float("nan")
    assert packed.start_native(w, parts, terms, key=None, codes_into=torch.empty_like(parts["codes"])).finish() is None
    grow = packed.LowRank(packed.dequantize(w, parts) * 999.0, torch.eye(1024))
    with pytest.raises(packed.NeedsFreshScales):
        packed.start_native(w, parts, grow, key=None, codes_into=torch.empty_like(parts["codes"])).finish()
    started = packed.start_native(w, parts, terms, key=None, codes_into=torch.empty_like(parts["codes"]))
    started.cancel()
    assert all(f.done() for f in started.running.futures)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_gets_kernel_threads_of_its_own(kernels) -> None:
    """A process forked after the kernels ran has none of its parent's threads: its requantizations start
    pools of their own rather than wait for threads that do not exist (they hung)."""
    w, parts, _ = _packed_case("int4-sym-bf16", 37, 200)
    terms = _terms(37, 200, 0.01)
    want = packed.requantize_native(w, parts, terms, key=None)  # both pools started here
    started = packed.start_native(w, parts, terms, key=None, codes_into=torch.empty_like(parts["codes"]))
    assert want is not None and started is not None and started.finish() is not None
    pid = os.fork()
    if pid == 0:  # the child: 0 if both paths give the parent's codes
        code = 2
        try:
            got = packed.start_native(w, parts, terms, key=None, codes_into=torch.empty_like(parts["codes"]))
            again = packed.requantize_native(w, parts, terms, key=None)
            ok = got is not None and again is not None
            code = 0 if ok and torch.equal(got.finish().parts["codes"], want.parts["codes"]) else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's requantization hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_terms_folded_into_one_product_and_none_at_all() -> None:
    """LowRank.of folds each term's factor into its left half and stacks the terms; with none (an
    expert no term reaches) it is a product of rank 0, whose delta is zeros."""
    from loratool.math.linalg import RowFactors

    g = torch.Generator().manual_seed(3)
    a, b = RowFactors(torch.randn(6, 2, generator=g), torch.randn(2, 9, generator=g), 0.5), RowFactors(
        torch.randn(6, 3, generator=g), torch.randn(3, 9, generator=g), -2.0)  # fmt: skip
    terms = packed.LowRank.of([a, b], 6, 9, torch.device("cpu"))
    assert terms.left.shape == (6, 5) and terms.right.shape == (5, 9)
    want = 0.5 * a.left.double() @ a.right.double() - 2.0 * b.left.double() @ b.right.double()
    torch.testing.assert_close(terms.delta().double(), want, rtol=1e-5, atol=1e-6)
    none = packed.LowRank.of([], 6, 9, torch.device("cpu"))
    assert none.left.shape == (6, 0) and none.right.shape == (0, 9)
    assert torch.equal(none.delta(), torch.zeros(6, 9))


@pytest.mark.parametrize(("rows", "rank", "cols"), [(37, 5, 200), (3, 16, 1100), (40, 1, 64), (5, 0, 70), (9, 16, 120)])
def test_the_kernels_delta_is_the_torch_sum_term_by_term(kernels, rows: int, rank: int, cols: int) -> None:
    """LowRank.delta by the kernels (rows split across the cores; four rows at once in blocks of two
    vectors, then of sixteen columns, then column by column; the rows left one at a time) gives the
    bytes of the torch passes' sum, signed zeros included; and is the product within a float32
    sum's rounding."""
    terms = _terms(rows, cols, 1.0, rank)
    if rank:
        terms.left[0] = 0.0  # products of -0 and +0: their sum from +0 is +0
        terms.right[0, :7] = -terms.right[0, :7].abs()
    fast, slow = terms.delta(), _torch_delta(terms)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    torch.testing.assert_close(fast.double(), terms.left.double() @ terms.right.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grid", ["e2m1", "int4", "int4-zero", "int8-zero"])
@pytest.mark.parametrize(("rows", "rank"), [(37, 3), (16, 9), (5, 0), (21, 20)])
def test_the_kernels_subspace_rule_on_a_4_bit_grid_is_round_subspace(kernels, grid: str, rows: int, rank: int) -> None:
    """round_subspace on E2M1's grid and the integers' (zero points or not), by the kernels (sixteen
    rows a lane each, the last block padded; the rows split across the cores; a basis of width 8 or
    16 held in registers, a wider one not): the same values, signed zeros, ties (to even) and
    saturated ends included, on rows of one block and of several, a subspace of no rank among them;
    and requantize's native path gives them too."""
    from loratool.quant.intpack import grid_of
    from loratool.quant.rounding import E2M1, round_subspace

    g = torch.Generator().manual_seed(rows + rank)
    cols = 70
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :5] = torch.tensor([-0.0, 0.0, -1e-9, 1e3, -1e3])  # signed zeros, a tiny negative, both ends
    scale = torch.rand(rows, cols, generator=g) * 0.01 + 0.002
    space = subspace_of([torch.randn(rank, cols, generator=g)] if rank else [torch.zeros(1, cols)])
    bits = 8 if grid.startswith("int8") else 4
    lattice, bounds = (
        (E2M1, None) if grid == "e2m1" else (grid_of(bits), (float(grid_of(bits).lo), float(grid_of(bits).hi)))
    )
    zero = torch.randint(-3, 4, (rows, cols), generator=g).float() if grid.endswith("zero") else None
    ties = torch.tensor([2.5, -0.25, 5.0, -3.5])  # halfway between grid points: to even (E2M1: 2, -0, 4, -4)
    w[1 : 1 + len(ties), 0], scale[1 : 1 + len(ties), 0] = ties, 1.0  # column 0: no feedback yet, v = w
    if zero is not None:
        zero[1 : 1 + len(ties), 0] = 0.0
    want = round_subspace(w, scale, lattice, space, zero)
    got = torch.empty_like(w)
    assert kernels.lowbit_subspace(w, scale, zero, bounds, space, got) == 0
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(
        packed._subspace_native(w, scale, lattice, space, zero).view(torch.int32), want.view(torch.int32)
    )


@pytest.mark.parametrize("fmt", LOWBIT)
def test_the_packed_decode_is_the_torch_dequantization(monkeypatch, kernels, fmt: str) -> None:
    w, parts, _ = _packed_case(fmt, 37, 96 if fmt.startswith("mx") else 200)
    fast = packed.dequantize(w, parts)
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    assert torch.equal(fast, packed.dequantize(w, parts))


def test_a_packed_merge_that_is_not_finite_or_needs_a_new_tensor_scale_is_left_to_torch(kernels) -> None:
    w, parts, _ = _packed_case("int4-sym-bf16", 37, 200)
    terms = _terms(37, 200, 0.01)
    terms.left[4, 1] = float("nan")
    assert packed.requantize_native(w, parts, terms, key=None) is None
    w, parts, w0 = _packed_case("nvfp4-ct", 37, 200)
    grow = packed.LowRank(packed.dequantize(w, parts) * 999.0, torch.eye(200))  # past what the tensor scale serves
    with pytest.raises(packed.NeedsFreshScales):
        packed.requantize(w, packed.dequantize(w, parts) * 1000.0, parts)
    with pytest.raises(packed.NeedsFreshScales):
        packed.requantize_native(w, parts, grow, key=None)


@pytest.mark.parametrize("fmt", ["nvfp4-ct", "mxfp4", "int4-asym-bf16-g128"])
def test_whole_groups_that_are_not_finite_or_need_a_new_tensor_scale_are_left_to_torch(kernels, fmt: str) -> None:
    """The same answers on rows of whole groups (with AVX-512, fused_chunk; NVFP4 sixteen groups at a
    time): a NaN in the delta of one group, an NVFP4 NaN scale code in one group, a delta past what the
    NVFP4 tensor scale serves."""
    w, parts, _ = _packed_case(fmt, 13, 1024)
    terms = _terms(13, 1024, 0.01)
    terms.right[1, 777] = float("nan")
    assert packed.requantize_native(w, parts, terms, key=None) is None
    if fmt.startswith("nvfp4"):
        nan_scale = dict(parts, scale=parts["scale"].clone())
        nan_scale["scale"].view(torch.uint8)[6, 37] = 0x7F
        assert packed.requantize_native(w, nan_scale, _terms(13, 1024, 0.01), key=None) is None
        grow = packed.LowRank(packed.dequantize(w, parts) * 999.0, torch.eye(1024))
        with pytest.raises(packed.NeedsFreshScales):
            packed.requantize_native(w, parts, grow, key=None)


def test_packed_weights_the_kernels_do_not_take_go_to_torch(kernels) -> None:
    w, parts, _ = _packed_case("int4-sym-bf16", 37, 200)
    none = _terms(37, 200, 0.0)
    parts16 = dict(parts, scale=parts["scale"].to(torch.float16))
    assert packed.requantize_native(w, parts16, none, key=None) is None  # a float16 scale
    gidx = dict(parts, g_idx=torch.arange(200) // 64)
    assert packed.requantize_native(w, gidx, none, key=None) is None  # activation order
    stray = dict(parts, zero=torch.zeros(5, 4, dtype=torch.int32))  # zero points, the scheme symmetric
    assert packed.requantize_native(w, stray, none, key=None) is None


@pytest.mark.parametrize("which", ["e2m1", "int"])
def test_a_subspace_loop_that_disagrees_with_torch_is_not_used(monkeypatch, kernels, which: str) -> None:
    """The compiled subspace loop is checked too, when first asked for: one value off on either grid,
    and the rule goes to the torch passes (the other packed passes, checked apart, stay compiled)."""
    subspace = native.Fp8Kernels.lowbit_subspace

    def one_step_off(self, w, scale, zero, grid, space, out):  # type: ignore[no-untyped-def]
        answer = subspace(self, w, scale, zero, grid, space, out)
        if (grid is None) == (which == "e2m1"):
            out[0, 0] += 1.0
        return answer

    assert packed._subspace_agrees(kernels)
    monkeypatch.setattr(native.Fp8Kernels, "lowbit_subspace", one_step_off)
    monkeypatch.setattr(packed, "_checked", {})
    with pytest.warns(RuntimeWarning, match="subspace rounding disagrees with the torch passes"):
        assert not packed.subspace_compiled(torch.device("cpu"))
    assert packed._kernels() is not None


def test_packed_kernels_that_disagree_with_torch_are_not_used(monkeypatch, kernels) -> None:
    """The load-time check (packed._agrees) catches a build whose packed passes write other bytes."""
    assert packed._agrees(kernels)
    encode = native.Fp8Kernels.lowbit_encode

    def off_by_one_code(self, spec, terms, row0, base, out, **kw):  # type: ignore[no-untyped-def]
        answer = encode(self, spec, terms, row0, base, out, **kw)
        out[0][0, 0] ^= 1  # one code's low bit flipped
        return answer

    monkeypatch.setattr(native.Fp8Kernels, "lowbit_encode", off_by_one_code)
    monkeypatch.setattr(packed, "_checked", {})
    with pytest.warns(RuntimeWarning, match="disagree with the torch passes"):
        assert packed._kernels() is None
    w, parts, _ = _packed_case("nvfp4-ct", 37, 200)
    assert packed.requantize_native(w, parts, _terms(37, 200, 0.0), key=None) is None  # the torch passes, then


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4-ct", "int4-asym-bf16-g128"])
def test_dequantize_into_a_buffer_gives_the_same_values(kernels, monkeypatch, fmt: str) -> None:
    """``packed.dequantize(..., out=)`` writes the values into the buffer and returns it, by the kernels
    and by the torch passes alike; a buffer of another shape is refused."""
    w, parts, _ = _packed_case(fmt, 37, 1024)
    want = packed.dequantize(w, parts)
    out = torch.full(want.shape, float("nan"))
    assert packed.dequantize(w, parts, out=out) is out and torch.equal(out, want)
    with pytest.raises(ValueError, match="of shape"):
        packed.dequantize(w, parts, out=torch.empty(want.shape[0], want.shape[1] + 1))
    monkeypatch.setattr(packed, "_dequantize_native", lambda w, parts, out=None: None)  # the torch passes
    out.fill_(float("nan"))
    assert packed.dequantize(w, parts, out=out) is out and torch.equal(out, want)


def test_run_parts_called_from_a_part_runs_there_instead_of_waiting_on_the_pool(monkeypatch) -> None:
    """A part that itself splits its work (an FP8 decode inside a part, say) does it on its own thread:
    on the pool's thread, its helpers would queue behind the very part that waits for them."""
    import threading

    monkeypatch.setattr(native, "available_cores", lambda: 2)
    answers: list[list[list[int]]] = []
    nested = lambda i: native.run_parts(lambda j: 10 * i + j, range(4))  # noqa: E731
    worker = threading.Thread(target=lambda: answers.append(native.run_parts(nested, range(8))), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert answers == [[[10 * i + j for j in range(4)] for i in range(8)]], "run_parts waited on itself"
