"""The math against its oracles: exact SVD, the formulas, and the rank rules' definitions."""

from __future__ import annotations

import math
import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.adapter import LoraModule
from loratool.math import linalg
from loratool.math.linalg import (
    TruncatedSVD,
    add_lora,
    allocate_budget,
    dora_rescale,
    exact_svd,
    factored_svd,
    lora_delta,
    merge_rows,
    out_in,
    randomized_svd,
    rank_for_energy,
    relative_error,
    residual_error,
    row_factors,
    split_factors,
    squared_norm,
    top_svd,
    unit_of_rounding,
)


def test_energy_share_is_a_share() -> None:
    """The kept energy and the total are computed apart in float32; a nearly exact fit can put the
    first a few ulps above the second (CUDA's SVD did), and an adapter's report must stay in [0, 1]."""
    s = torch.tensor([2.0, 1.0])
    over = TruncatedSVD(torch.eye(2), s, torch.eye(2), total_energy=5.0 * (1 - 1e-7))
    assert over.energy_share(2) == 1.0 and over.energy_share(1) == pytest.approx(0.8)
    assert TruncatedSVD(torch.eye(2), s, torch.eye(2), total_energy=0.0).energy_share(1) == 1.0


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((u * s.double()) @ v.T).float()


def float64_sq(t: torch.Tensor) -> float:
    return sum(float(c.double().square().sum()) for c in t.reshape(-1).split(1 << 20))


