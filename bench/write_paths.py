"""Buffered vs O_DIRECT writes of one large file, alternated, with a pause before each.

    python bench/write_paths.py --workdir /tmp/loratool-bench [--gib 2] [--repeats 3] [--pause 3]

Why loratool writes large outputs with O_DIRECT (``loratool/io/directio.py``): on VMs whose host
reclaims the guest's free memory, every fresh page-cache page costs a fault to the host, and the
kernel time of a buffered write dwarfs the copy. The pause lets freed memory go back to the host,
as it does between two real runs. Prints wall and kernel (system) seconds of each run.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path
from typing import Any

from loratool.io.directio import DirectFile


def write_file(path: Path, gib: float, direct: bool, chunk: bytes) -> tuple[float, float]:
    """Seconds of wall and of kernel time to write and fsync ``gib`` GiB from one reused buffer."""
    n = int(gib * 2**30) // len(chunk)
    sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    t = time.perf_counter()
    out = DirectFile(path, direct=direct)
    for _ in range(n):
        out.write(chunk)
    out.close()
    wall = time.perf_counter() - t
    return wall, resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0


def run(workdir: Path, gib: float = 2.0, repeats: int = 3, pause: float = 3.0) -> dict[str, Any]:
    path = workdir / "write-paths.bin"
    chunk = os.urandom(1 << 20) * 64  # 64 MiB, touched once before timing
    runs: dict[str, list[tuple[float, float]]] = {"buffered": [], "O_DIRECT": []}
    for _ in range(repeats):  # alternated
        for label, direct in (("buffered", False), ("O_DIRECT", True)):
            time.sleep(pause)
            runs[label].append(write_file(path, gib, direct, chunk))
            path.unlink()
    return {"gib": gib, "pause": pause, "runs": runs}


def report(r: dict[str, Any]) -> str:
    lines = [f"write {r['gib']:g} GiB and fsync from one reused 64 MiB buffer, pause {r['pause']:g} s before each"]
    for label, runs in r["runs"].items():
        for wall, kernel in runs:
            lines.append(f"  {label:9s} {wall:6.2f} s wall   {kernel:6.2f} s kernel")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pause", type=float, default=3.0)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(report(run(args.workdir, args.gib, args.repeats, args.pause)))


if __name__ == "__main__":
    main()
