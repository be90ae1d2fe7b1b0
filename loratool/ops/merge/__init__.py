"""``loratool merge`` and ``loratool unmerge``: W' = W +/- sum_i s_i * scaling_i * B_i @ A_i.

Streams the checkpoint one tensor at a time, in float32 on the chosen device, with one cast at the
end. The output keeps the input's layout: the same tensor names in the same shards, the index, and
the directory's other files (config, tokenizer).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ...formats import AdapterArg
from ...quant.rounding import Rule
from .check import RoundTripCheck
from .run import MergeResult, apply_adapters


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterArg],
    *,
    output: str | os.PathLike[str],
    device: str = "auto",
    dtype: str | None = None,
    fan_in_fan_out: bool | None = None,
    rounding: Rule | None = None,
    seed: int = 0,
    min_kept: float | None = None,
    max_noise: float | None = None,
    requantize: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = True,
) -> MergeResult:
    """Merge LoRA adapters into a checkpoint: W' = W + sum_i s_i * scaling_i * B_i @ A_i.

    Into a quantized (FP8) base, the merged weights are rounded back onto the base's grid (or, with
    ``dtype``, onto that dtype's), and how decides whether the adapter survives: nearest rounding
    writes the base back wherever the delta is below half a step (most of a typical LoRA), while
    the subspace and stochastic rules keep it (:mod:`loratool.quant.rounding`). The result's
    ``quantization`` reports ``kept``, the share of the delta the written weights carry. Plain
    checkpoints round to nearest, as PEFT.

    Args:
        base: the checkpoint (file or model directory) the adapters were trained on.
        adapters: adapter paths, or ``(path, scale)`` pairs (scale defaults to 1).
        output: where to write the merged checkpoint (a file for a file, a directory for a directory).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: the output's dtype for floating tensors (default: the base's).
        fan_in_fan_out: treat LoRA targets as GPT-2 ``Conv1D``; default from the adapter and config.
        rounding: onto a quantized base's grid: ``subspace`` (the default in an FP8 layout; its
            rounding error kept out of the adapter's input subspace), ``stochastic`` (unbiased; the
            default for a ``dtype`` output), or ``nearest`` (the quantizers' own rule, biased
            against small deltas).
        seed: the stochastic stream's seed; the bytes are the same for one seed on any device and
            any number of threads.
        min_kept: refuse (write nothing) when the merge's ``kept`` falls below this (0: never).
        max_noise: refuse (write nothing) when the rounding's ``noise`` exceeds this many times the
            delta's norm. Into a packed low-bit base in place, unless either is given, ``min_kept``
            0.8 and ``max_noise`` 1: on bench_fp4's trained pairs a 4-bit merge whose noise outgrew its
            delta could leave the model further from the merged one than the base was.
        requantize: ``"fp8"``: into a compressed-tensors NVFP4 or INT4/INT8 base, write the weights the
            adapters touch as FP8 128x128 block-scaled (the rest as they were), with a
            ``mixed-precision`` config that transformers loads.
        force: replace an existing output.

    Raises:
        AdapterLostError: ``kept`` is below ``min_kept``, or ``noise`` above ``max_noise``.
        MissingKeyError: an adapter module has no matching tensor in the base.
        ShapeMismatchError: an adapter module does not fit its tensor.
        UnsupportedAdapterError: adapters trained on a rewritten base (PiSSA, OLoRA, ...), DoRA.
        NonFiniteError: the merged weight holds NaN or Inf.

    Example:
        >>> loratool.merge("base/", ["adapter/", ("style/", 0.5)], output="merged/")
    """
    return apply_adapters(
        +1,
        base,
        adapters,
        output=output,
        device=device,
        dtype=dtype,
        fan_in_fan_out=fan_in_fan_out,
        rounding=rounding,
        seed=seed,
        min_kept=min_kept,
        max_noise=max_noise,
        force=force,
        allow_pickle=allow_pickle,
        show_progress=show_progress,
        requantize=requantize,
    )


def unmerge(
    merged: str | os.PathLike[str],
    adapters: Sequence[AdapterArg],
    *,
    output: str | os.PathLike[str],
    check: str | os.PathLike[str] | None = None,
    max_units: float | None = None,
    device: str = "auto",
    dtype: str | None = None,
    fan_in_fan_out: bool | None = None,
    rounding: Rule | None = None,
    seed: int = 0,
    min_kept: float | None = None,
    max_noise: float | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = True,
) -> MergeResult:
    """Take merged adapters back out: W = W' - sum_i s_i * scaling_i * B_i @ A_i.

    In float32 the round trip is exact to rounding; in bf16/fp16 each element may land one unit
    of rounding away from the original. ``check`` (the original base) measures exactly that.

    From a quantized (FP8) checkpoint the subtraction is rounded as :func:`merge` rounds (nearest
    rounding would leave most of a small adapter in), and the restored codes lie within the
    merge's rounding and the unmerge's of the original (``check`` measures it, in FP8 steps), not
    on the original bytes.

    Args:
        merged: the merged checkpoint.
        adapters: the adapters (and scales) that were merged.
        output: where to write the restored checkpoint.
        check: the original base; the result reports the largest and relative difference from it.
        max_units: with ``check``, refuse (writing nothing) a result further than this many units of
            rounding from the original base (FP8 or 4-bit steps in a quantized layout).

    Raises:
        UnsupportedAdapterError: DoRA adapters (their merge cannot be undone from files alone).
        RoundTripError: the result lies further than ``max_units`` from ``check``.

    Example:
        >>> loratool.unmerge("merged/", ["adapter/"], output="restored/", check="base/")
    """
    return apply_adapters(
        -1,
        merged,
        adapters,
        output=output,
        device=device,
        dtype=dtype,
        fan_in_fan_out=fan_in_fan_out,
        rounding=rounding,
        seed=seed,
        min_kept=min_kept,
        max_noise=max_noise,
        force=force,
        allow_pickle=allow_pickle,
        show_progress=show_progress,
        check=check,
        max_units=max_units,
    )


__all__ = ["MergeResult", "RoundTripCheck", "merge", "unmerge"]
