"""The safetensors header, read and patched by hand: an 8-byte little-endian length, then JSON.

``safe_open`` lists tensors sorted by name and gives no offsets; reading in on-disk order keeps
I/O sequential, and streaming writers patch values known only at the end (input digests) into a
header written first. Both go through :func:`read_header`, which refuses what is not a header.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import InputFileError

METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces


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
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(f"the header is not valid JSON ({e})", path=str(path)) from None
    if not isinstance(header, dict):
        raise InputFileError("the header is not a JSON object", path=str(path))
    return n, header


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole JSON header of a safetensors file (tensor entries and ``__metadata__``)."""
    p = Path(path)
    with open(p, "rb") as f:
        return _parse(p, f)[1]


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
