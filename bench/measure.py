"""Run one loratool call in a fresh process and report its wall time and peak memory.

    python bench/measure.py extract '{"base": "...", "finetuned": "...", "output": "...", "rank": 16}'

Prints one JSON line: seconds, cpu_seconds (user + system time of all the process's threads over
the call, the memory sampler's few milliseconds included), peak_anon_mib (private memory: what the
process itself holds; memory-mapped checkpoint pages are page cache the kernel can drop, so they
are reported apart as peak_rss_mib), and the call's JSON result. torch is imported before the
call as the ``loratool`` command imports it (loratool.cli.startup: the collector paused, then frozen).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Samples RssAnon and VmRSS every 5 ms on a thread (VmHWM would count page cache too)."""

    def __init__(self) -> None:
        self.anon = self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon = max(self.anon, _status_kib("RssAnon"))
            self.rss = max(self.rss, _status_kib("VmRSS"))
            time.sleep(0.005)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from loratool.cli import startup

    startup.import_torch_frozen()  # as the loratool command does before a command that uses torch
    import loratool

    op, kwargs = sys.argv[1], json.loads(sys.argv[2])
    if ":" in op:  # a baseline written in a bench script: "bench_combine:dense_combine"
        import importlib

        module, name = op.split(":")
        fn = getattr(importlib.import_module(module), name)
    else:
        fn = getattr(loratool, op)
    args = kwargs.pop("_args", [])
    import torch  # imported before measuring: its own footprint is not the operation's

    torch.zeros(1)
    baseline = _status_kib("RssAnon")
    with PeakMemory() as mem:
        before = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    payload = result.to_json() if hasattr(result, "to_json") else result
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_anon_mib": (mem.anon - baseline) / 1024,
                      "peak_rss_mib": mem.rss / 1024, "result": payload}, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
