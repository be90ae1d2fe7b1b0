"""Property test: whatever is done to a safetensors header or an index file, loratool answers with its
own file error (or reads a file that is still valid), never with another exception."""

from __future__ import annotations

import json
import re
import shutil
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
    kind = draw(st.sampled_from(["bytes", "length", "truncate", "field", "entry", "layout", "tail", "constant"]))
    if kind == "bytes":  # random bytes over the header
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, 8 + n - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "tail":  # bytes past the data, or the data cut short
        return raw + bytes(draw(st.integers(1, 8))) if draw(st.booleans()) else raw[: -draw(st.integers(1, 8))]
    if kind == "constant":  # a JSON number spelled as Python's json writes what JSON has no word for
        text = raw[8 : 8 + n].decode()
        number = draw(st.sampled_from(sorted(set(re.findall(r"\d+", text)))))
        body = text.replace(number, draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])), 1).encode()
        return struct.pack("<Q", len(body)) + body + raw[8 + n :]
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    if kind == "layout":  # values of the right types that may not fit: other dtypes, shapes, offsets
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(
            st.sampled_from(["F32", "F16", "BF16", "F4", "F6_E2M3", "U8", "C64", "F8_E4M3FNUZ", "XX"])
            if field == "dtype"
            else st.lists(st.integers(0, 13), max_size=3)
            if field == "shape"
            else st.lists(st.integers(0, 80), min_size=2, max_size=2)
        )
    elif kind == "field":
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


def _listing(path: Path, headers_only: bool) -> object:
    """What a checkpoint lists (tensors in order, their shapes, dtypes and files, the headers' metadata),
    or the kind of loratool error that refused it."""
    try:
        with open_checkpoint(path, headers_only=headers_only) as ck:
            return [(i.name, i.shape, i.dtype, i.file) for i in ck.infos()], ck.metadata
    except LoraToolError as e:
        return type(e).__name__


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_headers_are_checked_as_safetensors_checks_them(data: st.DataObject) -> None:
    """inspect lists a checkpoint from its headers, checked by loratool (safetensors would import torch to
    open it): whatever is done to a header, that listing refuses exactly what safe_open refuses, and
    lists what it lists."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw = _valid_file(folder)
        (folder / "model.safetensors").write_bytes(data.draw(header_mutation(raw)))
        assert _listing(folder, headers_only=True) == _listing(folder, headers_only=False)


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


WRONG_TYPES = [None, "x", -1, 1.5, True, [1, "a"], {"a": 1}, float("nan")]
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_config_fields_of_any_type(data: st.DataObject) -> None:
    """Any field of an adapter's adapter_config.json, or of a base's config.json (down to its
    quantization_config's config groups' weights), set to a value of another JSON type: every reader and
    the commands on the tiny fixtures (milliseconds each) answer with loratool's own error or read on, and
    validate reports rather than raises (a sweep of the fixtures' fields through every command found
    eleven fields read before validation looked, and config.json's head and layer counts in GGUF's)."""
    import loratool
    from loratool.formats import load_adapter
    from loratool.validation import validate_adapter

    adapter_config = json.loads((FIXTURES / "llama-peft-adapter" / "adapter_config.json").read_text())
    quant = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16,
                                           "symmetric": True}}}}  # fmt: skip
    which = data.draw(st.sampled_from(["adapter", "base"]))
    base_config = json.loads((FIXTURES / "llama-base" / "config.json").read_text())
    base_config = {**base_config, "quantization_config": quant, "text_config": {"model_type": "llama"}}
    config = adapter_config if which == "adapter" else base_config
    paths = list(_paths(config))
    path = data.draw(st.sampled_from(paths))
    value = data.draw(st.sampled_from(WRONG_TYPES))
    holder = config
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        if which == "adapter":
            folder = Path(tmp) / "adapter"
            shutil.copytree(FIXTURES / "llama-peft-adapter", folder)
            (folder / "adapter_config.json").write_text(json.dumps(config))
            out = Path(tmp) / "out"
            for read in (load_adapter, inspect,
                         lambda a: loratool.merge(FIXTURES / "llama-base", [a], output=out, force=True),
                         lambda a: loratool.resize(a, output=out, rank=1, force=True),
                         lambda a: loratool.convert(a, to="gguf", base=FIXTURES / "llama-base", output=out,
                                                    force=True)):  # fmt: skip
                try:
                    read(folder)
                except LoraToolError:
                    pass
            validate_adapter(folder)
        else:
            folder = Path(tmp) / "base"
            shutil.copytree(FIXTURES / "llama-base", folder)
            (folder / "config.json").write_text(json.dumps(config))
            out, adapter = Path(tmp) / "out", FIXTURES / "llama-peft-adapter"
            for read in (_layouts, inspect, header_shapes,
                         lambda b: loratool.merge(b, [adapter], output=out, force=True, min_kept=0.0),
                         lambda b: loratool.extract(b, FIXTURES / "llama-ft", output=out, rank=2, force=True),
                         lambda b: loratool.convert(adapter, to="gguf", base=b, output=out, force=True),
                         lambda b: loratool.validate(adapter, base=b)):  # fmt: skip
                try:
                    read(folder)
                except LoraToolError:
                    pass


def _layouts(path: Path) -> None:
    with open_checkpoint(path) as ck:
        ck.packed_layout()
        ck.fp8_layout()


def _paths(config: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON object, into nested objects."""
    out = []
    for key, value in config.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += _paths(value, (*prefix, key))
    return out
