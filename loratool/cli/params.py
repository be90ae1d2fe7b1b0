"""What the commands share: parameter types checked at the boundary (a bad value is a usage error,
exit 2), the options several commands take, and how a result is printed (text or ``--json``)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import LoraToolError


# -- parameter types: values are checked at the boundary, and a bad one is a usage error (exit 2) --
class _AdapterSpec(click.ParamType):  # type: ignore[type-arg]
    """``PATH`` or ``PATH:SCALE`` (``adapter/:0.5``, ``style.safetensors:-1``); the scale must be finite."""

    name = "ADAPTER[:SCALE]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, float]:
        from ..registry.store import resolve_path

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
        from ..registry.store import resolve_path

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
REGEX = _Regex()


class Share(click.FloatRange):
    """A float in a range, NaN refused (it compares false with both bounds, so FloatRange lets it in)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if isinstance(number, float) and math.isnan(number):
            self.fail(f"{value!r} is not a number in {self._describe_range()}", param, ctx)
        return number


ENERGY_RANGE = Share(0, 1, min_open=True)

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
    help="Treat 2-D weights as GPT-2 Conv1D (in, out), or not: for a checkpoint whose config.json has no known "
    "model_type (by default that decides; an option that contradicts it is refused, as PEFT goes by the layer).",
)
FORMAT: Decorator = click.option(
    "--format",
    "fmt",
    type=click.Choice(["peft", "kohya", "diffusers"]),
    default="peft",
    show_default=True,
    help="Output format (diffusers: a pipeline LoRA file, modules under their component, e.g. unet.).",
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
    from ..registry.store import Registry, check_name

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


def seed_option(help: str) -> Decorator:
    """--seed, with help in the words of the command it is on."""
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


SVD: Decorator = click.option(
    "--svd", type=click.Choice(["randomized", "exact"]), default="randomized", show_default=True
)
OVERSAMPLE: Decorator = click.option(
    "--oversample", type=click.IntRange(min=0), default=16, show_default=True,
    help="Columns the randomized SVD's sketch takes beyond the rank (more: nearer the exact SVD, slower).",
)  # fmt: skip
N_ITER: Decorator = click.option(
    "--n-iter", type=click.IntRange(min=0), default=4, show_default=True,
    help="Power iterations, at most 32 (4 or more, even: half as many block Krylov steps).",
)  # fmt: skip
ROUNDING: Decorator = click.option(
    "--rounding", type=click.Choice(["subspace", "stochastic", "nearest"]), default=None,
    help="How the written weights return onto a quantized base's grid (FP8, NVFP4, MXFP4, INT4/INT8), or "
    "--dtype's from one. subspace (the default in an FP8 layout): each row's rounding error fed forward out of "
    "the adapter's input subspace (into a 4-bit layout several times slower than stochastic); "
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
    type=Share(0.0, 1.0),
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


def emit(result: Any, as_json: bool, human: Callable[[Any], str], *, failed: bool = False) -> None:
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


def registered(result: Any, name: str | None, *, event: tuple[str, str, str | None] | None = None) -> Any:
    """With ``--register NAME``: add the command's output to the registry; the result's JSON says
    which version it became."""
    if name is None:
        return result
    from ..registry.ops import register

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


def record_uses(paths: list[str], kind: str, target: str, detail: str | None = None) -> None:
    """Note in the registry where registered adapters (given by reference) went."""
    from ..registry.store import Registry

    registry = Registry()
    for path in paths:
        entry = registry.entry_of_view(path)
        if entry is not None:
            registry.record_event(entry, kind, str(target), detail)
