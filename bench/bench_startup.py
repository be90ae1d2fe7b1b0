"""Start-up: what a short ``loratool`` command costs above importing torch, and what the collector took.

Times whole processes on the shipped fixtures, as a pipeline runs them: ``inspect`` (of a checkpoint,
from its headers, and of an adapter), ``validate``, ``merge``, ``extract`` and ``registry ls``, each through loratool's entry point (``python -m
loratool``: torch imported with the collector paused and frozen, the rest frozen before exit;
loratool.cli.startup) and, as the baseline in the same run, through the same click group with
Python's collector left as it is. Runs alternate, best of ``--repeats``; ``python -c 'import
torch'`` is the floor. loratool's modules are compiled to bytecode first, as an installed package
has them (this VM sets PYTHONDONTWRITEBYTECODE, which would otherwise compile them in every
process).

    python bench/bench_startup.py --workdir /tmp/loratool-bench [--repeats 5]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine  # which compiles loratool's modules to bytecode as it is imported

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
BASELINE = "import sys; from loratool.cli import cli; cli(args=sys.argv[1:], prog_name='loratool')"
FROZEN_TORCH = "import gc; gc.disable(); import torch; gc.freeze()"
TORCH_FREE = ("inspect ckpt", "registry ls")  # headers and the registry's database only


def commands(out: Path) -> dict[str, list[str]]:
    f = FIXTURES
    return {
        "inspect ckpt": ["inspect", str(f / "llama-base"), "--json"],
        "inspect adapter": ["inspect", str(f / "llama-peft-adapter"), "--json"],
        "validate": ["validate", str(f / "llama-peft-adapter"), "--base", str(f / "llama-base")],
        "merge": ["merge", str(f / "llama-base"), str(f / "llama-peft-adapter"), "-o", str(out), "-q"],
        "extract": ["extract", str(f / "llama-base"), str(f / "llama-ft"), "-r", "4", "-o", str(out), "-q"],
        "registry ls": ["registry", "ls"],
    }


def seconds(argv: list[str], env: dict[str, str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def run(workdir: Path, layers: int = 0, rank: int = 0, device: str = "cpu", repeats: int = 5) -> dict[str, Any]:
    out = workdir / "startup-out"
    env = dict(os.environ, LORATOOL_HOME=str(workdir / "startup-home"), LORATOOL_DIGEST_CACHE="0")
    floors = {"old": [], "new": []}
    for _ in range(repeats):
        floors["old"].append(seconds([sys.executable, "-c", "import torch"], env, out))
        floors["new"].append(seconds([sys.executable, "-c", FROZEN_TORCH], env, out))
    rows = []
    for name, args in commands(out).items():
        new, old = [], []
        for _ in range(repeats):  # alternated: the VM's speed drifts
            new.append(seconds([sys.executable, "-m", "loratool", *args], env, out))
            old.append(seconds([sys.executable, "-c", BASELINE, *args], env, out))
        rows.append({"command": name, "new": new, "old": old})
    shutil.rmtree(out, ignore_errors=True)
    return {"machine": machine(), "floor": {k: min(v) for k, v in floors.items()}, "rows": rows}


def report(r: dict[str, Any]) -> str:
    floor = r["floor"]
    lines = [
        "whole processes on the shipped fixtures, best of each (runs alternated); a process that only imports torch: "
        f"{floor['old']:.2f} s, {floor['new']:.2f} s with the collector paused and frozen",
        f"  {'command':15s} {'collector as is':>13s} {'startup.py':>11s}  {'new/old':>7s}   above its import-torch process",
    ]
    for row in r["rows"]:
        new, old = min(row["new"]), min(row["old"])
        above = (
            "(imports no torch)"
            if row["command"] in TORCH_FREE
            else f"{old - floor['old']:+.2f} s -> {new - floor['new']:+.2f} s"
        )
        lines.append(f"  {row['command']:15s} {old:11.2f} s {new:9.2f} s  {new / old:6.2f}x   {above}")
    return "\n".join(lines)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    r = run(args.workdir, repeats=args.repeats)
    print(r["machine"])
    print(report(r))


if __name__ == "__main__":
    main()
