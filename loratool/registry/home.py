"""Where loratool keeps its own files (``LORATOOL_HOME``): the adapter registry's store, and the
inputs' kept digests (:mod:`loratool.metadata.digests`)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def default_home() -> Path:
    """``LORATOOL_HOME``, else ``$XDG_CACHE_HOME/loratool``, else ``~/.cache/loratool``."""
    if env := os.environ.get("LORATOOL_HOME"):
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "loratool"


def make_private_dir(path: Path, *, narrow: bool = True) -> None:
    """``path`` and its missing parents as folders only their owner can enter (0700); an existing
    folder is narrowed to that too (``narrow``: the registry's store). Raises OSError
    (NotADirectoryError where it is a file)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):  # each one 0700 (mkdir's parents=True makes them by the umask)
        folder.mkdir(mode=0o700, exist_ok=True)
    target = missing[0] if missing else path
    if not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(target))
    if narrow and target.stat().st_mode & 0o077:
        os.chmod(target, 0o700)
