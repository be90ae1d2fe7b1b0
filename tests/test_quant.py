"""loratool.quant: the FP8 merge step and the rounding rules against oracles written here from the
definitions: each format's value grid enumerated from its 256 codes, stochastic rounding as "the
upper neighbour with probability equal to the fractional position", and kept as its formula."""

from __future__ import annotations

import pytest
import torch

from loratool.host import torch_threads
from loratool.math.linalg import row_factors, unit_of_rounding
from loratool.quant import fp8
from loratool.quant.fp8 import dequantize_fp8, merge_fp8_rows, quantize_fp8
from loratool.quant.layout import Fp8Scheme
from loratool.quant.rounding import GRIDS, Kept, Rounding, hash32, round_subspace, round_to_grid, subspace_of, uniforms

E4M3 = torch.float8_e4m3fn


def factors(out: int, inp: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)  # A (r, in), B (out, r)


def value_grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of ``dtype`` (float64, sorted): all 256 codes for FP8, all 65536 for 16 bits."""
    bits = 8 if dtype.itemsize == 1 else 16
    raw = torch.arange(2**bits, dtype=torch.int32)
    codes = raw.to(torch.uint8) if bits == 8 else raw.to(torch.int16)  # int16 wraps: every pattern once
    values = codes.view(dtype).double()
    return values[values.isfinite()].unique().sort().values


def neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the largest grid value <= x, the smallest >= x), both x itself on the grid; x within range."""
    grid = value_grid(dtype)
    xd = x.double()
    hi_i = torch.searchsorted(grid, xd, right=False).clamp(max=len(grid) - 1)
    lo_i = (torch.searchsorted(grid, xd, right=True) - 1).clamp(min=0)
    return grid[lo_i], grid[hi_i]


def spread(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values across the format's range, subnormals and signs included, and some beyond it."""
    g = torch.Generator().manual_seed(seed)
    grid = GRIDS[dtype]
    lo, hi = grid.min_exp - grid.mantissa - 2, min(127, int(torch.tensor(grid.top).log2()) + 1)
    mags = torch.exp2(torch.empty(n).uniform_(lo, hi, generator=g))
    return torch.where(torch.rand(n, generator=g) < 0.5, -mags, mags)


# -- the stream -----------------------------------------------------------------------------------
def test_hash32_is_the_32_bit_arithmetic_it_stands_for() -> None:
    """hash32 in int64 equals the same steps done in Python integers modulo 2^32."""

    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x21F0AAAD) % 2**32
        x ^= x >> 15
        x = (x * 0x735A2D97) % 2**32
        return x ^ (x >> 15)

    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert hash32(torch.tensor(xs, dtype=torch.int64)).tolist() == [reference(x) for x in xs]


@pytest.mark.parametrize(("row0", "rows", "cols"), [(0, 1, 1), (3, 5, 37), (70_000, 9, 1031)])
def test_uniforms_are_hash32_of_each_place(row0: int, rows: int, cols: int) -> None:
    """The int32 fast path equals the int64 definition, odd sizes (SIMD tails) and large rows included."""
    key = 0x9E3779B9
    r = torch.arange(row0, row0 + rows, dtype=torch.int64)
    c = torch.arange(cols, dtype=torch.int64)
    want = (hash32(hash32(r ^ key)[:, None] ^ c[None, :]) >> 8).to(torch.float32) * 2.0**-24
    assert torch.equal(uniforms(key, row0, rows, cols), want)


def test_uniforms_depend_on_the_place_alone_and_are_uniform() -> None:
    u = uniforms(7, 0, 300, 500)
    assert torch.equal(u[120:180], uniforms(7, 120, 60, 500))  # any split of the rows draws the same
    assert not torch.equal(u, uniforms(8, 0, 300, 500))  # another key, other draws
    assert float(u.min()) >= 0 and float(u.max()) < 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    expected = u.numel() / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30  # 9 degrees of freedom: p < 0.001 beyond 27.9
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.01


def test_a_rounding_key_is_per_seed_and_tensor() -> None:
    r = Rounding("stochastic", 3)
    assert r.key("a.weight") == Rounding("stochastic", 3).key("a.weight")
    assert len({r.key("a.weight"), r.key("b.weight"), Rounding("stochastic", 4).key("a.weight")}) == 3


# -- rounding onto a grid ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(GRIDS), ids=str)
def test_nearest_is_the_formats_own_conversion(dtype: torch.dtype) -> None:
    x = spread(50_000, dtype)
    top = GRIDS[dtype].top
    assert torch.equal(round_to_grid(x, dtype, None), x.clamp(-top, top).to(dtype).float())


