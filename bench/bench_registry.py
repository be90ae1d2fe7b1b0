"""Registry at scale: 10,000 entries (small synthetic adapters, 1,000 names x 10 versions).

Times ``registry add`` per entry (all of them, and the last thousand, to show it does not grow),
and the interactive commands as a user runs them (a fresh ``loratool`` process each, the
interpreter's start included): ``registry ls``, ``registry show NAME@v5 --lineage``,
``registry ls --base CHECKPOINT``, and a ``validate NAME@prod`` resolved through the registry. The
baseline in the same run is the same command on an empty registry. Target: ls and show well
under a second.

    python bench/bench_registry.py --workdir /tmp/loratool-bench [--entries 10000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine

ROOT = Path(__file__).resolve().parent.parent


def make_adapters(root: Path, count: int) -> list[Path]:
    """``count`` distinct two-module adapters; one in four fits the shipped Llama fixture's q_proj."""
    import torch

    from loratool.adapter import Adapter, LoraModule
    from loratool.formats import save_adapter

    paths = []
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        out = 32 if i % 4 == 0 else 48  # the fixture's q_proj is (32, 32)
        a = Adapter()
        for layer in range(2):
            a.modules[f"model.layers.{layer}.self_attn.q_proj"] = LoraModule(
                torch.randn(2, 32, generator=g), torch.randn(out, 2, generator=g), 4.0
            )
        path = root / f"a{i:05d}"
        if not path.exists():
            save_adapter(a, path, card=False)
        paths.append(path)
    return paths


def cli_seconds(*args: str, env: dict[str, str], repeat: int = 3) -> float:
    """Best wall time of ``loratool ARGS`` in a fresh process."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "loratool", *args], env=env, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t)
    return best


def run(workdir: Path, layers: int = 0, rank: int = 0, device: str = "cpu", entries: int = 10_000) -> dict[str, Any]:
    from loratool.registry.ops import register

    sources = make_adapters(workdir / "registry-sources", entries)
    home = workdir / "registry-home"
    empty = workdir / "registry-empty"
    for h in (home, empty):
        if h.exists():
            shutil.rmtree(h)
    os.environ["LORATOOL_HOME"] = str(home)
    per_entry = []
    t0 = time.perf_counter()
    for i, src in enumerate(sources):
        t = time.perf_counter()
        register(src, name=f"adapter-{i // 10:04d}", aliases=["prod"] if i % 10 == 4 else ())
        per_entry.append(time.perf_counter() - t)
    add_total = time.perf_counter() - t0
    env = {**os.environ, "LORATOOL_HOME": str(home)}
    env_empty = {**os.environ, "LORATOOL_HOME": str(empty)}
    base = str(ROOT / "fixtures" / "llama-base")
    ref = f"adapter-{entries // 20:04d}"
    figures = {
        "ls": (cli_seconds("registry", "ls", env=env), cli_seconds("registry", "ls", env=env_empty)),
        "ls --json": (
            cli_seconds("registry", "ls", "--json", env=env),
            cli_seconds("registry", "ls", "--json", env=env_empty),
        ),  # fmt: skip
        "show --lineage": (
            cli_seconds("registry", "show", f"{ref}@v5", "--lineage", env=env),
            cli_seconds("--version", env=env_empty),
        ),  # fmt: skip
        "ls --base": (
            cli_seconds("registry", "ls", "--base", base, env=env),
            cli_seconds("registry", "ls", "--base", base, env=env_empty),
        ),  # fmt: skip
        "validate NAME@prod": (
            cli_seconds("validate", f"{ref}@prod", env=env),
            cli_seconds("validate", str(sources[entries // 2 + 4]), env=env),
        ),  # fmt: skip
    }
    db = home / "registry.db"
    return {
        "machine": machine(), "entries": entries, "add_total_s": add_total,
        "add_mean_ms": 1000 * add_total / entries, "add_last_1000_ms": 1000 * _mean(per_entry[-1000:]),
        "add_first_1000_ms": 1000 * _mean(per_entry[:1000]), "figures": figures,
        "db_mib": db.stat().st_size / 2**20,
        "blobs_mib": sum(f.stat().st_size for f in (home / "blobs").rglob("*") if f.is_file()) / 2**20,
    }  # fmt: skip


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def report(r: dict[str, Any]) -> str:
    lines = [
        f"registry with {r['entries']:,} entries (two-module adapters, 1,000 names x 10 versions)",
        f"  add                          {r['add_mean_ms']:6.1f} ms per entry ({r['add_total_s']:.0f} s in all; "
        f"first 1,000 {r['add_first_1000_ms']:.1f} ms, last 1,000 {r['add_last_1000_ms']:.1f} ms each)",
        f"  index {r['db_mib']:.1f} MiB, stored files {r['blobs_mib']:.0f} MiB",
        "  a fresh `loratool` process each (interpreter start included), best of 3; baseline in brackets:",
    ]
    baselines = {"ls": "empty registry", "ls --json": "empty registry", "show --lineage": "loratool --version",
                 "ls --base": "empty registry", "validate NAME@prod": "validate by path"}  # fmt: skip
    for name, (t, base) in r["figures"].items():
        lines.append(f"  {name:<28} {t:6.2f} s   ({baselines[name]} {base:.2f} s, {t / base:.2f}x)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--entries", type=int, default=10_000)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(report(run(args.workdir, entries=args.entries)))


if __name__ == "__main__":
    main()
