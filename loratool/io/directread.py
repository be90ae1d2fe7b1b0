"""Reading tensors' bytes without the page cache, where nothing else will read the files again.

A memory-mapped read of a file that is not in the page cache has the kernel fault in fresh
page-cache pages; on virtual machines whose free memory the host reclaims, that costs CPU time
well beyond the copy, time an extraction's SVD needs on the same cores. With ``O_DIRECT`` the disk
writes straight into a buffer of ours. ``bench/read_paths.py`` (2-core VM, the 16-layer bench
pair, 4.1 GiB): the files read in 2.1-3.1 s either way, with 0.74 s of system time buffered and
0.18 s with ``O_DIRECT``; a whole extraction from the disk, digests kept, took 8.7 s reading this
way (9.5 s user time) against 10.0 s memory-mapped (16.0 s user time).

Used only where it pays, checkpoint by checkpoint: on files mostly not in the page cache
(:func:`resident_share`, from ``mincore``: cached files are read faster from memory) that no one
else reads in the same run. Files whose digests are not kept are hashed for provenance from the same
reads (``tee``; extraction checks that its reads go through them forward), not by a hasher reading
them again: the disk would serve them twice.
A file system that refuses ``O_DIRECT`` (tmpfs, some network file systems) is read as before;
so is every file with ``LORATOOL_DIRECT_IO=0``.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ..errors import InputFileError
from .directio import _REFUSED, ALIGN, direct_io_enabled

STRIP_BYTES = 4 * 1024 * 1024  # a read's size at most: large enough for the disk, small enough to stay in cache


class DirectReader:
    """Reads byte ranges of files with ``O_DIRECT`` into ``buffers`` reused page-aligned buffers.

    :meth:`read` into buffer ``i`` returns a view of it, valid until the next read into it; None where
    the file system refuses direct reads of that file (then read it another way). ``tee`` maps files to
    a function given each read of them (offset, bytes) before it returns: a hash of the file taken
    from the same reads (``metadata.digests.SequentialSha256.feed``).
    """

    def __init__(
        self, buffers: int = 2, strip_bytes: int = STRIP_BYTES,
        tee: Mapping[Path, Callable[[int, memoryview], None]] | None = None,
    ) -> None:  # fmt: skip
        self.strip_bytes = strip_bytes
        self._tee = dict(tee or {})
        self._fds: dict[Path, int | None] = {}
        self._bufs = [mmap.mmap(-1, strip_bytes + 2 * ALIGN) for _ in range(buffers)]  # page-aligned

    def usable(self, path: Path) -> bool:
        """Whether ``path`` opens for direct reads (opened once, kept open)."""
        if path not in self._fds:
            fd: int | None = None
            if direct_io_enabled():
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError as e:
                    if e.errno not in _REFUSED:
                        raise
            self._fds[path] = fd
        return self._fds[path] is not None

    def read(self, i: int, path: Path, offset: int, nbytes: int) -> memoryview | None:
        """``nbytes`` (at most ``strip_bytes``) of ``path`` from ``offset``, into buffer ``i``."""
        if nbytes > self.strip_bytes:
            raise ValueError(f"a direct read takes at most {self.strip_bytes} bytes, not {nbytes}")
        fd = self._fds.get(path)
        if fd is None:
            return None
        start = offset - offset % ALIGN  # O_DIRECT wants the offset, length and address aligned
        stop = -(-(offset + nbytes) // ALIGN) * ALIGN
        view = memoryview(self._bufs[i])
        got = 0
        while start + got < offset + nbytes:
            try:
                n = os.preadv(fd, [view[got : stop - start]], start + got)
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                self._fds[path] = None  # the open was taken, the read is not
                os.close(fd)
                return None
            if n == 0:
                why = f"the file ends at byte {start + got}, before a tensor's last byte"
                raise InputFileError(why, path=str(path), fix="it was cut short while being read: copy it again")
            got += n
        out = view[offset - start : offset - start + nbytes]
        if (feed := self._tee.get(path)) is not None:
            feed(offset, out)
        return out

    def close(self) -> None:
        """Close the files and free the buffers (left to the views still held, if any)."""
        for path, fd in self._fds.items():
            if fd is not None:
                os.close(fd)
            self._fds[path] = None
        bufs, self._bufs = self._bufs, []
        for buf in bufs:
            with contextlib.suppress(BufferError):
                buf.close()


def resident_share(paths: Iterable[Path]) -> float:
    """The share of the files' pages in the page cache (``mincore``; Linux). 1.0 where it cannot be told,
    so that a caller keeps to ordinary reads."""
    if not sys.platform.startswith("linux"):
        return 1.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        page = mmap.PAGESIZE
        resident = total = 0
        for path in paths:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    continue
                addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    return 1.0
                try:
                    pages = -(-size // page)
                    vec = ctypes.create_string_buffer(pages)
                    if libc.mincore(addr, size, vec) != 0:
                        return 1.0
                    resident += pages - vec.raw.count(0)
                    total += pages
                finally:
                    libc.munmap(addr, size)
        return resident / total if total else 1.0
    except (OSError, AttributeError):
        return 1.0
