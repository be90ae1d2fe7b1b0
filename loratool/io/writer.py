"""Writing safetensors files tensor by tensor.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once. A merge of a 70B
model cannot afford that, so :class:`SafetensorsStreamWriter` writes the format by hand (an 8-byte
header length, a JSON header, then raw little-endian data): the header is known before the data
because names, shapes and dtypes are known up front, and the data is then appended one tensor at a
time. Files written this way load with ``safe_open``/``load_file`` like any other.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ShapeMismatchError
from .checkpoint import DTYPE_SIZES, PICKLE_SUFFIXES, dtype_name
from .directio import DIRECT_MIN_BYTES, DirectFile

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and safetensors dtype of a tensor that will be written."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


# -- streaming safetensors ----------------------------------------------------------------------
class SafetensorsStreamWriter:
    """Write one safetensors file whose header is known up front, one tensor at a time, in order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self._specs = list(specs)
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for s in self._specs:
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._file = DirectFile(path, direct=offset >= DIRECT_MIN_BYTES)
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def _expect(self, name: str) -> TensorSpec:
        """The spec of ``name``, whose turn it must be."""
        if self._next >= len(self._specs):
            raise RuntimeError(f"{self.path.name}: tensor '{name}' was not declared")
        spec = self._specs[self._next]
        if name != spec.name:
            raise RuntimeError(f"{self.path.name}: expected tensor '{spec.name}' next, got '{name}'")
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._expect(name)
        if tuple(tensor.shape) != spec.shape or dtype_name(tensor.dtype) != spec.dtype:
            raise ShapeMismatchError(
                "does not match the declared layout",
                key=name,
                expected=f"{list(spec.shape)} {spec.dtype}",
                got=f"{list(tensor.shape)} {dtype_name(tensor.dtype)}",
            )
        flat = tensor.detach().to("cpu").contiguous()
        if flat.numel():
            self._file.write(tensor_bytes(flat))  # flat stays alive across the write
        self._next += 1

    def write_pieces(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """Write tensor ``name`` as consecutive slices of its first dimension, each as it comes (a
        mixture-of-experts weight an expert at a time, while the next is computed)."""
        spec, rows = self._expect(name), 0
        for piece in pieces:
            if tuple(piece.shape[1:]) != spec.shape[1:] or dtype_name(piece.dtype) != spec.dtype or not spec.shape:
                raise ShapeMismatchError("a piece does not match the declared layout", key=name,
                                         expected=f"(rows, {', '.join(map(str, spec.shape[1:]))}) {spec.dtype}",
                                         got=f"{list(piece.shape)} {dtype_name(piece.dtype)}")  # fmt: skip
            rows += piece.shape[0]
            if rows > spec.shape[0]:
                break
            flat = piece.detach().to("cpu").contiguous()
            if flat.numel():
                self._file.write(tensor_bytes(flat))
        if rows != spec.shape[0]:
            raise ShapeMismatchError("its pieces do not add up to the declared layout", key=name,
                                     expected=f"{spec.shape[0]} rows", got=f"{rows}")  # fmt: skip
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._specs):
            missing = self._specs[self._next].name
            self._file.abort()
            raise RuntimeError(f"{self.path.name}: closed before tensor '{missing}' was written")
        self._file.close()  # fsyncs now, while the next shard is computed, not all at the end

    def abort(self) -> None:
        self._file.abort()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy and without numpy (torch does not
    require it). The caller keeps ``t`` alive while the view is in use."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file from a dict (``safetensors.torch.save_file`` needs numpy, which
    torch does not bring; this needs nothing)."""
    specs = [TensorSpec(k, tuple(t.shape), dtype_name(t.dtype)) for k, t in tensors.items()]
    writer = SafetensorsStreamWriter(path, specs, metadata)
    try:
        for k, t in tensors.items():
            writer.write(k, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise


class CheckpointWriter:
    """Write a checkpoint laid out in shards ``[(file name, specs), ...]``, tensor by tensor, in order.

    With more than one shard, ``index_name`` (``model.safetensors.index.json``) is written as
    transformers does; ``index_name=None`` leaves the index to the caller.
    """

    def __init__(
        self,
        directory: Path,
        shards: list[tuple[str, list[TensorSpec]]],
        *,
        metadata: dict[str, str] | None = None,
        index_name: str | None = "model.safetensors.index.json",
    ) -> None:
        self.directory = directory
        self._shards = shards
        self._metadata = metadata or {}
        self._index_name = index_name
        self._current = -1
        self._writer: SafetensorsStreamWriter | None = None
        self._remaining = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._shard().write(name, tensor)
        self._remaining -= 1

    def write_pieces(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """:meth:`SafetensorsStreamWriter.write_pieces` in the shard whose turn it is."""
        self._shard().write_pieces(name, pieces)
        self._remaining -= 1

    def _shard(self) -> SafetensorsStreamWriter:
        while self._writer is None or self._remaining == 0:
            self._open_next()
        assert self._writer is not None
        return self._writer

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._current += 1
        if self._current >= len(self._shards):
            raise RuntimeError("more tensors written than the layout declares")
        fname, specs = self._shards[self._current]
        self._writer = SafetensorsStreamWriter(self.directory / fname, specs, self._metadata)
        self._remaining = len(specs)

    def close(self) -> None:
        while self._current < len(self._shards) - 1:
            self._open_next()  # raises if a declared tensor was never written
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if len(self._shards) > 1 and self._index_name is not None:
            total = sum(s.nbytes for _, specs in self._shards for s in specs)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {s.name: fname for fname, specs in self._shards for s in specs},
            }
            (self.directory / self._index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def copy_aux_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy a model directory's non-weight files (config, tokenizer, generation config...)."""
    copied = []
    for f in sorted(src_dir.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.name.endswith((".safetensors", ".index.json", *PICKLE_SUFFIXES)):
            continue
        shutil.copy2(f, dst_dir / f.name)
        copied.append(f.name)
    return copied
