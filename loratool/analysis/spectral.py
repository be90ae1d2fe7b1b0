"""The rank analysis of the LoRA paper (Hu et al., 2021, section 7), as pure functions.

- the spectrum of an update and its energy curve: the share of ||dW||_F^2 that the top-r
  singular values hold, and the smallest rank reaching a share;
- the stable rank ||dW||_F^2 / sigma_1^2 and the effective rank exp(H(sigma / sum sigma))
  (Roy & Vetterli, 2007);
- the normalized subspace similarity of two adapters' A factors,
  phi(A1, A2, i, j) = ||U1^(i)T U2^(j)||_F^2 / min(i, j), U^(i) the top-i right-singular vectors;
- the amplification factor ||dW_r||_F / ||U_r^T W V_r||_F: how strongly the rank-r part of the
  update (U_r, V_r its singular vectors) amplifies directions the base weight W does not emphasize.

Everything is computed in float64 from spectra and small products; no (out, in) matrix is formed
here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

ENERGY_SHARES = (0.5, 0.9, 0.99)  # the rank_for_energy keys analyze reports


def energy_curve(S: torch.Tensor, total_energy: float) -> list[float]:
    """Share of ``total_energy`` (= ||M||_F^2) held by the top r singular values, for r = 1..len(S)."""
    if total_energy <= 0:
        return [0.0] * int(S.shape[0])
    return (torch.cumsum(S.double().square(), 0) / total_energy).clamp(max=1.0).tolist()


def ranks_for_energy(
    S: torch.Tensor, total_energy: float, shares: Iterable[float] = ENERGY_SHARES, *, complete: bool = False
) -> dict[str, int | None]:
    """The smallest rank whose singular values hold each share of ``total_energy``.

    ``S`` may be the top of a longer spectrum; a share it does not reach is ``None`` (more than
    ``len(S)`` are needed), unless ``complete`` says ``S`` is the whole spectrum, when the last
    rank reaches every share up to rounding.
    """
    curve = energy_curve(S, total_energy)
    out: dict[str, int | None] = {}
    for share in shares:
        r = next((i + 1 for i, e in enumerate(curve) if e >= share - 1e-12), None)
        if r is None and complete and curve:
            r = len(curve)
        out[str(share)] = 0 if total_energy <= 0 else r
    return out


def stable_rank(S: torch.Tensor, total_energy: float) -> float:
    """||M||_F^2 / sigma_1^2: at least 1, at most the rank; exact from the top singular value alone."""
    if S.numel() == 0 or float(S[0]) == 0:
        return 0.0
    return total_energy / float(S[0].double()) ** 2


def effective_rank(S: torch.Tensor) -> float:
    """exp of the entropy of the normalized singular values (Roy & Vetterli 2007); needs the whole
    spectrum. Between 1 and the number of nonzero singular values."""
    s = S.double()
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return math.exp(float(-(p * p.log()).sum()))


def numerical_rank(S: torch.Tensor, shape: tuple[int, int], eps: float) -> int:
    """Singular values above ``max(shape) * eps * sigma_1`` (the rule of ``torch.linalg.matrix_rank``)."""
    if S.numel() == 0:
        return 0
    return int((S.double() > max(shape) * eps * float(S[0])).sum())


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """phi(i, j) for i = 1..r1, j = 1..r2, as an (r1, r2) float64 matrix (entry [i-1, j-1]).

    ``A1`` (r1, in) and ``A2`` (r2, in) are two adapters' A factors for one module. With Vh_k the
    right-singular vectors of A_k (rows), M = Vh1 @ Vh2^T holds every inner product, and
    ||U1^(i)T U2^(j)||_F^2 is the sum of M[:i, :j]^2: two cumulative sums give all of them.
    Each entry lies in [0, 1]: 1 when one subspace contains the other.
    """
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A factors of different input sizes: {tuple(A1.shape)} and {tuple(A2.shape)}")
    vh1 = torch.linalg.svd(A1.double(), full_matrices=False)[2]  # (r1, in), orthonormal rows
    vh2 = torch.linalg.svd(A2.double(), full_matrices=False)[2]  # (r2, in)
    m = vh1 @ vh2.T  # (r1, in) @ (in, r2) -> (r1, r2)
    overlap = m.square().cumsum(0).cumsum(1)  # [i-1, j-1] = ||M[:i, :j]||_F^2
    i = torch.arange(1, m.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, m.shape[1] + 1, dtype=torch.float64)[None, :]
    phi: torch.Tensor = overlap / torch.minimum(i, j)
    return phi


def amplification(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, W: torch.Tensor, ranks: Iterable[int]
) -> dict[int, float]:
    """||dW_r||_F / ||U_r^T W V_r||_F for each r in ``ranks`` up to the update's numerical rank.

    ``U`` (out, k), ``S`` (k,), ``Vh`` (k, in) are the update's top singular triplets and ``W``
    (out, in) the base weight. ||dW_r||_F = sqrt(sum S[:r]^2); for a rank-r LoRA update, dW_r is
    the whole update, as in the paper. ``inf`` when W has nothing in that subspace. Ranks past the
    numerical rank (float32's rule, :func:`numerical_rank`) are left out: there U_r and V_r take
    arbitrary directions of the update's null space, and the ratio changes with the SVD routine
    (a rank-4 update's r = 16 gave 3.73 on the CPU and 3.47 on CUDA).
    """
    defined = numerical_rank(S, (int(W.shape[0]), int(W.shape[1])), torch.finfo(torch.float32).eps)
    wanted = sorted({r for r in ranks if 1 <= r <= min(S.shape[0], defined)})
    if not wanted:
        return {}
    top = wanted[-1]
    u, vh = U[:, :top].to(W.dtype), Vh[:top].to(W.dtype)
    projected = (u.T @ (W @ vh.T)).double()  # (r, out) @ ((out, in) @ (in, r)) -> (r, r)
    energy = S[:top].double().square().cumsum(0)
    out = {}
    for r in wanted:
        denominator = float(torch.linalg.matrix_norm(projected[:r, :r]))
        out[r] = math.sqrt(float(energy[r - 1])) / denominator if denominator > 0 else math.inf
    return out
