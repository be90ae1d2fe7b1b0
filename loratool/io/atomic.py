"""Outputs appear whole or not at all.

Every output goes to a hidden temporary path beside the target and is renamed into place only
after it is complete and flushed, so an interrupted run leaves nothing at the target path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputExistsError


def check_output(target: str | os.PathLike[str], *, force: bool, inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Refuse an existing output without ``force``, and an output that is one of the inputs."""
    out = Path(target)
    for src in inputs:
        src_p = Path(src)
        if (
            out.exists()
            and src_p.exists()
            and (out.resolve() == src_p.resolve() or out.resolve() in src_p.resolve().parents)
        ):
            raise OutputExistsError(
                "the output is one of the inputs", path=str(out), fix="choose another -o/--output path"
            )
    if out.exists() and not force:
        raise OutputExistsError("the output exists", path=str(out), fix="pass --force to replace it")
    return out


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike[str], *, force: bool, directory: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it to ``target`` only if the block succeeds.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary path is removed and
    ``target`` is left as it was.
    """
    out = check_output(target, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.loratool-tmp-{tag}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.loratool-old-{tag}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise


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
