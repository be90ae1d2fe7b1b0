"""The sha256 of input files, and a cache of them, so that the same base is not hashed on every run.

Provenance records the sha256 of every input (``DESIGN.md``, Trust). sha256 runs at roughly 1 GB/s
a core on the development machine, so the two 4 GiB checkpoints of a Llama-1B extraction keep one
of its two cores busy for several seconds, while the extraction needs both. Users extract and merge
against the same base again and again; its digest is worth keeping.

A file's digest is kept in ``LORATOOL_HOME/digests.sqlite3`` (see
:func:`loratool.registry.home.default_home`) beside what identifies its contents, as git's index
does: device, inode, size, and the modification and change times in nanoseconds. Every write to a
file moves its change time, which no system call lets a user set, so a kept digest is used only
while all five are as they were. A file written within a few seconds of being hashed is not kept:
a write in the same tick of the file system's clock could leave its times as they were (git's
"racy" entries). ``LORATOOL_DIGEST_CACHE=0`` turns the cache off. The cache can make a run slower,
never fail it: any error of its database (a read-only home, a corrupt file) means hashing instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import sqlite3
import time
from collections.abc import Iterator

from ..errors import InputFileError
from ..registry.home import default_home, make_private_dir

CACHE_ENV = "LORATOOL_DIGEST_CACHE"
CACHE_FILE = "digests.sqlite3"
RACY_NS = 3_000_000_000  # a file written this close to its hashing is not kept

Identity = tuple[int, int, int, int, int]


def sha256_file(path: str | os.PathLike[str], chunk: int = 16 * 1024 * 1024) -> str:
    """The file's sha256, hashed from a memory map: ``read`` would copy every byte out of the page
    cache first, which costs as much kernel time as the hashing costs user time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
            for start in range(0, size, chunk):
                h.update(view[start : start + chunk])
    return h.hexdigest()


def cached_sha256(path: str | os.PathLike[str]) -> str:
    """:func:`sha256_file`, or the digest kept from an earlier run while the file is unchanged."""
    real = os.path.realpath(path)
    try:
        before = _identity(os.stat(real))
    except OSError:
        return sha256_file(path)  # its own error names the file
    enabled = os.environ.get(CACHE_ENV, "1") != "0"
    kept = _lookup(real, before) if enabled else None
    if kept is not None:
        return kept
    started = time.time_ns()
    digest = sha256_file(real)
    _keep(real, before, started, digest)
    return digest


def _keep(path: str, identity: Identity, started: int, digest: str) -> None:
    """Keep the digest of a file hashed from ``started`` on, unless it was written too close to that
    (racy) or has changed since."""
    written = max(identity[3], identity[4])  # mtime, ctime
    if os.environ.get(CACHE_ENV, "1") != "0" and written < started - RACY_NS and _unchanged(path, identity):
        _store(path, identity, digest)


class SequentialSha256:
    """A file's sha256 taken from another reader's reads, so that a file read once is not read twice.

    :meth:`feed` is given the bytes that reader read at an offset; the hash goes on from wherever
    they continue it (bytes it has already hashed are passed over; a gap before them, such as the
    tensors that reader skips, is read here from the file). :meth:`finish` hashes whatever is left
    and returns the digest, kept as :func:`cached_sha256` keeps one. The digest is the file's
    whatever the reads were; it saves the second read only where they come in file order (extraction
    checks that they will: ``ops.extract._read_forward``). Not thread-safe: one thread feeds it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.realpath(path)
        self._identity = _identity(os.stat(self.path))
        self._started = time.time_ns()
        self._hash = hashlib.sha256()
        self._pos = 0  # bytes [0, _pos) hashed
        self.fed = 0  # of them, bytes taken from feed (the rest read here)

    def feed(self, offset: int, data: memoryview | bytes) -> None:
        """The reader read ``data`` at ``offset``."""
        end = offset + len(data)
        if end <= self._pos:
            return
        if offset > self._pos:
            self._read_to(offset)
        self._hash.update(data[self._pos - offset :])
        self.fed += end - self._pos
        self._pos = end

    def finish(self) -> str:
        """The digest: the rest of the file hashed (its size when this began), kept while unchanged."""
        self._read_to(self._identity[2])
        digest = self._hash.hexdigest()
        _keep(self.path, self._identity, self._started, digest)
        return digest

    def _read_to(self, stop: int, chunk: int = 16 * 1024 * 1024) -> None:
        if stop <= self._pos:
            return
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < stop:
                raise InputFileError(
                    f"the file is {size} bytes, {stop - size} fewer than when it was opened", path=self.path,
                    fix="it changed while being read: run again once nothing writes it",
                )  # fmt: skip
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
                for start in range(self._pos, stop, chunk):
                    self._hash.update(view[start : min(start + chunk, stop)])
        self._pos = stop


def kept_sha256(path: str | os.PathLike[str]) -> str | None:
    """The digest kept for ``path`` while it is unchanged, or None (nothing kept, or the cache off)."""
    real = os.path.realpath(path)
    if os.environ.get(CACHE_ENV, "1") == "0" or not os.path.exists(real):
        return None
    return _lookup(real, _identity(os.stat(real)))


def _unchanged(path: str, identity: Identity) -> bool:
    try:
        return _identity(os.stat(path)) == identity
    except OSError:
        return False


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@contextlib.contextmanager
def _database() -> Iterator[sqlite3.Connection]:
    home = default_home()
    make_private_dir(home, narrow=False)  # made 0700 where missing; a folder the user chose is left as it is
    new = not (home / CACHE_FILE).exists()
    db = sqlite3.connect(home / CACHE_FILE, timeout=5.0)
    if new:
        os.chmod(home / CACHE_FILE, 0o600)  # it names the user's files
    try:
        with db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER, size INTEGER,"
                " mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT)"
            )
            yield db
    finally:
        db.close()


def _lookup(path: str, identity: Identity) -> str | None:
    try:
        with _database() as db:
            row = db.execute(
                "SELECT dev, ino, size, mtime_ns, ctime_ns, sha256 FROM digests WHERE path = ?", (path,)
            ).fetchone()
    except (sqlite3.Error, OSError):
        return None
    if row is None or tuple(row[:5]) != identity or not _is_digest(row[5]):
        return None
    return str(row[5])


def _store(path: str, identity: Identity, digest: str) -> None:
    with contextlib.suppress(sqlite3.Error, OSError):
        with _database() as db:
            db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?)", (path, *identity, digest))


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
