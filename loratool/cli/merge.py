"""``loratool merge`` and ``loratool unmerge``: adapters into a checkpoint's weights and back out."""

from __future__ import annotations

from typing import Any

import click

from .app import cli
from .params import (
    ADAPTER_SPEC,
    DEVICE,
    DTYPE,
    FAN_IN_FAN_OUT,
    FORCE,
    JSON,
    MAX_NOISE,
    MIN_KEPT,
    OUTPUT,
    PICKLE,
    QUIET,
    REQUANTIZE,
    ROUNDING,
    ROUNDING_SEED,
    emit,
    options,
    record_uses,
)


def _merge_text(d: dict[str, Any]) -> str:
    text = (
        f"{d['operation']}: {d['tensors_changed']} tensor(s) changed, {d['tensors_replaced']} replaced; "
        f"wrote {d['output']}"
    )
    q = d.get("quantization")
    if q:
        where = "written dequantized (quantization_config dropped)" if q["dequantized"] else "requantized"
        text += f"\n{q['grid']} ({q['method']}, {', '.join(q['schemes'])}): {len(q['tensors'])} weight(s) {where}"
        if q["kept"] is not None:
            text += (
                f", {q['rounding']['rule']} rounding: kept {q['kept']:.3f} of the delta, noise "
                f"{q['noise']:.3f} of its norm"
            )
        if d["operation"] == "unmerge" and not q["dequantized"]:
            text += (
                f"\nthe restored {q['grid']} weights lie within the merge's and this unmerge's rounding of the "
                "original, not on its bytes" + ("" if "check" in d else "; --check BASE measures how far")
            )
    if "check" in d:
        c = d["check"]
        text += (
            f"\ncheck against the original base: max |diff| {c['max_abs_diff']:.3e}, "
            f"relative {c['relative_diff']:.3e}, max {c['max_rounding_units']:.2f} unit(s) of rounding"
            + (f" (in {c['worst_tensor']})" if c.get("worst_tensor") else "")
            + f", {c['elements_differing']:,} of {c['elements']:,} elements differ"
        )
    return text


@cli.command()
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=ADAPTER_SPEC)
@options(OUTPUT, DEVICE, DTYPE, FAN_IN_FAN_OUT, ROUNDING, ROUNDING_SEED, MIN_KEPT, MAX_NOISE, REQUANTIZE, FORCE, PICKLE,
         QUIET, JSON)  # fmt: skip
def merge(
    base: str,
    adapters: tuple[tuple[str, float], ...],
    output: str,
    device: str,
    dtype: str | None,
    fan_in_fan_out: bool | None,
    rounding: str | None,
    seed: int,
    min_kept: float | None,
    max_noise: float | None,
    requantize: str | None,
    force: bool,
    allow_pickle: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Merge adapters into BASE: W + scale * scaling * B @ A, a full checkpoint.

    Each ADAPTER is a PEFT directory or a kohya .safetensors file, optionally with :SCALE.
    The output keeps BASE's layout (tensor names, shards, index, config and tokenizer files).
    Into a quantized base (FP8; MXFP4, NVFP4, INT4/INT8) the merged weights are requantized in its
    layout, rounded so that they keep the adapter (--rounding); the summary says how much of it
    they carry (kept). A 4-bit merge in place that keeps less than 0.8, or whose rounding noise
    outgrows the adapter's delta, writes nothing and says what to do.
    GPTQ and AWQ bases merge with --dtype only (their quantizers need calibration data).

    \b
    Examples:
      loratool merge base/ adapter/ -o merged/
      loratool merge base/ chat/ style/:0.5 -o merged/ --dtype bfloat16
      loratool merge fp8-base/ adapter/ -o merged/ --min-kept 0.8 --json
      loratool merge nvfp4-base/ adapter/ -o merged/ --requantize fp8
      loratool merge gpt-oss-20b/ adapter/ -o merged-bf16/ --dtype bfloat16
    """
    from ..ops.merge import merge as run

    if requantize and dtype:
        raise click.UsageError("--requantize and --dtype exclude each other: --dtype writes every weight dequantized")
    result = run(base, list(adapters), output=output, device=device, dtype=dtype, fan_in_fan_out=fan_in_fan_out,
                 rounding=rounding, seed=seed, min_kept=min_kept, max_noise=max_noise, force=force,  # type: ignore[arg-type]
                 allow_pickle=allow_pickle, show_progress=not quiet, requantize=requantize)  # fmt: skip
    record_uses([a for a, _ in adapters], "merged into", output)
    emit(result, as_json, _merge_text)


@cli.command()
@click.argument("merged", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=ADAPTER_SPEC)
@click.option(
    "--check",
    "check",
    type=click.Path(),
    default=None,
    help="The original base: report how far the result is from it (max, relative, units of rounding).",
)
@click.option(
    "--max-units",
    type=click.FloatRange(min=0.0),
    default=None,
    metavar="UNITS",
    help="With --check: fail, writing nothing, when the result lies more than UNITS units of rounding (FP8 or "
    "4-bit steps in a quantized layout) from the original base; e.g. 1 for bf16 in a pipeline (float32 weights "
    "round at the magnitude of the adapters' terms, which can be many units of a small weight).",
)
@options(
    OUTPUT, DEVICE, DTYPE, FAN_IN_FAN_OUT, ROUNDING, ROUNDING_SEED, MIN_KEPT, MAX_NOISE, FORCE, PICKLE, QUIET, JSON
)
def unmerge(
    merged: str,
    adapters: tuple[tuple[str, float], ...],
    check: str | None,
    max_units: float | None,
    output: str,
    device: str,
    dtype: str | None,
    fan_in_fan_out: bool | None,
    rounding: str | None,
    seed: int,
    min_kept: float | None,
    max_noise: float | None,
    force: bool,
    allow_pickle: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Take merged adapters back out of MERGED: W - scale * scaling * B @ A.

    In bf16/fp16 a merge/unmerge round trip lands within one unit of rounding of the original
    (not bit-exact); --check BASE measures it. From an FP8 checkpoint the codes come back near the
    original (within the merge's rounding and the unmerge's, which --check measures in FP8 steps),
    not the original bytes: keep the original base to go back exactly.

    \b
    Examples:
      loratool unmerge merged/ adapter/ -o restored/ --check base/
      loratool unmerge merged/ adapter/ -o restored/ --check base/ --max-units 1   # exit 1 past 1 unit
    """
    if max_units is not None and check is None:
        raise click.UsageError("--max-units needs --check BASE: the original base to measure the result against")
    from ..ops.merge import unmerge as run

    result = run(merged, list(adapters), output=output, check=check, max_units=max_units, device=device, dtype=dtype,
                 fan_in_fan_out=fan_in_fan_out, rounding=rounding, seed=seed,  # type: ignore[arg-type]
                 min_kept=min_kept, max_noise=max_noise, force=force, allow_pickle=allow_pickle,
                 show_progress=not quiet)  # fmt: skip
    record_uses([a for a, _ in adapters], "unmerged from", merged)
    emit(result, as_json, _merge_text)
