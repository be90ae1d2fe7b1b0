"""Hugging Face style sharding for the synthetic benchmark checkpoints (bench/synth.py) and tests.

loratool's own outputs keep their input's layout; only made-up checkpoints need a shard plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from loratool.errors import InputFileError
from loratool.io.writer import CheckpointWriter, TensorSpec

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # what transformers uses by default


def shard_file_names(n: int, prefix: str = "model") -> list[str]:
    """Hugging Face shard names: ``model.safetensors`` or ``model-00001-of-00003.safetensors``."""
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Split specs, in order, into shards of at most ``max_shard_bytes`` (a larger tensor stands alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_checkpoint(
    directory: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    specs: list[TensorSpec],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Stream ``tensors`` (in the order of ``specs``) into HF-style shards in ``directory``.

    Returns the shard file names.
    """
    planned = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(planned))
    writer = CheckpointWriter(directory, list(zip(names, planned)), metadata=metadata)
    try:
        for name, t in tensors:
            writer.write(name, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return names


def parse_size(text: str) -> int:
    """``"5GB"`` -> bytes (powers of 1000 for KB/MB/GB, 1024 for KiB/MiB/GiB, like transformers)."""
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise InputFileError(f"cannot read size '{text}'", fix="write it like 5GB, 500MB or 2GiB") from None
