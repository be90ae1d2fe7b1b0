"""Reading checkpoints: one safetensors file, a directory, or a sharded set with an index.

Everything that touches ``safetensors`` for reading lives here. Listing a checkpoint reads only the
headers; tensors are read one at a time from memory-mapped files, so a 100 GB model can be walked
with the memory of its largest tensor.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import arch
from ..errors import InputFileError, LoraToolError, MissingInputError, MissingKeyError
from ..quant.layout import (
    Fp8Layout,
    PackedLayout,
    Quantization,
    detect_quantization,
    fp8_layout,
    logical_shapes,
    packed_layout,
)
from .header import METADATA_KEY, read_checked_header, read_header, tensor_byte_ranges, tensor_offsets, tensor_shapes

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

# safetensors dtype name -> (torch dtype name, bytes per element)
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def dtype_kind(name: str) -> str:
    """A safetensors dtype name's kind: ``"floating-point"`` (F16, BF16, F32, F8_E4M3...), ``"integer"``
    (I8, U8...), ``"boolean"``, or ``"other"`` (complex C64, say)."""
    if name == "BOOL":
        return "boolean"
    if name[:1] in ("I", "U"):
        return "integer"
    return "floating-point" if name.startswith(("F", "BF")) else "other"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name (``"BF16"``) or a user spelling (``"bf16"``)."""
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "FLOAT32": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16,
        "FP32": torch.float32, "FP16": torch.float16, "HALF": torch.float16, "FLOAT": torch.float32,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }  # fmt: skip
    try:
        return table[name.upper()]
    except KeyError:
        raise InputFileError(
            f"unknown dtype '{name}'", fix="use one of float32, float16, bfloat16 (or F32, F16, BF16)"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    import torch

    table = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }  # fmt: skip
    return table[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """What a header says of one tensor: no data is read to know it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name: "F32", "BF16", ...
    file: str  # file name relative to the checkpoint root

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES.get(self.dtype, 4)


# config.json's sections that loratool reads as objects (quantization, a vision-language model's text model)
OBJECT_SECTIONS = ("quantization_config", "compression_config", "text_config")


class Checkpoint:
    """A checkpoint opened for streaming reads.

    Use :func:`open_checkpoint` to make one. ``keys()`` and ``info()`` come from headers;
    ``get()`` reads one tensor, memory-mapped. With ``headers_only`` the headers are read and checked
    here (:func:`.header.read_checked_header`) and safetensors opens a file at its first read: safetensors
    imports torch to open one, which listing does not need.
    """

    def __init__(self, path: Path, files: list[Path], *, index_file: Path | None, allow_pickle: bool,
                 headers_only: bool = False):  # fmt: skip
        self.path = path
        self.root = path if path.is_dir() else path.parent
        self.files = files
        self.index_file = index_file
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[str, Any] = {}
        self._unopened: dict[str, Path] = {}  # files listed from their headers, opened at their first read
        self._opening = threading.Lock()  # a merge's reader and look-ahead threads may first read a file at once
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}  # file -> tensor -> (first byte, count)
        self.metadata: dict[str, dict[str, str]] = {}
        for f in files:
            if f.suffix in PICKLE_SUFFIXES:
                self._open_pickle(f, allow_pickle)
            elif not (headers_only and self._list_safetensors(f)):
                self._open_safetensors(f)

    # -- opening -------------------------------------------------------------------------------
    def _list_safetensors(self, file: Path) -> bool:
        """List a file from its header, checked as safetensors checks it; False where the check cannot
        decide (a dtype it does not know), for safetensors to open the file instead."""
        try:
            header, decided = read_checked_header(file)
        except InputFileError as e:  # worded as safe_open's refusals are
            raise _unreadable(file, e.message) from None
        except OSError as e:
            raise InputFileError(f"cannot read the file ({e.strerror})", path=str(file)) from None
        if not decided:
            return False
        rel = file.name
        self._unopened[rel] = file
        self.metadata[rel] = dict(header.get(METADATA_KEY) or {})
        offsets = tensor_offsets(header)
        for name, (shape, dtype) in sorted(tensor_shapes(file, header).items(), key=lambda kv: (offsets[kv[0]], kv[0])):
            self._add(TensorInfo(name, shape, dtype, rel))
        return True

    def _safe_open(self, file: Path) -> Any:
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(str(file), framework="pt")  # safetensors ships no type hints
        except SafetensorError as e:
            raise _unreadable(file, e) from None
        except OSError as e:
            raise InputFileError(f"cannot read the file ({e.strerror})", path=str(file)) from None

    def _handle(self, rel: str) -> Any:
        """The open safetensors file ``rel``, opened now if it was listed from its header."""
        if rel not in self._handles:
            with self._opening:
                if rel not in self._handles:
                    self._handles[rel] = self._safe_open(self._unopened[rel])
                    del self._unopened[rel]
        return self._handles[rel]

    def _open_safetensors(self, file: Path) -> None:
        from safetensors import SafetensorError

        rel = file.name
        handle = self._safe_open(file)
        try:
            names = list(handle.keys())
            infos = []
            for name in names:
                s = handle.get_slice(name)
                infos.append(TensorInfo(name, tuple(s.get_shape()), s.get_dtype(), rel))
            meta = handle.metadata() or {}
        except SafetensorError as e:
            raise _unreadable(file, e) from None
        self._handles[rel] = handle
        self.metadata[rel] = dict(meta)
        offsets = tensor_offsets(read_header(file))
        for info in sorted(infos, key=lambda i: (offsets.get(i.name, 0), i.name)):
            self._add(info)

    def _open_pickle(self, file: Path, allow_pickle: bool) -> None:
        if not allow_pickle:
            raise InputFileError(
                "refusing to read a pickle file: unpickling can run arbitrary code",
                path=str(file),
                fix="convert it to .safetensors, or pass --allow-pickle if you trust its source "
                "(it is then loaded with torch.load(weights_only=True))",
            )
        import torch

        try:
            state = _torch_load(file)
        except Exception as e:  # torch raises many kinds here; all mean "unreadable"
            raise InputFileError(f"cannot load the pickle file ({e})", path=str(file)) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputFileError("the pickle file does not hold a flat dict of tensors", path=str(file))
        self._pickled[file.name] = state
        for name, t in state.items():
            self._add(TensorInfo(name, tuple(t.shape), dtype_name(t.dtype), file.name))

    def _add(self, info: TensorInfo) -> None:
        if info.name in self._infos:
            raise InputFileError(
                f"tensor '{info.name}' appears in both {self._infos[info.name].file} and {info.file}",
                path=str(self.path),
                fix="a sharded checkpoint must hold each tensor once",
            )
        self._infos[info.name] = info

    # -- listing (headers only) -----------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names, shard by shard, in on-disk order within each shard."""
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise MissingKeyError("not in the checkpoint", path=str(self.path), key=key) from None

    def shape_of(self, key: str) -> tuple[int, ...] | None:
        """``key``'s stored shape, or None where the checkpoint has no such tensor."""
        return self.info(key).shape if key in self else None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    @property
    def num_params(self) -> int:
        return sum(i.numel for i in self._infos.values())

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def header_metadata(self) -> dict[str, str]:
        """The first file's header metadata (all shards of one checkpoint normally agree)."""
        return next(iter(self.metadata.values()), {}) if self.metadata else {}

    def config(self) -> dict[str, Any]:
        """``config.json`` beside the weights, or ``{}``."""
        cfg = self.root / "config.json"
        if not cfg.is_file():
            return {}
        try:
            config = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputFileError(f"config.json is not valid JSON ({e})", path=str(cfg)) from None
        if not isinstance(config, dict):
            raise InputFileError(
                f"config.json holds a JSON {type(config).__name__}, not an object", path=str(cfg),
                fix="a model's config.json is an object of its settings: download it again",
            )  # fmt: skip
        for section in OBJECT_SECTIONS:  # read with .get(...) all through: each must be an object where present
            if config.get(section) is not None and not isinstance(config[section], dict):
                raise InputFileError(
                    f"config.json's {section} is a JSON {type(config[section]).__name__}, not an object",
                    path=str(cfg), fix="a model's config.json is an object of its settings: download it again",
                )  # fmt: skip
        names = config.get("architectures")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise InputFileError(
                f"config.json's architectures is {json.dumps(names)[:40]}, not a list of class names",
                path=str(cfg), fix="a model's config.json lists its classes in architectures: download it again",
            )  # fmt: skip
        for owner in (config, config.get("text_config") or {}):  # the family's name, looked up in tables
            if owner.get("model_type") is not None and not isinstance(owner["model_type"], str):
                raise InputFileError(
                    f"config.json's model_type is {json.dumps(owner['model_type'])[:40]}, not a name",
                    path=str(cfg), fix="a model's config.json names its family in model_type: download it again",
                )  # fmt: skip
        return config

    def quantization(self) -> Quantization | None:
        """How the checkpoint is quantized (config.json, tensor dtypes and names), or None."""
        return detect_quantization(self.config(), ((i.name, i.dtype) for i in self._infos.values()))

    def quant_config(self) -> dict[str, Any]:
        """config.json, with ModelOpt's ``hf_quant_config.json`` beside it under ``hf_quant_config``."""
        config = self.config()
        extra = self.root / "hf_quant_config.json"
        if extra.is_file():
            try:
                config = {**config, "hf_quant_config": json.loads(extra.read_text())}
            except (OSError, json.JSONDecodeError) as e:
                raise InputFileError(f"hf_quant_config.json is not valid JSON ({e})", path=str(extra)) from None
            if not isinstance(config["hf_quant_config"], dict):
                raise InputFileError(
                    "hf_quant_config.json does not hold a JSON object", path=str(extra),
                    fix="ModelOpt writes an object of its settings there: download it again",
                )  # fmt: skip
        return config

    def fp8_layout(self) -> Fp8Layout | None:
        """The FP8 layout of the weights (None when unquantized or packed low-bit); refuses the
        quantizations loratool does not read."""
        try:
            return fp8_layout(self.quant_config(), {i.name: (i.shape, i.dtype) for i in self._infos.values()})
        except LoraToolError as e:
            raise type(e)(e.message, path=str(self.path), fix=e.fix) from None

    def packed_layout(self) -> PackedLayout | None:
        """The packed low-bit layout (MXFP4, NVFP4, INT4/INT8 pack-quantized) of the weights, or None."""
        try:
            return packed_layout(self.quant_config(), {i.name: (i.shape, i.dtype) for i in self._infos.values()})
        except LoraToolError as e:
            raise type(e)(e.message, path=str(self.path), fix=e.fix) from None

    # -- reading --------------------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU, the stored dtype)."""
        info = self.info(key)
        if info.file in self._pickled:
            return self._pickled[info.file][key]
        from safetensors import SafetensorError

        try:
            tensor: torch.Tensor = self._handle(info.file).get_tensor(key)
            return tensor
        except SafetensorError as e:
            raise InputFileError(f"cannot read tensor '{key}' ({e})", path=str(self.root / info.file)) from None

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` of one tensor's first dimension (CPU, the stored dtype), and
        only those bytes: one expert of a 3-D experts parameter, say."""
        info = self.info(key)
        if info.file in self._pickled:
            return self._pickled[info.file][key][start:stop]
        from safetensors import SafetensorError

        try:
            tensor: torch.Tensor = self._handle(info.file).get_slice(key)[start:stop]
            return tensor
        except SafetensorError as e:
            raise InputFileError(f"cannot read tensor '{key}' ({e})", path=str(self.root / info.file)) from None

    def byte_range(self, key: str) -> tuple[Path, int, int] | None:
        """The file, first byte and byte count of a tensor's data as stored (None for a pickled one),
        for reads that bypass safetensors (:mod:`.directread`); the header was checked on opening."""
        info = self.info(key)
        if info.file in self._pickled:
            return None
        path = next(f for f in self.files if f.name == info.file)  # info.file is the name of one of them
        if info.file not in self._ranges:
            self._ranges[info.file] = tensor_byte_ranges(path)
        start, length = self._ranges[info.file][key]
        return path, start, length

    def get_meta(self, key: str) -> torch.Tensor:
        """A tensor with the stored shape and dtype on the ``meta`` device: no data is read."""
        import torch

        info = self.info(key)
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")

    def file_paths(self) -> list[Path]:
        """Every file the checkpoint consists of (shards and index), for hashing and provenance."""
        paths = list(self.files)
        if self.index_file is not None:
            paths.append(self.index_file)
        return paths

    def close(self) -> None:
        self._handles.clear()
        self._pickled.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unreadable(file: Path, why: object) -> InputFileError:
    """A safetensors file that safetensors (or loratool's check of its header) refuses."""
    return InputFileError(f"not a readable safetensors file ({why})", path=str(file),
                          fix="the file is truncated or corrupt: download or copy it again")  # fmt: skip


def _torch_load(file: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped where the file allows it: the legacy
    (pre-zip) format cannot be mapped, so it is read whole."""
    import torch

    try:
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(str(file), map_location="cpu", weights_only=True)


def resolve_checkpoint_files(path: str | os.PathLike[str]) -> tuple[Path, list[Path], Path | None]:
    """Find the weight files of a checkpoint path. Returns (path, files, index_file)."""
    p = Path(path)
    if not p.exists():
        raise MissingInputError("no such file or directory", path=str(p))
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _from_index(p.parent, p)
        if p.suffix == ".gguf":
            raise InputFileError(
                "a GGUF file: loratool works on safetensors checkpoints; it reads GGUF LoRA adapters back with "
                "convert", path=str(p),
                fix="give the transformers model folder; for a llama.cpp adapter: loratool convert ADAPTER.gguf "
                "--to peft --base MODEL -o adapter/",
            )  # fmt: skip
        if not p.name.endswith(WEIGHT_SUFFIXES):
            raise InputFileError(
                "not a checkpoint file", path=str(p), fix="give a .safetensors file or a model directory"
            )
        return p, [p], None
    if (p / "model_index.json").is_file():  # a diffusers pipeline: one checkpoint per component folder
        parts = sorted(d.name for d in p.iterdir() if d.is_dir() and (d / "config.json").is_file())
        raise InputFileError(
            f"a diffusers pipeline folder, which holds one checkpoint per component ({', '.join(parts) or 'none'})",
            path=str(p), fix=f"give the component's folder, e.g. {p / (parts[0] if parts else 'unet')}",
        )  # fmt: skip
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise InputFileError(
            f"several index files ({', '.join(i.name for i in indexes)})",
            path=str(p),
            fix="keep one *.safetensors.index.json per model directory",
        )
    if indexes:
        return _from_index(p, indexes[0])
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors"):
        if (p / name).is_file():
            return p, [p / name], None
    singles = sorted(p.glob("*.safetensors"))
    if len(singles) == 1:
        return p, singles, None
    pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if len(pickles) == 1:
        return p, pickles, None
    found = ", ".join(f.name for f in singles) or "none"
    raise InputFileError(
        f"no model.safetensors or *.safetensors.index.json in the directory (safetensors files: {found})",
        path=str(p),
        fix="point at the model file itself, or at a directory holding one checkpoint",
    )


def _from_index(root: Path, index: Path) -> tuple[Path, list[Path], Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputFileError(
            f"not a valid index file ({type(e).__name__}: {e})",
            path=str(index),
            fix="an index needs a 'weight_map' object of tensor name -> shard file",
        ) from None
    if not all(isinstance(f, str) for f in files):
        raise InputFileError("the weight_map's values must be shard file names", path=str(index))
    paths = [_inside(root, f, index) for f in files]
    for f in paths:
        if not f.is_file():
            raise MissingInputError(
                f"shard '{f.name}' is named in {index.name} but missing",
                path=str(f),
                fix="download the missing shard or fix the index",
            )
    return root, paths, index


def _inside(root: Path, name: str, index: Path) -> Path:
    """The shard ``name`` of an index, which must name a file inside the checkpoint's folder: no
    absolute path and no ``..`` leaving it. The rule is about the name the index gives; where the
    bytes lie is not its business (a Hugging Face cache snapshot's files are links into its blobs)."""
    normal = os.path.normpath(name)
    if Path(name).is_absolute() or normal == ".." or normal.startswith(".." + os.sep):
        raise InputFileError(
            f"the index names shard '{name}', which lies outside the checkpoint's folder",
            path=str(index),
            fix="shards must be named relative to the folder, inside it (no absolute paths or '..')",
        )
    return root / normal


def open_checkpoint(
    path: str | os.PathLike[str], *, allow_pickle: bool = False, headers_only: bool = False
) -> Checkpoint:
    """Open a checkpoint for streaming reads (headers now, tensors on demand).

    Args:
        path: a ``.safetensors`` file, a directory with ``model.safetensors``, or a sharded
            directory with ``*.safetensors.index.json``.
        allow_pickle: accept ``.bin``/``.pt`` files, loaded with ``torch.load(weights_only=True)``.
        headers_only: list the files from their headers, checked here, and open them with
            safetensors (which imports torch) at their first read: for what only lists.

    Raises:
        InputFileError: missing, corrupt or truncated files; pickle without ``allow_pickle``.
    """
    root, files, index = resolve_checkpoint_files(path)
    ckpt = Checkpoint(root, files, index_file=index, allow_pickle=allow_pickle, headers_only=headers_only)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = [k for k, f in weight_map.items() if k not in ckpt]
        if missing:
            raise MissingKeyError(
                f"{len(missing)} tensor(s) listed in {index.name} are not in their shards",
                path=str(index),
                key=missing[0],
                fix="the index and the shards come from different saves: download them again",
            )
    return ckpt


def header_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a safetensors checkpoint and its shape as the model holds it (packed low-bit weights under
    their model names, a vision-language model's tensors as it names them), from the headers alone: no
    torch, for catalogue queries that must answer at once (``registry ls --base``)."""
    root, files, _ = resolve_checkpoint_files(path)
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        if f.suffix in PICKLE_SUFFIXES:
            raise InputFileError("a pickle checkpoint has no header to read shapes from", path=str(f),
                                 fix="convert it to .safetensors")  # fmt: skip
        tensors.update(tensor_shapes(f, read_header(f)))
    folder = root if root.is_dir() else root.parent
    config: dict[str, Any] = {}
    for name, key in (("config.json", None), ("hf_quant_config.json", "hf_quant_config")):
        try:
            data = json.loads((folder / name).read_text()) if (folder / name).is_file() else {}
        except (OSError, ValueError):
            data = {}  # a catalogue query matches what it can read; the operations say what is wrong
        if isinstance(data, dict):
            config = {**config, key: data} if key else {**data, **config}
    try:
        shapes = logical_shapes(config, tensors)
    except LoraToolError:
        shapes = {n: shape for n, (shape, _) in tensors.items()}
    rules = arch.live_name_rules(config)  # a vision-language model's tensors, by the names it holds them
    return {arch.live_name(rules, n): s for n, s in shapes.items()} if rules else shapes
