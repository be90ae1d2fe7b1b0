"""Tensors computed side by side on the CPU, each on its share of torch's threads.

A truncated SVD on one tensor at a time spreads each operation over all cores (torch's intra-op
threads): the large thin products scale, but the QR of thin blocks, the small products and the
elementwise work between them do not, and OpenMP's idle threads spin between them. With two
tensors at once, each on half of torch's threads (one each on two cores), both cores stay busy on
work that needs no synchronisation: ``bench/svd_workers.py`` measures it.

That needs torch's thread count to be each thread's own, which its OpenMP builds give
(``omp_set_num_threads`` and MKL's ``mkl_set_num_threads_local`` act on the calling thread);
elsewhere one tensor at a time, as before. ``torch.set_num_threads`` also sets the count that
threads take on their first operation: the caller's is read (which fixes its own) before any
worker or :func:`single_threaded` sets theirs, and set back afterwards.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, TypeVar

from ..host import progress
from .pipeline import prefetch

if TYPE_CHECKING:
    import torch

K = TypeVar("K")
T = TypeVar("T")
R = TypeVar("R")

IN_FLIGHT_BYTES = 512 << 20  # inputs computed at once beyond the first: two MLP deltas of an 8B model (235 MB each)
WORKERS = 2


def side_by_side_workers(device: torch.device) -> int:
    """How many tensors to compute at once: :data:`WORKERS` on the CPU where torch has several threads
    (its count, which ``OMP_NUM_THREADS``, ``torch.set_num_threads`` or torchrun's one a process set,
    is shared among the workers) and its thread count is per thread, else one."""
    import torch

    per_thread = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return WORKERS if device.type == "cpu" and torch.get_num_threads() >= WORKERS and per_thread else 1


def single_threaded(items: Iterable[T]) -> Iterator[T]:
    """``items``, iterated with one torch thread on the iterating thread (a prefetch thread's reading
    and widening, beside workers that take the cores)."""
    import torch

    torch.set_num_threads(1)
    yield from items


def read_side_by_side(
    fn: Callable[[T], R], read: Callable[[K], T], keys: Sequence[K], workers: int, *, depth: int, desc: str,
    show: bool, size: Callable[[T], int],
) -> list[R]:  # fmt: skip
    """``fn(read(key))`` for each key, in order, with a progress bar: ``read`` on the prefetch thread,
    ``depth`` keys ahead (0: on this thread), ``fn`` on ``workers`` (:func:`run_side_by_side`). Beside
    several workers the reader runs on one torch thread and queues one fewer: each worker holds an
    item, so as many are in memory."""
    items: Iterable[T] = map(read, keys)
    if workers > 1 and depth > 0:
        items, depth = single_threaded(items), max(1, depth - 1)
    ahead = prefetch(items, depth=depth)
    try:
        shown = progress(ahead, total=len(keys), desc=desc, enabled=show)
        return list(run_side_by_side(fn, shown, workers, size=size))
    finally:
        ahead.close()  # the prefetch thread is done (joined) before the caller closes what it reads


def run_side_by_side(
    fn: Callable[[T], R], items: Iterable[T], workers: int, *, size: Callable[[T], int] = lambda item: 0,
    budget: int = IN_FLIGHT_BYTES,
) -> Iterator[R]:  # fmt: skip
    """``fn(item)`` for each item, yielded in the items' order, on ``workers`` threads that share the
    caller's torch threads (``torch.get_num_threads() // workers`` each): at most ``workers`` at once
    and, beyond one, at most ``budget`` bytes of inputs (``size``) at once. A worker takes the next item
    as soon as its call ends, whatever the order: the results of calls that end before one begun
    earlier wait for it, and an item's bytes count until its call ends. With one worker, on the
    calling thread. An item larger than ``budget`` runs alone (none begins beside it, and it waits for
    those running), so on all the caller's threads, where its share would leave cores idle: an 8B
    model's changed embedding (2.1 GB in float32), a 70B model's MLP deltas. An error in ``fn`` is
    raised where its result would have been yielded, once the calls running beside it are done."""
    if workers <= 1:
        yield from map(fn, items)
        return
    import torch

    saved = torch.get_num_threads()
    each = max(1, saved // workers)
    order: deque[Future[R]] = deque()  # submitted and not yet yielded, in the items' order
    running: dict[Future[R], int] = {}  # submitted and not yet seen to end: their items' bytes
    pool = ThreadPoolExecutor(workers, thread_name_prefix="loratool-worker")
    try:
        for item in items:
            n = size(item)
            while running and (len(running) >= workers or sum(running.values()) + n > budget):
                ended, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in ended:
                    del running[future]
                while order and order[0].done():
                    yield order.popleft().result()
            future = pool.submit(_on_threads, fn, item, saved if n > budget else each)
            order.append(future)
            running[future] = n
        while order:
            yield order.popleft().result()
    finally:
        for future in order:
            future.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(saved)  # the count threads that start later take


def _on_threads(fn: Callable[[T], R], item: T, threads: int) -> R:
    """``fn(item)`` with ``threads`` torch threads on this (worker) thread."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(item)
