"""``analyze --report``: one self-contained HTML file of plots and tables (matplotlib, Agg backend).

matplotlib is an optional extra (``loratool[plot]``) and is imported only here. Images are PNGs
embedded as base64 ``data:`` URIs: the file opens anywhere, offline, and links to nothing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..arch import module_group
from ..errors import LoraToolError
from ..io.atomic import atomic_output

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Module = dict[str, Any]  # one entry of analyze's JSON "modules"

ENERGY_SHARES = ("0.5", "0.9", "0.99")  # the rank_for_energy keys, one heatmap panel each
MAX_PHI_PANELS = 12
MAX_TABLE_ROWS = 2000


def require_matplotlib() -> None:
    """Refuse early, before any work, when the report cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LoraToolError(
            "--report needs matplotlib, which is not installed",
            fix="install it: pip install 'loratool[plot]' (or leave out --report)",
        ) from None


def write_report(result: dict[str, Any], out: Path, *, force: bool = False) -> Path:
    """Draw the plots of an analysis (the JSON ``analyze --json`` prints) and write the report
    atomically to ``out``, replacing a file there only with ``force`` (another run's report that
    appeared meanwhile included). Works as well on a JSON file saved earlier."""
    modules: list[Module] = result["modules"]
    top_k = result["top_k"]
    first = ""  # two adapters: the spectra, ranks and amplification are the first one's
    if result["mode"] == "adapters":
        first = f" Of the first adapter, {result['inputs'][0]}."
    names = [_short(i) for i in result["inputs"]]
    figures: list[tuple[str, str, Figure | None]] = [
        ("Energy kept and singular values, by rank", "Left: the share of ||dW||_F^2 held by the top r singular "
         "values. Right: the singular values themselves (log scale), as the LoRA paper plots them. Thick: the "
         "median of a module type, thin: each module." + first, _energy_and_spectrum(modules)),
        ("Rank needed, by layer", "The smallest rank holding 50/90/99% of each update's energy (of several "
         f"modules of one type in a layer, the largest). Grey (>{top_k}): more than the {top_k} singular values "
         "computed (raise --top-k)." + first if top_k else "The smallest rank holding 50/90/99% of each "
         "update's energy (of several modules of one type in a layer, the largest)." + first,
         _rank_heatmap(modules, top_k)),
        ("Amplification factor", "||dW_r||_F / ||U_r^T W V_r||_F, median per module type: how strongly the update "
         "amplifies directions the base weight does not emphasize (Hu et al. 2021, 7.3)." + first,
         _amplification_bars(modules)),
        ("Subspace similarity of the A factors", "phi(i, j) = ||U1^(i)T U2^(j)||_F^2 / min(i, j), averaged over the "
         f"layers of each module type (Hu et al. 2021, 7.2); i: the first adapter's top directions "
         f"({names[0]}), j: the second's ({names[-1]}).", _phi_heatmaps(modules, names)),
    ]  # fmt: skip
    with atomic_output(out, force=force, directory=False) as tmp:
        tmp.write_text(_html(result, [(t, c, _png(f)) for t, c, f in figures if f is not None]), encoding="utf-8")
    return out


# -- figures ------------------------------------------------------------------------------------------
def _new_figure(width: float = 7.5, height: float = 4.2) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")  # no pyplot: no global state


def _by_type(modules: list[Module]) -> dict[str, list[Module]]:
    groups: dict[str, list[Module]] = defaultdict(list)
    for m in modules:
        groups[module_group(m["module"])[0]].append(m)
    return dict(sorted(groups.items()))


def _energy_and_spectrum(modules: list[Module]) -> Figure | None:
    if not modules:
        return None
    fig = _new_figure(11.0, 4.2)
    energy, spectrum = fig.subplots(1, 2)
    for (kind, ms), color in zip(_by_type(modules).items(), _colors()):
        for key, ax in (("energy", energy), ("singular_values", spectrum)):
            curves = [m[key] for m in ms if m[key]]
            for c in curves:
                ax.plot(range(1, len(c) + 1), c, color=color, alpha=0.15, linewidth=0.7)
            if curves:
                length = min(len(c) for c in curves)
                median = [statistics.median(c[i] for c in curves) for i in range(length)]
                ax.plot(range(1, length + 1), median, color=color, linewidth=2.2, label=f"{kind} ({len(ms)})")
    for share in (0.5, 0.9, 0.99):
        energy.axhline(share, color="0.6", linewidth=0.6, linestyle=":")
    energy.set(xlabel="rank r", ylabel="energy kept", ylim=(0, 1.02), xlim=(1, None))
    spectrum.set(xlabel="index i", ylabel="singular value sigma_i", yscale="log", xlim=(1, None))
    for ax in (energy, spectrum):
        _integer_ticks(ax.xaxis)
    energy.legend(fontsize="small", loc="lower right")
    return fig


