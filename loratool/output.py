"""Writing outputs: atomically, and tensor by tensor.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once. A merge of a 70B
model cannot afford that, so :class:`SafetensorsStreamWriter` writes the format by hand (an 8-byte
header length, a JSON header, then raw little-endian data): the header is known before the data
because names, shapes and dtypes are known up front, and the data is then appended one tensor at a
time. Files written this way load with ``safe_open``/``load_file`` like any other.

Every output goes to a hidden temporary path beside the target and is renamed into place only
after it is complete and flushed, so an interrupted run leaves nothing at the target path.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import shutil
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import DTYPE_SIZES, PICKLE_SUFFIXES, dtype_name
from .directio import DIRECT_MIN_BYTES, DirectFile
from .errors import InputFileError, OutputExistsError, ShapeMismatchError
from .runtime import BufferPool

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # what transformers uses by default


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


# -- atomic output -------------------------------------------------------------------------------
def check_output(target: str | os.PathLike[str], *, force: bool, inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Refuse an existing output without ``force``, and an output that is one of the inputs."""
    out = Path(target)
    for src in inputs:
        src_p = Path(src)
        if (
            out.exists()
            and src_p.exists()
            and (out.resolve() == src_p.resolve() or out.resolve() in src_p.resolve().parents)
        ):
            raise OutputExistsError(
                "the output is one of the inputs", path=str(out), fix="choose another -o/--output path"
            )
    if out.exists() and not force:
        raise OutputExistsError("the output exists", path=str(out), fix="pass --force to replace it")
    return out


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike[str], *, force: bool, directory: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it to ``target`` only if the block succeeds.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary path is removed and
    ``target`` is left as it was.
    """
    out = check_output(target, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.loratool-tmp-{tag}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.loratool-old-{tag}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _fsync_tree(p: Path) -> None:
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise RuntimeError(f"{self.path.name}: tensor '{name}' was not declared")
        spec = self._specs[self._next]
        if name != spec.name:
            raise RuntimeError(f"{self.path.name}: expected tensor '{spec.name}' next, got '{name}'")
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

    def close(self) -> None:
        if self._next != len(self._specs):
            missing = self._specs[self._next].name
            self._file.abort()
            raise RuntimeError(f"{self.path.name}: closed before tensor '{missing}' was written")
        self._file.close()  # fsyncs now, while the next shard is computed, not all at the end

    def abort(self) -> None:
        self._file.abort()


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


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


# -- sharded checkpoints --------------------------------------------------------------------------
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
        while self._writer is None or self._remaining == 0:
            self._open_next()
        assert self._writer is not None
        self._writer.write(name, tensor)
        self._remaining -= 1

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


class BackgroundWriter:
    """Hands ``write`` calls to a thread, up to ``depth`` tensors behind, so that writing (and
    flushing) one tensor overlaps computing the next. Errors surface on the next call."""

    def __init__(self, writer: CheckpointWriter, depth: int = 2, pool: BufferPool | None = None) -> None:
        self._writer = writer
        self._pool = pool
        self._queue: queue.Queue[tuple[str, torch.Tensor, torch.dtype | None, bool] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loratool-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as e:  # handed to the caller on its next call
                    self._error = e

    def _write(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None, recycle: bool) -> None:
        if dtype is None or (tensor.dtype == dtype and tensor.device.type == "cpu"):
            self._writer.write(name, tensor)
        elif self._pool is None:
            self._writer.write(name, tensor.to("cpu", dtype))
        else:  # cast into a reused buffer, and hand it back once written
            out = self._pool.take(tensor.shape, dtype, _cpu()).copy_(tensor)
            self._writer.write(name, out)
            self._pool.give(out)
        if recycle and self._pool is not None:
            self._pool.give(tensor)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(
        self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None, *, recycle: bool = False
    ) -> None:
        """Queue ``tensor`` (cast to ``dtype`` on the writer thread, if given) for writing;
        ``recycle``: ``tensor`` came from the pool and goes back to it once written."""
        self._raise()
        self._queue.put((name, tensor, dtype, recycle))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()
        self._writer.close()

    def abort(self) -> None:
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(None)
            self._thread.join()
        self._writer.abort()


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


def patch_header_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Rewrite a safetensors file's ``__metadata__`` in place; the new header must not be longer.

    Streaming writers emit the header before the data. Values only known at the end (input
    digests hashed in the background) are written as same-length placeholders and patched here.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > n:
            raise RuntimeError(f"{path.name}: patched header ({len(raw)} bytes) outgrows the reserved {n}")
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))
