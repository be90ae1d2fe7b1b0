"""Extraction one tensor at a time against two side by side (loratool.stream.workers), in one process.

On the bench pair (bench_extract's, 16 layers unless ``--layers``), alternated: ``loratool.extract``
with ``side_by_side_workers`` as shipped (two workers on a CPU of several cores where torch's thread
count is per thread) and forced to one, the inputs' digests kept (as after a first run), from the
page cache and, where the page cache can be dropped (root on Linux), from the disk. Prints wall and
CPU time (user + system, all threads) of each, best of ``--repeats``, the ratio, and the worst
module's relative error of each (the same to the digits printed, or the change is not a speed-up).

    python bench/svd_workers.py --workdir /tmp/loratool-bench [--layers 16] [--repeats 3]
"""

from __future__ import annotations

import os
import resource
import time

from bench_extract import ensure_pair
from common import drop_page_cache, fresh, keep_digests, machine, pair_args, read_floor


def main() -> None:
    args = pair_args(__doc__)
    pair = ensure_pair(args.workdir, args.layers)
    home = keep_digests(fresh(args.workdir / "svd-workers-home"), pair / "base", pair / "ft")
    os.environ["LORATOOL_HOME"] = str(home)
    from loratool.cli import startup

    startup.import_torch_frozen()
    import loratool
    import loratool.ops.extract as extract_op

    shipped = extract_op.side_by_side_workers
    places = ["page cache"] + (["disk"] if drop_page_cache() else [])
    runs: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for _ in range(args.repeats):
        for place in places:
            for workers in (1, 0):  # 0: as shipped
                extract_op.side_by_side_workers = shipped if workers == 0 else (lambda device: 1)
                if place == "disk":
                    drop_page_cache()
                else:
                    read_floor(pair / "base", pair / "ft")
                r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                result = loratool.extract(pair / "base", pair / "ft", output=fresh(args.workdir / "svd-workers-out"),
                                          rank=16, show_progress=False)  # fmt: skip
                wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
                cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
                worst = max(r.relative_error for r in result.report)
                runs.setdefault((place, workers), []).append((wall, cpu, worst))
    extract_op.side_by_side_workers = shipped
    import torch

    print(machine())
    n = shipped(torch.device("cpu"))
    print(f"extract -r 16 on {args.layers} layers in one process, digests kept, best of {args.repeats}, alternated; "
          f"side by side: {n} workers of {max(1, torch.get_num_threads() // n)} thread(s)")  # fmt: skip
    for place in places:
        one, two = min(runs[(place, 1)]), min(runs[(place, 0)])
        for label, key, best in (("one at a time", 1, one), ("side by side", 0, two)):
            walls = ", ".join(f"{w:.2f}" for w, _, _ in runs[(place, key)])
            print(f"  {place:10s} {label:14s} {best[0]:6.2f} s   cpu {best[1]:6.2f} s   worst error {best[2]:.6f}"
                  f"   (runs {walls})")  # fmt: skip
        print(f"  {place:10s} side by side / one at a time  {two[0] / one[0]:.2f}x wall, {two[1] / one[1]:.2f}x cpu")


if __name__ == "__main__":
    main()
