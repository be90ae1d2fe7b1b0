"""``loratool analyze``: the rank analysis of a fine-tune or of adapters."""

from __future__ import annotations

from typing import Any

import click

from .app import cli
from .params import (
    DEVICE,
    FAN_IN_FAN_OUT,
    FORCE,
    JSON,
    N_ITER,
    OVERSAMPLE,
    PICKLE,
    QUIET,
    REGEX,
    SVD,
    emit,
    energy_option,
    options,
    seed_option,
)


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
@options(SVD, OVERSAMPLE, N_ITER)
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
@options(
    seed_option("Seed of the randomized SVD's draws (extract's default, so the spectra agree)."),
    DEVICE,
    FAN_IN_FAN_OUT,
    FORCE,
    PICKLE,
    QUIET,
    JSON,
)
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
    from ..ops.analyze import analyze as run

    if energy is not None and budget is not None:
        raise click.UsageError("--energy and --budget are two rank rules: give one")
    result = run(first, second, base=base, top_k=top_k, svd=svd, oversample=oversample, n_iter=n_iter,  # type: ignore[arg-type]
                 seed=seed, amplification_ranks=amplification_ranks, energy=energy, budget=budget,
                 include=include, exclude=exclude, fan_in_fan_out=fan_in_fan_out, device=device,
                 report=report, force=force, allow_pickle=allow_pickle, show_progress=not quiet)  # fmt: skip
    emit(result, as_json, _analyze_text)


def _number(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _amplification(by_rank: dict[str, float | None], r: str) -> str:
    """One amplification factor: "-" where not computed, "inf" where JSON's null stands for infinity."""
    return "-" if r not in by_rank else "inf" if by_rank[r] is None else _number(by_rank[r])


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
        row += "".join(f"  {_amplification(m['amplification'], str(k)):>7}" for k in amp_ranks)
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
