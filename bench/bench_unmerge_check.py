"""unmerge --check BASE against unmerge alone: a rank-16 adapter merged into a Llama-1B-shaped bf16
checkpoint (``--layers`` layers), then taken out again, with and without the comparison to the
original base (which also reads the base once more). Whole processes (bench/measure.py), best of
``--repeats``, alternated: this machine's I/O drifts from run to run.

    python bench/bench_unmerge_check.py --workdir /tmp/loratool-bench [--layers 4]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_extract import ensure_pair
from bench_merge import make_adapter
from common import bench_main, fresh, machine, measure

import loratool


def run(workdir: Path, layers: int, rank: int, device: str, repeats: int = 3) -> dict[str, Any]:
    pair = ensure_pair(workdir, layers)
    adapter = make_adapter(pair / "base", workdir / f"adapter-l{layers}", rank)
    merged = workdir / f"unmerge-check-merged-l{layers}"
    if not merged.exists():
        loratool.merge(pair / "base", [str(adapter)], output=merged, show_progress=False)
    plain, checked, units = [], [], None
    for _ in range(repeats):
        plain.append(measure("unmerge", _args=[str(merged), [str(adapter)]], output=str(fresh(workdir / "um-out")),
                             device=device, show_progress=False)["seconds"])  # fmt: skip
        m = measure("unmerge", _args=[str(merged), [str(adapter)]], output=str(fresh(workdir / "um-out")),
                    check=str(pair / "base"), device=device, show_progress=False)  # fmt: skip
        checked.append(m["seconds"])
        units = m["result"]["check"]["max_rounding_units"]
    fresh(workdir / "um-out")
    gib = sum(f.stat().st_size for f in merged.iterdir() if f.suffix == ".safetensors") / 2**30
    return {"machine": machine(), "layers": layers, "rank": rank, "gib": gib, "plain": plain, "checked": checked,
            "ratio": min(checked) / min(plain), "max_rounding_units": units}  # fmt: skip


def report(r: dict[str, Any]) -> str:
    runs = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    return "\n".join([
        f"unmerge a rank-{r['rank']} adapter from a {r['gib']:.2f} GiB bf16 Llama-1B-shaped checkpoint ({r['layers']} layers)",
        f"  unmerge                  {min(r['plain']):6.1f} s   best of {runs(r['plain'])}",
        f"  unmerge --check BASE     {min(r['checked']):6.1f} s   best of {runs(r['checked'])}",
        f"  --check / unmerge        {r['ratio']:6.2f}x   (target: at most 1.5x; max {r['max_rounding_units']:.2f} unit(s) "
        "of rounding found)",
    ])  # fmt: skip


def main() -> None:
    bench_main(__doc__, run, report, layers=4, rank=16)


if __name__ == "__main__":
    main()
