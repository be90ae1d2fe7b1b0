"""The ``loratool`` command line: parse, call one library function, print.

Errors are mapped to exit codes in one place (:class:`_Group`): a :class:`LoraToolError` exits 1
with its message, a usage error exits 2, and ``LORATOOL_DEBUG=1`` shows the traceback. torch is
imported only inside commands, so ``loratool --help`` is instant.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click

from ._version import __version__
from .errors import LoraToolError

DEBUG_ENV = "LORATOOL_DEBUG"


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return super().invoke(ctx)
        except LoraToolError as e:
            if debug:
                raise
            click.secho(f"error: {e}", err=True, fg="red")
            ctx.exit(1)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug of ours: say so without a traceback unless asked
            if debug:
                raise
            click.secho(
                f"error: unexpected {type(e).__name__}: {e}\n"
                f"This is a loratool bug; set {DEBUG_ENV}=1 for the traceback and report it.",
                err=True,
                fg="red",
            )
            ctx.exit(1)


# -- parameter types: values are checked at the boundary, and a bad one is a usage error (exit 2) --
class _AdapterSpec(click.ParamType):  # type: ignore[type-arg]
    """``PATH`` or ``PATH:SCALE`` (``adapter/:0.5``, ``style.safetensors:-1``); the scale must be finite."""

    name = "ADAPTER[:SCALE]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, float]:
        from .registry import resolve_path

        if isinstance(value, tuple):
            return value
        head, sep, tail = str(value).rpartition(":")
        if sep and head and head != "sha256":
            try:
                scale = float(tail)
            except ValueError:
                return resolve_path(str(value)), 1.0  # a ':' in the path itself
            if not math.isfinite(scale):
                self.fail(f"the scale of {head!r} is {tail!r}: give a finite number", param, ctx)
            return resolve_path(head), scale
        return resolve_path(str(value)), 1.0


class _AdapterPath(click.ParamType):  # type: ignore[type-arg]
    """An adapter path, or a registry reference (NAME, NAME@vN, NAME@ALIAS, sha256:PREFIX); a path
    that exists wins."""

    name = "ADAPTER"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .registry import resolve_path

        return resolve_path(str(value))


class _Dtype(click.ParamType):  # type: ignore[type-arg]
    """A floating dtype for outputs: float32, bfloat16, float16 (and F32, BF16, fp16 ... spellings)."""

    name = "DTYPE"
    _NAMES = {
        "float32": "float32", "f32": "float32", "fp32": "float32", "float": "float32",
        "bfloat16": "bfloat16", "bf16": "bfloat16",
        "float16": "float16", "f16": "float16", "fp16": "float16", "half": "float16",
    }  # fmt: skip

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        name = self._NAMES.get(str(value).lower())
        if name is None:
            self.fail(f"{value!r} is not an output dtype: use float32, bfloat16 or float16", param, ctx)
        return name


class _Device(click.ParamType):  # type: ignore[type-arg]
    """auto, cpu, cuda or cuda:N (whether that device exists is checked when the command runs)."""

    name = "DEVICE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
            self.fail(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N", param, ctx)
        return text


class _Regex(click.ParamType):  # type: ignore[type-arg]
    """A Python regular expression (kept as text; compiled here once to check it)."""

    name = "REGEX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            re.compile(str(value))
        except re.error as e:
            self.fail(f"{value!r} is not a valid regular expression ({e})", param, ctx)
        return str(value)


ADAPTER_SPEC = _AdapterSpec()
ADAPTER_PATH = _AdapterPath()
COMBINE_METHODS = (
    "cat",
    "svd",
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
)  # fmt: skip  (loratool.ops.combine.METHODS; spelled here so --help needs no torch)
REGEX = _Regex()


class _Share(click.FloatRange):
    """A float in a range, NaN refused (it compares false with both bounds, so FloatRange lets it in)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if isinstance(number, float) and math.isnan(number):
            self.fail(f"{value!r} is not a number in {self._describe_range()}", param, ctx)
        return number


ENERGY_RANGE = _Share(0, 1, min_open=True)

# -- shared options, declared once ------------------------------------------------------------------
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

OUTPUT: Decorator = click.option("-o", "--output", required=True, type=click.Path(), help="Where to write (required).")
DEVICE: Decorator = click.option(
    "--device", type=_Device(), default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
)
DTYPE: Decorator = click.option(
    "--dtype", type=_Dtype(), default=None, help="Output dtype: float32, bfloat16, float16 (default: keep)."
)
FORCE: Decorator = click.option("--force", is_flag=True, help="Replace an existing output.")
QUIET: Decorator = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
JSON: Decorator = click.option("--json", "as_json", is_flag=True, help="Print a JSON result on stdout.")
PICKLE: Decorator = click.option("--allow-pickle", is_flag=True, help="Accept .bin/.pt (torch.load weights_only=True).")
FAN_IN_FAN_OUT: Decorator = click.option(
    "--fan-in-fan-out/--no-fan-in-fan-out",
    default=None,
    help="Treat 2-D weights as GPT-2 Conv1D (in, out). Default: from config.json's model_type.",
)
FORMAT: Decorator = click.option(
    "--format", "fmt", type=click.Choice(["peft", "kohya"]), default="peft", show_default=True, help="Output format."
)
PORTABLE: Decorator = click.option(
    "--portable",
    is_flag=True,
    help="PEFT: one rank, scaling 1 (lora_alpha = r, no rank/alpha_pattern), for runtimes such as vLLM.",
)


def _registry_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--register NAME: the name is checked, and the registry opened, before the command's work."""
    if value is None:
        return None
    from .registry import Registry, check_name

    try:
        check_name(value)
    except LoraToolError as e:
        raise click.BadParameter(f"{e.message}. {e.fix}") from None
    Registry().check_usable()  # a LoraToolError: exit 1, nothing done yet
    return value


REGISTER: Decorator = click.option(
    "--register",
    "register",
    default=None,
    metavar="NAME",
    callback=_registry_name,
    help="Also add the output to the adapter registry as the next version of NAME (checked before the work).",
)
BASE_MODEL_ID: Decorator = click.option(
    "--base-model-id", default=None, help="The base's Hub id, recorded in the adapter config and card."
)
KOHYA_BASE: Decorator = click.option(
    "--base",
    type=click.Path(),
    default=None,
    help="A checkpoint whose module paths name the modules of kohya inputs (headers only).",
)


