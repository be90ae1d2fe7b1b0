"""Where loratool keeps its own files: the adapter registry's store (``LORATOOL_HOME``)."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """``LORATOOL_HOME``, else ``$XDG_CACHE_HOME/loratool``, else ``~/.cache/loratool``."""
    if env := os.environ.get("LORATOOL_HOME"):
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "loratool"
