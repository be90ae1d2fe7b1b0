"""Run the benchmark suite and write docs/benchmarks.md from what it measured.

    python bench/run_all.py [--workdir /tmp/loratool-bench] [--layers 16] [--device cpu]

Every figure is a ratio against a baseline run in the same invocation (these machines are noisy):
extract (randomized and exact) vs the exact full-SVD approach, merge vs a plain copy, combine-svd vs
the dense approach; peak private memory for each, and the read floor beside the figures.
Needs about 10 GB of free disk in --workdir for the default 16-layer pair.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import bench_combine
import bench_extract
import bench_merge
from common import machine

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--combine-layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=DOCS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sections = []
    for name, bench, kwargs in (
        ("extract", bench_extract, dict(layers=args.layers, rank=16)),
        ("merge", bench_merge, dict(layers=args.layers, rank=16)),
        ("combine", bench_combine, dict(layers=args.combine_layers, rank=64)),
    ):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        result = bench.run(args.workdir, device=args.device, **kwargs)
        text = bench.report(result)
        print(text, flush=True)
        sections.append(f"### {name}\n\n```\n{text}\n```\n")
    command = "python bench/run_all.py " + " ".join(sys.argv[1:])
    body = "\n".join(
        [
            "# Benchmarks",
            "",
            f"Produced by `{command.strip()}` on {dt.date.today().isoformat()}.",
            f"Machine: {machine()}.",
            "",
            "Each ratio compares runs made in the same invocation, on inputs the script wrote or read shortly",
            "before (so they may sit in the page cache). 'Peak private memory' is the largest RssAnon the",
            "process reached above its state after importing torch; memory-mapped checkpoint pages are page",
            "cache the kernel can drop, and are not counted.",
            "",
            *sections,
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(body)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
