"""TIES, DARE and magnitude pruning: merging several task tensors with less interference.

Pure functions over tensors, the same rules as PEFT's ``peft.utils.merge_utils`` (which
``add_weighted_adapter`` applies): magnitude pruning keeps the ``int(density * numel)`` largest
magnitudes; DARE keeps each element with probability ``density`` and rescales it by 1/density;
TIES elects a sign per element (of the sum of the pruned tensors, ``total``, or of their signs,
``frequency``; ties go to +) and averages, weighted, the values that agree with it.

Random masks come from a ``torch.Generator`` the caller seeds, so a result depends only on the
seed, never on the thread count, device or module order.

PEFT stacks the tasks and makes a dozen passes over the stack; here the elementwise work runs in
cache-sized chunks, one pass over memory, and the magnitude threshold is found by exact selection
in a band that a sample brackets (see :func:`kth_largest`). The arithmetic per element is PEFT's,
in its order, so results agree with it to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SignMethod = Literal["total", "frequency"]
METHODS: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")

_CHUNK = 1 << 18  # elements per chunk of the elementwise merge: 1 MiB of float32 per task, cache-resident
_SAMPLE = 1 << 16  # sample size that brackets a selection


@dataclass
class MergeStats:
    """What a sparse merge did: the share of elements kept by pruning, and (TIES) the share of the
    kept nonzero elements whose sign agreed with the elected one."""

    density: float = 1.0
    sign_agreement: float | None = None


def kth_largest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The ``k``-th largest element of the 1-D tensor ``values`` (1 <= k <= numel), exactly, and
    how many elements are at least that large (k, unless equal values straddle it).

    ``torch.kthvalue`` is a single-threaded selection over all n elements. Here a sample of 65,536
    elements (at fixed pseudo-random positions: a stride would see a few columns only) brackets
    the answer in [lo, hi] (its quantile, with a margin of several binomial standard deviations);
    counting the elements above ``hi`` and selecting among the few in the band gives the exact
    value. Where the bracket misses (it can, by chance), the plain selection runs: the result never
    depends on the sample, only the time does.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    if n > 8 * _SAMPLE:
        positions = torch.randint(n, (_SAMPLE,), generator=torch.Generator().manual_seed(0)).to(values.device)
        sample = values[positions].sort().values
        q = (n - k) / n  # the share of elements below the answer
        margin = 6 * math.sqrt(_SAMPLE * q * (1 - q)) + 16
        lo = sample[max(0, math.floor(q * _SAMPLE - margin))]
        hi = sample[min(_SAMPLE - 1, math.ceil(q * _SAMPLE + margin))]
        above = int(torch.count_nonzero(values > hi))
        if above < k:
            band = values[(values >= lo) & (values <= hi)]
            if above + band.numel() >= k:  # the answer lies in the band: the (k - above)-th largest there
                value = torch.kthvalue(band, band.numel() - (k - above) + 1).values
                return value, above + int(torch.count_nonzero(band >= value))
    value = torch.kthvalue(values, n - k + 1).values
    return value, int(torch.count_nonzero(values >= value))


def magnitude_prune_(t: torch.Tensor, density: float) -> torch.Tensor:
    """Zero, in place, all but the ``int(density * numel)`` largest magnitudes of contiguous ``t``.

    Where equal magnitudes straddle the threshold (float32 repeats values in large tensors), the
    first of them in memory order are kept: ``topk``, which PEFT uses, leaves that choice to its
    implementation, so PEFT's own result there is not defined either.
    """
    flat = t.view(-1)
    k = int(density * flat.numel())
    if k == 0:
        return t.zero_()
    magnitude = flat.abs()
    threshold, at_least = kth_largest(magnitude, k)
    flat.masked_fill_(magnitude < threshold, 0)
    if at_least > k and threshold > 0:  # drop the last of the tied magnitudes, keeping k
        tied = torch.nonzero(magnitude == threshold).reshape(-1)
        flat[tied[tied.numel() - (at_least - k) :]] = 0
    return t


def random_mask(shape: torch.Size | tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(density) draws (float32, CPU), from ``generator`` alone."""
    return torch.bernoulli(torch.full(tuple(shape), density, dtype=torch.float32), generator=generator)


def prune(
    t: torch.Tensor, density: float, how: Literal["magnitude", "random"], generator: torch.Generator | None = None
) -> torch.Tensor:
    """``t`` with all but a ``density`` share of its elements zeroed (random: rescaled by 1/density)."""
    task = _Task.of(t, density, how, generator)
    return task.chunk(0, t.numel()).view(t.shape)


