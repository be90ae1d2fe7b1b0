"""``loratool combine`` and ``loratool resize``: several adapters into one, and one to a new rank."""

from __future__ import annotations

from typing import Any

import click

from .app import cli
from .params import (
    ADAPTER_PATH,
    ADAPTER_SPEC,
    BASE_MODEL_ID,
    DEVICE,
    DTYPE,
    FORCE,
    FORMAT,
    JSON,
    KOHYA_BASE,
    OUTPUT,
    PICKLE,
    PORTABLE,
    QUIET,
    REGISTER,
    Share,
    emit,
    energy_option,
    options,
    rank_option,
    registered,
    seed_option,
)

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
    "--density", type=Share(0, 1, min_open=True), default=None,
    help="TIES/DARE/magnitude pruning: the share of elements each source keeps.",
)  # fmt: skip
@click.option(
    "--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
    help="TIES: elect each element's sign from the sum (total) or from the count of signs (frequency).",
)  # fmt: skip
@click.option(
    "--svd-clamp", type=Share(0, 1, min_open=True), default=None,
    help="The _svd forms: clamp the factors at this quantile of their values, as PEFT's svd_clamp.",
)  # fmt: skip
@options(rank_option("The output's rank, per module, for --method svd and the _svd forms (default: the largest "
                     "source rank); with --energy, the highest allowed."),
         energy_option("--method svd: per module, the smallest rank keeping this share of the combined delta's "
                       "energy (sum S^2), capped by -r."),
         seed_option("Seed of DARE's random masks (dare_linear, dare_ties and their _svd forms)."),
         FORMAT, PORTABLE, BASE_MODEL_ID, KOHYA_BASE, OUTPUT, REGISTER, DEVICE, DTYPE, FORCE,
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
    from ..ops.combine import combine as run

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
    emit(registered(result, register), as_json, _combine_text)


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
    from ..ops.combine import resize as run

    if rank is None and energy is None:
        raise click.UsageError("resize needs -r/--rank or --energy (e.g. loratool resize adapter/ -r 8 -o out/)")

    result = run(adapter, output=output, rank=rank, energy=energy, device=device, dtype=dtype, format=fmt,  # type: ignore[arg-type]
                 portable=portable, base_model_id=base_model_id, base=base, force=force,
                 allow_pickle=allow_pickle, show_progress=not quiet)  # fmt: skip
    emit(registered(result, register), as_json, _combine_text)
