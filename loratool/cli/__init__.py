"""The ``loratool`` command line: parse, call one library function, print.

One module per command (or pair of commands that share their parts); :mod:`.params` holds what
they share and :mod:`.app` the group, which maps errors to exit codes.
"""

from __future__ import annotations

from . import analyze, combine, convert, extract, hub, inspect, merge, registry  # noqa: F401  (each adds its commands)
from .app import cli, main

__all__ = ["cli", "main"]