@dataclass(frozen=True)
class _Task:
    """One task tensor and how it is pruned, applied a chunk at a time (the tensor is never written)."""

    flat: torch.Tensor  # (numel,), contiguous
    pruned: torch.Tensor | None = None  # already pruned, where that could not wait
    threshold: torch.Tensor | None = None  # magnitude pruning: keep |x| >= threshold
    mask: torch.Tensor | None = None  # DARE: keep where True, rescaled by 1 / density
    density: float = 1.0

    @classmethod
    def of(
        cls,
        t: torch.Tensor,
        density: float,
        how: Literal["magnitude", "random"] | None,
        generator: torch.Generator | None,
    ) -> _Task:
        flat = t.contiguous().view(-1)
        if how is None or density >= 1:
            return cls(flat)
        if how == "random":
            assert generator is not None
            return cls(flat, mask=random_mask(t.shape, density, generator).to(t.device).view(-1) != 0, density=density)
        k = int(density * flat.numel())
        if k == 0:
            return cls(flat, pruned=torch.zeros_like(flat))
        threshold, at_least = kth_largest(flat.abs(), k)
        if at_least > k and threshold > 0:  # equal magnitudes straddle the threshold: prune a copy now
            return cls(flat, pruned=magnitude_prune_(flat.clone(), density))
        return cls(flat, threshold=threshold)

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """The pruned elements [start, stop), as PEFT computes them (``tensor * mask``, then ``/ density``)."""
        if self.pruned is not None:
            return self.pruned[start:stop]
        x = self.flat[start:stop]
        if self.threshold is not None:
            return x * (x.abs() >= self.threshold)
        if self.mask is not None:
            return x * self.mask[start:stop] / self.density
        return x


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
    """Merge same-shaped task tensors with ``weights`` by ``method``; DARE takes one generator per task.

    The tasks are read, never written; the memory this takes beyond them is the result, one task's
    magnitudes while its threshold is found (magnitude pruning) or one boolean mask per task (DARE).
    """
    how: Literal["magnitude", "random"] | None = None
    if method in ("dare_linear", "dare_ties"):
        assert generators is not None and len(generators) == len(tensors)
        how = "random"
    elif method in ("ties", "magnitude_prune"):
        how = "magnitude"
    draws: list[torch.Generator | None] = list(generators) if generators is not None else [None] * len(tensors)
    tasks = [_Task.of(t, density, how, g) for t, g in zip(tensors, draws)]
    out = torch.empty_like(tensors[0], memory_format=torch.contiguous_format)
    flat_out = out.view(-1)
    elect = method in ("ties", "dare_ties")
    nonzero_before = nonzero = agreeing = 0
    for start in range(0, flat_out.numel(), _CHUNK):
        stop = min(start + _CHUNK, flat_out.numel())
        xs = [task.chunk(start, stop) for task in tasks]
        if stats is not None:
            nonzero_before += sum(int(torch.count_nonzero(task.flat[start:stop])) for task in tasks)
            nonzero += sum(int(torch.count_nonzero(x)) for x in xs)
        if elect:
            flat_out[start:stop], agreed = _ties_chunk(xs, weights, sign_method)
            agreeing += agreed
        else:  # PEFT's (stacked * w).sum(0), term by term
            acc = xs[0] * weights[0]
            for x, w in zip(xs[1:], weights[1:]):
                acc += x * w
            flat_out[start:stop] = acc
    if stats is not None:
        stats.density = nonzero / max(1, nonzero_before)
        stats.sign_agreement = agreeing / max(1, nonzero) if elect else None
    return out


def _ties_chunk(xs: list[torch.Tensor], weights: list[float], sign_method: SignMethod) -> tuple[torch.Tensor, int]:
    """TIES on one chunk of each task: the merged values and how many task values agreed."""
    vote = xs[0].clone() if sign_method == "total" else xs[0].sign()
    for x in xs[1:]:
        vote += x if sign_method == "total" else x.sign()
    majority = torch.where(vote >= 0, 1.0, -1.0).to(vote.dtype)  # ties go to +
    num = torch.zeros_like(vote)
    count = torch.zeros_like(vote)
    for x, w in zip(xs, weights):
        agree = (x * majority) > 0  # the sign of x is the elected one (0 never agrees)
        num += (x * w) * agree  # PEFT: (stacked * w) * mask, summed over the tasks
        count += agree
    return num / count.clamp(min=1), int(count.sum(dtype=torch.float64))  # float32 would round past 2^24
