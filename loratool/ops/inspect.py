"""``loratool inspect``: what a checkpoint or an adapter holds, from headers and small reads."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import LoraToolError
from ..formats import is_adapter
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..metadata.provenance import decode


def inspect(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, Any]:
    """Describe a checkpoint or an adapter.

    A checkpoint is described from its headers alone (no tensor is read): tensor and parameter
    counts, dtypes, shards, bytes. An adapter is described from its headers and config (kohya
    alphas, scalars, are the only values read): format, modules, ranks, alphas and scalings,
    target modules, trainable parameters, dtypes, header metadata.

    Returns:
        A JSON-ready dict; ``kind`` is ``"checkpoint"`` or ``"adapter"``.

    Example:
        >>> loratool.inspect("adapter/")["modules"]
    """
    p = Path(path)
    if is_adapter(p):
        return _inspect_adapter(p, allow_pickle)
    return _inspect_checkpoint(p, allow_pickle)


def _inspect_checkpoint(p: Path, allow_pickle: bool) -> dict[str, Any]:
    with open_checkpoint(p, allow_pickle=allow_pickle, headers_only=True) as ck:
        infos = ck.infos()
        dtypes = Counter(i.dtype for i in infos)
        per_file = Counter(i.file for i in infos)
        record = decode(ck.header_metadata)
        return {
            "kind": "checkpoint",
            "path": str(p),
            "tensors": len(infos),
            "parameters": ck.num_params,
            "bytes": ck.nbytes,
            "file_bytes": sum(f.stat().st_size for f in ck.files),
            "dtypes": dict(dtypes),
            "shards": [{"file": f, "tensors": n} for f, n in per_file.items()],
            "index": ck.index_file.name if ck.index_file else None,
            "model_type": ck.config().get("model_type"),
            "quantization": _quantization(ck),
            "provenance": record,
            "metadata": {k: v for k, v in ck.header_metadata.items() if k != "loratool"},
        }


def _quantization(ck: Checkpoint) -> dict[str, Any] | None:
    """The method and its evidence; for FP8 that loratool handles, the schemes, block size and weights."""
    found = ck.quantization()
    if found is None:
        return None
    out: dict[str, Any] = {"method": found.method, "evidence": found.evidence, "supported": False}
    try:
        layout = ck.fp8_layout() or ck.packed_layout()
    except LoraToolError as e:
        out["why_unsupported"] = e.message
        return out
    if layout is not None:
        out.update(layout.describe(), supported=True)
    return out


def _inspect_adapter(p: Path, allow_pickle: bool) -> dict[str, Any]:
    from ..formats import load_adapter

    a = load_adapter(p, allow_pickle=allow_pickle, lazy=True)  # headers only, however large
    modules = [
        {
            "module": name,
            "kind": m.kind,
            "rank": m.rank,
            "alpha": m.alpha,
            "scaling": m.scaling,
            "shape": list(m.weight_shape),
            "dtype": str(m.lora_A.dtype).replace("torch.", ""),
            "bias": m.bias is not None,
        }
        for name, m in a.modules.items()
    ]
    files = [p] if p.is_file() else [f for f in sorted(p.iterdir()) if f.is_file()]
    return {
        "kind": "adapter",
        "path": str(p),
        "format": a.format,
        "modules": modules,
        "module_count": len(modules),
        "ranks": dict(Counter(m["rank"] for m in modules)),
        "use_rslora": a.config.get("use_rslora", False),
        "use_dora": a.use_dora,
        "target_modules": a.config.get("target_modules"),
        "whole_tensors": sorted(a.whole),
        "trainable_tokens": {k: len(idx) for k, (idx, _) in sorted(a.token_rows.items())},
        "trainable_parameters": a.num_params,
        "dtypes": dict(Counter(m["dtype"] for m in modules)),
        "bytes": sum(f.stat().st_size for f in files),
        "base_model_name_or_path": a.base_model_name_or_path,
        "provenance": decode(a.metadata),
        "metadata": {k: v for k, v in a.metadata.items() if k != "loratool"},
    }
