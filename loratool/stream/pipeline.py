"""The streaming pipeline shared by extract and merge: read ahead, widen on the device, compute, write behind.

A checkpoint streams through three threads, one tensor (or a small window) at a time::

    prefetch thread          main thread               writer thread
    read + widen(tensor) ->  compute on float32   ->   cast, write, fsync (BackgroundWriter)

Buffer ownership, stated once: :func:`widen` hands the caller a float32 tensor that it owns; on
CPU it comes from the :class:`BufferPool`. The owner either gives it back with
``pool.give(t)`` once consumed, or passes it to :meth:`BackgroundWriter.write` with
``recycle=True``, after which it belongs to the writer, which gives it back once written. A
tensor read from a checkpoint (memory-mapped) is never given to the pool. So peak memory is a
few tensors, whatever the model's size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..host import progress

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")


def upcast(t: torch.Tensor, device: torch.device, *, copy: bool = False) -> torch.Tensor:
    """``t`` as float32 on ``device``. To CUDA the stored dtype travels (half the bytes of float32)
    and is widened on the GPU."""
    import torch

    if device.type == "cuda" and t.device.type == "cpu":
        return to_device(t, device).to(torch.float32)
    return t.to(device, torch.float32, copy=copy)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: to a GPU from page-locked memory, asynchronously (a pageable copy is
    staged by the driver and blocks the caller; on an H200 host that made merge slower on the GPU
    than on the CPU). torch's host allocator keeps the staging buffer until the copy is done."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` in ``dtype`` on the CPU. From a GPU it is cast there first (fewer bytes cross) and
    lands in page-locked memory: a pageable copy runs at a fraction of the bus's speed."""
    import torch

    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t)  # waits for the work that computes t


def fault_in(t: torch.Tensor, page: int = 4096) -> torch.Tensor:
    """``t`` (a CPU tensor, perhaps a view of a memory-mapped file) with every page of it touched
    here, so that whoever reads it next finds it mapped in memory rather than on the disk; a copy
    would do the same at the cost of moving every byte."""
    import torch

    flat = t.reshape(-1).view(torch.uint8)
    if flat.numel():
        int(flat[::page].sum())  # one byte a page
    return t


