"""TIES, DARE and magnitude pruning: merging several task tensors with less interference.

Pure functions over tensors, the same rules as PEFT's ``peft.utils.merge_utils`` (which
``add_weighted_adapter`` applies): magnitude pruning keeps the ``int(density * numel)`` largest
magnitudes; DARE keeps each element with probability ``density`` and rescales it by 1/density;
TIES elects a sign per element (of the sum of the pruned tensors, ``total``, or of their signs,
``frequency``; ties go to +) and averages, weighted, the values that agree with it.

Random masks come from a ``torch.Generator`` the caller seeds, so a result depends only on the
seed, never on the thread count, device or module order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SignMethod = Literal["total", "frequency"]
METHODS: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass
class MergeStats:
    """What a sparse merge did: the share of elements kept by pruning, and (TIES) the share of the
    kept nonzero elements whose sign agreed with the elected one."""

    density: float = 1.0
    sign_agreement: float | None = None


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """1 where ``t`` holds one of its ``int(density * numel)`` largest magnitudes, else 0.

    The k-th largest magnitude is found by selection (``kthvalue``, three times faster than PEFT's
    ``topk`` on CPU for large k). Where equal magnitudes straddle it (float32 repeats values in
    large tensors), the first of them in memory order are kept: ``topk`` leaves that choice to its
    implementation, so PEFT's own result there is not defined either.
    """
    k = int(density * t.numel())
    magnitude = t.abs().reshape(-1)
    if k == 0:
        return torch.zeros_like(t)
    threshold = torch.kthvalue(magnitude, t.numel() - k + 1).values
    keep = magnitude > threshold
    need = k - int(torch.count_nonzero(keep))  # count_nonzero: far faster than a bool sum
    if need:
        tied = torch.nonzero(magnitude == threshold).reshape(-1)[:need]
        keep[tied] = True
    return keep.view(t.shape).to(t.dtype)


def random_mask(shape: torch.Size | tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(density) draws (float32, CPU), from ``generator`` alone."""
    return torch.bernoulli(torch.full(tuple(shape), density, dtype=torch.float32), generator=generator)


def prune(
    t: torch.Tensor, density: float, how: Literal["magnitude", "random"], generator: torch.Generator | None = None
) -> torch.Tensor:
    """``t`` with all but a ``density`` share of its elements zeroed (random: rescaled by 1/density)."""
    if density >= 1:
        return t
    if how == "magnitude":
        return t * magnitude_mask(t, density)
    assert generator is not None
    return t * random_mask(t.shape, density, generator).to(t.device, t.dtype) / density


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Per element of ``stacked`` (n, ...): whether each task's sign is the elected one."""
    sign = stacked.sign()
    weight = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(weight >= 0, 1.0, -1.0).to(stacked.dtype)
    return sign == majority


def merge_tasks(
    tensors: list[torch.Tensor],
    weights: list[float],
    method: Method,
    *,
    density: float = 1.0,
    sign_method: SignMethod = "total",
    generators: list[torch.Generator] | None = None,
    stats: MergeStats | None = None,
) -> torch.Tensor:
    """Merge same-shaped task tensors with ``weights`` by ``method``; DARE takes one generator per task."""
    if method in ("dare_linear", "dare_ties"):
        assert generators is not None and len(generators) == len(tensors)
        pruned = [prune(t, density, "random", g) for t, g in zip(tensors, generators)]
    elif method in ("ties", "magnitude_prune"):
        pruned = [prune(t, density, "magnitude") for t in tensors]
    else:
        pruned = list(tensors)
    stacked = torch.stack(pruned)  # (n, ...)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if stats is not None:
        stats.density = int(torch.count_nonzero(stacked)) / max(1, sum(int(torch.count_nonzero(t)) for t in tensors))
    if method not in ("ties", "dare_ties"):
        return (stacked * w).sum(dim=0)
    agree = majority_sign_mask(stacked, sign_method)
    if stats is not None:
        nonzero = stacked != 0
        stats.sign_agreement = int(torch.count_nonzero(agree & nonzero)) / max(1, int(torch.count_nonzero(nonzero)))
    weighted = stacked * w * agree
    return weighted.sum(dim=0) / agree.sum(dim=0, dtype=stacked.dtype).clamp(min=1)  # mean over the agreeing