@pytest.mark.parametrize("dtype", list(GRIDS), ids=str)
def test_stochastic_rounding_lands_on_a_neighbour_with_the_odds_of_its_position(dtype: torch.dtype) -> None:
    """Each value goes to one of the two grid values around it (itself if on the grid), saturating
    beyond the range, and to the upper one exactly when the draw is below its fractional position."""
    top = GRIDS[dtype].top
    x = spread(50_000, dtype, seed=1)
    u = uniforms(11, 0, 1, x.numel()).reshape(-1)
    got = round_to_grid(x, dtype, u).double()
    a = x.abs().clamp(max=top)
    lo, hi = neighbours(a, dtype)
    frac = torch.where(hi > lo, (a.double() - lo) / (hi - lo).clamp(min=1e-300), torch.zeros_like(lo))
    want = torch.where(u.double() < frac, hi, lo) * torch.where(x < 0, -1.0, 1.0).double()
    assert torch.equal(got, want)
    assert torch.equal(got.float().to(dtype).double(), got)  # exactly representable


@pytest.mark.parametrize("dtype", [E4M3, torch.float8_e5m2, torch.bfloat16], ids=str)
def test_stochastic_rounding_is_unbiased_over_seeds(dtype: torch.dtype) -> None:
    """The mean over 400 streams of the rounded values converges to the values themselves, where
    nearest rounding's stays off by the fraction it drops (a statistical test with fixed seeds)."""
    g = torch.Generator().manual_seed(2)
    x = (1 + torch.rand(2000, generator=g)) * torch.exp2(torch.randint(-8, 6, (2000,), generator=g).float())
    lo, hi = neighbours(x, dtype)
    step = (hi - lo).clamp(min=1e-300)
    total = torch.zeros(x.shape, dtype=torch.float64)
    seeds = 400
    for seed in range(seeds):
        total += round_to_grid(x, dtype, uniforms(Rounding("stochastic", seed).key("w"), 0, 1, x.numel())[0]).double()
    bias = (total / seeds - x.double()) / step  # in steps; a draw's std is at most 1/2 step
    assert float(bias.abs().max()) < 5 * 0.5 / seeds**0.5  # every element within 5 sigma
    assert abs(float(bias.mean())) < 0.005
    nearest = (round_to_grid(x, dtype, None).double() - x.double()) / step
    assert float(nearest.abs().mean()) > 0.2  # what the test would see without the randomness


# -- the subspace rule -----------------------------------------------------------------------------
def test_subspace_gains_are_the_damped_solves_of_what_follows_each_column() -> None:
    """gain_j = (damping I + sum_{k > j} a_k a_k^T)^-1 a_j, a_j the rows of an orthonormal basis of the
    span of the right factors, solved here one column at a time."""
    g = torch.Generator().manual_seed(0)
    rights = [torch.randn(3, 40, generator=g), torch.randn(2, 40, generator=g)]
    space = subspace_of(rights, damping=0.05, chunk=7)  # chunks that do not divide the columns
    assert space.rank == 5 and space.width == 8 and not space.basis[:, 5:].any() and not space.gain[:, 5:].any()
    a = space.basis[:, :5].double()
    assert torch.allclose(a.T @ a, torch.eye(5, dtype=torch.float64), atol=1e-6)  # orthonormal
    stacked = torch.cat(rights).double().T
    assert torch.allclose(a @ (a.T @ stacked), stacked, atol=1e-4)  # spans the factors
    for j in (0, 13, 39):
        m = 0.05 * torch.eye(5, dtype=torch.float64) + a[j + 1 :].T @ a[j + 1 :]
        assert torch.allclose(space.gain[j, :5].double(), torch.linalg.solve(m, a[j]), rtol=1e-4, atol=1e-5)


def test_subspace_rounding_without_a_subspace_is_nearest() -> None:
    g = torch.Generator().manual_seed(1)
    w, scale = torch.randn(9, 30, generator=g), torch.rand(9, 30, generator=g) + 0.01
    empty = subspace_of([torch.zeros(2, 30)])
    assert empty.rank == 0
    assert torch.equal(round_subspace(w, scale, E4M3, empty), round_to_grid(w / scale, E4M3, None))


