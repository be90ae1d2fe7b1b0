"""Reading an extraction's inputs from the disk: memory-mapped against O_DIRECT (loratool.io.directread).

Needs root on Linux (the page cache is dropped before each cold read). On the bench pair
(bench_extract's, 16 layers unless ``--layers``), alternated in the same run:

- the read floor as bench_extract measures it (buffered 16 MiB reads into one reused buffer), and
  the same bytes read with O_DIRECT (8 MiB reads into one reused buffer);
- reading and widening every paired weight into float32 deltas, as extraction's reader does
  (``stream.deltas.DeltaReader``), memory-mapped from a cold cache, with O_DIRECT from a cold cache,
  and memory-mapped from the page cache: wall time and this process's CPU time;
- whole ``loratool extract -r 16`` processes from a cold cache with the inputs' digests kept, with
  only the base's kept (a new fine-tune), and with none kept (a first run): extraction reads both
  with O_DIRECT, hashing those whose digests are not kept from the same reads; each against
  ``LORATOOL_DIRECT_IO=0`` (both memory-mapped, the hasher reading them through the page cache).

    python bench/read_paths.py --workdir /tmp/loratool-bench [--layers 16] [--repeats 3]
"""

from __future__ import annotations

import mmap
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_extract import ensure_pair
from common import drop_page_cache, fresh, keep_digests, pair_args, read_floor

from loratool.io.checkpoint import open_checkpoint
from loratool.metadata import digests
from loratool.stream.deltas import DeltaReader, paired_keys
from loratool.stream.pipeline import BufferPool


def timed(fn: Callable[[], object], children: bool = False) -> tuple[float, float, float]:
    """Wall, user and system seconds of ``fn`` (of the child processes it waits for, with ``children``)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    r0, t = resource.getrusage(who), time.perf_counter()
    fn()
    wall, r1 = time.perf_counter() - t, resource.getrusage(who)
    return wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def direct_floor(*dirs: Path, chunk: int = 8 << 20) -> None:
    buf = mmap.mmap(-1, chunk)
    with memoryview(buf) as view:
        for f in sorted(p for d in dirs for p in d.iterdir() if p.is_file()):
            fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
            try:
                offset = 0
                while n := os.preadv(fd, [view], offset):
                    offset += n
            finally:
                os.close(fd)
    buf.close()


def widen_all(pair: Path, direct: bool) -> None:
    """Every paired weight's float32 delta and norm, as extraction's reader forms them."""
    with open_checkpoint(pair / "base") as b, open_checkpoint(pair / "ft") as f:
        keys = paired_keys(b, f, skip=set())
        chosen = frozenset(k for k in keys if k.endswith(".weight") and len(b.info(k).shape) == 2) if direct else None
        pool = BufferPool()
        read = DeltaReader(b, f, torch.device("cpu"), pool, direct=chosen or frozenset())
        try:
            for key in keys:
                d = read(key)
                if d.delta is not None:
                    pool.give(d.delta)
        finally:
            read.close()


def extract_process(pair: Path, out: Path, home: Path, direct: bool, template: Path | None = None) -> None:
    """A whole extraction with ``home``'s kept digests (a fresh copy of ``template``'s, if given)."""
    if template is not None:
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(template, home)
    env = dict(os.environ, LORATOOL_HOME=str(home), LORATOOL_DIRECT_IO="1" if direct else "0")
    env[digests.CACHE_ENV] = "1"
    cmd = [sys.executable, "-m", "loratool", "extract", str(pair / "base"), str(pair / "ft"), "-r", "16",
           "-o", str(fresh(out)), "--quiet"]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


KEPT = {"digests kept": "both", "base's digest kept": "base", "nothing kept": "none"}  # the homes each run copies


def line(label: str, runs: list[tuple[float, float, float]]) -> str:
    best = min(runs)
    walls = ", ".join(f"{w:.2f}" for w, _, _ in runs)
    return f"  {label:46s} {best[0]:6.2f} s   user {best[1]:5.2f}  sys {best[2]:5.2f}   (runs {walls})"


def main() -> None:
    args = pair_args(__doc__)
    pair = ensure_pair(args.workdir, args.layers)
    if not drop_page_cache():
        raise SystemExit("the page cache cannot be dropped here (root on Linux): every read would come from memory")
    homes = {"both": keep_digests(fresh(args.workdir / "read-paths-home"), pair / "base", pair / "ft"),
             "base": keep_digests(fresh(args.workdir / "read-paths-base-home"), pair / "base"),  # a new fine-tune
             "none": fresh(args.workdir / "read-paths-empty-home")}  # a first run  # fmt: skip
    homes["none"].mkdir()
    run_home = args.workdir / "read-paths-run-home"  # a fresh copy of one of them each run
    runs: dict[str, list[tuple[float, float, float]]] = {}

    def cold(label: str, fn: Callable[[], object], children: bool = False) -> None:
        drop_page_cache()
        runs.setdefault(label, []).append(timed(fn, children))

    for _ in range(args.repeats):
        cold("read floor (buffered)", lambda: read_floor(pair / "base", pair / "ft"))
        cold("the same files with O_DIRECT", lambda: direct_floor(pair / "base", pair / "ft"))
        cold("weights widened, memory-mapped, cold", lambda: widen_all(pair, direct=False))
        cold("weights widened, O_DIRECT, cold", lambda: widen_all(pair, direct=True))
        read_floor(pair / "base", pair / "ft")  # into the page cache
        runs.setdefault("weights widened, memory-mapped, page cache", []).append(timed(lambda: widen_all(pair, False)))
        for what, template in KEPT.items():
            for direct in (True, False):
                label = f"extract, {what}, {'O_DIRECT' if direct else 'memory-mapped'}"
                cold(label, lambda direct=direct, t=template: extract_process(
                    pair, args.workdir / "out-read-paths", run_home, direct, template=homes[t]), children=True)  # fmt: skip
    print(f"reading the {args.layers}-layer bench pair ({sum(f.stat().st_size for f in pair.rglob('*')) / 2**30:.2f} "
          f"GiB), best of {args.repeats}, alternated; page cache dropped before each cold run")  # fmt: skip
    for label, r in runs.items():
        print(line(label, r))
    for what in KEPT:
        d, m = (min(v) for k, v in runs.items() if k.startswith(f"extract, {what}"))
        print(f"  extract, {what}: O_DIRECT / memory-mapped  {d[0] / m[0]:.2f}x")


if __name__ == "__main__":
    main()