def test_squared_norm_is_accurate_on_large_tensors() -> None:
    """2^24 elements (a Llama-1B MLP weight's count): the square within 1e-7 of float64's (torch's norm
    of a whole float32 tensor of this size was 2.5e-3 off, measured), also as a long 1-D tensor whose
    length is no multiple of the runs it is cut into, and a bfloat16 one's (its rows summed in float32)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4096, 4096, generator=g) * (torch.arange(4096) % 7 + 1)
    assert abs(squared_norm(t) - float64_sq(t)) <= 1e-7 * float64_sq(t)
    flat = t.reshape(-1)[: (1 << 24) - 5]
    assert abs(squared_norm(flat) - float64_sq(flat)) <= 1e-7 * float64_sq(flat)
    half = t.bfloat16()
    assert abs(squared_norm(half) - float64_sq(half)) <= 2e-6 * float64_sq(half)  # rows in bf16: 1.6e-5
    assert squared_norm(torch.zeros(0, 3)) == 0.0
    wide = t[:, :1024]  # a transposed view (a Conv1D or experts delta as (out, in)): its columns' norms, as accurate
    assert abs(squared_norm(wide.T) - float64_sq(wide)) <= 1e-7 * float64_sq(wide)
    assert squared_norm(torch.tensor([[1.0, 2.0], [2.0, 4.0]])) == pytest.approx(25.0, rel=1e-6)
    assert math.isnan(squared_norm(torch.tensor([[1.0, float("nan")]])))
    assert math.isinf(squared_norm(torch.tensor([[1.0, float("inf")]])))


def test_residual_error_is_accurate_on_large_matrices() -> None:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(8192, 2048, generator=g)
    b, a = torch.randn(8192, 16, generator=g), torch.randn(16, 2048, generator=g) * 0.1
    want = math.sqrt(float64_sq(m - b @ a) / float64_sq(m))
    assert abs(residual_error(m.clone(), b, a) - want) <= 1e-7 * want


def test_exact_low_rank_is_recovered() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(96, 8, generator=g) @ torch.randn(8, 64, generator=g)
    for svd in (exact_svd(delta, 8), randomized_svd(delta, 8, generator=g)):
        b, a = split_factors(svd, 8)
        assert residual_error(delta.clone(), b, a) < 1e-5


@pytest.mark.parametrize("shape", [(512, 192), (192, 512)])
def test_randomized_within_one_percent_of_exact_on_slow_decay(shape: tuple[int, int]) -> None:
    k = min(shape)
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 0.5  # slowly decaying, like real fine-tunes
    delta = with_spectrum(*shape, s)
    for r in (4, 16, 32):
        exact = relative_error(exact_svd(delta, r), r)
        approx = randomized_svd(delta, r, generator=torch.Generator().manual_seed(1))
        b, a = split_factors(approx, r)
        err = residual_error(delta.clone(), b, a)
        assert err <= exact * 1.01, (r, err, exact)


def test_block_krylov_for_thin_sketches_matches_four_power_iterations() -> None:
    """A basis a sixth of the smaller side or thinner takes block Krylov (every iterate of 2 steps) on
    a matrix of 2^20 elements or more; its error is within 1% of the exact truncation's and within
    3e-4 (relative) of four power iterations' from the same start, and its basis holds what two power
    iterations keep."""
    s = 1.0 / torch.arange(1, 1201, dtype=torch.float64) ** 0.5
    delta = with_spectrum(1536, 1200, s)

    def svd(rank: int, matrix: torch.Tensor = delta, **kw: object) -> TruncatedSVD:
        return randomized_svd(matrix, rank, generator=torch.Generator().manual_seed(1), **kw)  # type: ignore[arg-type]

    def err(decomposed: TruncatedSVD, rank: int) -> float:
        b, a = split_factors(decomposed, rank)
        return residual_error(delta.clone(), b, a)

    for r in (16, 48):  # bases of 72 and 168 columns, 168 <= 1200 / 6
        krylov = err(svd(r, krylov=True), r)
        assert torch.equal(svd(r).S, svd(r, krylov=True).S)  # the automatic choice
        assert krylov <= 1.01 * relative_error(exact_svd(delta, r), r)
        assert krylov <= err(svd(r, krylov=False), r) * (1 + 3e-4)
        assert krylov <= err(svd(r, krylov=False, n_iter=2), r) * (1 + 1e-6)  # the basis holds its last block
    assert torch.equal(svd(64).S, svd(64, krylov=False).S)  # 216 columns: more than a sixth of 1200
    small = delta[:1000, :1000]  # 10^6 < 2^20 elements
    assert torch.equal(svd(16, small).S, svd(16, small, krylov=False).S)


@pytest.mark.parametrize("shape", [(1536, 1200), (1200, 1536)])
def test_block_krylov_is_rayleigh_ritz_on_its_space(shape: tuple[int, int]) -> None:
    """The Lanczos-built basis gives what Rayleigh-Ritz on the same Krylov space gives, formed the
    plain way in float64 (every iterate orthonormalized, one QR of them all, then Q^T A)."""
    s = 1.0 / torch.arange(1, min(shape) + 1, dtype=torch.float64) ** 0.5
    delta = with_spectrum(*shape, s)
    got = randomized_svd(delta, 16, oversample=8, generator=torch.Generator().manual_seed(1), krylov=True)
    a = delta.double() if shape[0] >= shape[1] else delta.double().T
    omega = torch.randn(a.shape[1], 24, generator=torch.Generator().manual_seed(1)).double()
    q = torch.linalg.qr(a @ omega)[0]
    blocks = [q]
    for _ in range(2):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q)[0])[0]
        blocks.append(q)
    basis = torch.linalg.qr(torch.cat(blocks, dim=1))[0]
    u_small, want, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    torch.testing.assert_close(got.S.double(), want[:16], rtol=2e-5, atol=0)
    u, v = (got.U, got.Vh.T) if shape[0] >= shape[1] else (got.Vh.T, got.U)
    torch.testing.assert_close(u.T.double() @ u.double(), torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(v.T.double() @ v.double(), torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-5)
    # the same subspaces: |cos| of the angles between ours and the float64 top 8 (well separated) near 1
    for ours, theirs in ((u, basis @ u_small[:, :8]), (v, vh[:8].T)):
        assert torch.linalg.svdvals(ours[:, :8].double().T @ theirs).min() > 1 - 1e-4


def test_block_krylov_on_an_exhausted_space() -> None:
    """A matrix of rank 10 has nothing left for the later blocks: their new part is rounding noise,
    which the reorthogonalization must keep out of the basis's span without losing orthonormality."""
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(1300, 10, generator=g) @ torch.randn(10, 1200, generator=g)
    svd = randomized_svd(delta, 16, generator=torch.Generator().manual_seed(1), krylov=True)
    b, a = split_factors(svd, 16)
    assert residual_error(delta.clone(), b, a) < 1e-5
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(16), rtol=0, atol=1e-5)
    torch.testing.assert_close(svd.Vh @ svd.Vh.T, torch.eye(16), rtol=0, atol=1e-5)


