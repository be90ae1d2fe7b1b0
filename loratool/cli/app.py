"""The ``loratool`` group and entry point: errors mapped to exit codes in one place.

A :class:`LoraToolError` exits 1 with its message, a usage error exits 2, Ctrl-C 130, and
``LORATOOL_DEBUG=1`` shows the traceback. torch is imported only for commands that use it, so
``loratool --help`` and the registry's listings are instant; :func:`main` imports it before such a
command runs, with the collector paused (:mod:`.startup`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from typing import Any

import click

from .._version import __version__
from ..errors import LoraToolError
from . import startup

DEBUG_ENV = "LORATOOL_DEBUG"


class Group(click.Group):
    """A click group whose commands' errors become exit codes here, and nowhere else."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return super().invoke(ctx)
        except LoraToolError as e:
            if debug:
                raise
            click.secho(f"error: {e}", err=True, fg="red")
            ctx.exit(1)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # the reader left (`loratool ... | head`): exit quietly, as other tools do
            _quiet_closed_streams()
            ctx.exit(1)
        except OSError as e:  # the file system's answer (a name too long, no permission, a full disk): not a bug
            if debug:
                raise
            where = f"{str(e.filename)[:200]}: " if e.filename is not None else ""
            click.secho(f"error: {where}{e.strerror or e}", err=True, fg="red")
            ctx.exit(1)
        except Exception as e:  # a bug of ours: say so without a traceback unless asked
            if debug:
                raise
            click.secho(
                f"error: unexpected {type(e).__name__}: {e}\n"
                f"This is a loratool bug; set {DEBUG_ENV}=1 for the traceback and report it.",
                err=True,
                fg="red",
            )
            ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="loratool")
def cli() -> None:
    """loratool: extract, merge, unmerge, combine, resize, convert, validate, analyze, push and pull LoRA adapters.

    Works on safetensors checkpoint files, offline, on CPU or CUDA.

    \b
    Examples:
      loratool extract base/ finetuned/ -r 16 -o adapter/
      loratool merge base/ adapter/ -o merged/
      loratool inspect adapter/ --json

    Set LORATOOL_DEBUG=1 to see tracebacks.
    """


class _EchoHandler(logging.Handler):
    """loratool's log records (warnings of the library itself) as ``warning: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            click.secho(f"{record.levelname.lower()}: {record.getMessage()}", err=True, fg="yellow")


_log = logging.getLogger("loratool")
_log.addHandler(_EchoHandler(logging.WARNING))
_log.propagate = False


def _quiet_closed_streams() -> None:
    """Point stdout and stderr, where their reader has gone, at /dev/null: the interpreter flushes them
    at exit, and a second BrokenPipeError there would print a traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):  # closed or replaced streams: nothing to flush
            pass


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so atomic outputs clean up their temporary files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # torch warns at import when numpy is absent; loratool never needs numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    if startup.needs_torch(sys.argv[1:]):
        startup.import_torch_frozen()  # a third of a short command's time went to the collector
    try:
        cli(prog_name="loratool")
    finally:
        _quiet_closed_streams()  # output that waited in a buffer for a reader who left
        startup.freeze_before_exit()


if __name__ == "__main__":
    main()
