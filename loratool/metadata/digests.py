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
    written = max(before[3], before[4])  # mtime, ctime
    if enabled and written < started - RACY_NS and _unchanged(real, before):
        _store(real, before, digest)
    return digest


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