def relative_product_error(got: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> float:
    want = a.double() @ x.double()
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("m, n, w", [(512, 2048, 24), (2048, 512, 24), (300, 70, 1), (64, 3000, 40)])
def test_thin_product_is_the_float32_product(m: int, n: int, w: int) -> None:
    """``a @ x`` to float32's accuracy (bfloat16 or TF32 arithmetic would be 1e-3 to 1e-4 off), for a
    matrix, its transposed view (the SVD's ``A^T q``) and a strided block of it."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2 * m, n + 8, generator=g)
    for a in (big[:m, :n].contiguous(), big[:m, :n].contiguous().T.contiguous().T, big[::2, 3 : n + 3]):
        x = torch.randn(a.shape[1], w, generator=g)
        got = linalg.thin_product(a, x)
        assert got.shape == (a.shape[0], w) and got.dtype == torch.float32
        assert relative_product_error(got, a, x) < 1e-5
    x = torch.randn(m, w, generator=g)
    assert relative_product_error(linalg.thin_product(big[:m, :n].T, x), big[:m, :n].T, x) < 1e-5


@pytest.mark.parametrize("broken", ["raises", "wrong"])
def test_thin_product_keeps_matmul_when_onednn_fails(broken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch's oneDNN product is missing, has another signature or computes something else, the
    first call's check finds it and every product is ``@``'s."""

    def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if broken == "raises":
            raise RuntimeError("no such op")
        return x @ w.T + 1

    monkeypatch.setattr(linalg, "_onednn_linear", onednn)
    monkeypatch.setattr(linalg, "_ONEDNN", [])
    g = torch.Generator().manual_seed(0)
    a, x = torch.randn(700, 300, generator=g), torch.randn(300, 24, generator=g)
    assert torch.equal(linalg.thin_product(a, x), a @ x)
    assert linalg._ONEDNN == [False]


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and platform.machine() in ("x86_64", "AMD64")),
                    reason="oneDNN's product is checked where torch's x86-64 builds ship it")  # fmt: skip
def test_thin_product_takes_onednn_where_torch_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The randomized SVD's speed on CPU rests on it (bench/svd_products.py): a torch that drops or
    renames the op must show here, not only as a slower extraction."""
    monkeypatch.setattr(linalg, "_ONEDNN", [])
    assert linalg._onednn_works()


def truncation_error(svd, truth: tuple[torch.Tensor, torch.Tensor, torch.Tensor], r: int) -> float:
    """||U_r S_r V_r - the float64 rank-r truncation|| / ||the truncation||."""
    u, s, vh = truth
    exact = (u[:, :r] * s[:r]) @ vh[:r]
    ours = (svd.U[:, :r].double() * svd.S[:r].double()) @ svd.Vh[:r].double()
    return float((ours - exact).norm() / exact.norm())


SPECTRA = {
    "flat (Gaussian)": None,
    "1/i^0.3": lambda i: i**-0.3,
    "1/i": lambda i: i**-1.0,
    "1/i^2 (sigma_r far below sqrt(eps) sigma_1)": lambda i: i**-2.0,
}


@pytest.mark.parametrize("spectrum", list(SPECTRA), ids=list(SPECTRA))
@pytest.mark.parametrize("shape", [(1024, 256), (256, 1024)])
def test_top_svd_is_as_accurate_as_the_direct_svd(spectrum: str, shape: tuple[int, int]) -> None:
    """The truncation from top_svd is no further from the float64 truth than float32 LAPACK's."""
    f = SPECTRA[spectrum]
    g = torch.Generator().manual_seed(3)
    n = min(shape)
    if f is None:
        m = torch.randn(*shape, generator=g)
    else:
        m = with_spectrum(*shape, f(torch.arange(1, n + 1, dtype=torch.float64)))
    truth = torch.linalg.svd(m.double(), full_matrices=False)
    for r in (8, 32):
        direct = truncation_error(exact_svd(m, r), truth, r)
        ours = truncation_error(top_svd(m, r), truth, r)
        assert ours <= 3 * direct + 1e-6, (r, ours, direct)
        assert top_svd(m, r).U.shape == (shape[0], r) and top_svd(m, r).Vh.shape == (r, shape[1])