def rank_option(help: str) -> Decorator:
    """-r/--rank, with help in the words of the command it is on."""
    return click.option("-r", "--rank", type=click.IntRange(min=1), default=None, help=help)


def energy_option(help: str) -> Decorator:
    """--energy SHARE (of sum S^2), with help in the words of the command it is on."""
    return click.option("--energy", type=ENERGY_RANGE, default=None, help=help)


SEED: Decorator = click.option(
    "--seed", type=int, default=0, show_default=True,
    help="Seed of the random draws (extract: the randomized SVD; combine: DARE's masks).",
)  # fmt: skip
ROUNDING: Decorator = click.option(
    "--rounding", type=click.Choice(["subspace", "stochastic", "nearest"]), default=None,
    help="How merged weights return onto a quantized base's grid (FP8, NVFP4, MXFP4, INT4/INT8), or --dtype's from "
    "one. subspace (the default in an FP8 layout): each row's rounding error fed forward out of the adapter's "
    "input subspace (in a 4-bit layout slow, torch passes column by column); "
    "stochastic (the default into --dtype and 4-bit layouts): up or down with the odds of the value's position, "
    "unbiased; nearest: "
    "the quantizers' own rule, which writes the base back wherever the delta is under half a step. Plain "
    "checkpoints always round to nearest, as PEFT merges.",
)  # fmt: skip
ROUNDING_SEED: Decorator = click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of --rounding stochastic: the same seed writes the same bytes on any device and thread count.",
)
MIN_KEPT: Decorator = click.option(
    "--min-kept",
    type=_Share(0.0, 1.0),
    default=None,
    metavar="SHARE",
    help="Into a quantized base: fail, writing nothing, when the written weights carry less than this share of "
    "the adapter's delta (kept, in the summary); e.g. 0.8 in a pipeline. 0 writes whatever the merge keeps (and "
    "lifts the 4-bit defaults of --max-noise).",
)
MAX_NOISE: Decorator = click.option(
    "--max-noise",
    type=click.FloatRange(0.0, None),
    default=None,
    metavar="RATIO",
    help="Into a quantized base: fail, writing nothing, when rounding adds noise above this many times the "
    "adapter's delta (noise, in the summary). Into a 4-bit base in place, unless --min-kept or --max-noise is "
    "given, --min-kept 0.8 --max-noise 1 apply.",
)
REQUANTIZE: Decorator = click.option(
    "--requantize",
    type=click.Choice(["fp8"]),
    default=None,
    help="Into a compressed-tensors NVFP4 or INT4/INT8 base: write the weights the adapters touch as FP8 "
    "(128x128 blocks) and the rest as they were, in a mixed-precision config transformers loads; keeps far more "
    "of the adapter than a 4-bit grid at about twice those weights' size.",
)
ENDPOINT: Decorator = click.option(
    "--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)."
)
REVISION: Decorator = click.option("--revision", default=None, help="Branch, tag or commit id (default: main).")


def options(*decorators: Decorator) -> Decorator:
    """Apply shared options in the order listed (as they appear in --help)."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def _emit(result: Any, as_json: bool, human: Callable[[Any], str], *, failed: bool = False) -> None:
    """Print a result: JSON on stdout, or text (on stderr when ``failed``); warnings on stderr.

    Under torchrun, rank 0 speaks for all. A ``failed`` result exits 1 once printed.
    """
    if int(os.environ.get("RANK", "0")) == 0:
        payload = result.to_json() if hasattr(result, "to_json") else result
        for w in (payload.get("warnings") or []) if isinstance(payload, dict) else []:
            click.secho(f"warning: {w}", err=True, fg="yellow")
        if as_json:
            click.echo(json.dumps(payload, indent=2, default=str, allow_nan=False))
        else:
            click.echo(human(payload), err=failed)
    if failed:
        sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="loratool")
def cli() -> None:
    """loratool: extract, merge, unmerge, combine, resize, convert, validate, analyze, push and pull LoRA adapters.

    Works on safetensors checkpoint files, offline, on CPU or CUDA.

    \b
    Examples:
      loratool extract base/ finetuned/ -r 16 -o adapter/
      loratool merge base/ adapter/ -o merged/
      loratool inspect adapter/ --json

    Set LORATOOL_DEBUG=1 to see tracebacks.
    """


@cli.command()
@click.argument("base", type=click.Path())
@click.argument("finetuned", type=click.Path())
@options(
    rank_option("The rank of every module (default 16); with --energy or --budget, the highest rank allowed."),
    energy_option("Per module, the smallest rank keeping this share of its delta's energy (sum S^2), capped by -r."),
)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    default=None,
    help="Total LoRA parameters, spent where each rank buys the most energy.",
)
@click.option("--svd", type=click.Choice(["randomized", "exact"]), default="randomized", show_default=True)
@click.option("--oversample", type=click.IntRange(min=0), default=8, show_default=True)
@click.option("--n-iter", type=click.IntRange(min=0), default=4, show_default=True, help="Power iterations.")
@click.option("--include", type=REGEX, default=None, help="Only module paths it matches (re.search) become LoRA.")
@click.option("--exclude", type=REGEX, default=None, help="Module paths it matches do not become LoRA.")
@click.option(
    "--keep-full",
    type=REGEX,
    default=None,
    help="Changed tensors LoRA cannot hold (norms, biases) are stored whole when they match.",
)
@click.option(
    "--bias",
    is_flag=True,
    help="Store the changed bias of each LoRA linear layer as its lora_B.bias (PEFT's lora_bias; "
    "Qwen2-style attention biases) instead of dropping it.",
)
@options(SEED, FORMAT, PORTABLE, BASE_MODEL_ID, OUTPUT, REGISTER, DEVICE, DTYPE, FAN_IN_FAN_OUT, FORCE, PICKLE, QUIET,
         JSON)  # fmt: skip
def extract(
    base: str,
    finetuned: str,
    rank: int | None,
    energy: float | None,
    budget: int | None,
    svd: str,
    oversample: int,
    n_iter: int,
    include: str | None,
    exclude: str | None,
    keep_full: str | None,
    bias: bool,
    fmt: str,
    portable: bool,
    base_model_id: str | None,
    seed: int,
    output: str,
    register: str | None,
    device: str,
    dtype: str | None,
    fan_in_fan_out: bool | None,
    force: bool,
    allow_pickle: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Extract a LoRA adapter from FINETUNED - BASE by truncated SVD.

    \b
    Examples:
      loratool extract base/ finetuned/ -r 16 -o adapter/
      loratool extract base/ ft/ --energy 0.9 -r 64 -o adapter/
      loratool extract base/ ft/ --budget 2000000 -o adapter/ --svd exact
    """  # noqa: D301
    from .ops.extract import extract as run

    if energy is not None and budget is not None:
        raise click.UsageError("--energy and --budget are two rank rules: give one")
    if rank is None and energy is None and budget is None:
        rank = 16
    result = run(base, finetuned, output=output, rank=rank, energy=energy, budget=budget, svd=svd,  # type: ignore[arg-type]
                 oversample=oversample, n_iter=n_iter, device=device, dtype=dtype, include=include,
                 exclude=exclude, keep_full=keep_full, bias=bias, fan_in_fan_out=fan_in_fan_out, format=fmt,  # type: ignore[arg-type]
                 portable=portable, base_model_id=base_model_id, force=force, allow_pickle=allow_pickle,
                 seed=seed, show_progress=not quiet)  # fmt: skip
    _emit(_registered(result, register), as_json, _extract_text)