def _integer_ticks(axis: Any) -> None:
    """Ranks, layers and indices are integers: no tick between them."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _rank_heatmap(modules: list[Module], top_k: int | None) -> Figure | None:
    """One panel per energy share: the rank each (module type, layer) needs, grey beyond K."""
    import numpy as np

    groups = [module_group(m["module"]) for m in modules]
    types = sorted({t for t, _ in groups})
    layers = sorted({x for _, x in groups}, key=lambda x: (x is None, x or 0))
    if not types:
        return None
    fig = _new_figure(max(5.0, 2.0 + 0.32 * len(layers)), 0.8 + len(ENERGY_SHARES) * (0.6 + 0.3 * len(types)))
    axes = fig.subplots(len(ENERGY_SHARES), 1, sharex=True, squeeze=False)[:, 0]
    for ax, share in zip(axes, ENERGY_SHARES):
        grid = np.full((len(types), len(layers)), np.nan)
        beyond = np.zeros_like(grid, dtype=bool)
        for m, (kind, layer) in zip(modules, groups):
            i, j = types.index(kind), layers.index(layer)
            r = m["rank_for_energy"].get(share)
            if r is None:
                beyond[i, j] = True
            else:  # several modules of one type in one layer (experts): the largest rank they need
                grid[i, j] = r if np.isnan(grid[i, j]) else max(grid[i, j], r)
        grid[beyond] = np.nan
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.imshow(np.ma.masked_where(~beyond, np.ones_like(grid)), aspect="auto", cmap="Greys", vmin=0, vmax=2)
        known = grid[~np.isnan(grid)]
        if len(layers) <= 40:
            lo, hi = (float(known.min()), float(known.max())) if known.size else (0.0, 1.0)
            for (i, j), v in np.ndenumerate(grid):
                label = f">{top_k}" if beyond[i, j] else ("" if np.isnan(v) else f"{v:.0f}")
                bright = not np.isnan(v) and (v - lo) > 0.6 * (hi - lo)  # viridis turns yellow: dark text there
                ax.text(j, i, label, ha="center", va="center", fontsize=7, color="black" if bright else "white")
        ax.set_yticks(range(len(types)), types, fontsize="small")
        ax.set_title(f"{float(share):.0%} of the energy", fontsize="small")
        if known.size:
            low, high = int(known.min()), int(known.max())
            image.set_clim(low - 0.5, high + 0.5)  # each rank a band of colour, one rank alone mid-scale
            bar = fig.colorbar(image, ax=ax, label="rank")
            if high - low < 8:
                bar.set_ticks(range(low, high + 1))
            else:
                _integer_ticks(bar.ax.yaxis)
    axes[-1].set_xticks(range(len(layers)), ["-" if x is None else str(x) for x in layers], fontsize="x-small")
    axes[-1].set_xlabel("layer")
    return fig


def _amplification_bars(modules: list[Module]) -> Figure | None:
    import numpy as np

    groups = {k: ms for k, ms in _by_type(modules).items() if any(m["amplification"] for m in ms)}
    ranks = sorted({r for ms in groups.values() for m in ms for r in m["amplification"]}, key=int)
    if not groups:
        return None
    fig = _new_figure(max(5.0, 1.5 + 0.5 * len(groups) * len(ranks) ** 0.5), 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    width = 0.8 / len(ranks)
    for n, (r, color) in enumerate(zip(ranks, _colors())):
        medians = [_median([_infinite(m["amplification"][r]) for m in ms if r in m["amplification"]])
                   for ms in groups.values()]  # fmt: skip
        values = [v if math.isfinite(v) else math.nan for v in medians]  # no bar where it is infinite
        ax.bar(x + (n - (len(ranks) - 1) / 2) * width, values, width, label=f"r = {r}", color=color)
    ax.set_xticks(x, list(groups), rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("amplification factor")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    return fig


def _phi_heatmaps(modules: list[Module], names: list[str]) -> Figure | None:
    import numpy as np

    panels = []
    for kind, ms in _by_type(modules).items():
        phis = [np.asarray(m["subspace_similarity"]) for m in ms if m.get("subspace_similarity") is not None]
        if not phis:
            continue
        shape = Counter(p.shape for p in phis).most_common(1)[0][0]  # average the matrices of one shape
        panels.append((kind, np.mean([p for p in phis if p.shape == shape], axis=0)))
    if not panels:
        return None
    panels = panels[:MAX_PHI_PANELS]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = _new_figure(3.4 * cols + 0.8, 3.1 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    image = None
    for ax, (kind, phi) in zip(axes, panels):
        r1, r2 = phi.shape
        image = ax.imshow(phi, vmin=0, vmax=1, cmap="magma", origin="upper", aspect="auto",
                          extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5), interpolation="nearest")  # fmt: skip
        ax.set(title=kind, xlabel=f"j ({names[-1]})", ylabel=f"i ({names[0]})")
        ax.title.set_fontsize("small")
        _integer_ticks(ax.xaxis)
        _integer_ticks(ax.yaxis)
    assert image is not None
    fig.colorbar(image, ax=list(axes), label="phi(i, j)")
    return fig


def _short(path: str) -> str:
    """An input as a plot label: its last path component (an adapter's folder name)."""
    return Path(path.rstrip("/")).name or path


def _colors() -> list[str]:
    return [f"C{i % 10}" for i in range(64)]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -- the page -------------------------------------------------------------------------------------------
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { padding: 0.2em 0.6em; text-align: right; }
th { border-bottom: 1px solid #888; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) { background: #f4f4f4; } .note { color: #555; font-size: 0.9em; } img { max-width: 100%; }
"""


def _html(result: dict[str, Any], images: list[tuple[str, str, str]]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>loratool analyze: {e(' vs '.join(result['inputs']))}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Rank analysis: {e(' vs '.join(result['inputs']))}</h1>",
        f"<p class='note'>loratool {e(__version__)}, mode <b>{e(result['mode'])}</b>, {len(result['modules'])} modules"
        + (f", top {result['top_k']} singular values each" if result["top_k"] else ", whole spectra from the factors")
        + (
            f"; spectra, ranks and amplification of the first adapter, {e(result['inputs'][0])}, and the subspace "
            f"similarity of both"
            if result["mode"] == "adapters"
            else ""
        )
        + ".</p>",
    ]
    for w in result["warnings"]:
        parts.append(f"<p class='note'>warning: {e(w)}</p>")
    parts.append("<h2>By module type</h2>")
    beyond = f">{result['top_k']}" if result["top_k"] else "-"  # as the heatmaps write it
    parts.append(_table(result["summary"]["by_type"], beyond))
    for title, caption, png in images:
        parts.append(f"<h2>{e(title)}</h2><p class='note'>{e(caption)}</p>")
        parts.append(f'<img alt="{e(title)}" src="data:image/png;base64,{png}">')
    parts.append("<h2>By layer</h2>")
    parts.append(_table(result["summary"]["by_layer"], beyond))
    parts.append("<h2>Modules</h2>")
    parts.append(_module_table(result["modules"], beyond))
    if result["skipped"]:
        parts.append("<h2>Changed tensors not analyzed</h2><table><tr><th>tensor</th><th>norm</th><th>why</th></tr>")
        parts.extend(
            f"<tr><td>{e(s['key'])}</td><td>{s['norm']:.4g}</td><td>{e(s['reason'])}</td></tr>"
            for s in result["skipped"]
        )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(groups: dict[str, dict[str, Any]], beyond: str) -> str:
    e = html.escape
    columns: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("modules", lambda g: g["modules"]),
        ("stable rank (median)", lambda g: g["median_stable_rank"]),
        *[(f"rank for {float(s):.0%}", lambda g, s=s: g["median_rank_for_energy"].get(s))
          for s in ("0.5", "0.9", "0.99")],
        *[(f"amplification r={r}", lambda g, r=r: _infinite(g["median_amplification"][r])
           if r in g.get("median_amplification", {}) else "")
          for r in sorted({r for g in groups.values() for r in g.get("median_amplification", {})}, key=int)],
        *([("phi(1,1)", lambda g: g.get("mean_phi_top", "")), ("mean phi", lambda g: g.get("mean_phi", ""))]
          if any("mean_phi" in g for g in groups.values()) else []),
    ]  # fmt: skip
    rows = ["<table><tr><th></th>" + "".join(f"<th>{e(c)}</th>" for c, _ in columns) + "</tr>"]
    for name, g in groups.items():
        cells = "".join(f"<td>{_fmt(get(g), beyond)}</td>" for _, get in columns)
        rows.append(f"<tr><td>{e(name)}</td>{cells}</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _module_table(modules: list[Module], beyond: str) -> str:
    e = html.escape
    head = "<table><tr><th>module</th><th>shape</th><th>sigma_1</th><th>stable rank</th><th>r50</th><th>r90</th>"
    head += "<th>r99</th><th>amplification</th></tr>"
    rows = [head]
    for m in modules[:MAX_TABLE_ROWS]:
        ranks = [m["rank_for_energy"].get(s) for s in ("0.5", "0.9", "0.99")]
        amp = ", ".join(f"{r}: {_infinite(a):.3g}" for r, a in m["amplification"].items())
        sigma = m["singular_values"][0] if m["singular_values"] else ""
        rows.append(
            f"<tr><td>{e(m['module'])}</td><td>{e('x'.join(map(str, m['shape'])))}</td>"
            f"<td>{_fmt(sigma, beyond)}</td><td>{_fmt(m['stable_rank'], beyond)}</td>"
            + "".join(f"<td>{_fmt(r, beyond)}</td>" for r in ranks)
            + f"<td>{e(amp)}</td></tr>"
        )
    rows.append("</table>")
    if len(modules) > MAX_TABLE_ROWS:
        rows.append(f"<p class='note'>{len(modules) - MAX_TABLE_ROWS} more modules: see --json.</p>")
    return "\n".join(rows)


def _infinite(v: float | None) -> float:
    """An amplification factor as the JSON holds it: null for infinity (the base has nothing in that subspace)."""
    return math.inf if v is None else v


def _fmt(v: Any, beyond: str) -> str:
    """A table cell; None is a rank beyond the singular values computed, written as the heatmaps write it."""
    if v is None:
        return html.escape(beyond)
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))