def test_squared_norm_of_values_whose_squares_pass_float32() -> None:
    """Finite float32 values above 2^64 square past float32's range: summed in float64, not Inf."""
    t = torch.full((3, 5000), 3e30)
    assert math.isclose(squared_norm(t), 15000 * 3e30**2, rel_tol=1e-6)
    assert squared_norm(torch.tensor([[1.0, math.inf]])) == math.inf
    assert math.isnan(squared_norm(torch.tensor([[1.0, math.nan]])))


def test_top_svd_of_a_matrix_whose_gram_matrix_float32_cannot_hold() -> None:
    """Values past 2^64 square past float32's range in the Gram matrix (linalg.svd then failed on its
    Inf, as combine --method ties_svd did at a scale of 1e38): by a power of two, the same triplets."""
    m = torch.randn(300, 120, generator=torch.Generator().manual_seed(0))
    for e in (70, 100):
        big = top_svd(torch.ldexp(m, torch.tensor(e)), 8)
        want = top_svd(m, 8)
        assert torch.equal(big.S, torch.ldexp(want.S, torch.tensor(e))), e
        assert torch.equal(big.U, want.U) and torch.equal(big.Vh, want.Vh), e
        assert math.isclose(big.total_energy, squared_norm(m) * 4.0**e, rel_tol=1e-6)  # summed in float64 past 2^64


def test_top_svd_falls_back_to_the_direct_svd_when_its_check_fails(monkeypatch) -> None:
    """Should the Gram eigenvectors be wrong, the residual check sees it and the direct SVD runs."""
    g = torch.Generator().manual_seed(4)
    m = torch.randn(512, 128, generator=g)
    truth = torch.linalg.svd(m.double(), full_matrices=False)
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: (real_eigh(a)[0], torch.linalg.qr(torch.randn_like(a))[0]))
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **kw: calls.append(a.shape) or real_svd(a, **kw))
    assert truncation_error(top_svd(m, 8), truth, 8) < 1e-5
    assert (512, 128) in calls  # the direct SVD of the whole matrix ran