def _extract_text(d: dict[str, Any]) -> str:
    lines = [f"{'module':<48} {'shape':>13} {'rank':>5} {'rel.err':>9} {'energy':>7}"]
    for m in d["modules"]:
        shape = "x".join(map(str, m["shape"]))
        lines.append(
            f"{m['module']:<48} {shape:>13} {m['rank']:>5} {m['relative_error']:>9.3e} {m['energy_kept']:>7.2%}"
        )
    s = d["summary"]
    if s["modules"]:
        lines.append(
            f"{s['modules']} modules, {d['trainable_parameters']:,} parameters, max relative error "
            f"{s['max_relative_error']:.3e}, min energy kept {s['min_energy_kept']:.2%}"
        )
    lines.append(f"wrote {d['output']}")
    return "\n".join(lines)


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
            f"relative {c['relative_diff']:.3e}, max {c['max_rounding_units']:.2f} unit(s) of rounding, "
            f"{c['elements_differing']:,} of {c['elements']:,} elements differ"
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
    from .ops.merge import merge as run

    if requantize and dtype:
        raise click.UsageError("--requantize and --dtype exclude each other: --dtype writes every weight dequantized")
    result = run(base, list(adapters), output=output, device=device, dtype=dtype, fan_in_fan_out=fan_in_fan_out,
                 rounding=rounding, seed=seed, min_kept=min_kept, max_noise=max_noise, force=force,  # type: ignore[arg-type]
                 allow_pickle=allow_pickle, show_progress=not quiet, requantize=requantize)  # fmt: skip
    _record_uses([a for a, _ in adapters], "merged into", output)
    _emit(result, as_json, _merge_text)


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
@options(
    OUTPUT, DEVICE, DTYPE, FAN_IN_FAN_OUT, ROUNDING, ROUNDING_SEED, MIN_KEPT, MAX_NOISE, FORCE, PICKLE, QUIET, JSON
)
def unmerge(
    merged: str,
    adapters: tuple[tuple[str, float], ...],
    check: str | None,
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
    """
    from .ops.merge import unmerge as run

    result = run(merged, list(adapters), output=output, check=check, device=device, dtype=dtype,
                 fan_in_fan_out=fan_in_fan_out, rounding=rounding, seed=seed,  # type: ignore[arg-type]
                 min_kept=min_kept, max_noise=max_noise, force=force, allow_pickle=allow_pickle,
                 show_progress=not quiet)  # fmt: skip
    _record_uses([a for a, _ in adapters], "unmerged from", merged)
    _emit(result, as_json, _merge_text)


def _combine_text(d: dict[str, Any]) -> str:
    lines = [f"{'module':<48} {'rank':>5} {'rel.err':>9} {'energy':>7}"]
    for m in d["modules"]:
        lines.append(f"{m['module']:<48} {m['rank']:>5} {m['relative_error']:>9.3e} {m['energy_kept']:>7.2%}")
    s = d["summary"]
    if s["modules"]:
        lines.append(
            f"{s['modules']} modules, {d['trainable_parameters']:,} parameters, "
            f"max relative error {s['max_relative_error']:.3e}"
        )
    lines.append(f"{d['operation']} ({d['method']}): wrote {d['output']}")
    return "\n".join(lines)


@cli.command()
@click.argument("adapters", nargs=-1, required=True, type=ADAPTER_SPEC)
@click.option(
    "--method",
    type=click.Choice(list(COMBINE_METHODS)),
    default="cat",
    show_default=True,
    help="cat: exact; svd: exact truncation to -r; linear: PEFT's per-factor average (approximate); "
    "ties, dare_linear, dare_ties, magnitude_prune: PEFT's, on A and B apart (equal ranks); their _svd "
    "forms: on each module's dense deltas, then truncated to -r.",
)
@click.option(
    "--density", type=_Share(0, 1, min_open=True), default=None,
    help="TIES/DARE/magnitude pruning: the share of elements each source keeps.",
)  # fmt: skip
@click.option(
    "--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
    help="TIES: elect each element's sign from the sum (total) or from the count of signs (frequency).",
)  # fmt: skip
@click.option(
    "--svd-clamp", type=_Share(0, 1, min_open=True), default=None,
    help="The _svd forms: clamp the factors at this quantile of their values, as PEFT's svd_clamp.",
)  # fmt: skip
@options(rank_option("The output's rank, per module, for --method svd and the _svd forms (default: the largest "
                     "source rank); with --energy, the highest allowed."),
         energy_option("--method svd: per module, the smallest rank keeping this share of the combined delta's "
                       "energy (sum S^2), capped by -r."),
         SEED, FORMAT, PORTABLE, BASE_MODEL_ID, KOHYA_BASE, OUTPUT, REGISTER, DEVICE, DTYPE, FORCE,
         PICKLE, QUIET, JSON)  # fmt: skip
def combine(
    adapters: tuple[tuple[str, float], ...],
    method: str,
    density: float | None,
    majority_sign: str,
    svd_clamp: float | None,
    rank: int | None,
    energy: float | None,
    seed: int,
    fmt: str,
    portable: bool,
    base_model_id: str | None,
    base: str | None,
    output: str,
    register: str | None,
    device: str,
    dtype: str | None,
    force: bool,
    allow_pickle: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Combine ADAPTERS (each optionally :WEIGHT, negative allowed) into one adapter.

    cat, svd and linear aim at sum_i w_i * scaling_i * B_i @ A_i (cat exactly), with scaling 1
    whatever the sources' ranks, alphas and rsLoRA flags; TIES, DARE and magnitude pruning
    depart from the sum on purpose, to reduce interference between the sources.

    \b
    Examples:
      loratool combine chat/ code/ -o mix/                         # exact, rank = sum of ranks
      loratool combine chat/:1 toxic/:-0.5 --method svd -r 32 -o mix/
      loratool combine a/ b/ c/ --method ties_svd --density 0.3 -r 16 -o mix/
      loratool combine a/ b/ --method dare_linear --density 0.5 --seed 7 -o mix/
    """
    from .ops.combine import combine as run

    svd_forms = method == "svd" or method.endswith("_svd")
    if (rank is not None and not svd_forms) or (energy is not None and method != "svd"):
        raise click.UsageError(
            f"-r/--rank (and --energy, for svd) apply to --method svd and the _svd forms, not {method}"
        )
    sparse = method not in ("cat", "svd", "linear")
    if sparse and density is None:
        raise click.UsageError(f"--method {method} needs --density (the share of elements kept, e.g. 0.5)")
    if not sparse and density is not None:
        raise click.UsageError(f"--density applies to TIES, DARE and magnitude pruning, not --method {method}")
    if svd_clamp is not None and not (sparse and svd_forms):
        raise click.UsageError("--svd-clamp applies to the _svd forms of TIES, DARE and magnitude pruning")

    result = run(list(adapters), output=output, method=method, rank=rank, energy=energy, device=device,  # type: ignore[arg-type]
                 dtype=dtype, format=fmt, portable=portable, base_model_id=base_model_id, base=base,  # type: ignore[arg-type]
                 force=force, allow_pickle=allow_pickle, show_progress=not quiet, density=density,
                 majority_sign=majority_sign, svd_clamp=svd_clamp, seed=seed)  # type: ignore[arg-type]  # fmt: skip
    _emit(_registered(result, register), as_json, _combine_text)


@cli.command()
@click.argument("adapter", type=ADAPTER_PATH)
@options(rank_option("The new rank of every module (its exact truncated SVD, from the factors)."),
         energy_option("Per module, the smallest rank keeping this share of its delta's energy (sum S^2), capped "
                       "by -r."),
         FORMAT, PORTABLE, BASE_MODEL_ID, KOHYA_BASE, OUTPUT, REGISTER, DEVICE, DTYPE, FORCE, PICKLE,
         QUIET, JSON)  # fmt: skip
def resize(
    adapter: str,
    rank: int | None,
    energy: float | None,
    fmt: str,
    portable: bool,
    base_model_id: str | None,
    base: str | None,
    output: str,
    register: str | None,
    device: str,
    dtype: str | None,
    force: bool,
    allow_pickle: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Re-truncate ADAPTER's rank by an exact SVD of its factors.

    \b
    Examples:
      loratool resize adapter/ -r 8 -o small/
      loratool resize adapter/ --energy 0.95 -o small/ --format kohya
    """
    from .ops.combine import resize as run

    if rank is None and energy is None:
        raise click.UsageError("resize needs -r/--rank or --energy (e.g. loratool resize adapter/ -r 8 -o out/)")

    result = run(adapter, output=output, rank=rank, energy=energy, device=device, dtype=dtype, format=fmt,  # type: ignore[arg-type]
                 portable=portable, base_model_id=base_model_id, base=base, force=force,
                 allow_pickle=allow_pickle, show_progress=not quiet)  # fmt: skip
    _emit(_registered(result, register), as_json, _combine_text)


@cli.command()
@click.argument("path", type=ADAPTER_PATH)
@options(PICKLE, JSON)
def inspect(path: str, allow_pickle: bool, as_json: bool) -> None:
    """Show what a checkpoint or an adapter holds (checkpoints: from headers only).

    \b
    Examples:
      loratool inspect model/
      loratool inspect adapter/ --json
    """
    from .ops.inspect import inspect as run

    _emit(run(path, allow_pickle=allow_pickle), as_json, _inspect_text)


def _inspect_text(d: dict[str, Any]) -> str:
    if d["kind"] == "checkpoint":
        shards = ", ".join(f"{s['file']} ({s['tensors']})" for s in d["shards"])
        lines = [
            f"checkpoint {d['path']}",
            f"  tensors {d['tensors']:,}   parameters {d['parameters']:,}   bytes {d['bytes']:,}",
            f"  dtypes {d['dtypes']}   model_type {d['model_type']}",
            *_quantization_lines(d.get("quantization")),
            f"  files {shards}" + (f"   index {d['index']}" if d["index"] else ""),
        ]
    else:
        lines = [
            f"adapter {d['path']} ({d['format']})",
            f"  modules {d['module_count']}   ranks {d['ranks']}   trainable parameters {d['trainable_parameters']:,}",
            f"  dtypes {d['dtypes']}   rslora {d['use_rslora']}   dora {d['use_dora']}   bytes {d['bytes']:,}",
            f"  base model {d['base_model_name_or_path']}",
        ]
        for m in d["modules"]:
            lines.append(
                f"  {m['module']:<48} {m['kind']:<9} r={m['rank']:<4} alpha={m['alpha']:<6g} scaling={m['scaling']:.4g}"
            )
        if d["whole_tensors"]:
            lines.append(f"  whole tensors: {', '.join(d['whole_tensors'])}")
        if d.get("trainable_tokens"):
            rows = ", ".join(f"{k} ({n} rows)" for k, n in d["trainable_tokens"].items())
            lines.append(f"  trainable tokens (rows replaced on merge): {rows}")
    if d.get("provenance"):
        p = d["provenance"]
        lines.append(f"  made by loratool {p.get('version')} {p.get('operation')} at {p.get('created')}")
    return "\n".join(lines)


def _quantization_lines(q: dict[str, Any] | None) -> list[str]:
    if not q:
        return []
    if not q["supported"]:
        return [f"  quantized: {q['method']} ({q['evidence']}): {q.get('why_unsupported', 'not supported')}"]
    if "packed_weights" in q:  # MXFP4, NVFP4, INT4/INT8: a line per weight
        head = f"  quantized: {q['method']} ({', '.join(q['schemes'])}), {len(q['quantized_weights'])} packed weights"
        return [head, *(f"    {w['tensor']} {w['shape']}: {w['scheme']}" for w in q["packed_weights"])]
    block = f"block {q['block'][0]}x{q['block'][1]}" if q.get("block") else "block"
    schemes = ", ".join(block if s == "block" else f"per {s}" for s in q["schemes"])
    return [f"  quantized: {q['method']} ({schemes}), {len(q['quantized_weights'])} FP8 weights"]


class _Fusion(click.ParamType):  # type: ignore[type-arg]
    """FUSED=PART,PART,...: a fused module's leaf name and its parts' leaf names, in row order."""

    name = "FUSED=PARTS"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, tuple[str, ...]]:
        if isinstance(value, tuple):
            return value
        fused, _, parts = str(value).partition("=")
        names = tuple(p.strip() for p in parts.split(",") if p.strip())
        if not fused.strip() or len(names) < 2 or len(set(names)) < len(names):
            self.fail(f"{value!r}: give FUSED=PART,PART,... with two or more distinct parts", param, ctx)
        return fused.strip(), names


_FUSION = _Fusion()


@cli.command()
@click.argument("adapter", type=ADAPTER_PATH)
@click.option(
    "--to", "to", type=click.Choice(["peft", "kohya", "mlx", "gguf"]), required=True, help="The format to write."
)
@PORTABLE
@click.option(
    "--base",
    type=click.Path(),
    default=None,
    help="The base checkpoint (headers and config.json only). GGUF: required (llama.cpp's architecture, tensor "
    "names; every module must fit). kohya and GGUF input: names its modules.",
)
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    default="f32",
    show_default=True,
    help="GGUF tensor type (q8_0 falls back to f16 for rows that do not divide into blocks of 32, as llama.cpp does).",
)
@click.option(
    "--fuse",
    "fuse",
    type=_FUSION,
    multiple=True,
    help="FUSED=PART,PART,... e.g. qkv_proj=q_proj,k_proj,v_proj: each layer's parts become one module "
    "(A stacked, B block-diagonal), for fused checkpoints such as Phi-3. Repeatable.",
)
@click.option(
    "--split",
    "split",
    type=_FUSION,
    multiple=True,
    help="FUSED=PART,PART,... the other way: each part gets the shared A and its rows of B (sizes from --base).",
)
@click.option(
    "-r",
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="LyCORIS LoHa/LoKr input (required there): the LoRA rank each module's delta is truncated to by SVD; "
    "the output reports each module's relative error.",
)
@options(OUTPUT, REGISTER, DTYPE, FORCE, PICKLE, QUIET, JSON)
def convert(adapter: str, to: str, portable: bool, base: str | None, outtype: str, fuse: tuple[Any, ...],
            split: tuple[Any, ...], rank: int | None, output: str, register: str | None, dtype: str | None,
            force: bool, allow_pickle: bool, quiet: bool, as_json: bool) -> None:  # fmt: skip
    """Write ADAPTER in another format (PEFT, kohya, mlx-lm, llama.cpp GGUF); every delta stays the same.

    Reads PEFT directories, kohya .safetensors files, mlx-lm adapter directories, llama.cpp
    LoRA adapters (.gguf, with --base: llama.cpp's names lead back to module paths only through
    the base) and LyCORIS LoHa/LoKr files (with -r: each module's delta truncated by SVD, its
    error reported). GGUF needs the gguf package: pip install 'loratool[gguf]'.

    \b
    Examples:
      loratool convert adapter/ --to mlx -o adapter-mlx/
      loratool convert adapter-mlx/ --to peft -o adapter/
      loratool convert adapter/ --to peft --portable -o adapter-vllm/
      loratool convert adapter/ --to gguf --base model/ -o adapter.gguf
      loratool convert adapter/ --to peft --fuse qkv_proj=q_proj,k_proj,v_proj \\
          --fuse gate_up_proj=gate_proj,up_proj -o adapter-phi3/
      loratool convert lora.safetensors --to peft --base model/ -o adapter/
      loratool convert adapter.gguf --to peft --base model/ -o adapter/
      loratool convert loha.safetensors --to peft -r 16 --base model/ -o adapter/
    """  # noqa: D301
    from .ops.convert import convert as run

    result = run(adapter, to=to, output=output, portable=portable, base=base, dtype=dtype,  # type: ignore[arg-type]
                 outtype=outtype, fuse=fuse, split=split, rank=rank, force=force,  # type: ignore[arg-type]
                 allow_pickle=allow_pickle)  # fmt: skip

    def text(d: dict[str, Any]) -> str:
        ranks = ", ".join(map(str, d["ranks"]))
        arch = f", {d['gguf']['arch']}, {d['gguf']['outtype']}, alpha {d['gguf']['alpha']:g}" if d.get("gguf") else ""
        line = (f"wrote {d['output']} ({d['format']}{arch}, from {d['source_format']}): {d['modules']} modules, "
                f"rank {ranks}, {d['parameters']:,} parameters")  # fmt: skip
        errors = d.get("truncation")
        if errors:
            worst = max(errors, key=errors.get)
            line += (f"\n{len(errors)} LoHa/LoKr module(s) truncated: relative error mean "
                     f"{sum(errors.values()) / len(errors):.2e}, worst {errors[worst]:.2e} ({worst})")  # fmt: skip
        return line

    if register and to == "gguf":
        raise click.UsageError("--register keeps PEFT, kohya and mlx adapters; a GGUF file is for llama.cpp")
    _emit(_registered(result, register), as_json, text)


class _Ranks(click.ParamType):  # type: ignore[type-arg]
    """A comma-separated list of positive ranks, e.g. 1,4,16,64."""

    name = "RANKS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            ranks = tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of ranks (e.g. 1,4,16,64)", param, ctx)
        if not ranks or min(ranks) < 1:
            self.fail(f"{value!r}: ranks must be positive integers", param, ctx)
        return ranks


@cli.command()
@click.argument("first", metavar="BASE|ADAPTER", type=click.Path())
@click.argument("second", metavar="[FINETUNED|OTHER]", type=click.Path(), required=False)
@click.option(
    "-k",
    "--top-k",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Singular values per module (BASE FINETUNED; adapters give all r).",
)
@click.option("--svd", type=click.Choice(["randomized", "exact"]), default="randomized", show_default=True)
@click.option("--oversample", type=click.IntRange(min=0), default=8, show_default=True)
@click.option("--n-iter", type=click.IntRange(min=0), default=4, show_default=True, help="Power iterations.")
@click.option(
    "--amplification",
    "amplification_ranks",
    type=_Ranks(),
    default="1,4,16,64",
    show_default=True,
    help="Ranks r of the amplification factor ||dW_r|| / ||U_r^T W V_r|| (needs the base's weights).",
)
@options(
    energy_option(
        "Also report the rank extract --energy would give each module: the smallest keeping this "
        "share of its energy (sum S^2)."
    )
)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    default=None,
    help="Also report the ranks extract --budget would spend this many parameters on.",
)
@click.option("--include", type=REGEX, default=None, help="Only module paths it matches (re.search).")
@click.option("--exclude", type=REGEX, default=None, help="Leave out module paths it matches.")
@click.option(
    "--base",
    type=click.Path(),
    default=None,
    help="With adapters: the base checkpoint, for the amplification factor (and kohya names).",
)
@click.option(
    "--report",
    type=click.Path(),
    default=None,
    help="Write a self-contained HTML report with plots here (needs loratool[plot]).",
)
@options(SEED, DEVICE, FAN_IN_FAN_OUT, FORCE, PICKLE, QUIET, JSON)
def analyze(
    first: str,
    second: str | None,
    top_k: int,
    svd: str,
    oversample: int,
    n_iter: int,
    amplification_ranks: tuple[int, ...],
    energy: float | None,
    budget: int | None,
    include: str | None,
    exclude: str | None,
    base: str | None,
    report: str | None,
    seed: int,
    device: str,
    fan_in_fan_out: bool | None,
    force: bool,
    allow_pickle: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """The LoRA paper's rank analysis of a fine-tune, an adapter, or two adapters.

    \b
    BASE FINETUNED  per changed weight: top-K singular values of the delta, the rank
                    for 50/90/99% of its energy, stable rank, amplification factor
    ADAPTER         per module: the spectrum of scaling * B @ A (from the factors),
                    effective rank; with --base, the amplification factor
    ADAPTER OTHER   and the subspace similarity phi(i, j) of the two A factors

    \b
    Examples:
      loratool analyze base/ finetuned/ --report report.html
      loratool analyze base/ finetuned/ --energy 0.9 --json
      loratool analyze adapter-r8/ adapter-r64/ --report phi.html
    """  # noqa: D301
    from .ops.analyze import analyze as run

    if energy is not None and budget is not None:
        raise click.UsageError("--energy and --budget are two rank rules: give one")
    result = run(first, second, base=base, top_k=top_k, svd=svd, oversample=oversample, n_iter=n_iter,  # type: ignore[arg-type]
                 seed=seed, amplification_ranks=amplification_ranks, energy=energy, budget=budget,
                 include=include, exclude=exclude, fan_in_fan_out=fan_in_fan_out, device=device,
                 report=report, force=force, allow_pickle=allow_pickle, show_progress=not quiet)  # fmt: skip
    _emit(result, as_json, _analyze_text)


def _number(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _analyze_text(d: dict[str, Any]) -> str:
    modules = d["modules"]
    amp_ranks = sorted({int(r) for m in modules for r in m["amplification"]})
    phi = any("subspace_similarity" in m for m in modules)
    extract = any("extract_rank" in m for m in modules)
    width = max(len(m["module"]) for m in modules)
    head = f"{'module':<{width}}  {'shape':>11}  {'sigma_1':>9}  {'stable':>7}  {'r50':>4} {'r90':>4} {'r99':>4}"
    head += "".join(f"  {'amp@' + str(r):>7}" for r in amp_ranks)
    head += f"  {'eff.rank':>8}" if d["mode"] != "checkpoints" else ""
    head += f"  {'extract':>7}" if extract else ""
    head += f"  {'phi11':>5}  {'phi':>5}" if phi else ""
    lines = [head]

    def rank(v: float | None) -> str:
        return f">{d['top_k']}" if v is None else f"{v:g}"

    for m in modules:
        r = m["rank_for_energy"]
        shape = "x".join(map(str, m["shape"]))
        row = f"{m['module']:<{width}}  {shape:>11}  {m['singular_values'][0]:>9.4g}  {m['stable_rank']:>7.3g}"
        row += f"  {rank(r['0.5']):>4} {rank(r['0.9']):>4} {rank(r['0.99']):>4}"
        row += "".join(f"  {_number(m['amplification'].get(str(k))):>7}" for k in amp_ranks)
        row += f"  {m['effective_rank']:>8.3g}" if "effective_rank" in m else ""
        row += f"  {m.get('extract_rank', ''):>7}" if extract else ""
        if "subspace_similarity" in m:
            p = m["subspace_similarity"]
            row += f"  {p[0][0]:>5.2f}  {sum(map(sum, p)) / (len(p) * len(p[0])):>5.2f}"
        lines.append(row)
    lines.append("")
    lines.append(f"{len(modules)} modules ({d['mode']}); by module type:")
    for name, g in d["summary"]["by_type"].items():
        r90 = g["median_rank_for_energy"].get("0.9")
        text = f"  {name}: {g['modules']} modules, median rank for 90% energy {rank(r90)}"
        text += f", median stable rank {g['median_stable_rank']:.3g}"
        if "mean_phi" in g:
            text += f", mean phi {g['mean_phi']:.2f} (phi(1,1) {g['mean_phi_top']:.2f})"
        lines.append(text)
    if d["skipped"]:
        lines.append(f"{len(d['skipped'])} changed tensor(s) not analyzed (see --json)")
    if d["report"]:
        lines.append(f"report: {d['report']}")
    return "\n".join(lines)


@cli.command()
@click.argument("adapter", type=ADAPTER_PATH)
@click.option("--no-values", is_flag=True, help="Skip reading tensors (finite values, recorded digest).")
@click.option(
    "--base",
    type=click.Path(),
    default=None,
    help="Also check that every module fits this checkpoint (names and shapes, headers only).",
)
@click.option(
    "--runtime",
    "runtimes",
    type=click.Choice(["vllm", "llama.cpp", "mlx", "peft"]),
    multiple=True,
    help="Also check what this runtime can serve (repeatable); each problem says how to fix it. "
    "llama.cpp needs --base.",
)
@options(JSON)
def validate(adapter: str, no_values: bool, base: str | None, runtimes: tuple[str, ...], as_json: bool) -> None:
    """Check ADAPTER's metadata against schemas/ and its structure against its tensors.

    Lists every problem at once with its path; exits 0 when valid, 1 when not.

    \b
    Examples:
      loratool validate adapter/
      loratool validate adapter/ --json
      loratool validate adapter/ --base model/   # does it fit this model?
      loratool validate adapter/ --runtime vllm --runtime llama.cpp --base model/
    """
    from .ops.validate import validate as run

    report = run(adapter, check_values=not no_values, base=base, runtimes=runtimes)  # type: ignore[arg-type]
    _emit(report, as_json, _validate_text, failed=not report.valid)


def _validate_text(d: dict[str, Any]) -> str:
    if d["valid"]:
        checked = ", tensor digest checked" if d["sha256_checked"] else ""
        return f"valid: {d['path']} ({d['format']}, {d['modules']} modules{checked})"
    lines = [f"invalid: {d['path']} ({len(d['problems'])} problem(s))"]
    lines += [f"  {p['path']}: {p['message']}" for p in d["problems"]]
    return "\n".join(lines)


@cli.command()
@click.argument("adapter", type=ADAPTER_PATH)
@click.argument("repo_id")
@REVISION
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@options(BASE_MODEL_ID, ENDPOINT, JSON)
def push(
    adapter: str,
    repo_id: str,
    revision: str | None,
    private: bool,
    message: str | None,
    create_pr: bool,
    base_model_id: str | None,
    endpoint: str | None,
    as_json: bool,
) -> None:
    """Validate ADAPTER and upload it, with a model card, to REPO_ID in one commit.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed. Re-pushing unchanged
    files makes no commit.

    \b
    Examples:
      loratool push adapter/ me/my-adapter --private --base-model-id meta-llama/Llama-3.2-1B
      loratool push adapter/ me/my-adapter --revision v2 -m "rank 32"
    """
    from .ops.hub import push as run

    result = run(adapter, repo_id, revision=revision, private=private, message=message, create_pr=create_pr,
                 base_model_id=base_model_id, endpoint=endpoint)  # fmt: skip
    _record_uses([adapter], "pushed to", f"{repo_id}@{result.revision}", result.commit_id)

    def text(d: dict[str, Any]) -> str:
        if not d["changed"]:
            return f"{d['repo_id']}@{d['revision']} already holds these files: no commit made ({d['commit_id']})"
        where = d["pull_request_url"] or d["commit_url"]
        return f"pushed {', '.join(d['uploaded'])} to {d['repo_id']}@{d['revision']}\ncommit {d['commit_id']}\n{where}"

    _emit(result, as_json, text)


@cli.command()
@click.argument("repo_id")
@options(REVISION, ENDPOINT, OUTPUT, REGISTER, FORCE, QUIET, JSON)
def pull(repo_id: str, revision: str | None, endpoint: str | None, output: str, register: str | None, force: bool,
         quiet: bool, as_json: bool) -> None:  # fmt: skip
    """Download the adapter in REPO_ID into -o OUT, checking every file's checksum.

    Works offline from the cache (HF_HUB_OFFLINE=1) for a revision pulled before.

    \b
    Examples:
      loratool pull me/my-adapter -o adapter/
      loratool pull me/my-adapter --revision 0a1b2c... -o adapter/
    """
    from .ops.hub import pull as run

    result = run(repo_id, output=output, revision=revision, endpoint=endpoint, force=force, show_progress=not quiet)
    _emit(
        _registered(result, register, event=("pulled", repo_id, result.commit_id)),
        as_json,
        lambda d: f"pulled {d['repo_id']}@{d['commit_id'][:12]} into {d['output']} (checksums verified)",
    )


class _Tag(click.ParamType):  # type: ignore[type-arg]
    """KEY=VALUE."""

    name = "KEY=VALUE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, val = str(value).partition("=")
        if not sep or not key.strip():
            self.fail(f"{value!r}: give KEY=VALUE", param, ctx)
        return key.strip(), val


@cli.group(cls=_Group)
def registry() -> None:
    """A local catalog of adapters: versions, aliases, lineage, compatibility.

    Entries live under LORATOOL_HOME (default ~/.cache/loratool). Wherever a command takes an
    adapter path it also takes a reference: NAME (newest version), NAME@v3, NAME@prod (an alias)
    or sha256:PREFIX. A path that exists always wins over a reference of the same spelling.

    \b
    Examples:
      loratool registry add adapter/ --name support-bot --alias staging --tag task=support
      loratool registry ls --base model/
      loratool registry alias support-bot@v2 prod
      loratool merge model/ support-bot@prod -o merged/
      loratool registry show support-bot@prod --lineage
    """  # noqa: D301


@registry.command("add")
@click.argument("adapter", type=click.Path())
@click.option("--name", required=True, help="The name; the entry becomes its next version (v1, v2, ...).")
@click.option("--alias", "aliases", multiple=True, help="An alias to point at this version (repeatable).")
@click.option("--tag", "tags", multiple=True, type=_Tag(), help="KEY=VALUE (repeatable).")
@click.option("--description", default=None, help="Free text.")
@options(JSON)
def registry_add(adapter: str, name: str, aliases: tuple[str, ...], tags: tuple[tuple[str, str], ...],
                 description: str | None, as_json: bool) -> None:  # fmt: skip
    """Validate ADAPTER and register it as the next version of --name (files are copied in)."""
    from .ops.registry import register

    result = register(adapter, name=name, aliases=aliases, tags=dict(tags), description=description)

    def text(d: dict[str, Any]) -> str:
        what = "registered" if d["created"] else "already registered"
        aliases = f" ({', '.join(d['aliases'])})" if d["aliases"] else ""
        return f"{what} {d['ref']}{aliases}: {d['modules']} modules, {d['digest'][:19]}"

    _emit(result, as_json, text)


@registry.command("ls")
@click.option("--name", "name_glob", default=None, help="Only names matching this glob (e.g. 'support-*').")
@click.option("--base", type=click.Path(), default=None,
              help="Only adapters whose every module fits this checkpoint (headers only).")  # fmt: skip
@click.option("--hub", "hub_owner", default=None, help="List the Hub's PEFT adapters of this user or org instead.")
@click.option("--hub-base", "hub_base", default=None, help="List the Hub's PEFT adapters for this base model id.")
@options(ENDPOINT, JSON)
def registry_ls(name_glob: str | None, base: str | None, hub_owner: str | None, hub_base: str | None,
                endpoint: str | None, as_json: bool) -> None:  # fmt: skip
    """List registered adapters, newest version first per name (or adapters on the Hub)."""
    if hub_owner or hub_base:
        from .ops.hub import list_hub_adapters

        models = list_hub_adapters(owner=hub_owner, base_model=hub_base, endpoint=endpoint)
        _emit({"hub": models}, as_json, lambda d: "\n".join(m["id"] for m in d["hub"]) or "no adapters found")
        return
    from .ops.registry import list_entries

    entries = list_entries(name_glob=name_glob, base=base)

    def text(d: dict[str, Any]) -> str:
        if not d["entries"]:
            return "no adapters" + (" fit that base" if base else " registered")
        rows = [f"{'REF':<32} {'ALIASES':<16} {'FORMAT':<6} {'MODULES':>7} {'RANKS':<10} DIGEST"]
        for e in d["entries"]:
            ranks = ",".join(map(str, e["ranks"]))
            rows.append(f"{e['ref']:<32} {','.join(e['aliases']):<16} {e['format']:<6} {e['modules']:>7} "
                        f"{ranks:<10} {e['digest'][7:19]}")  # fmt: skip
        return "\n".join(rows)

    _emit({"entries": [e.to_json() for e in entries]}, as_json, text)


@registry.command("show")
@click.argument("ref")
@click.option("--lineage", is_flag=True, help="Also where it came from and what came from it.")
@options(JSON)
def registry_show(ref: str, lineage: bool, as_json: bool) -> None:
    """Show one entry: files, digests, aliases, tags, provenance, Hub events."""
    from .ops.registry import lineage_lines
    from .registry import Registry

    reg = Registry()
    entry = reg.resolve(ref)
    payload = {**entry.to_json(), "base_fingerprint": reg.fingerprint(entry)}
    if lineage:
        payload["lineage"] = reg.lineage(entry)

    def text(d: dict[str, Any]) -> str:
        ranks = ",".join(map(str, d["ranks"]))
        lines = [
            f"{d['ref']}  {d['digest']}",
            f"  created {d['created']}",
            f"  format {d['format']}, {d['modules']} modules, ranks {ranks}, {d['parameters']:,} parameters",
        ]
        if d["operation"]:
            lines.append(f"  made by loratool {d['operation']}")
        for key in ("aliases", "tags"):
            if d[key]:
                lines.append(f"  {key}: " + (", ".join(d[key]) if key == "aliases" else
                                            ", ".join(f"{k}={v}" for k, v in d[key].items())))  # fmt: skip
        if d["description"]:
            lines.append(f"  {d['description']}")
        lines += [f"  file {f['path']} ({f['size']:,} bytes) sha256:{f['sha256'][:16]}" for f in d["files"]]
        fp = d["base_fingerprint"]
        lines.append(f"  fits a base with {len(fp['targets'])} tensor(s) of these shapes (show --json lists them)")
        lines += [f"  base file {b['path']} sha256:{b['sha256'][:16]}" for b in fp["base_files"]]
        lines += [f"  {e['kind']} {e['target']} {e['detail']}".rstrip() for e in d["events"]]
        if "lineage" in d:
            lines += ["lineage:"] + ["  " + line for line in lineage_lines(d["lineage"])]
        return "\n".join(lines)

    _emit(payload, as_json, text)


@registry.command("alias")
@click.argument("ref")
@click.argument("alias")
@options(JSON)
def registry_alias(ref: str, alias: str, as_json: bool) -> None:
    """Point NAME@ALIAS at the version REF names (moving it if it pointed elsewhere)."""
    from .registry import Registry

    entry = Registry().alias(ref, alias)
    _emit(entry.to_json(), as_json, lambda d: f"{d['name']}@{alias} -> {d['ref']}")


@registry.command("rm")
@click.argument("ref")
@options(JSON)
def registry_rm(ref: str, as_json: bool) -> None:
    """Remove the version REF names (its aliases go with it; `registry gc` frees the files)."""
    from .registry import Registry

    entry = Registry().remove(ref)
    _emit(entry.to_json(), as_json, lambda d: f"removed {d['ref']}")


@registry.command("gc")
@options(JSON)
def registry_gc(as_json: bool) -> None:
    """Delete stored files that no entry references any more."""
    from .registry import Registry

    result = Registry().gc()
    _emit(result, as_json, lambda d: f"removed {d['blobs_removed']} file(s), {d['bytes_freed']:,} bytes")


@registry.command("verify")
@options(JSON)
def registry_verify(as_json: bool) -> None:
    """Re-hash every stored file and check every view (what commands read) holds them; report (never
    delete) what is missing or does not match. Exit 1 if any."""
    from .registry import Registry

    bad = Registry().verify()

    def text(d: dict[str, Any]) -> str:
        if not d["problems"]:
            return "every stored file matches its sha256, and every view holds them"
        return "\n".join(f"{p['blob'][:16] if 'blob' in p else p['view']}: {p['problem']} ({', '.join(p['entries'])})"
                         for p in d["problems"])  # fmt: skip

    _emit({"problems": bad}, as_json, text, failed=bool(bad))


def _registered(result: Any, name: str | None, *, event: tuple[str, str, str | None] | None = None) -> Any:
    """With ``--register NAME``: add the command's output to the registry; the result's JSON says
    which version it became."""
    if name is None:
        return result
    from .ops.registry import register

    try:
        added = register(result.output, name=name, event=event)
    except LoraToolError as e:
        raise type(e)(
            f"the output was written to {result.output}, but registering it as {name!r} failed: {e.message}",
            path=e.path, fix=f"{e.fix + '; then r' if e.fix else 'R'}egister it: loratool registry add {result.output} "
            f"--name {name}",
        ) from None  # fmt: skip
    payload = result.to_json()
    payload["registered"] = added.entry.ref
    payload.setdefault("warnings", [])
    if not added.created:
        payload["warnings"].append(f"{added.entry.ref} already holds these files: no new version")
    return payload


def _record_uses(paths: list[str], kind: str, target: str, detail: str | None = None) -> None:
    """Note in the registry where registered adapters (given by reference) went."""
    from .registry import Registry

    registry = Registry()
    for path in paths:
        entry = registry.entry_of_view(path)
        if entry is not None:
            registry.record_event(entry, kind, str(target), detail)


class _EchoHandler(logging.Handler):
    """loratool's log records (warnings of the library itself) as ``warning: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            click.secho(f"{record.levelname.lower()}: {record.getMessage()}", err=True, fg="yellow")


_log = logging.getLogger("loratool")
_log.addHandler(_EchoHandler(logging.WARNING))
_log.propagate = False


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so atomic outputs clean up their temporary files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # torch warns at import when numpy is absent; loratool never needs numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    cli(prog_name="loratool")


if __name__ == "__main__":
    main()
