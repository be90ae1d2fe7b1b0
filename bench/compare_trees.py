"""Time the same loratool command from two source trees, alternated, in one run: is a change slower?

    python bench/compare_trees.py --old /tmp/oldtree --workdir /tmp/loratool-bench [--repeat 3]

``--old`` is a checkout of an earlier revision (``git worktree add /tmp/oldtree REV``); the new
tree is this one. Each command runs as a fresh process (``python -m loratool``) with PYTHONPATH
set to one tree, old and new alternated so that the machine's drift touches both alike; the best
of ``--repeat`` is reported, with every run. Inputs are the benchmark pair ``run_all.py`` makes
(16 layers, Llama-1B shapes) the rank-16 adapter of the merge bench, and the four rank-64 sources of the combine bench.
A whole process is timed, start-up and imports included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

NEW = Path(__file__).resolve().parent.parent
DOCS = NEW / "docs" / "benchmarks.md"


def timed(tree: Path, args: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loratool", *args, "-o", str(out), "-q"], check=True, env=env,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="*", choices=["merge", "extract", "combine"])
    ap.add_argument("--write-docs", action="store_true", help="Put the result in docs/benchmarks.md.")
    ap.add_argument("--old-label", default="(unnamed)", help="What the old tree is, for the docs (a commit id).")
    args = ap.parse_args()
    pair, adapter = args.workdir / "1b-l16", args.workdir / "adapter-l16"
    commands = {
        "merge": ["merge", str(pair / "base"), str(adapter), "--device", "cpu"],
        "extract": ["extract", str(pair / "base"), str(pair / "ft"), "-r", "16", "--device", "cpu"],
        "combine": ["combine", *(str(args.workdir / f"combine-src-l2-{i}") for i in range(4)), "--method", "svd",
                    "-r", "64", "--device", "cpu"],
    }  # fmt: skip
    only = set(args.only or commands)
    lines = []
    for name, command in commands.items():
        if name not in only:
            continue
        runs: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeat):
            for label, tree in (("old", args.old), ("new", NEW)):
                runs[label].append(timed(tree, command, args.workdir / f"compare-{label}"))
        old, new = min(runs["old"]), min(runs["new"])
        lines.append(f"{name:<8} old {old:6.1f} s  new {new:6.1f} s  new/old {new / old:.2f}x   "
                     f"(old runs {', '.join(f'{s:.1f}' for s in runs['old'])}; "
                     f"new runs {', '.join(f'{s:.1f}' for s in runs['new'])})")  # fmt: skip
        print(lines[-1], flush=True)
    if args.write_docs:
        _write_section(args, "\n".join(lines))


def _write_section(args: argparse.Namespace, text: str) -> None:
    from common import machine

    command = "python bench/compare_trees.py " + " ".join(sys.argv[1:])
    section = (
        f"### compare_trees\n\n`{command}` on {dt.date.today().isoformat()}; {machine()}; old tree: "
        f"{args.old_label}. Whole processes, start-up included.\n\n```\n{text}\n```\n"
    )
    doc = DOCS.read_text()
    block = f"<!-- section:compare_trees -->\n{section}<!-- /section -->\n"
    if "<!-- section:compare_trees -->" in doc:
        doc = re.sub(r"<!-- section:compare_trees -->\n.*?<!-- /section -->\n", lambda _: block, doc, flags=re.S)
    else:
        doc += "\n" + block
    DOCS.write_text(doc)


if __name__ == "__main__":
    main()
