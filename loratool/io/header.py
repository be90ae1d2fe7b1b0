"""The safetensors header, read and patched by hand: an 8-byte little-endian length, then JSON.

``safe_open`` lists tensors sorted by name and gives no offsets; reading in on-disk order keeps
I/O sequential, and streaming writers patch values known only at the end (input digests) into a
header written first. Both go through :func:`read_header`, which refuses what is not a header.
:func:`read_checked_header` also checks the layout as ``safe_open`` does, for what lists a
checkpoint without opening it with safetensors (which imports torch).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import InputFileError

METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces (0.8)

# Bits an element of each dtype takes, as safetensors 0.8 names them. A name not here is left to the
# installed safetensors to judge (a later release may know more).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip


def _parse(path: Path, f: Any) -> tuple[int, dict[str, Any]]:
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise InputFileError("too short to be a safetensors file", path=str(path), fix="copy the file again")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise InputFileError(
            f"header length {n} does not fit the file ({size} bytes)",
            path=str(path),
            fix="the file is truncated or corrupt: download or copy it again",
        )
    try:
        header = json.loads(f.read(n), parse_constant=_no_constant)  # strict JSON, as safetensors reads it
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputFileError(f"the header is not valid JSON ({e})", path=str(path)) from None
    if not isinstance(header, dict):
        raise InputFileError("the header is not a JSON object", path=str(path))
    return n, header


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; JSON has no such words


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole JSON header of a safetensors file (tensor entries and ``__metadata__``)."""
    p = Path(path)
    with open(p, "rb") as f:
        return _parse(p, f)[1]


def tensor_byte_ranges(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """Each tensor's first byte and byte count in the file (the data section starts after the header),
    for reading a tensor's bytes apart from safetensors. The caller has had the header checked."""
    p = Path(path)
    with open(p, "rb") as f:
        n, header = _parse(p, f)
    out = {}
    for name, entry in header.items():
        if name != METADATA_KEY:
            begin, end = entry["data_offsets"]
            out[name] = (8 + n + int(begin), int(end) - int(begin))
    return out


def read_checked_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bool]:
    """The header of a safetensors file checked as ``safe_open`` checks it, without safetensors (which
    would import torch to open the file): strict JSON, each entry a dtype, a shape of whole
    non-negative dimensions and two offsets, the entries' bytes tiling the data exactly in the order
    of their offsets, each entry as many bytes as its shape and dtype take, and ``__metadata__`` (if
    any) strings by name. Returns the header and whether the check could decide: False where an
    entry's dtype is not in :data:`DTYPE_BITS`, which the installed safetensors then judges.

    Raises:
        InputFileError: what safetensors would refuse, naming the tensor.
    """
    p = Path(path)
    with open(p, "rb") as f:
        n, header = _parse(p, f)
        size = os.fstat(f.fileno()).st_size
    corrupt = "the file is truncated or corrupt: download or copy it again"
    meta = header.get(METADATA_KEY)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise InputFileError("the header's __metadata__ is not strings by name", path=str(p), fix=corrupt)
    spans = []
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        dtype, shape, offsets = _fields(entry)
        if dtype is None or shape is None or offsets is None:
            raise InputFileError(f"tensor '{name}' has no valid dtype, shape and offsets in the header", path=str(p),
                                 fix=corrupt)  # fmt: skip
        if dtype not in DTYPE_BITS:
            return header, False
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits >= 1 << 64 or bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise InputFileError(f"tensor '{name}': its offsets do not hold {shape} x {dtype}", path=str(p),
                                 fix=corrupt)  # fmt: skip
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise InputFileError(f"tensor '{name}' does not start where the one before it ends", path=str(p),
                                 fix=corrupt)  # fmt: skip
        end = stop
    if 8 + n + end != size:
        raise InputFileError(f"the tensors' data takes {end} bytes, the file holds {size - 8 - n}", path=str(p),
                             fix=corrupt)  # fmt: skip
    return header, True


def _fields(entry: object) -> tuple[str | None, list[int] | None, list[int] | None]:
    """An entry's dtype, shape and offsets where each has the type safetensors asks (serde's usize
    for dimensions and offsets), None in place of any that has not."""
    if not isinstance(entry, dict):
        return None, None, None

    def whole(v: object) -> bool:
        return type(v) is int and 0 <= v < 1 << 64

    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    return (
        dtype if isinstance(dtype, str) else None,
        shape if isinstance(shape, list) and all(whole(d) for d in shape) else None,
        offsets if isinstance(offsets, list) and len(offsets) == 2 and all(whole(o) for o in offsets) else None,
    )


def tensor_offsets(header: dict[str, Any]) -> dict[str, int]:
    """Start offset of each tensor's data, from a header."""
    out = {}
    for k, v in header.items():
        if k == METADATA_KEY:
            continue
        try:
            out[k] = int(v["data_offsets"][0])
        except (TypeError, KeyError, IndexError, ValueError):
            out[k] = 0  # safe_open has already judged the entry; order it first
    return out


def tensor_shapes(path: str | os.PathLike[str], header: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and dtype from its header entry, for the queries that read no tensor and so
    never open the file with safe_open (which checks every entry): an entry without a dtype string and
    a list of whole non-negative dimensions is refused, naming the tensor."""
    out = {}
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        shape, dtype = (entry.get("shape"), entry.get("dtype")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(dtype, str) and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise InputFileError(
                f"tensor '{name}' has no valid shape and dtype in the header",
                path=str(path),
                fix="the file is truncated or corrupt: download or copy it again",
            )
        out[name] = (tuple(shape), dtype)
    return out


def header_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (``{}`` when it has none)."""
    meta = read_header(path).get(METADATA_KEY) or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def patch_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Rewrite a safetensors file's ``__metadata__`` in place; the new header must not be longer.

    Streaming writers emit the header before the data. Values only known at the end (input
    digests hashed in the background) are written as same-length placeholders and patched here.
    """
    with open(path, "r+b") as f:
        n, header = _parse(path, f)
        header[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > n:
            raise RuntimeError(f"{path.name}: patched header ({len(raw)} bytes) outgrows the reserved {n}")
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))
