"""JSON schemas in ``schemas/`` and the one place ``jsonschema`` is used.

The schemas ship inside the package (``loratool/schemas``, copied at build time); in a source
checkout they are read from the repository's ``schemas/`` folder.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_NAMES = ("adapter_config", "mlx_adapter_config", "provenance")


def schema_dir() -> Path:
    package = Path(__file__).resolve().parent.parent  # loratool/: a wheel holds loratool/schemas, a checkout ./schemas
    for candidate in (package / "schemas", package.parent / "schemas"):
        if (candidate / "adapter_config.schema.json").is_file():
            return candidate
    raise FileNotFoundError("loratool's schemas/ folder is missing from this installation")


@cache
def load_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((schema_dir() / f"{name}.schema.json").read_text())
    return schema


def json_path(parts: Any) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def check(instance: Any, name: str) -> list[tuple[str, str]]:
    """Every violation of schema ``name`` at once, as sorted ``(json path, message)`` pairs.

    A message is the nearest ``x-message`` along the failing keyword's schema path (written for
    people), followed by what arrived; otherwise jsonschema's own message.
    """
    from jsonschema import Draft202012Validator

    schema = load_schema(name)
    problems = set()
    for error in Draft202012Validator(schema).iter_errors(instance):
        message = _nearest_message(schema, list(error.absolute_schema_path))
        if message is None:
            message = error.message
        elif error.validator != "required" and error.path:
            message = f"{message} (got {json.dumps(error.instance)[:80]})"
        problems.add((json_path(error.absolute_path), message))
    problems.update((json_path(at), _NOT_A_NUMBER) for at in _non_finite(instance, []))
    return sorted(problems)


_NOT_A_NUMBER = (
    "is NaN or Infinity, which is not a JSON number (Python's json module reads and writes it anyway): give a "
    "finite number (a NaN alpha or scale would merge as if it were 1)"
)


def _non_finite(value: Any, at: list[Any]) -> list[list[Any]]:
    """The paths of every NaN or Infinity in a parsed JSON document (jsonschema's number type takes them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [at]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, [*at, k])]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, [*at, i])]
    return []


def _nearest_message(schema: dict[str, Any], schema_path: list[Any]) -> str | None:
    node: Any = schema
    found = None
    for part in schema_path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
        if isinstance(node, dict) and "x-message" in node:
            found = node["x-message"]
    return found


def check_schemas() -> None:
    """Check our schemas against the JSON Schema 2020-12 meta-schema (raises on a bad schema)."""
    from jsonschema import Draft202012Validator

    for name in SCHEMA_NAMES:
        Draft202012Validator.check_schema(load_schema(name))
