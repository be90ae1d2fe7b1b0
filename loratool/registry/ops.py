"""``loratool registry``: add, ls, show, alias, rm, gc, verify, and references for every command.

The storage and its rules are :mod:`loratool.registry.store`; this module reads adapters (headers only)
for what the registry records, and resolves references into paths the other commands read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import experts
from ..errors import LoraToolError
from ..formats import load_adapter
from ..io.checkpoint import header_shapes
from ..metadata.provenance import decode
from ..validation import require_valid
from .store import Entry, Facts, Registry

WEIGHT_FILES = {"peft": "adapter_model.safetensors", "mlx": "adapters.safetensors"}


@dataclass
class AddResult:
    entry: Entry
    created: bool
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.entry.to_json(), "created": self.created, "warnings": self.warnings}


def facts_of(adapter: str | os.PathLike[str]) -> tuple[Facts, list[str]]:
    """What the registry records about a valid adapter, from its headers and config."""
    warnings = require_valid(adapter, "it was not registered", check_values=True)
    a = load_adapter(adapter, lazy=True)
    p = Path(adapter)
    if a.format in ("kohya", "diffusers"):  # one file
        weights = p.name
    elif (p / WEIGHT_FILES[a.format]).is_file():
        weights = WEIGHT_FILES[a.format]
    else:
        weights = "adapter_model.bin"
    targets = {f"{path}.weight": tuple(m.weight_shape) for path, m in a.modules.items() if m.expert is None}
    targets.update({k: tuple(t.shape) for k, t in a.whole.items()})
    alternatives: dict[str, tuple[int, ...]] = {}
    for param, items in experts.group_experts(a.modules).items():  # (E, out, in), or (E, in, out) transposed
        m = items[0][1]
        targets[param] = (len(items), m.out_features, m.in_features)
        alternatives[param] = (len(items), m.in_features, m.out_features)
    record = decode(a.metadata)
    facts = Facts(
        format=a.format, weights=weights, modules=len(a.modules), ranks=sorted({m.rank for m in a.modules.values()}),
        parameters=a.num_params, targets=targets, base_model=a.base_model_name_or_path,
        provenance=record if record and "_invalid_json" not in record else None, alternatives=alternatives,
    )  # fmt: skip
    return facts, warnings


def register(
    adapter: str | os.PathLike[str],
    *,
    name: str,
    aliases: tuple[str, ...] | list[str] = (),
    tags: dict[str, str] | None = None,
    description: str | None = None,
    home: str | os.PathLike[str] | None = None,
    event: tuple[str, str, str | None] | None = None,
) -> AddResult:
    """Register an adapter (validated first) as the next version of ``name``.

    Example:
        >>> loratool.register("adapter/", name="support-bot", aliases=["staging"])
    """
    p = Path(adapter)
    if not p.exists():
        raise LoraToolError("no such adapter", path=str(p))
    facts, warnings = facts_of(p)
    if facts.format not in ("kohya", "diffusers") and p.is_file():
        p = p.parent
    entry, created = Registry(home).add(p, facts, name=name, aliases=list(aliases), tags=tags,
                                        description=description, event=event)  # fmt: skip
    return AddResult(entry, created, warnings)


def list_entries(
    *,
    name_glob: str | None = None,
    base: str | os.PathLike[str] | None = None,
    home: str | os.PathLike[str] | None = None,
) -> list[Entry]:
    """Registered adapters (newest version first per name); with ``base``, only those whose every
    target module and whole tensor exists in that checkpoint with a fitting shape (headers only)."""
    shapes = header_shapes(base) if base is not None else None
    if shapes is not None:  # experts stored apart also fit adapters on the parameters transformers fuses
        shapes = {**experts.fused_shapes(shapes), **shapes}
    return Registry(home).entries(name_glob=name_glob, compatible_with=shapes)


def lineage_lines(tree: dict[str, Any]) -> list[str]:
    """``show --lineage`` as text: parents above (indented by generation), children below."""
    lines = [tree["ref"]]

    def parent(node: dict[str, Any], depth: int) -> None:
        pad = "  " * depth
        if "ref" in node:
            lines.append(f"{pad}<- {node['ref']} ({node.get('operation') or 'registered'}, {node['role']})")
            for p in node["parents"]:
                parent(p, depth + 1)
        elif "hub" in node:
            lines.append(f"{pad}<- pulled from {node['hub']} at {node['commit']}")
        else:
            lines.append(f"{pad}<- {node['path']} ({node['role']}, sha256:{node['sha256'][:12]})")

    def child(node: dict[str, Any], depth: int) -> None:
        pad = "  " * depth
        if "ref" in node:
            lines.append(f"{pad}-> {node['ref']} ({node.get('operation') or 'registered'})")
            for c in node["children"]:
                child(c, depth + 1)
        else:
            detail = f" at {node['detail']}" if node.get("detail") else ""
            lines.append(f"{pad}-> {node['event']} {node['target']}{detail}")

    for p in tree["parents"]:
        parent(p, 1)
    for c in tree["children"]:
        child(c, 1)
    return lines
