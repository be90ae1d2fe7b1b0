"""loratool: an offline toolkit for LoRA adapters on safetensors checkpoints.

Every command of the CLI is a function here of the same name::

    import loratool
    loratool.extract("base/", "finetuned/", output="adapter/", rank=16)
    loratool.merge("base/", ["adapter/"], output="merged/")

Imports are lazy so that ``import loratool`` (and ``loratool --help``) do not load torch.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import LoraToolError

if TYPE_CHECKING:  # what __getattr__ hands out, for type checkers and IDEs
    from .adapter import Adapter, LoraModule  # noqa: F401
    from .formats import load_adapter, save_adapter  # noqa: F401
    from .io.checkpoint import open_checkpoint  # noqa: F401
    from .ops.analyze import analyze  # noqa: F401
    from .ops.combine import combine, resize  # noqa: F401
    from .ops.convert import convert  # noqa: F401
    from .ops.extract import extract  # noqa: F401
    from .ops.hub import list_hub_adapters, pull, push  # noqa: F401
    from .ops.inspect import inspect  # noqa: F401
    from .ops.merge import merge, unmerge  # noqa: F401
    from .ops.validate import validate  # noqa: F401
    from .registry.ops import register  # noqa: F401
    from .registry.store import Registry, resolve_path  # noqa: F401

_EXPORTS = {
    "extract": "ops.extract", "merge": "ops.merge", "unmerge": "ops.merge", "combine": "ops.combine",
    "resize": "ops.combine", "inspect": "ops.inspect", "validate": "ops.validate", "push": "ops.hub",
    "pull": "ops.hub", "analyze": "ops.analyze", "convert": "ops.convert", "register": "ops.registry",
    "Registry": "registry", "resolve_path": "registry", "list_hub_adapters": "ops.hub",
    "load_adapter": "formats", "save_adapter": "formats", "Adapter": "adapter", "LoraModule": "adapter",
    "open_checkpoint": "io.checkpoint",
}  # fmt: skip

__all__ = ["LoraToolError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        with warnings.catch_warnings():  # torch warns at import when numpy is absent; loratool never needs numpy
            warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
            module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'loratool' has no attribute {name!r}")
