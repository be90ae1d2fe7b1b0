"""What every operation needs from its surroundings: a device, CPU threads, progress bars, regexes."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from .errors import LoraToolError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` means CUDA when present; ``cuda``/``cuda:N`` fail clearly when it is not."""
    import torch

    text = "auto" if spec is None else str(spec)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise LoraToolError(f"unknown device '{text}'", fix="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoraToolError("CUDA was asked for but is not available", fix="use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoraToolError(
                f"there is no {device} (this machine has {torch.cuda.device_count()} CUDA device(s))",
                fix="pick an index below the device count",
            )
    return device


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run torch's CPU kernels on ``n`` threads for the duration of the block."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def compute_threads(reserved: int = 1) -> contextlib.AbstractContextManager[int]:
    """Run torch's CPU kernels on all cores but ``reserved``, for the duration of the block.

    Streaming operations hash, read and write on background threads while the main thread
    computes. Left at every core, torch's OpenMP workers spin between the many short kernels of a
    blocked loop and take the cores those threads need: on 2 cores, a profile of merge found a
    quarter of its CPU time in OpenMP's spin-wait. An explicit lower thread count
    (``OMP_NUM_THREADS``, ``torch.set_num_threads``) is kept.
    """
    import torch

    return torch_threads(max(1, min(torch.get_num_threads(), available_cores() - reserved)))


def map_on_cores(fn: Callable[[T], R], items: Iterable[T], *, enabled: bool = True) -> Iterator[R]:
    """``map(fn, items)`` with one item per core at a time, results in order.

    For many small, independent pieces of linear algebra (a QR and an SVD per module): LAPACK
    spreads a 256-column QR over cores poorly; on 2 cores, one single-threaded call per core got
    through about 1.5x as many modules. Every call runs single-threaded, so results do not depend
    on the number of cores. ``enabled=False`` (work on a GPU) is a plain ``map``.
    """
    if not enabled:
        yield from map(fn, items)
        return
    workers = available_cores()
    with torch_threads(1):
        if workers == 1:
            yield from map(fn, items)
            return
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loratool-compute")
        try:
            yield from pool.map(fn, items)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error, start nothing more


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on stderr (shown only past a second of work), or the plain iterable."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    bar: Iterable[T] = tqdm(items, total=total, desc=desc, unit="tensor", delay=1.0, dynamic_ncols=True, leave=False)
    return bar


def compile_regex(pattern: str | None, option: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise LoraToolError(f"{option} {pattern!r} is not a valid regular expression ({e})") from None
