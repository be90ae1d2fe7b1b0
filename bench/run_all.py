"""Run the benchmark suite and write docs/benchmarks.md from what it measured.

    python bench/run_all.py [--workdir /tmp/loratool-bench] [--layers 16] [--device cpu] [--only combine]

Every figure is a ratio against a baseline run in the same invocation (these machines are noisy):
extract (randomized and exact) vs the exact full-SVD approach, merge vs a plain copy (bf16 and FP8),
what a merge into FP8 keeps of the adapter at the model's output per rounding rule, combine-svd vs
the dense approach; peak private memory for each, and the read floor beside the figures; and
buffered vs O_DIRECT writes (write_paths), which explains the copy baseline's swings; GGUF files
from loratool's converter and llama.cpp's, by the delta llama.cpp would add (gguf, where
LORATOOL_LLAMA_CPP_LORA names llama.cpp's convert_lora_to_gguf.py; skipped elsewhere); extract
against mergekit's extractor (mergekit, where LORATOOL_MERGEKIT names mergekit-extract-lora); and, where a
CUDA GPU is present, merge on it against its host's CPU (gpu; skipped elsewhere, its section kept).
``--only`` re-runs some benches and keeps the other sections of the document as they were; each
section says which command produced it, when, and on what machine.
Needs about 10 GB of free disk in --workdir for the default 16-layer pair.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from pathlib import Path

import bench_analyze
import bench_combine
import bench_extract
import bench_fp4
import bench_fp8
import bench_gguf
import bench_gpu
import bench_merge
import bench_mergekit
import bench_moe
import bench_quant_keep
import bench_registry
import bench_startup
import bench_ties
import bench_unmerge_check
import torch
import write_paths
from common import machine

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BENCHES = {
    "extract": bench_extract, "merge": bench_merge, "fp8": bench_fp8, "quant_keep": bench_quant_keep,
    "fp4": bench_fp4, "unmerge_check": bench_unmerge_check, "combine": bench_combine,
    "ties": bench_ties, "analyze": bench_analyze, "moe": bench_moe, "registry": bench_registry, "startup": bench_startup,
    "write_paths": write_paths,
    "gguf": bench_gguf, "mergekit": bench_mergekit, "gpu": bench_gpu,
}  # fmt: skip
INTRO = """# Benchmarks

Written by `bench/run_all.py`; each section names the command that produced it.

Each ratio compares runs made in the same invocation, on inputs the script wrote or read shortly
before (so they may sit in the page cache). 'Peak private memory' is the largest RssAnon the
process reached above its state after importing torch; memory-mapped checkpoint pages are page
cache the kernel can drop, and are not counted.

On the 2-core VM, writing a fresh file through the page cache costs far more kernel time than
the copy itself whenever the host has reclaimed the guest's free memory, so a plain copy of the
same files swings between about 2 and 9 s from run to run (the write_paths section measures it).
loratool writes large files with O_DIRECT and does not pay that; the merge section shows the
read + write floor through that same writer beside the copy.
"""


def sections(text: str) -> dict[str, str]:
    found = re.findall(r"<!-- section:(\w+) -->\n(.*?)<!-- /section -->\n", text, flags=re.S)
    return dict(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--combine-layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=None)
    ap.add_argument("--out", type=Path, default=DOCS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    kept = sections(args.out.read_text()) if args.out.exists() else {}
    command = "python bench/run_all.py " + " ".join(sys.argv[1:])
    for name in args.only or list(BENCHES):
        if name == "gpu" and not torch.cuda.is_available():
            print("skipping gpu: no CUDA GPU here (its section is kept as it was)", file=sys.stderr)
            continue
        if name == "mergekit" and not os.environ.get("LORATOOL_MERGEKIT"):
            print("skipping mergekit: LORATOOL_MERGEKIT does not name mergekit-extract-lora (its section is kept)",
                  file=sys.stderr)  # fmt: skip
            continue
        if name == "gguf" and not os.environ.get("LORATOOL_LLAMA_CPP_LORA"):
            print("skipping gguf: LORATOOL_LLAMA_CPP_LORA does not name llama.cpp's convert_lora_to_gguf.py (its "
                  "section is kept as it was)", file=sys.stderr)  # fmt: skip
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        layers = (
            args.combine_layers
            if name in ("combine", "ties")
            else 4
            if name in ("moe", "quant_keep", "fp4")
            else args.layers
        )
        rank = 64 if name in ("combine", "ties", "analyze") else 16
        if name == "write_paths":
            result = write_paths.run(args.workdir)
        elif name == "startup":
            result = bench_startup.run(args.workdir)
        elif name == "mergekit":
            result = bench_mergekit.run(args.workdir, layers, rank, os.environ["LORATOOL_MERGEKIT"])  # the pair
        elif name == "gguf":
            result = bench_gguf.run(args.workdir / "gguf", Path(os.environ["LORATOOL_LLAMA_CPP_LORA"]))
        else:
            result = BENCHES[name].run(args.workdir, layers, rank, args.device)
        text = BENCHES[name].report(result)
        print(text, flush=True)
        kept[name] = (
            f"### {name}\n\n`{command.strip()}` on {dt.date.today().isoformat()}; {machine()}.\n\n```\n{text}\n```\n"
        )
    order = [n for n in BENCHES if n in kept] + [n for n in kept if n not in BENCHES]  # others' sections too
    body = INTRO + "".join(f"\n<!-- section:{n} -->\n{kept[n]}<!-- /section -->\n" for n in order)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(body)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
