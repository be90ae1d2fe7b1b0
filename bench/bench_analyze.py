"""Analyze: `loratool analyze BASE FT` against `loratool extract` at the same K, in one run.

analyze computes the same top-K randomized SVD of every delta as extract (same seed, same
spectrum) plus the energy curve, stable rank and amplification factor (one (r, out) @ (out, in)
@ (in, r) product against the base weight). Target: within 1.5x of extract's time; memory flat
in the number of layers (a 4-layer pair beside the 16-layer one).

    python bench/bench_analyze.py --workdir /tmp/loratool-bench [--layers 16] [--rank 64] [--device cpu]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_extract import ensure_pair
from common import bench_main, fresh, machine, measure


def run(workdir: Path, layers: int, rank: int, device: str, small_layers: int = 4) -> dict[str, Any]:
    pair = ensure_pair(workdir, layers)
    small = ensure_pair(workdir, small_layers)
    inputs = dict(device=device, show_progress=False)
    extracted = measure("extract", base=str(pair / "base"), finetuned=str(pair / "ft"), rank=rank,
                        output=str(fresh(workdir / "out-analyze-extract")), **inputs)  # fmt: skip
    analyzed = measure("analyze", first=str(pair / "base"), second=str(pair / "ft"), top_k=rank,
                       report=str(fresh(workdir / "analyze.html")), **inputs)  # fmt: skip
    analyzed_small = measure("analyze", first=str(small / "base"), second=str(small / "ft"), top_k=rank, **inputs)
    svals_extract = {m["module"]: m["energy_kept"] for m in extracted["result"]["modules"]}
    svals_analyze = {m["module"]: m["energy"][rank - 1] for m in analyzed["result"]["modules"]}
    worst = max(abs(svals_extract[m] - svals_analyze[m]) for m in svals_extract)
    return {
        "machine": machine(),
        "layers": layers,
        "rank": rank,
        "device": device,
        "modules": len(svals_analyze),
        "extract_s": extracted["seconds"],
        "analyze_s": analyzed["seconds"],
        "ratio": analyzed["seconds"] / extracted["seconds"],
        "energy_kept_worst_difference": worst,
        "peak_anon_mib_extract": extracted["peak_anon_mib"],
        "peak_anon_mib": analyzed["peak_anon_mib"],
        "peak_anon_mib_small": analyzed_small["peak_anon_mib"],
        "small_layers": small_layers,
        "report_bytes": (workdir / "analyze.html").stat().st_size,
    }


def report(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"analyze -k {r['rank']} vs extract -r {r['rank']} on {r['layers']} layers ({r['modules']} modules, bf16), "
            f"device {r['device']}",
            f"  extract -r {r['rank']}                  {r['extract_s']:8.1f} s",
            f"  analyze -k {r['rank']} --report         {r['analyze_s']:8.1f} s   {r['ratio']:.2f}x extract (target <= 1.5x)",
            f"  energy kept at rank {r['rank']}, worst |extract - analyze|  {r['energy_kept_worst_difference']:.2e}",
            f"  peak private memory             {r['peak_anon_mib']:.0f} MiB at {r['layers']} layers, "
            f"{r['peak_anon_mib_small']:.0f} MiB at {r['small_layers']} layers (extract: {r['peak_anon_mib_extract']:.0f} MiB)",
            f"  report                          {r['report_bytes'] / 1024:.0f} KiB, self-contained",
        ]
    )


def main() -> None:
    bench_main(__doc__, run, report, layers=16, rank=64)


if __name__ == "__main__":
    main()