def test_spectral_error_identity_matches_the_formed_residual() -> None:
    s = torch.linspace(3, 0.1, 40)
    delta = with_spectrum(64, 48, s)
    svd = exact_svd(delta, 10)
    b, a = split_factors(svd, 10)
    assert relative_error(svd, 10) == pytest.approx(residual_error(delta.clone(), b, a), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factored_svd_equals_dense_svd(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    Bs = [torch.randn(50, r, generator=g) for r in (3, 5, 4)]
    As = [torch.randn(r, 40, generator=g) for r in (3, 5, 4)]
    dense = sum(b @ a for b, a in zip(Bs, As))
    f = factored_svd(Bs, As, 6, dtype=dtype)
    d = exact_svd(dense, 6)
    assert torch.allclose(f.S.float(), d.S, rtol=1e-4)
    assert f.total_energy == pytest.approx(d.total_energy, rel=1e-5)
    b, a = split_factors(f, 6)
    assert residual_error(dense.clone(), b, a) == pytest.approx(relative_error(d, 6), rel=1e-4)


def test_factored_svd_of_dependent_factors_is_exact_and_finite() -> None:
    """Stacked factors with shared columns: the core is singular, the kept vectors stay finite."""
    g = torch.Generator().manual_seed(4)
    b, a = torch.randn(30, 3, generator=g), torch.randn(3, 20, generator=g)
    Bs, As = [b, b, 2 * b[:, :1]], [a, -0.5 * a, a[:1]]  # rank 3 in 7 stacked columns
    dense = sum(x @ y for x, y in zip(Bs, As))
    f = factored_svd(Bs, As, 7)
    assert torch.isfinite(f.U).all() and torch.isfinite(f.Vh).all()
    bf, af = split_factors(f, 7)
    assert torch.allclose(bf @ af, dense, rtol=1e-5, atol=1e-5)
    assert float(f.S[3:].max()) < 1e-6 * float(f.S[0])


@settings(max_examples=60, deadline=None)
@given(
    s=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=30),
    fraction=st.floats(0.01, 1.0),
    cap=st.integers(1, 40),
)
def test_energy_rank_is_the_smallest_that_keeps_the_fraction(s: list[float], fraction: float, cap: int) -> None:
    S = torch.tensor(sorted(s, reverse=True), dtype=torch.float64)
    total = float(S.square().sum())
    r = rank_for_energy(S, total, fraction, cap)
    if total == 0:
        assert r == 0
        return
    assert 1 <= r <= min(cap, len(s))
    kept = float(S[:r].square().sum()) / total
    if r < min(cap, len(s)):
        assert kept >= fraction - 1e-9  # keeps the share...
    if r > 1:
        assert float(S[: r - 1].square().sum()) / total < fraction + 1e-9  # ...and one less would not


@settings(max_examples=60, deadline=None)
@given(
    spectra=st.lists(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=8), min_size=1, max_size=5),
    costs=st.lists(st.integers(1, 20), min_size=5, max_size=5),
    budget=st.integers(0, 200),
)
def test_budget_allocation_is_feasible_and_greedy_optimal(spectra, costs, budget) -> None:
    names = [f"m{i}" for i in range(len(spectra))]
    S = {n: torch.tensor(sorted(s, reverse=True), dtype=torch.float64) for n, s in zip(names, spectra)}
    c = dict(zip(names, costs))
    ranks = allocate_budget(S, c, budget)
    spent = sum(ranks[n] * c[n] for n in names)
    assert spent <= budget
    assert all(0 <= ranks[n] <= len(S[n]) for n in names)

    def gain(n: str, j: int) -> float:  # energy per parameter of module n's rank j + 1
        return float(S[n][j]) ** 2 / c[n]

    # the budget is spent until no next rank with any energy is affordable
    for n in names:
        r = ranks[n]
        assert not (r < len(S[n]) and c[n] <= budget - spent and gain(n, r) > 0), f"{n} could buy rank {r + 1}"
    if not (len(names) <= 3 and all(len(S[n]) <= 4 for n in names)):
        return
    # The exact guarantee, against brute force. Ranks in order of energy per parameter, up to the first
    # that does not fit, are the best use of what they cost (the fractional knapsack bound is met); the
    # rest of the budget can add at most that first misfit's rate per parameter.
    order = sorted(((gain(n, j), n, j) for n in names for j in range(len(S[n])) if gain(n, j) > 0),
                   key=lambda t: (-t[0], t[1], t[2]))  # fmt: skip
    prefix_energy, prefix_cost, misfit_rate = 0.0, 0, 0.0
    for g, n, _ in order:
        if prefix_cost + c[n] > budget:
            misfit_rate = g
            break
        prefix_energy += g * c[n]
        prefix_cost += c[n]
    got = sum(float(S[n][: ranks[n]].square().sum()) for n in names)
    assert got >= prefix_energy - 1e-9
    assert _brute_force(S, c, prefix_cost, names) == pytest.approx(prefix_energy, abs=1e-9)
    best = _brute_force(S, c, budget, names)
    assert best <= prefix_energy + misfit_rate * (budget - prefix_cost) + 1e-9
    if misfit_rate == 0.0:  # everything worth buying fitted: greedy is the optimum itself
        assert got == pytest.approx(best, abs=1e-9)