class BufferPool:
    """Reusable tensors by element count and dtype.

    A fresh 64 MB tensor costs the kernel 16,000 page faults and zeroing every time; streaming a
    model allocates one per weight, so without reuse that system time rivals the arithmetic.
    Buffers come back with :meth:`give`; the pool holds at most what was in flight at once.

    ``keep_bytes`` bounds what it holds while nothing uses it: a buffer that would take the free
    buffers past it is let go on its return, and a new buffer first lets the free ones go until it
    fits beside them. A pass whose largest tensors come once or twice (an embedding, the head) then
    keeps only the layers' sizes, which repeat, and its peak is the largest tensor plus what is in
    flight rather than the sum of every size it met.
    """

    def __init__(self, keep_bytes: int | None = None) -> None:
        self._free: dict[tuple[int, torch.dtype, str], list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._keep = keep_bytes
        self._free_bytes = 0

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        import torch

        n = 1
        for d in shape:
            n *= d
        with self._lock:
            free = self._free.get((n, dtype, str(device)))
            flat = free.pop() if free else None
            if flat is not None:
                self._free_bytes -= _nbytes(flat)
            elif self._keep is not None:  # room first: let the free buffers go, the largest first
                size = n * torch.empty(0, dtype=dtype).element_size()
                while self._free_bytes and self._free_bytes + size > self._keep:
                    key = max((k for k, v in self._free.items() if v), key=lambda k: _nbytes(self._free[k][0]))
                    self._free_bytes -= _nbytes(self._free[key].pop())
        if flat is None:
            flat = torch.empty(n, dtype=dtype, device=device)
        return flat.view(tuple(shape))

    def give(self, t: torch.Tensor) -> None:
        with self._lock:
            if self._keep is not None and self._free_bytes + _nbytes(t) > self._keep:
                return  # let go: its memory goes back to the allocator
            self._free.setdefault((t.numel(), t.dtype, str(t.device)), []).append(t.reshape(-1))
            self._free_bytes += _nbytes(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def widen(t: torch.Tensor, device: torch.device, pool: BufferPool) -> torch.Tensor:
    """A private float32 copy of ``t`` on ``device``, which the caller owns (see the module docstring).

    On CPU it is widened into a reused buffer: fresh 64 MB allocations cost more than the
    arithmetic done on them.
    """
    import torch

    if device.type == "cuda":
        return upcast(t, device, copy=True)
    return pool.take(t.shape, torch.float32, device).copy_(t)


def widen_difference(wf: torch.Tensor, wb: torch.Tensor, device: torch.device, pool: BufferPool) -> torch.Tensor:
    """``wf - wb`` in float32, a private tensor the caller owns (as :func:`widen`). On the CPU a
    strip of rows at a time: ``delta.sub_(wb)`` with ``wb`` in another dtype would make a float32
    copy of the whole of ``wb`` first (250 MB for a Llama head), and a strip stays in cache."""
    import torch

    if device.type == "cuda" or wf.dim() == 0 or wf.dtype == wb.dtype == torch.float32:
        return widen(wf, device, pool).sub_(upcast(wb, device) if device.type == "cuda" else wb)
    if wb.dim() == 2 and wb.shape[0] > 1 and wb.stride() == (1, wb.shape[0]):
        # a transposed view (a packed weight dequantized as stored, held as the model holds it): a strip of
        # its rows is a column of what is stored, read an element a cache line; torch's blocked transposing
        # copy takes the whole (several times faster on a gpt-oss expert's 2880 x 5760)
        flat = pool.take(wb.shape, wb.dtype, device).copy_(wb)
        try:
            return widen_difference(wf, flat, device, pool)
        finally:
            pool.give(flat)
    out = pool.take(wf.shape, torch.float32, device)
    step = max(1, (1 << 20) // max(1, wf[0].numel()))  # about 4 MB of float32 a strip
    as_is = wb.dtype == torch.float32 and wb.is_contiguous()  # (else each strip widened into scratch)
    scratch = None if as_is else pool.take((min(step, wf.shape[0]), *wf.shape[1:]), torch.float32, device)
    for i in range(0, wf.shape[0], step):
        n = min(step, wf.shape[0] - i)
        out[i : i + n].copy_(wf[i : i + n]).sub_(wb[i : i + n] if scratch is None else scratch[:n].copy_(wb[i : i + n]))
    if scratch is not None:
        pool.give(scratch)  # reused, not freed: a temporary a strip would leave memory with the allocator
    return out


def give_back(t: torch.Tensor, pool: BufferPool) -> None:
    """Return a tensor :func:`widen` made once it is consumed (CUDA tensors are left to torch's caching allocator)."""
    if t.device.type != "cuda":
        pool.give(t)


def stream(fn: Callable[[T], R], items: list[T], *, desc: str, show: bool, depth: int = 2) -> Iterable[R]:
    """``map(fn, items)`` computed ``depth`` items ahead on the prefetch thread, with a progress bar."""
    return progress(prefetch(map(fn, items), depth=depth), total=len(items), desc=desc, enabled=show)


class _Writer(Protocol):
    def write(self, name: str, tensor: torch.Tensor) -> None: ...
    def write_pieces(self, name: str, pieces: Iterable[torch.Tensor]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def prefetch(items: Iterable[T], depth: int = 2) -> Generator[T, None, None]:
    """Iterate ``items`` on a background thread, up to ``depth`` ahead of the consumer.

    Reading (memory-mapped page faults, dtype conversion) then overlaps computing on the previous
    item. Exceptions from the producer surface in the consumer, in order.
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(("item", item))
            q.put(("end", None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(("error", e))

    thread = threading.Thread(target=produce, name="loratool-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            while not q.empty():
                q.get_nowait()
            thread.join(timeout=0.05)


class Pieces:
    """A tensor handed to :meth:`BackgroundWriter.write` before it is computed, whose slices along the
    first dimension (``count`` equal ones: a mixture-of-experts weight's experts) the writer writes as
    the computation marks them :meth:`ready`, while it computes the next: the last piece's write is
    then all that follows the computation, not the whole tensor's."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._ready, self._failed = 0, False
        self._changed = threading.Condition()

    def ready(self, n: int) -> None:
        """The first ``n`` pieces are computed."""
        with self._changed:
            self._ready = n
            self._changed.notify_all()

    def fail(self) -> None:
        """The rest will not come: the writer stops waiting for them (and fails the write)."""
        with self._changed:
            self._failed = True
            self._changed.notify_all()

    def slices(self, tensor: torch.Tensor) -> Generator[torch.Tensor, None, None]:
        """``tensor``'s pieces, each once it is ready."""
        step = tensor.shape[0] // self.count
        for i in range(self.count):
            self._wait(i + 1)
            yield tensor[i * step : (i + 1) * step]

    def _wait(self, n: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._ready >= n or self._failed)
            if self._ready < n:
                raise RuntimeError("the computation of a tensor being written stopped")


QUEUE_BYTES = 128 * 2**20  # a BackgroundWriter's queue_bytes where results should not wait on the writer


class BackgroundWriter:
    """Hands ``write`` calls to a thread, up to ``depth`` computed tensors behind (more while they hold
    under ``queue_bytes`` together), so that writing (and flushing) one tensor overlaps computing the
    next; tensors passed on as read (``borrowed``: views of the input's pages, no memory of ours)
    queue beyond that, so that the writer copies them while the next results are computed (and small
    results, such as a 4-bit weight's, go on being computed while it does). Errors surface on the
    next call."""

    def __init__(self, writer: _Writer, depth: int = 2, pool: BufferPool | None = None,
                 queue_bytes: int = 0) -> None:  # fmt: skip
        self._writer = writer
        self._pool = pool
        self._queue: queue.SimpleQueue[tuple[str, torch.Tensor, torch.dtype | None, bool, bool, Pieces | None] | None]
        self._queue = queue.SimpleQueue()
        self._room = threading.Condition()
        self._held = (0, 0)  # computed tensors queued and being written: how many, their bytes
        self._slots, self._queue_bytes = depth + 1, queue_bytes  # queued (depth) and the one being written
        self._error: BaseException | None = None
        self._pieces: list[Pieces] = []  # the tensors queued while still being computed
        self._thread = threading.Thread(target=self._run, name="loratool-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            name, tensor, dtype, recycle, borrowed, pieces = item
            n = _nbytes(tensor)  # (a recycled tensor is the pool's once written)
            if self._error is None:
                try:
                    self._write(name, tensor, dtype, recycle, pieces)
                except BaseException as e:  # handed to the caller on its next call
                    self._error = e
            if not borrowed:
                with self._room:
                    self._held = (self._held[0] - 1, self._held[1] - n)
                    self._room.notify()

    def _write(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None, recycle: bool,
               pieces: Pieces | None) -> None:  # fmt: skip
        import torch

        on_cpu = tensor.device.type == "cpu"
        if pieces is not None:
            self._writer.write_pieces(name, pieces.slices(tensor))
        elif on_cpu and dtype in (None, tensor.dtype):
            self._writer.write(name, tensor)
        elif not on_cpu or self._pool is None:
            self._writer.write(name, to_host(tensor, dtype))
        else:  # cast into a reused buffer, and hand it back once written
            assert dtype is not None
            out = self._pool.take(tensor.shape, dtype, torch.device("cpu")).copy_(tensor)
            self._writer.write(name, out)
            self._pool.give(out)
        if recycle and self._pool is not None:
            self._pool.give(tensor)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(
        self,
        name: str,
        tensor: torch.Tensor,
        dtype: torch.dtype | None = None,
        *,
        recycle: bool = False,
        borrowed: bool = False,
        pieces: Pieces | None = None,
    ) -> None:
        """Queue ``tensor`` (cast to ``dtype`` on the writer thread, if given) for writing;
        ``recycle``: ``tensor`` came from the pool and goes back to it once written; ``borrowed``: it
        is the input's own (it does not count against ``depth``); ``pieces``: it is still being
        computed (a CPU tensor, in its own dtype), and written piece by piece as they are ready."""
        self._raise()
        if not borrowed:
            n = _nbytes(tensor)
            with self._room:
                self._room.wait_for(lambda: self._held[0] < self._slots or self._held[1] + n <= self._queue_bytes)
                self._held = (self._held[0] + 1, self._held[1] + n)
        if pieces is not None:
            self._pieces.append(pieces)
        self._queue.put((name, tensor, dtype, recycle, borrowed, pieces))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()
        self._writer.close()

    def abort(self) -> None:
        for pieces in self._pieces:  # a computation that stopped: its writes must not wait for it
            pieces.fail()
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(None)
            self._thread.join()
        self._writer.abort()
