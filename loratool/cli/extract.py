"""``loratool extract``: an adapter from the difference of a fine-tune and its base."""

from __future__ import annotations

from typing import Any

import click

from .app import cli
from .params import (
    BASE_MODEL_ID,
    DEVICE,
    DTYPE,
    FAN_IN_FAN_OUT,
    FORCE,
    FORMAT,
    JSON,
    N_ITER,
    OUTPUT,
    OVERSAMPLE,
    PICKLE,
    PORTABLE,
    QUIET,
    REGEX,
    REGISTER,
    SVD,
    emit,
    energy_option,
    options,
    rank_option,
    registered,
    seed_option,
)


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
@options(SVD, OVERSAMPLE, N_ITER)
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
@options(seed_option("Seed of the randomized SVD's draws: the same seed and threads write the same adapter."),
         FORMAT, PORTABLE, BASE_MODEL_ID, OUTPUT, REGISTER, DEVICE, DTYPE, FAN_IN_FAN_OUT, FORCE, PICKLE, QUIET,
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
    from ..ops.extract import extract as run

    if energy is not None and budget is not None:
        raise click.UsageError("--energy and --budget are two rank rules: give one")
    if rank is None and energy is None and budget is None:
        rank = 16
    result = run(base, finetuned, output=output, rank=rank, energy=energy, budget=budget, svd=svd,  # type: ignore[arg-type]
                 oversample=oversample, n_iter=n_iter, device=device, dtype=dtype, include=include,
                 exclude=exclude, keep_full=keep_full, bias=bias, fan_in_fan_out=fan_in_fan_out, format=fmt,  # type: ignore[arg-type]
                 portable=portable, base_model_id=base_model_id, force=force, allow_pickle=allow_pickle,
                 seed=seed, show_progress=not quiet)  # fmt: skip
    emit(registered(result, register), as_json, _extract_text)


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
