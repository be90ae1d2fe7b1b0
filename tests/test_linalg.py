"""The math against its oracles: exact SVD, the formulas, and the rank rules' definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.linalg import (
    allocate_budget,
    exact_svd,
    factored_svd,
    randomized_svd,
    rank_for_energy,
    relative_error,
    residual_error,
    split_factors,
)


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((u * s.double()) @ v.T).float()


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
    # the budget is spent until no next rank with any energy is affordable
    left = budget - spent
    for n in names:
        r = ranks[n]
        assert not (r < len(S[n]) and c[n] <= left and float(S[n][r]) ** 2 > 0), f"{n} could buy rank {r + 1}"
    # against brute force on small cases: greedy energy equals the best feasible energy
    if len(names) <= 3 and all(len(S[n]) <= 4 for n in names):
        best = _brute_force(S, c, budget, names)
        got = sum(float(S[n][: ranks[n]].square().sum()) for n in names)
        assert got >= best - 1e-9 or _greedy_gap_allowed(S, c, budget, names, got, best)


def _brute_force(S, c, budget, names) -> float:
    import itertools

    best = 0.0
    for combo in itertools.product(*[range(len(S[n]) + 1) for n in names]):
        if sum(r * c[n] for r, n in zip(combo, names)) <= budget:
            best = max(best, sum(float(S[n][:r].square().sum()) for r, n in zip(combo, names)))
    return best


def _greedy_gap_allowed(S, c, budget, names, got, best) -> bool:
    # Greedy by ratio is optimal up to one item (the knapsack's fractional bound): the gap is
    # at most the largest single rank's energy.
    largest = max(float(S[n][0]) ** 2 for n in names)
    return best - got <= largest + 1e-9


def test_split_factors_keeps_scaling_one() -> None:
    delta = with_spectrum(20, 30, torch.tensor([4.0, 1.0]))
    b, a = split_factors(exact_svd(delta, 2), 2)
    assert b.shape == (20, 2) and a.shape == (2, 30)
    assert torch.allclose(b @ a, delta, atol=1e-5)
    # B and A carry sqrt(S) each: balanced column/row norms
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-4)
    assert math.isclose(float(b.norm(dim=0)[0]) ** 2, 4.0, rel_tol=1e-4)
