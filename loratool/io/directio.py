"""Appending multi-GB files without the page cache.

A buffered ``write`` copies every byte into freshly allocated page-cache pages. For a checkpoint
that is written once and not read back, that copy is pure cost, and on virtual machines whose
free memory the host reclaims it dominates: ``bench/write_paths.py`` measured 7 to 9 s of kernel
time for 2 GiB on the 2-core CI machine, against under 2 s of wall time and 0.2 s of kernel time
with ``O_DIRECT``, where the disk reads straight from our buffer (``bench/bench_merge.py`` shows
the effect on a whole merge).

``O_DIRECT`` wants the buffer address, the file offset and the length aligned to the device's
block size, so :class:`DirectFile` stages data in page-aligned buffers (two: one is written while
the other fills), writes them in full blocks, and pads the last block, then cuts the file back to
its true length. Where the platform
or file system has no ``O_DIRECT`` (macOS, tmpfs, some network file systems), it falls back to
ordinary buffered writes; so does ``LORATOOL_DIRECT_IO=0``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import queue
import threading
from pathlib import Path

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
STAGING_BYTES = 16 * 1024 * 1024
DIRECT_MIN_BYTES = 64 * 1024 * 1024  # below this, the page cache costs little and is simpler
_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}  # what file systems say to O_DIRECT


def direct_io_enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("LORATOOL_DIRECT_IO", "1") != "0"


class DirectFile:
    """A new file written front to back: ``write`` appends, ``close`` flushes, syncs and closes.

    ``direct=False`` (or a file system that refuses ``O_DIRECT``) gives plain buffered writes with
    the same interface. After :meth:`close` the file's bytes are exactly those written.

    Direct writes go through two page-aligned staging buffers: while a thread of the file's own writes
    one to the disk, ``write`` fills the other (one buffer, filled and written in turn, left the disk
    idle during every copy: ``bench/write_paths.py``'s 2 GiB took 1.7-2.9 s so, 1.5-1.6 s now). A
    write's error is raised by the next ``write`` or by ``close``.
    """

    def __init__(self, path: Path, *, direct: bool = True) -> None:
        self.path = path
        self._fd = -1
        self._direct = False
        if direct and direct_io_enabled():
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
                self._direct = True
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
        if not self._direct:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        # page-aligned; the second is only touched once the first is handed to the writing thread
        self._stages = [mmap.mmap(-1, STAGING_BYTES) for _ in range(2)] if self._direct else []
        self._stage = self._stages[0] if self._stages else None  # the one being filled
        self._addresses = [_address(stage) for stage in self._stages]
        self._staged = 0  # bytes in it, not yet handed over
        self._handed = 0  # bytes handed to the writing thread (all of them written once it is idle)
        self._written = 0  # bytes on disk (a multiple of ALIGN while direct): the writing thread's count
        self._todo: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()  # (stage, length)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()  # stages written, to fill again
        self._free.put(1)
        self._filling = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopping = False

    @property
    def direct(self) -> bool:
        return self._direct

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._stage is None:
            _write_all(self._fd, view)
            return
        # Copied by memmove where the source's address is known (a tensor's bytes): it lets go of the
        # GIL, which a slice assignment holds for the whole copy (up to 16 MiB, and the source's page
        # faults), stalling every other thread that comes back from a kernel to Python meanwhile.
        source = _address(view) if len(view) >= _MEMMOVE_MIN and not view.readonly else None
        done = 0
        while done < len(view):
            n = min(len(view) - done, STAGING_BYTES - self._staged)
            if source is None:
                self._stage[self._staged : self._staged + n] = view[done : done + n]
            else:
                ctypes.memmove(self._addresses[self._filling] + self._staged, source + done, n)
            self._staged += n
            done += n
            if self._staged == STAGING_BYTES:
                self._hand_over(STAGING_BYTES)

    def _hand_over(self, length: int) -> None:
        """Give the first ``length`` bytes (a multiple of ALIGN) of the stage being filled to the writing
        thread, and go on filling the other once it is written."""
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_stages, name="loratool-direct-io", daemon=True)
            self._thread.start()
        self._todo.put((self._filling, length))
        self._handed += length
        self._filling = self._free.get()
        self._stage, self._staged = self._stages[self._filling], 0
        if self._error is not None:
            raise self._error

    def _write_stages(self) -> None:
        """The writing thread: each stage handed over, in order, then handed back (after an error too,
        so that ``write`` never waits for it; the error is raised there)."""
        while (item := self._todo.get()) is not None:
            index, length = item
            if self._error is None and not self._stopping:
                try:
                    self._flush_stage(self._stages[index], length)
                except BaseException as e:
                    self._error = e
            self._free.put(index)

    def _flush_stage(self, stage: mmap.mmap, length: int) -> None:
        """Write the first ``length`` bytes (a multiple of ALIGN) of ``stage``."""
        with memoryview(stage) as view:
            try:
                _write_all(self._fd, view[:length])
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                self._fall_back()  # the file system took the open but refuses direct writes
                _write_all(self._fd, view[:length])
        self._written += length

    def _fall_back(self) -> None:
        """Go on with buffered writes (still through the staging buffers, to keep the order)."""
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY)
        os.lseek(self._fd, self._written, os.SEEK_SET)
        self._direct = False

    def _finish_writes(self) -> None:
        """Wait until the writing thread has written everything handed over, and stop it."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Write what is staged, give the file its exact length, fsync and close."""
        try:
            if self._stage is not None:
                true_size = self._handed + self._staged
                if self._staged:
                    length = -(-self._staged // ALIGN) * ALIGN  # whole blocks (cut back below)
                    self._stage[self._staged : length] = bytes(length - self._staged)
                    self._hand_over(length)
                self._finish_writes()
                if self._error is not None:
                    raise self._error
                if self._written != true_size:
                    os.ftruncate(self._fd, true_size)  # cut the padding of the last block
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without flushing (the caller removes the file). Never raises over the error being
        handled: a failed write's traceback still holds views of a staging buffer, which then
        cannot close (BufferError) and is freed with them instead."""
        self._stopping = True  # what is still queued is not written
        self._finish_writes()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        stages, self._stages, self._stage = self._stages, [], None
        for stage in stages:
            with contextlib.suppress(BufferError):
                stage.close()


_MEMMOVE_MIN = 64 * 1024  # smaller writes (a header, a norm's weight) are copied as slices


def _address(buffer: mmap.mmap | memoryview) -> int:
    """The address of a writable buffer's first byte."""
    first = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(first)
    del first  # releases the buffer: a staging mmap must stay closable
    return address


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]
