"""Outputs appear whole or not at all, never in place of an input, and never over another run's.

Every output is written to a hidden temporary path beside the target, flushed, and renamed into
place. The temporary name carries the writer's host and process id
(``.NAME.loratool-tmp-HOST-PID-TAG``), so a later run writing to the same place can tell litter
left by a killed run (``kill -9``, power loss) from a run still at work, and removes only the
former. The final rename happens under a lock on the output's folder and refuses an output that
appeared meanwhile unless ``force`` was given: of two runs racing to one output, one wins and the
other fails naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import LoraToolError, OutputExistsError, OutputLocationError
from ..registry.home import default_home

log = logging.getLogger("loratool")

HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_HOST = HOST  # (the temporaries' names carry it)
_LITTER = re.compile(r"^\.(?P<name>.+)\.loratool-(?:tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


# -- what an output may not touch ---------------------------------------------------------------------
def _protected(inputs: Iterable[str | os.PathLike[str]]) -> list[tuple[Path, bool]]:
    """(real path, whether everything inside it is input too) for each input a command reads.

    A folder (a model directory, a PEFT adapter) is read as a whole. A file is read alone, with the
    ``config.json`` beside it; an index file stands for its whole folder (it points at the shards).
    """
    out: list[tuple[Path, bool]] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            continue
        real = Path(os.path.realpath(p))
        if real.is_dir() or real.name.endswith(".index.json"):
            out.append((real if real.is_dir() else real.parent, True))
        else:
            out.append((real, False))
            out.append((real.parent / "config.json", False))
    return out


def _clashes(out: Path, protected: Path, whole: bool) -> bool:
    """``out`` is ``protected``, contains it, or lies inside it while it is read as a whole."""
    return out == protected or out in protected.parents or (whole and protected in out.parents)


def check_output(target: str | os.PathLike[str], *, force: bool, inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Refuse an output that is, contains, or lies inside an input (with or without ``force``), an
    existing output without ``force`` (a dangling symlink counts), and a location that cannot be
    written; all before any work is done.

    Raises:
        OutputExistsError: the output exists, or would replace or sit inside an input.
        OutputLocationError: the output's folder cannot be created or written.
    """
    out = Path(target)
    sweep_litter(out)  # first: an old output an interrupted --force run moved aside is put back
    candidates = {Path(os.path.abspath(out)), Path(os.path.realpath(out))}
    store = Path(os.path.realpath(default_home()))  # the registry's: outputs never touch it, --force or not
    if any(_clashes(c, store, True) for c in candidates):
        where = "lies inside" if store in Path(os.path.realpath(out)).parents else "would replace"
        raise OutputExistsError(
            f"the output {where} loratool's registry store {store}",
            path=str(out),
            fix="choose an -o/--output path outside LORATOOL_HOME; registered adapters are read from there by "
            "reference (NAME@vN), and loratool registry manages the store",
        )
    for protected, whole in _protected(inputs):
        if any(_clashes(c, protected, whole) for c in candidates):
            inside = whole and protected in Path(os.path.realpath(out)).parents
            raise OutputExistsError(
                f"the output {'lies inside' if inside else 'would replace'} the input {protected}",
                path=str(out),
                fix="choose an -o/--output path outside every input (--force never replaces an input)",
            )
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError("the output exists", path=str(out), fix="pass --force to replace it")
    _check_writable(out)
    return out


def _check_writable(out: Path) -> None:
    """Create and remove a probe file in the nearest existing folder above ``out``."""
    folder = Path(os.path.abspath(out)).parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputLocationError(
            f"{folder} is a file, so no folder can be made there", path=str(out), fix="choose another -o/--output path"
        )
    probe = folder / f".loratool-probe-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise OutputLocationError(
            f"cannot write in {folder} ({e.strerror or e})",
            path=str(out),
            fix="choose an -o/--output path on a writable file system",
        ) from None


# -- writing --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(target: str | os.PathLike[str], *, force: bool, directory: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it to ``target`` only if the block succeeds.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary path is removed and
    ``target`` is left as it was.
    """
    out = check_output(target, force=force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputLocationError(f"cannot create the output's folder ({e.strerror or e})", path=str(out)) from None
    tmp = out.parent / f".{out.name}.loratool-tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        _commit(tmp, out, force=force)
    except OSError as e:
        _remove(tmp)
        if isinstance(e, LoraToolError):
            raise
        raise OutputLocationError(f"writing the output failed ({e.strerror or e})", path=str(out)) from None
    except BaseException:
        _remove(tmp)
        raise


def _commit(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename ``tmp`` to ``out``; without ``force``, refuse an ``out`` that another run made meanwhile.

    An ``out`` that ``force`` replaces survives until the new one is in place: exchanged with it in
    one step where the OS can (Linux's ``renameat2``), else moved aside, put back if the second
    rename fails, and restored by the next run's :func:`sweep_litter` if this process dies between
    the two.
    """
    with _folder_lock(out.parent):
        exists = out.exists() or out.is_symlink()
        if exists and not force:
            raise OutputExistsError(
                "the output appeared while this run was writing it (another run wrote it first)",
                path=str(out),
                fix="pass --force to replace it, or write to another path",
            )
        if not exists:
            os.replace(tmp, out)
            return
        if _exchange(tmp, out):  # tmp now holds the old output
            old = tmp
        else:
            old = out.parent / f".{out.name}.loratool-old-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the old output back where it was
                raise
    _remove(old)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or
    the file system cannot, and nothing moved."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):  # the kernel or file system lacks it
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _renameat2() -> Any:
    """libc's renameat2, or None (not Linux, or a libc without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself, held for a check and a rename (milliseconds)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock: the rename is still atomic
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


def sweep_litter(out: Path) -> list[Path]:
    """Remove temporary copies of ``out`` whose writer (on this host) is gone, and put back an old
    ``out`` such a writer had moved aside (``--force``) where nothing replaced it; say so. Returns
    what was removed."""
    removed: list[Path] = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _LITTER.match(entry.name)
        if m is None or m["name"] != out.name or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        if "-old-" in entry.name and not (out.exists() or out.is_symlink()):
            os.replace(entry, out)  # a --force run died between its two renames: the old output comes back
            log.warning("restored %s from %s, moved aside by an interrupted loratool run (process %s)", out, entry,
                        m["pid"])  # fmt: skip
            continue
        _remove(entry)
        removed.append(entry)
        log.warning("removed %s, left behind by an interrupted loratool run (process %s)", entry, m["pid"])
    return removed


def writer_gone(host: str, pid: int) -> bool:
    """Whether the process that named a temporary ``host``-``pid`` is gone (only this host's can be told)."""
    return host == HOST and not _alive(pid)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _fsync_tree(p: Path) -> None:
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
