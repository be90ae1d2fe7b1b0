"""``loratool convert``: one adapter, another file format (PEFT, kohya, mlx-lm), the same deltas."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..adapter import Adapter
from ..errors import LoraToolError
from ..formats import load_adapter, save_adapter
from ..formats.kohya import resolve_paths
from ..io.atomic import check_output
from ..io.checkpoint import open_checkpoint, torch_dtype
from ..provenance import InputHasher, encode, make_record
from ..transforms import uniform_rank
from ..validation import require_valid

Target = Literal["peft", "kohya", "mlx"]
TARGETS: tuple[Target, ...] = ("peft", "kohya", "mlx")


@dataclass
class ConvertResult:
    """What :func:`convert` wrote."""

    output: Path
    source_format: str
    format: str
    modules: int
    ranks: list[int]
    parameters: int
    parameters_before: int
    portable: bool
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output), "source_format": self.source_format, "format": self.format,
            "modules": self.modules, "ranks": self.ranks, "parameters": self.parameters,
            "parameters_before": self.parameters_before, "portable": self.portable, "warnings": self.warnings,
        }  # fmt: skip


def convert(
    adapter: str | os.PathLike[str],
    *,
    to: Target,
    output: str | os.PathLike[str],
    portable: bool = False,
    base: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
) -> ConvertResult:
    """Write ``adapter`` in another format; every module's delta stays what it was.

    Args:
        adapter: a PEFT directory, a kohya ``.safetensors`` file or an mlx-lm directory.
        to: ``peft``, ``kohya`` or ``mlx``.
        output: the directory (PEFT, mlx) or ``.safetensors`` file (kohya) to write.
        portable: (PEFT) every module at one rank with scaling 1 (``lora_alpha = r``, no
            ``rank_pattern``/``alpha_pattern``), so runtimes that read only ``r`` and
            ``lora_alpha`` (vLLM) scale every module right. Lower ranks are padded with zeros.
        base: a checkpoint whose module paths name a kohya file's modules (headers only).
        dtype: the factors' dtype (default: keep).
        force: replace an existing output.

    Raises:
        LoraToolError: the target cannot hold the adapter (e.g. whole tensors in kohya or mlx),
            kohya names that no checkpoint resolves, an invalid adapter.

    Example:
        >>> loratool.convert("adapter/", to="mlx", output="adapter-mlx/")
    """
    if to not in TARGETS:
        raise LoraToolError(f"unknown target format {to!r}", fix=f"use one of {', '.join(TARGETS)}")
    if portable and to != "peft":
        raise LoraToolError(
            f"--portable is for PEFT output; {to} files already say each module's scale",
            fix="leave out --portable, or use --to peft",
        )
    out = check_output(output, force=force, inputs=[p for p in (adapter, base) if p is not None])
    warnings = require_valid(adapter, "convert refuses it", allow_pickle=allow_pickle)
    a = load_adapter(adapter, allow_pickle=allow_pickle)
    before = a.num_params
    source = a.format
    if base is not None:
        _name_from(a, base, allow_pickle)
    elif to != "kohya" and a.format == "kohya":
        _require_paths(a)
    if portable:
        a = uniform_rank(a)
        if a.num_params > before:
            top = max(m.rank for m in a.modules.values())
            warnings.append(f"ranks padded with zeros to {top}: {a.num_params - before} more parameters")
    hasher = InputHasher(_files(Path(adapter)))
    params = {"to": to, "portable": portable, "base": str(base) if base else None, "dtype": dtype}
    a.metadata = encode(make_record("convert", params, hasher.result()))
    save_adapter(a, out, format=to, force=force, dtype=torch_dtype(dtype) if dtype else None)
    written = load_adapter(out)
    if to == "mlx" and written.num_params > before:
        warnings.append(f"mlx-lm has one rank: ranks padded with zeros ({written.num_params - before} more parameters)")
    return ConvertResult(
        output=out, source_format=source, format=to, modules=len(written.modules),
        ranks=sorted({m.rank for m in written.modules.values()}), parameters=written.num_params,
        parameters_before=before, portable=portable, warnings=warnings,
    )  # fmt: skip


def _name_from(adapter: Adapter, base: str | os.PathLike[str], allow_pickle: bool) -> None:
    """Rename kohya prefixes to the base's module paths (headers only)."""
    with open_checkpoint(base, allow_pickle=allow_pickle) as ck:
        paths = [k.removesuffix(".weight") for k in ck.keys() if k.endswith(".weight")]
    found = resolve_paths(adapter, paths)
    missing = [m for m in adapter.modules if m not in found]
    if missing:
        raise LoraToolError(
            f"{len(missing)} module(s) name no weight of the base (first: {missing[0]})",
            path=str(base),
            fix="pass the checkpoint this adapter was trained on as --base",
        )
    adapter.modules = {found[m]: mod for m, mod in adapter.modules.items()}


def _require_paths(adapter: Adapter) -> None:
    unnamed = [m for m in adapter.modules if "." not in m]
    if unnamed:
        raise LoraToolError(
            f"the kohya file names modules by prefixes ({unnamed[0]}), not by module paths",
            path=adapter.path,
            fix="pass the base checkpoint as --base to name them",
        )


def _files(p: Path) -> list[Path]:
    return sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