def test_subspace_rounding_keeps_the_error_out_of_the_span() -> None:
    """Each value on the grid; the error's part in the span a small fraction of nearest rounding's."""
    g = torch.Generator().manual_seed(2)
    w, right = torch.randn(64, 512, generator=g), torch.randn(8, 512, generator=g)
    scale = torch.full((64, 512), 0.01)
    space = subspace_of([right])
    got = round_subspace(w, scale, E4M3, space)
    assert torch.equal(got.to(E4M3).float(), got)
    basis = space.basis[:, : space.rank].double()
    err = got.double() * 0.01 - w.double()
    near = round_to_grid(w / scale, E4M3, None).double() * 0.01 - w.double()
    assert float((err @ basis).norm()) < 0.2 * float((near @ basis).norm())
    assert float(err.norm()) < 3 * float(near.norm())  # the price: more error outside the span


# -- the FP8 merge step ----------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", [Fp8Scheme("block", (24, 16)), Fp8Scheme("channel")])
def test_merge_fp8_rows_matches_the_whole_weight_path(scheme: Fp8Scheme) -> None:
    """Strip by strip or whole: the same merged weight, the same scales, FP8 values within one unit;
    the kept sums as their definitions."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(70, 50, generator=g)  # 70 = 2 * 24 + 22, 50 = 3 * 16 + 2: ragged tiles both ways
    scale_shape = (3, 4) if scheme.kind == "block" else (70, 1)
    q, s = quantize_fp8(w, scheme, E4M3, scale_shape)
    a, b = factors(70, 50, 3, 5)
    q_out, s_out = torch.empty_like(q), torch.empty_like(s)
    kept = merge_fp8_rows(q, s, scheme, [row_factors(a, b, 0.5, "linear")], q_out, s_out)
    target = dequantize_fp8(q, s, scheme) + 0.5 * (b @ a)  # (out, r) @ (r, in)
    q_ref, s_ref = quantize_fp8(target, scheme, E4M3, scale_shape)
    assert torch.allclose(s_out, s_ref, rtol=1e-6)
    stored, ref = dequantize_fp8(q_out, s_out, scheme), dequantize_fp8(q_ref, s_ref, scheme)
    grid = dequantize_fp8(torch.ones_like(q_ref), s_ref, scheme)
    assert ((stored - ref).abs() <= unit_of_rounding((ref / grid).abs().double(), E4M3) * grid + 1e-7).all()
    delta, err = (0.5 * (b @ a)).double(), (target - stored).double()
    assert kept.dd == pytest.approx(float(delta.square().sum()), rel=1e-4)
    assert kept.ee == pytest.approx(float(err.square().sum()), rel=1e-4)
    assert kept.ed == pytest.approx(float((err * delta).sum()), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("scheme", [Fp8Scheme("block", (16, 8)), Fp8Scheme("channel")], ids=["block", "channel"])
@pytest.mark.parametrize("step", [16 * 40, 3 * 16 * 40 + 7])
@pytest.mark.parametrize("rule", ["nearest", "stochastic", "subspace"])
def test_merge_fp8_rows_gives_the_same_codes_in_steps_of_any_size(
    monkeypatch, scheme: Fp8Scheme, step: int, rule: str
) -> None:
    """A step is whole block rows (CPU: ~1M elements, to stay in cache; a GPU: the whole weight), so
    its size changes nothing: codes and scales bit for bit, and the sums, as one step over all.
    (A step of one row would not do: BLAS takes a matrix-vector path for it, which rounds apart.)"""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(70, 40, generator=g)  # 70 = 4 * 16 + 6: a ragged last block row
    scale_shape = (5, 5) if scheme.kind == "block" else (70, 1)
    q, s = quantize_fp8(w, scheme, E4M3, scale_shape)
    f = [row_factors(*factors(70, 40, 3, 9), 0.7, "linear")]
    key = 99 if rule == "stochastic" else None
    space = subspace_of([t.right for t in f]) if rule == "subspace" else None
    whole_q, whole_s = torch.empty_like(q), torch.empty_like(s)
    whole = merge_fp8_rows(q, s, scheme, f, whole_q, whole_s, key=key, space=space)
    monkeypatch.setitem(fp8._GROUP_ELEMENTS, "cpu", step)
    assert len(list(fp8._strip_groups(70, 40, scheme, q.device))) > 1
    step_q, step_s = torch.empty_like(q), torch.empty_like(s)
    stepped = merge_fp8_rows(q, s, scheme, f, step_q, step_s, key=key, space=space)
    assert torch.equal(step_q.view(torch.uint8), whole_q.view(torch.uint8)) and torch.equal(step_s, whole_s)
    assert stepped.dd == pytest.approx(whole.dd, rel=1e-6) and stepped.ee == pytest.approx(whole.ee, rel=1e-6)


@pytest.mark.parametrize("rule", ["stochastic", "subspace"])
def test_rounded_merges_are_deterministic_on_any_thread_count(rule: str) -> None:
    """One seed (or none), the same bytes on 1 and 2 threads (whichever path runs here)."""
    scheme = Fp8Scheme("block", (32, 32))
    q, s = quantize_fp8(torch.randn(256, 192, generator=torch.Generator().manual_seed(1)), scheme, E4M3, (8, 6))
    f = [row_factors(*factors(256, 192, 4, 2), 0.01, "linear")]
    key, space = (1234, None) if rule == "stochastic" else (None, subspace_of([f[0].right]))
    outs = []
    for threads in (1, 2):
        q_out, s_out = torch.empty_like(q), torch.empty_like(s)
        with torch_threads(threads):
            merge_fp8_rows(q, s, scheme, f, q_out, s_out, key=key, space=space)
        outs.append((q_out.view(torch.uint8).clone(), s_out.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_a_small_delta_is_erased_by_nearest_rounding_and_kept_by_stochastic() -> None:
    """A delta well under half an FP8 step: nearest writes most of the base back (kept near 0),
    stochastic rounding carries it (kept near 1, noise larger than the delta)."""
    scheme = Fp8Scheme("block", (32, 32))
    q, s = quantize_fp8(torch.randn(256, 256, generator=torch.Generator().manual_seed(3)), scheme, E4M3, (8, 8))
    f = [row_factors(*factors(256, 256, 8, 4), 2e-3, "linear")]  # ||delta|| / ||W|| about 0.6%
    results = {}
    for key in (None, 77):
        q_out, s_out = torch.empty_like(q), torch.empty_like(s)
        results[key] = merge_fp8_rows(q, s, scheme, f, q_out, s_out, key=key)
    assert results[None].kept is not None and results[None].kept < 0.3
    assert results[77].kept == pytest.approx(1.0, abs=0.1) and (results[77].noise or 0) > 1


def test_kept_is_its_formula() -> None:
    g = torch.Generator().manual_seed(0)
    base, delta = torch.randn(50, generator=g), torch.randn(50, generator=g) * 0.1
    written = base + 0.6 * delta + torch.randn(50, generator=g) * 0.02
    k = Kept.of(delta.double(), (base.double() + delta.double()) - written.double())
    change = written.double() - base.double()
    kept = float(change @ delta.double() / (delta.double() @ delta.double()))
    assert k.kept == pytest.approx(kept, rel=1e-9)
    assert k.noise == pytest.approx(float((change - kept * delta.double()).norm() / delta.double().norm()), rel=1e-6)
    assert Kept().kept is None and Kept().noise is None and Kept().to_json()["kept"] is None  # no delta: no NaN


@pytest.mark.parametrize(("dtype", "value"), [(torch.float8_e4m3fn, 320.0), (torch.float8_e5m2, 40960.0)])
@pytest.mark.parametrize("key", [None, 5], ids=["nearest", "stochastic"])
def test_merge_fp8_rows_stays_in_range_for_subnormal_scales(dtype: torch.dtype, value: float, key: int | None) -> None:
    """A tile so small that its new scale is a subnormal float32, rounded far down, still quantizes
    into range (no NaN or Inf codes)."""
    scheme = Fp8Scheme("block", (4, 4))
    q = torch.full((4, 4), value).to(dtype)  # W = value * 2^-148: its new scale, W / max, is
    s = torch.full((1, 1), 2.0**-148)  # 1.43 * 2^-149, stored as 2^-149: W / that is 1.43 * max
    q_out, s_out = torch.empty_like(q), torch.empty_like(s)
    zero = [row_factors(torch.zeros(1, 4), torch.zeros(4, 1), 1.0, "linear")]
    merge_fp8_rows(q, s, scheme, zero, q_out, s_out, key=key)
    assert dequantize_fp8(q_out, s_out, scheme).isfinite().all()


def test_merge_fp8_rows_refuses_per_tensor_scales() -> None:
    q = torch.zeros(4, 4, dtype=E4M3)
    with pytest.raises(ValueError, match="whole weight"):
        merge_fp8_rows(q, torch.ones(1), Fp8Scheme("tensor"), [], q.clone(), torch.ones(1))
