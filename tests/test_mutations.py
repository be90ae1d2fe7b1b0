"""Property test: whatever is done to a safetensors header or an index file, loratool answers with its
own file error (or reads a file that is still valid), never with another exception."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loratool.errors import LoraToolError
from loratool.io.checkpoint import header_shapes, open_checkpoint
from loratool.ops.inspect import inspect

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.weight": torch.ones(2, 2, dtype=torch.bfloat16),
    "c.bias": torch.zeros(5, dtype=torch.float16),
}


def _valid_file(folder: Path) -> bytes:
    save_file(TENSORS, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return (folder / "model.safetensors").read_bytes()


def _read_everything(path: Path) -> None:
    """What every command does to an input: list it, read each tensor, describe it; and what the
    registry's catalogue queries do, read the shapes from the headers alone (no safe_open)."""
    for read in (_open_and_read, inspect, header_shapes):
        try:
            read(path)
        except LoraToolError:
            pass  # loratool's own error, with its message: the one acceptable failure


def _open_and_read(path: Path) -> None:
    with open_checkpoint(path) as ck:
        for key in ck.keys():
            ck.get(key)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def header_mutation(draw: st.DrawFn, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    kind = draw(st.sampled_from(["bytes", "length", "truncate", "field", "entry"]))
    if kind == "bytes":  # random bytes over the header
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, 8 + n - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    if kind == "field":
        header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
    else:
        header[draw(st.sampled_from([name, "__metadata__", "extra"]))] = draw(json_values)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + raw[8 + n :]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_safetensors_headers(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw = _valid_file(folder)
        (folder / "model.safetensors").write_bytes(data.draw(header_mutation(raw)))
        _read_everything(folder / "model.safetensors")
        _read_everything(folder)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    weight_map=st.one_of(
        json_values,
        st.dictionaries(
            st.sampled_from(["a.weight", "b.weight", "c.bias", "d.weight"]),
            st.sampled_from(
                ["model.safetensors", "../model.safetensors", "/etc/passwd", "", ".", "missing.safetensors"]
            )
            | json_values,
            max_size=4,
        ),
    ),
    wrap=st.booleans(),
    garbage=st.booleans(),
)
def test_mutated_index_files(weight_map: object, wrap: bool, garbage: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        _valid_file(folder)
        index = folder / "model.safetensors.index.json"
        text = json.dumps({"metadata": {}, "weight_map": weight_map} if wrap else weight_map)
        index.write_text(text[: len(text) // 2] if garbage else text)
        _read_everything(folder)
        _read_everything(index)