def _brute_force(S, c, budget, names) -> float:
    import itertools

    best = 0.0
    for combo in itertools.product(*[range(len(S[n]) + 1) for n in names]):
        if sum(r * c[n] for r, n in zip(combo, names)) <= budget:
            best = max(best, sum(float(S[n][:r].square().sum()) for r, n in zip(combo, names)))
    return best


def test_split_factors_keeps_scaling_one() -> None:
    delta = with_spectrum(20, 30, torch.tensor([4.0, 1.0]))
    b, a = split_factors(exact_svd(delta, 2), 2)
    assert b.shape == (20, 2) and a.shape == (2, 30)
    assert torch.allclose(b @ a, delta, atol=1e-5)
    # B and A carry sqrt(S) each: balanced column/row norms
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-4)
    assert math.isclose(float(b.norm(dim=0)[0]) ** 2, 4.0, rel_tol=1e-4)


# -- merge kernels, each against the reference delta in float64 -----------------------------------------
KINDS = ["linear", "conv1d", "embedding"]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def reference_delta(a: torch.Tensor, b: torch.Tensor, factor: float, kind: str) -> torch.Tensor:
    """factor * B @ A in float64, in the stored layout: (out, in) for linear, its transpose otherwise."""
    d = factor * (b.double() @ a.double())  # (out, r) @ (r, in)
    return d if kind == "linear" else d.T


def factors(out: int, inp: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)  # A (r, in), B (out, r)


def stored(out: int, inp: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    shape = (out, inp) if kind == "linear" else (inp, out)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7)).to(dtype)


def within_rounding(got: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype) -> bool:
    """|got - ref| within one unit of rounding of ``dtype`` at the operands' magnitude (plus float32 noise)."""
    err = (got.double() - ref).abs()
    return bool((err <= unit_of_rounding(magnitude, dtype) + 1e-6 * magnitude).all())


