"""The ``loratool`` process's collector: torch's import and the interpreter's exit without its passes.

Importing torch makes about 160,000 objects that live as long as the process. Python's cyclic
collector sees them as new: while they are made, and again while the command's own imports run,
it collects its oldest generation several times, each pass visiting all of them (20-70 ms each
on the 2-core machine), and the interpreter's exit visits them once more while it tears down.
Whole processes of the shipped fixtures' inspect (of an adapter), validate, merge and extract took
0.70-0.75x as long without those passes (bench/bench_startup.py, the startup section of
docs/benchmarks.md: 0.33-0.43 s less each).

:func:`import_torch_frozen` imports torch with the collector paused and then moves every object
there is into the permanent generation (:func:`gc.freeze`), which later passes skip; they run as
before for everything made after it. :func:`freeze_before_exit` does the same for what the command
made, as it ends. Frozen objects are still freed when their last reference goes; only a reference
cycle among them would stay until exit. Only :func:`loratool.cli.main` calls these: a library
does not decide its caller's collector, and the tests, which run the commands in one process, keep
the collector as it is.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

_PRINT_AND_EXIT = frozenset({"-h", "--help", "--version"})  # options that print before any command runs


def needs_torch(args: Sequence[str]) -> bool:
    """Whether the command line ``args`` (without the program's name) runs a command that imports
    torch: all but the registry's, which work from its database and headers (except ``registry add``,
    which validates the adapter), and ``inspect`` of a checkpoint, which reads headers only (of an
    adapter it reads the adapter). A wrong True costs a second's import; a wrong False only the passes
    this module saves."""
    if not args or _PRINT_AND_EXIT.intersection(args):
        return False
    if args[0] == "registry":
        return len(args) > 1 and args[1] == "add"
    if args[0] == "inspect":
        return _is_adapter(next((a for a in args[1:] if not a.startswith("-")), None))
    return True


def _is_adapter(path: str | None) -> bool:
    from ..errors import LoraToolError
    from ..formats import is_adapter

    try:
        return path is not None and is_adapter(path)
    except (LoraToolError, OSError):  # the command itself says what is wrong with the file
        return False


def import_torch_frozen() -> None:
    """Import torch with the collector paused, then freeze everything the process holds."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    except ImportError:
        pass  # the command imports it again, and its error says what failed
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def freeze_before_exit() -> None:
    """Freeze everything the process holds, so that the interpreter's exit does not visit it."""
    gc.freeze()
