"""Appending multi-GB files without the page cache.

A buffered ``write`` copies every byte into freshly allocated page-cache pages. For a checkpoint
that is written once and not read back, that copy is pure cost, and on virtual machines whose
free memory the host reclaims it dominates: ``bench/write_paths.py`` measured 7 to 9 s of kernel
time for 2 GiB on the 2-core CI machine, against under 2 s of wall time and 0.2 s of kernel time
with ``O_DIRECT``, where the disk reads straight from our buffer (``bench/bench_merge.py`` shows
the effect on a whole merge).

``O_DIRECT`` wants the buffer address, the file offset and the length aligned to the device's
block size, so :class:`DirectFile` stages data in a page-aligned buffer, writes it in full
blocks, and pads the last block, then cuts the file back to its true length. Where the platform
or file system has no ``O_DIRECT`` (macOS, tmpfs, some network file systems), it falls back to
ordinary buffered writes; so does ``LORATOOL_DIRECT_IO=0``.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
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
        self._stage = mmap.mmap(-1, STAGING_BYTES) if self._direct else None  # page-aligned
        self._staged = 0  # bytes in the staging buffer, not yet written
        self._written = 0  # bytes on disk (a multiple of ALIGN while direct)

    @property
    def direct(self) -> bool:
        return self._direct

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._stage is None:
            _write_all(self._fd, view)
            return
        while len(view):
            n = min(len(view), STAGING_BYTES - self._staged)
            self._stage[self._staged : self._staged + n] = view[:n]
            self._staged += n
            view = view[n:]
            if self._staged == STAGING_BYTES:
                self._flush_stage(STAGING_BYTES)

    def _flush_stage(self, length: int) -> None:
        """Write the first ``length`` bytes (a multiple of ALIGN) of the staging buffer."""
        assert self._stage is not None
        with memoryview(self._stage) as stage:
            try:
                _write_all(self._fd, stage[:length])
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                self._fall_back()  # the file system took the open but refuses direct writes
                _write_all(self._fd, stage[:length])
        self._written += length
        self._staged = 0

    def _fall_back(self) -> None:
        """Go on with buffered writes (still through the staging buffer, to keep the order)."""
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY)
        os.lseek(self._fd, self._written, os.SEEK_SET)
        self._direct = False

    def close(self) -> None:
        """Write what is staged, give the file its exact length, fsync and close."""
        try:
            if self._stage is not None and self._staged:
                true_size = self._written + self._staged
                length = -(-self._staged // ALIGN) * ALIGN if self._direct else self._staged
                self._stage[self._staged : length] = bytes(length - self._staged)
                self._flush_stage(length)
                if self._written != true_size:
                    os.ftruncate(self._fd, true_size)  # cut the padding of the last block
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without flushing (the caller removes the file). Never raises over the error being
        handled: a failed write's traceback still holds views of the staging buffer, which then
        cannot close (BufferError) and is freed with them instead."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._stage is not None:
            stage, self._stage = self._stage, None
            with contextlib.suppress(BufferError):
                stage.close()


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]