@pytest.mark.parametrize("kind", KINDS)
def test_out_in_is_the_orientation_rule(kind: str) -> None:
    a, b = factors(12, 20, 3, 0)
    d = lora_delta(a, b, 0.5, kind)  # stored layout
    assert tuple(out_in(d, kind).shape) == (12, 20)
    assert torch.allclose(d.double(), reference_delta(a, b, 0.5, kind), atol=1e-5)
    m = LoraModule(lora_A=a, lora_B=b, alpha=1.0, kind=kind)  # type: ignore[arg-type]
    assert m.weight_shape == tuple(d.shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_add_lora_matches_the_reference(kind: str, dtype: torch.dtype) -> None:
    a, b = factors(12, 20, 3, 1)
    w = stored(12, 20, kind, dtype)
    ref = w.double() + reference_delta(a.to(dtype), b.to(dtype), -0.7, kind)
    got = add_lora(w.float().clone(), a.to(dtype), b.to(dtype), -0.7, kind)
    assert torch.allclose(got.double(), ref, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("scratch_rows", [1, 3, 7, 1000])  # one row, ragged blocks, one block
def test_merge_rows_matches_the_reference(kind: str, out_dtype: torch.dtype, scratch_rows: int) -> None:
    out_f, in_f = 24, 17
    w = stored(out_f, in_f, kind, out_dtype)
    terms = [(*factors(out_f, in_f, 4, 2), 0.3), (*factors(out_f, in_f, 2, 3), -1.5)]
    rows = [row_factors(a, b, f, kind) for a, b, f in terms]  # type: ignore[arg-type]
    cols = w.shape[1]
    out = torch.empty_like(w)
    seen: list[int] = []
    merge_rows(w, rows, out, torch.empty(scratch_rows * cols + 1), check=lambda block: seen.append(block.shape[0]))
    ref = w.double() + sum(reference_delta(a, b, f, kind) for a, b, f in terms)
    magnitude = w.double().abs() + sum(reference_delta(a.abs(), b.abs(), abs(f), kind) for a, b, f in terms)
    assert out.dtype == out_dtype and within_rounding(out, ref, magnitude, out_dtype)
    assert sum(seen) == w.shape[0] and max(seen) <= scratch_rows  # every row once, in blocks that fit


def test_merge_rows_refuses_a_scratch_smaller_than_a_row() -> None:
    w = torch.zeros(4, 10)
    with pytest.raises(ValueError, match="cannot hold a row"):
        merge_rows(w, [], torch.empty_like(w), torch.empty(9))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_rescale_gives_each_output_row_its_magnitude(kind: str) -> None:
    w = stored(12, 20, kind, torch.float32)
    m = torch.rand(12) + 0.5
    before = out_in(w, kind).double().clone()
    dora_rescale(w, m, kind)
    rows = out_in(w, kind).double()
    assert torch.allclose(rows.norm(dim=1), m.double(), rtol=1e-5)
    assert torch.allclose(rows, before * (m.double() / before.norm(dim=1))[:, None], rtol=1e-5)  # same directions


@pytest.mark.parametrize(("dtype", "int_dtype"), [(torch.float32, torch.int32), (torch.bfloat16, torch.int16),
                                                  (torch.float16, torch.int16)])  # fmt: skip
def test_unit_of_rounding_is_the_gap_to_the_next_value(dtype: torch.dtype, int_dtype: torch.dtype) -> None:
    x = (torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 100 + 1e-3).to(dtype)
    next_up = (x.view(int_dtype) + 1).view(dtype)  # positive normal values: the next bit pattern
    assert torch.equal(unit_of_rounding(x.double(), dtype), next_up.double() - x.double())


def test_merge_rows_adds_each_term_to_its_own_rows() -> None:
    """3-D experts merge as their (E*rows, cols) view: a term with ``row0`` touches only its rows,
    whatever the block size."""
    from loratool.math.linalg import RowFactors, merge_rows

    g = torch.Generator().manual_seed(0)
    experts, rows, cols, r = 3, 5, 7, 2
    w = torch.randn(experts * rows, cols, generator=g)
    terms = [RowFactors(torch.randn(rows, r, generator=g), torch.randn(r, cols, generator=g), 0.5, e * rows)
             for e in (0, 2)]  # fmt: skip
    expected = w.clone()
    for left, right, factor, row0 in terms:
        expected[row0 : row0 + rows] += factor * left @ right
    for scratch_rows in (1, 3, 4, 15):
        out = torch.empty_like(w)
        merge_rows(w, terms, out, torch.empty(scratch_rows * cols))
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_unit_of_rounding_is_the_frexp_formula_bit_for_bit() -> None:
    """The exponent-mask form against 2^(exponent - mantissa bits) by frexp/ldexp in float64."""
    from loratool.math.linalg import _MANTISSA_BITS, unit_of_rounding

    g = torch.Generator().manual_seed(0)
    for wide in (torch.float32, torch.float64):
        scale = 10.0 ** torch.randint(-40, 30, (20000,), generator=g).to(wide)
        x = torch.cat(
            [torch.randn(20000, generator=g).abs().to(wide) * scale, torch.tensor([0.0, 1.0, 0.75], dtype=wide)]
        )
        for dtype, bits in _MANTISSA_BITS.items():
            _, exp = torch.frexp(x.double().clamp_min(torch.finfo(dtype).tiny))
            want = torch.ldexp(torch.ones_like(x.double()), exp - 1 - bits)
            assert torch.equal(unit_of_rounding(x, dtype).double(), want), (wide, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_is_finite_finds_nan_and_inf_in_every_float_dtype(dtype: torch.dtype) -> None:
    """torch has no isfinite for float8: the elementwise fallback widens those first."""
    from loratool.math.linalg import is_finite

    x = torch.linspace(-2, 2, 64)
    assert is_finite(x.to(dtype))
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[17] = bad
        y = y.to(dtype)
        if not y[17].float().isfinite():  # e4m3fn has no Inf: torch saturates it to 448
            assert not is_finite(y), bad
