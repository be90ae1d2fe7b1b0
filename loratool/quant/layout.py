"""Which quantization a checkpoint uses, and the FP8 layouts loratool reads and writes exactly.

Read from config.json's ``quantization_config`` and the tensors' names, dtypes and shapes (headers
only): nothing here reads tensor data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from ..errors import UnsupportedCheckpointError

_FLOAT_LOW_BITS = ("F8_", "F6_", "F4")  # safetensors names of float8/6/4 dtypes
_SCALE_COMPANIONS = {
    "weight_scale_inv": "fp8 (block-scaled)", "weight_scale": "fp8 (scaled)", "input_scale": "fp8 (scaled)",
}  # fmt: skip
_BNB = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclass(frozen=True)
class Quantization:
    """What says a checkpoint is quantized: the method and the first piece of evidence."""

    method: str  # quant_method from config.json, else what the tensors look like
    evidence: str

    def __str__(self) -> str:
        return f"{self.method} ({self.evidence})"


def detect_quantization(config: Mapping[str, Any], tensors: Iterable[tuple[str, str]]) -> Quantization | None:
    """A quantized checkpoint's method, from config.json's ``quantization_config`` or the tensors.

    ``tensors`` are (name, safetensors dtype) pairs, from headers. Evidence in the tensors: float8
    (or narrower) dtypes; FP8 scale companions (``weight_scale_inv``, ``weight_scale``,
    ``input_scale``); packed integers (``qweight`` with ``qzeros``/``scales``/``g_idx``);
    bitsandbytes state (``absmax``, ``quant_map``, ``quant_state``); MXFP4 ``_blocks``/``_scales``.
    """
    qc = config.get("quantization_config") or config.get("compression_config")
    if isinstance(qc, Mapping) and qc:
        method = str(qc.get("quant_method") or qc.get("format") or "unknown")
        return Quantization(method, "config.json quantization_config")
    names = [(n, d) for n, d in tensors]
    leaves = {n.rsplit(".", 1)[-1] for n, _ in names}
    for name, _ in names:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _SCALE_COMPANIONS:
            return Quantization(_SCALE_COMPANIONS[leaf], f"tensor '{name}'")
        if leaf == "qweight":
            return Quantization("gptq/awq (packed integers)", f"tensor '{name}'")
        if leaf in _BNB or "quant_state" in leaf:
            return Quantization("bitsandbytes", f"tensor '{name}'")
        if leaf.endswith("_blocks") and leaf[: -len("_blocks")] + "_scales" in leaves:
            return Quantization("mxfp4", f"tensor '{name}'")
    for name, dtype in names:  # after the companions, which name the layout more precisely
        if dtype.startswith(_FLOAT_LOW_BITS):
            return Quantization("fp8" if dtype.startswith("F8_") else "low-bit float", f"tensor '{name}' is {dtype}")
    return None


@dataclass(frozen=True)
class Fp8Scheme:
    """How an FP8 weight is scaled: one scale (``tensor``), one per output row (``channel``), or
    one per ``block`` = (rows, cols) tile, the last tiles ragged where the shape does not divide.
    The real weight is ``q * scale`` (DeepSeek's ``weight_scale_inv``, compressed-tensors' and
    FBGEMM's ``weight_scale`` all multiply)."""

    kind: str  # "tensor", "channel" or "block"
    block: tuple[int, int] | None = None


@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 weight's scale tensor and how it applies."""

    scale_key: str
    scheme: Fp8Scheme


@dataclass
class Fp8Layout:
    """An FP8 checkpoint loratool can dequantize and requantize exactly as it was laid out."""

    method: str  # config.json's quant_method
    weights: dict[str, Fp8Weight]  # FP8 weight key -> its scale
    companions: set[str]  # every scale tensor (weights' and activations'): kept, or dropped when dequantizing

    @property
    def block(self) -> tuple[int, int] | None:
        return next((w.scheme.block for w in self.weights.values() if w.scheme.block), None)

    def describe(self) -> dict[str, Any]:
        kinds = sorted({w.scheme.kind for w in self.weights.values()})
        return {"method": self.method, "schemes": kinds, "block": self.block, "quantized_weights": sorted(self.weights)}


_FP8_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors")
_SUPPORTED = (
    "loratool reads FP8 (block-scaled, compressed-tensors float, FBGEMM), MXFP4 (gpt-oss), NVFP4 (ModelOpt, "
    "compressed-tensors) and compressed-tensors pack-quantized INT4/INT8"
)
_SCALE_DTYPES = ("F32", "BF16", "F16", "F64")
_SCALES = ("weight_scale_inv", "weight_scale")  # multiply the FP8 weight
ACTIVATION_SCALES = ("input_scale", "output_scale", "input_scale_ub", "k_scale", "v_scale")


def fp8_layout(config: Mapping[str, Any], tensors: Mapping[str, tuple[tuple[int, ...], str]]) -> Fp8Layout | None:
    """The FP8 layout of a checkpoint (None when it is not quantized).

    ``tensors`` maps names to (shape, safetensors dtype), from headers. Supported: block-scaled FP8
    (``quant_method: fp8`` with ``weight_block_size``, DeepSeek-V3 and Qwen3 FP8), compressed-tensors
    ``float-quantized`` 8-bit weights (per tensor, channel or block), FBGEMM FP8 (per channel).

    Raises:
        UnsupportedCheckpointError: any other quantization, or an FP8 layout this cannot read exactly.
    """
    found = detect_quantization(config, ((n, d) for n, (_, d) in tensors.items()))
    if found is None:
        return None
    qc = _quantization_section(config)
    method = str(qc.get("quant_method") or "")
    packed = packed_method(config, found)
    skip: Mapping[str, str] = {}
    if packed == "mixed-compressed" and any(_float8(spec) for spec in _group_specs(qc)):
        layout = packed_layout(config, tensors)  # FP8 groups beside packed ones, whose tensors are not FP8's
        skip = layout.companions if layout is not None else {}
    elif packed is not None:  # a packed low-bit layout alone: packed_layout reads it
        _refuse_stray_fp8(tensors)
        return None
    elif not method and found.method.startswith("fp8"):
        _refuse(found, "config.json has no quantization_config saying how its FP8 scales apply")
    elif method not in _FP8_METHODS or (method == "compressed-tensors" and not _float8_groups(qc)):
        _refuse(found, _SUPPORTED)
    block = _config_block(qc)
    weights = {}
    for name, (shape, dtype) in tensors.items():
        if name in skip:
            continue
        if not dtype.startswith("F8_"):
            unpaired = next((name[: -len("weight")] + s for s in _SCALES if name.endswith(".weight")
                             and name[: -len("weight")] + s in tensors), None)  # fmt: skip
            if unpaired is not None:  # read as it is stored, its scale would be dropped unread
                _malformed(f"'{name}' is {dtype}, not FP8, but its scale '{unpaired}' is stored beside it")
            continue
        if name.rsplit(".", 1)[-1] in (*_SCALES, *ACTIVATION_SCALES):
            _malformed(f"the scale tensor '{name}' is {dtype}; FP8 scales are float32, bfloat16 or float16")
        if len(shape) != 2:
            _refuse(found, f"the FP8 tensor '{name}' is {len(shape)}-D; only 2-D weights are supported")
        stem = name[: -len("weight")] if name.endswith("weight") else name + "_"
        scale_key = next((stem + s for s in _SCALES if stem + s in tensors), None)
        if scale_key is None:
            _refuse(found, f"the FP8 tensor '{name}' has no {stem}weight_scale(_inv) beside it")
        scale_dtype = tensors[scale_key][1]
        if scale_dtype not in _SCALE_DTYPES:
            _malformed(f"the scale tensor '{scale_key}' is {scale_dtype}; FP8 scales are float32, bfloat16 or float16 "
                       "(an integer scale would be cast and zero whole blocks)")  # fmt: skip
        weights[name] = Fp8Weight(scale_key, _scheme(name, scale_key, shape, tensors[scale_key][0], block))
    companions = {n for n in tensors if n.rsplit(".", 1)[-1] in (*_SCALES, *ACTIVATION_SCALES) and n not in skip}
    return Fp8Layout(method, weights, companions)


def _refuse_stray_fp8(tensors: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """A packed checkpoint whose config describes no FP8 weights may hold no float8 weight (its float8
    tensors are NVFP4's block scales, ``*.weight_scale``): read as plain numbers, one would lose its scale."""
    stray = next((n for n, (_, dtype) in tensors.items() if dtype.startswith("F8_") and n.endswith(".weight")), None)
    if stray is not None:
        _malformed(f"'{stray}' is {tensors[stray][1]}, but no config group describes FP8 weights", "quantized")


# compressed-tensors: the fields of a config group's weights spec loratool reads, and the JSON type of each
_SPEC_FIELDS: dict[str, type] = {
    "type": str, "num_bits": int, "strategy": str, "group_size": int, "symmetric": bool, "block_structure": list,
}  # fmt: skip


def _quantization_section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """config.json's quantization_config (or compression_config), checked as :func:`_require_groups` checks it."""
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    if not isinstance(qc, Mapping):
        _malformed(f"its quantization_config is a JSON {type(qc).__name__}, not an object", "quantized")
    _require_groups(qc)
    return qc


def _require_groups(qc: Mapping[str, Any]) -> None:
    """A quantization config's ``config_groups`` as the layouts read them: an object of objects, each
    ``weights`` an object whose fields have their JSON types (or are null); else the checkpoint is
    malformed, said by field, before any of them is read."""
    groups = qc.get("config_groups")
    if groups is None:
        return
    if not isinstance(groups, Mapping):
        _malformed(f"its config_groups is a JSON {type(groups).__name__}, not an object", "compressed-tensors")
    for name, group in groups.items():
        if not isinstance(group, Mapping):
            _malformed(f"its config group {name!r} is a JSON {type(group).__name__}, not an object",
                       "compressed-tensors")  # fmt: skip
        spec = group.get("weights")
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            _malformed(f"the weights of config group {name!r} are a JSON {type(spec).__name__}, not an object",
                       "compressed-tensors")  # fmt: skip
        for field, kind in _SPEC_FIELDS.items():
            value = spec.get(field)
            if value is not None and not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
                _malformed(f"config group {name!r} has weights.{field} = {json.dumps(value)[:40]}",
                           "compressed-tensors")  # fmt: skip


def _float8_groups(qc: Mapping[str, Any]) -> bool:
    """compressed-tensors: float-quantized 8-bit weights in every config group."""
    if qc.get("format") not in ("float-quantized", "naive-quantized") or not qc.get("config_groups"):
        return False
    return all(_float8(spec) for spec in _group_specs(qc))


def _group_specs(qc: Mapping[str, Any], fmt: str | None = None) -> list[Mapping[str, Any]]:
    """compressed-tensors: the weights' spec of each config group (of one ``format`` in a mixed checkpoint)."""
    groups = qc.get("config_groups") or {}
    chosen = [g for g in groups.values() if isinstance(g, Mapping) and (fmt is None or g.get("format") == fmt)]
    return [g.get("weights") or {} for g in chosen]


def _float8(spec: Mapping[str, Any]) -> bool:
    return spec.get("type") == "float" and spec.get("num_bits") == 8


def _config_block(qc: Mapping[str, Any]) -> tuple[int, int] | None:
    sizes = [qc.get("weight_block_size")]
    sizes += [(g.get("weights") or {}).get("block_structure") for g in (qc.get("config_groups") or {}).values()]
    for size in sizes:
        if isinstance(size, (list, tuple)) and len(size) == 2:
            if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
                _malformed(f"its config says blocks of {list(size)}: a block is two positive whole numbers")
            return int(size[0]), int(size[1])
    return None


def _scheme(
    name: str, scale_key: str, shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int] | None
) -> Fp8Scheme:
    """Which scheme a scale's shape says, checked against the weight's shape and the config's block."""
    numel = 1
    for d in scale_shape:
        numel *= d
    out_f, in_f = shape
    if numel == 1:
        return Fp8Scheme("tensor")
    if tuple(scale_shape) in ((out_f, 1), (out_f,)):
        return Fp8Scheme("channel")
    if block is not None and tuple(scale_shape) == (-(-out_f // block[0]), -(-in_f // block[1])):
        return Fp8Scheme("block", block)
    blocks = block or "the size config.json gives"
    _malformed(f"the scale '{scale_key}' of '{name}' has shape {list(scale_shape)}, which fits no FP8 scheme for "
               f"a {list(shape)} weight (per tensor, per row, or blocks of {blocks})")  # fmt: skip


def _malformed(why: str, what: str = "FP8") -> NoReturn:
    """A checkpoint that claims a layout loratool reads but breaks it: the file's fault, not the format's."""
    raise UnsupportedCheckpointError(
        f"the {what} checkpoint is malformed: {why}",
        fix="re-download it, or re-export it with its producer's quantizer; loratool will not guess what it means",
    )


# -- packed low-bit layouts  -------------------------------------------------------------------------
READ_ONLY = ("gptq", "awq")  # their quantizers need calibration data: read, never requantized


@dataclass(frozen=True)
class PackedScheme:
    """How one weight's codes and scales are laid out."""

    format: str  # one of FORMATS
    group: int  # columns per scale (a whole row: per channel)
    bits: int = 4
    symmetric: bool = True
    divide: bool = False  # NVFP4: the per-tensor scale divides (compressed-tensors) rather than multiplies
    v1: bool = True  # GPTQ: the v1 checkpoint format stores zero points less one

    def describe(self) -> str:
        if self.format in READ_ONLY:
            return f"{self.format} int{self.bits} (groups of {self.group}; read only)"
        if self.format == "int":
            kind = "symmetric" if self.symmetric else "asymmetric"
            return f"int{self.bits} pack-quantized ({kind}, groups of {self.group})"
        return f"{self.format} (groups of {self.group})"


@dataclass(frozen=True)
class PackedWeight:
    """One packed weight: its logical name and shape, its stored tensors by role (``codes``,
    ``scale``, and where the format has them ``global``, ``zero``, ``shape``, ``g_idx``), and the
    activation scales beside it (``extra``: kept in place, dropped when dequantizing)."""

    name: str
    shape: tuple[int, ...]
    parts: dict[str, str]
    scheme: PackedScheme
    transposed: bool = False
    extra: tuple[str, ...] = ()
    method: str = ""  # config.json's quant_method (or ModelOpt's quant_algo)

    @property
    def stored(self) -> list[str]:
        """Every tensor this weight is stored as, its activation scales included."""
        return [*self.parts.values(), *self.extra]

    @property
    def experts(self) -> int | None:
        """E for a 3-D experts parameter (handled one expert at a time), else None."""
        return self.shape[0] if len(self.shape) == 3 else None

    @property
    def rows_cols(self) -> tuple[int, int]:
        """One (expert's) weight in the stored orientation."""
        r, c = self.shape[-2:]
        return (c, r) if self.transposed else (r, c)

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.name, "shape": list(self.shape), "scheme": self.scheme.describe(),
                "stored_as": sorted(self.stored)}  # fmt: skip


@dataclass
class PackedLayout:
    """The packed low-bit weights of a checkpoint, by logical name (as transformers' model holds
    them once dequantized), and every stored tensor that belongs to one of them."""

    method: str
    weights: dict[str, PackedWeight]
    companions: dict[str, str]  # stored tensor -> the logical weight it belongs to

    def describe(self) -> dict[str, Any]:
        schemes = sorted({w.scheme.describe() for w in self.weights.values()})
        return {"method": self.method, "schemes": schemes, "quantized_weights": sorted(self.weights),
                "packed_weights": [self.weights[k].to_json() for k in sorted(self.weights)]}  # fmt: skip


def logical_shapes(
    config: Mapping[str, Any], tensors: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape as the model holds it: packed low-bit weights under their logical names and
    shapes, their stored parts gone (headers only, no torch: ``registry ls --base`` answers at once)."""
    layout = packed_layout(config, tensors)
    if layout is None:
        return {n: shape for n, (shape, _) in tensors.items()}
    out: dict[str, tuple[int, ...]] = {}
    for name, (shape, _) in tensors.items():
        owner = layout.companions.get(name)
        if owner is None:
            out[name] = shape
        else:
            out.setdefault(owner, layout.weights[owner].shape)
    return out


def packed_method(config: Mapping[str, Any], found: Quantization | None = None) -> str | None:
    """``mxfp4``, ``nvfp4-modelopt``, ``nvfp4-compressed``, ``int-compressed``, ``mixed-compressed``
    (compressed-tensors groups of several formats), ``gptq`` or ``awq``: the packed layouts loratool
    reads, from config.json (its ``quantization_config``; ModelOpt's ``hf_quant_config.json`` is
    passed in as ``config["hf_quant_config"]``), else None."""
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    method = str(qc.get("quant_method") or "") if isinstance(qc, Mapping) else ""
    modelopt = config.get("hf_quant_config")
    algo = str(qc.get("quant_algo") or "") if isinstance(qc, Mapping) else ""
    if isinstance(modelopt, Mapping) and isinstance(modelopt.get("quantization"), Mapping):
        algo = algo or str(modelopt["quantization"].get("quant_algo") or "")
        method = method or "modelopt"
    if method == "mxfp4" or (not method and found is not None and found.method == "mxfp4"):
        return "mxfp4"
    if method == "modelopt" and algo.upper() == "NVFP4":
        return "nvfp4-modelopt"
    if method in ("gptq", "awq"):
        return method
    if method == "compressed-tensors" and isinstance(qc, Mapping):
        if qc.get("format") == "nvfp4-pack-quantized":
            return "nvfp4-compressed"
        if qc.get("format") == "pack-quantized":
            return "int-compressed"
        if qc.get("format") == "mixed-precision":
            return "mixed-compressed"
    return None


def packed_layout(config: Mapping[str, Any], tensors: Mapping[str, tuple[tuple[int, ...], str]]) -> PackedLayout | None:
    """The packed weights of a checkpoint in one of the layouts :func:`packed_method` names, read from
    headers (``tensors``: name -> (shape, safetensors dtype)); None for any other checkpoint.

    Raises:
        UnsupportedCheckpointError: the config names such a layout but a weight breaks it.
    """
    found = detect_quantization(config, ((n, d) for n, (_, d) in tensors.items()))
    method = packed_method(config, found) if found is not None else None
    if method is None:
        return None
    assert found is not None
    qc = _quantization_section(config)
    if method == "mxfp4":
        weights = _mxfp4_weights(tensors)
    elif method == "nvfp4-modelopt":
        _require_nvfp4_config(_modelopt_spec(config, qc), "its ModelOpt quantization config")
        weights = _nvfp4_weights(tensors, "weight", "weight_scale", "weight_scale_2", divide=False)
    elif method == "nvfp4-compressed":
        for spec in _group_specs(qc):
            _require_nvfp4_config(spec, "a config group's weights spec")
        weights = _nvfp4_weights(tensors, "weight_packed", "weight_scale", "weight_global_scale", divide=True)
    elif method in ("gptq", "awq"):
        weights = _gptq_awq_weights(tensors, qc, method)
    elif method == "mixed-compressed":
        weights = _mixed_weights(tensors, qc, found)
        if not weights:
            return None  # FP8 groups alone: fp8_layout reads them
    else:
        weights = _int_weights(tensors, qc, found)
    if not weights:
        _malformed(f"config.json says {method}, but no tensor is stored that way", method)
    for w in weights.values():  # which of the two the model holds would be a guess
        if w.name in tensors and w.name not in w.parts.values():
            _malformed(f"'{w.name}' is stored twice: as itself, and packed as '{w.parts['codes']}'", method)
    named = {"mxfp4": "mxfp4", "nvfp4-modelopt": "modelopt (NVFP4)", "gptq": "gptq", "awq": "awq"}.get(
        method, "compressed-tensors")  # fmt: skip
    weights = {w.name: PackedWeight(**{**w.__dict__, "method": named}) for w in weights.values()}
    companions = {t: w.name for w in weights.values() for t in w.stored}
    return PackedLayout(named, weights, companions)


def _mxfp4_weights(tensors: Mapping[str, tuple[tuple[int, ...], str]]) -> dict[str, PackedWeight]:
    """gpt-oss: ``P_blocks`` (E, out, in / 32, 16) and ``P_scales`` (E, out, in / 32), uint8; the model
    holds ``P`` as (E, in, out)."""
    out = {}
    for name, (shape, dtype) in tensors.items():
        if not name.endswith("_blocks"):
            continue
        stem = name[: -len("_blocks")]
        scales = tensors.get(stem + "_scales")
        if scales is None:
            _malformed(f"'{name}' has no '{stem}_scales' beside it", "mxfp4")
        if dtype != "U8" or scales[1] != "U8":
            _malformed(f"'{name}' is {dtype} and its scales {scales[1]}; MXFP4 stores both as uint8", "mxfp4")
        if len(shape) != 4 or shape[-1] != 16 or tuple(scales[0]) != tuple(shape[:-1]):
            _malformed(f"'{name}' has shape {list(shape)} and its scales {list(scales[0])}; gpt-oss stores experts "
                       "as (E, out, in/32, 16) with scales (E, out, in/32): other MXFP4 tensors are not supported",
                       "mxfp4")  # fmt: skip
        e, rows, groups, _ = shape
        scheme = PackedScheme("mxfp4", 32)
        out[stem] = PackedWeight(stem, (e, groups * 32, rows), {"codes": name, "scale": stem + "_scales"}, scheme,
                                 transposed=True)  # fmt: skip
    return out


# NVFP4 as its definition fixes it (E2M1 values, one E4M3 scale per 16 and a tensor scale, symmetric), in the
# fields a config may state it by (each field's values that say so: W4A16 NVFP4 configs are seen with strategy
# "group" beside compressed-tensors' "tensor_group"); a config that states otherwise contradicts its tensors' layout
_NVFP4_FIELDS: dict[str, tuple[Any, ...]] = {
    "num_bits": (4,), "type": ("float",), "group_size": (16,), "strategy": ("tensor_group", "group"),
    "symmetric": (True,),
}  # fmt: skip


def _modelopt_spec(config: Mapping[str, Any], qc: Mapping[str, Any]) -> Mapping[str, Any]:
    """ModelOpt's NVFP4 fields: config.json's quantization_config, else hf_quant_config.json's quantization."""
    modelopt = config.get("hf_quant_config")
    section = modelopt.get("quantization") if isinstance(modelopt, Mapping) else None
    group = qc.get("group_size", section.get("group_size") if isinstance(section, Mapping) else None)
    return {"group_size": group}


def _require_nvfp4_config(spec: Mapping[str, Any], where: str) -> None:
    """A config's statement of NVFP4 (``spec``: a compressed-tensors weights spec, or ModelOpt's fields)
    that agrees with NVFP4's definition wherever it states a field; else the checkpoint is malformed
    (which of the two to believe is a guess: the tensors are read as NVFP4's definition lays them out)."""
    for field, values in _NVFP4_FIELDS.items():
        stated = spec.get(field)
        if stated is not None and not any(type(stated) is type(v) and stated == v for v in values):
            _malformed(f"{where} gives {field} = {json.dumps(stated)[:40]}, but NVFP4 has {field} = "
                       f"{' or '.join(json.dumps(v) for v in values)} by definition", "nvfp4")  # fmt: skip


def _nvfp4_weights(tensors: Mapping[str, tuple[tuple[int, ...], str]], codes: str, block: str, second: str, *,
                   divide: bool) -> dict[str, PackedWeight]:  # fmt: skip
    """NVFP4: uint8 codes (out, in / 2), e4m3 block scales (out, in / 16), a float32 tensor scale."""
    out = {}
    for name, (shape, dtype) in tensors.items():
        if not name.endswith("." + codes) or dtype != "U8":
            continue
        stem = name[: -len(codes)]
        parts = {"codes": name, "scale": stem + block, "global": stem + second}
        missing = [t for t in parts.values() if t not in tensors]
        if missing:
            _malformed(f"the NVFP4 weight '{name}' has no '{missing[0]}' beside it", "nvfp4")
        if len(shape) != 2:
            _malformed(f"the NVFP4 weight '{name}' is {len(shape)}-D; only 2-D weights are supported", "nvfp4")
        rows, cols = shape[0], shape[1] * 2
        (s_shape, s_dtype), (g_shape, g_dtype) = tensors[parts["scale"]], tensors[parts["global"]]
        if s_dtype != "F8_E4M3" or tuple(s_shape) != (rows, -(-cols // 16)):
            _malformed(f"the block scale '{parts['scale']}' is {s_dtype} {list(s_shape)}; NVFP4 needs float8_e4m3fn "
                       f"of shape {[rows, -(-cols // 16)]} for the weight '{name}'", "nvfp4")  # fmt: skip
        if g_dtype not in ("F32", "BF16", "F16") or _numel(g_shape) != 1:
            _malformed(f"the tensor scale '{parts['global']}' is {g_dtype} {list(g_shape)}; NVFP4 needs one float",
                       "nvfp4")  # fmt: skip
        extra = tuple(stem + a for a in ("input_scale", "input_global_scale") if stem + a in tensors)
        scheme = PackedScheme("nvfp4", 16, divide=divide)
        out[stem + "weight"] = PackedWeight(stem + "weight", (rows, cols), parts, scheme, extra=extra)
    return out


def _int_weights(tensors: Mapping[str, tuple[tuple[int, ...], str]], qc: Mapping[str, Any],
                 found: Quantization) -> dict[str, PackedWeight]:  # fmt: skip
    """compressed-tensors pack-quantized: int32 ``weight_packed``, ``weight_scale``, ``weight_shape``,
    ``weight_zero_point`` when asymmetric, ``weight_g_idx`` with activation ordering."""
    specs = [(g.get("weights") or {}) for g in (qc.get("config_groups") or {}).values() if isinstance(g, Mapping)]
    kinds = {(s.get("type"), s.get("num_bits"), s.get("strategy"), s.get("group_size"), bool(s.get("symmetric", True)))
             for s in specs}  # fmt: skip
    if len(kinds) != 1:
        _refuse(found, f"its config_groups describe {len(kinds)} weight schemes; loratool reads pack-quantized "
                       "checkpoints with one")  # fmt: skip
    kind, bits, strategy, group_size, symmetric = next(iter(kinds))
    if kind != "int" or bits not in (4, 8) or strategy not in ("group", "channel"):
        _refuse(found, f"its weights are {kind} {bits}-bit by {strategy}; loratool reads int 4- and 8-bit weights "
                       "grouped by group or channel")  # fmt: skip
    out = {}
    for name, (shape, dtype) in tensors.items():
        if not name.endswith(".weight_packed"):
            continue
        stem = name[: -len("packed")]
        parts = {"codes": name, "scale": stem + "scale", "shape": stem + "shape"}
        if not symmetric:
            parts["zero"] = stem + "zero_point"
        elif stem + "zero_point" in tensors:  # read as symmetric, its zero points would be dropped unread
            _malformed(f"its config says symmetric, but '{stem}zero_point' is stored beside '{name}'",
                       "pack-quantized")  # fmt: skip
        if stem + "g_idx" in tensors:
            parts["g_idx"] = stem + "g_idx"
        missing = [t for t in parts.values() if t not in tensors]
        if missing:
            _malformed(f"the pack-quantized weight '{name}' has no '{missing[0]}' beside it", "pack-quantized")
        if dtype != "I32" or len(shape) != 2:
            _malformed(f"'{name}' is {dtype} {list(shape)}; pack-quantized weights are 2-D int32", "pack-quantized")
        rows, cols = shape[0], shape[1] * 32 // int(bits)
        size = int(group_size or 0)  # an int or null (_require_groups): 0 or less, a row a group
        group = cols if strategy == "channel" or size <= 0 else min(size, cols)  # a group wider than a row: the row
        s_shape, s_dtype = tensors[parts["scale"]]
        if s_dtype not in ("F32", "BF16", "F16") or tuple(s_shape) != (rows, -(-cols // group)):
            _malformed(f"the scale '{parts['scale']}' is {s_dtype} {list(s_shape)}; expected a float tensor of shape "
                       f"{[rows, -(-cols // group)]} for the weight '{name}'", "pack-quantized")  # fmt: skip
        z_shape, z_dtype = tensors[parts["zero"]] if not symmetric else ((), "I32")
        z_want = (-(-rows * int(bits) // 32), s_shape[1])  # packed along the rows, as int32 words
        if not symmetric and (z_dtype != "I32" or tuple(z_shape) != z_want):
            _malformed(f"the zero points '{parts['zero']}' are {z_dtype} {list(z_shape)}, not int32 {list(z_want)}",
                       "pack-quantized")  # fmt: skip
        _require_integers(tensors, parts, ("shape", "g_idx"), "pack-quantized")
        extra = tuple(stem[: -len("weight_")] + a for a in ("input_global_scale", "input_scale")
                      if stem[: -len("weight_")] + a in tensors)  # fmt: skip
        scheme = PackedScheme("int", group, int(bits), symmetric)
        out[stem[:-1]] = PackedWeight(stem[:-1], (rows, cols), parts, scheme, extra=extra)  # "X.weight"
    return out


_MIXED_FORMATS = ("nvfp4-pack-quantized", "pack-quantized", "float-quantized", "naive-quantized")


def _mixed_weights(tensors: Mapping[str, tuple[tuple[int, ...], str]], qc: Mapping[str, Any],
                   found: Quantization) -> dict[str, PackedWeight]:  # fmt: skip
    """compressed-tensors ``mixed-precision``: each config group names its format; the packed ones here
    (NVFP4, INT), the FP8 ones (float-quantized) for :func:`fp8_layout`."""
    formats = {str(g.get("format")) for g in (qc.get("config_groups") or {}).values() if isinstance(g, Mapping)}
    unknown = sorted(formats - set(_MIXED_FORMATS))
    if unknown:
        _refuse(found, f"a config group is {unknown[0]!r}; loratool reads mixed checkpoints of "
                       f"{', '.join(_MIXED_FORMATS)} groups")  # fmt: skip
    weights = {}
    if "nvfp4-pack-quantized" in formats:
        for spec in _group_specs(qc, "nvfp4-pack-quantized"):
            _require_nvfp4_config(spec, "an nvfp4-pack-quantized config group's weights spec")
        weights.update(_nvfp4_weights(tensors, "weight_packed", "weight_scale", "weight_global_scale", divide=True))
    if "pack-quantized" in formats:
        int_only = {"config_groups": {str(i): {"weights": spec}
                                      for i, spec in enumerate(_group_specs(qc, "pack-quantized"))}}  # fmt: skip
        weights.update(_int_weights({n: v for n, v in tensors.items() if v[1] == "I32" or "packed" not in n}, int_only,
                                    found))  # fmt: skip
    return weights


def _gptq_awq_weights(tensors: Mapping[str, tuple[tuple[int, ...], str]], qc: Mapping[str, Any],
                      method: str) -> dict[str, PackedWeight]:  # fmt: skip
    """GPTQ: ``qweight`` (in * bits / 32, out), ``qzeros`` (groups, out * bits / 32), ``scales``
    (groups, out), ``g_idx`` (in); AWQ GEMM: ``qweight`` (in, out / 8), ``qzeros`` and ``scales``
    likewise by groups. Read only (dequantized for extract and --dtype)."""
    bits, group_size = qc.get("bits", 4), qc.get("group_size", 128)
    if method == "awq" and (bits != 4 or str(qc.get("version", "gemm")).lower() != "gemm"):
        _malformed(f"AWQ with bits={bits}, version={qc.get('version')!r}: loratool reads AWQ GEMM 4-bit", "AWQ")
    if not isinstance(bits, int) or bits not in (2, 4, 8) or not isinstance(group_size, int):
        _malformed(f"bits={bits!r}, group_size={group_size!r}: loratool reads 2-, 4- and 8-bit GPTQ", method.upper())
    fmt = str(qc.get("checkpoint_format") or "gptq")
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):  # marlin's repacking, say: read as gptq, every code wrong
        _malformed(f"checkpoint_format={fmt!r}: loratool reads GPTQ's gptq and gptq_v2 packing", "GPTQ")
    out = {}
    for name, (shape, dtype) in tensors.items():
        if not name.endswith(".qweight"):
            continue
        stem = name[: -len("qweight")]
        parts = {"codes": name, "zero": stem + "qzeros", "scale": stem + "scales"}
        if stem + "g_idx" in tensors:
            parts["g_idx"] = stem + "g_idx"
        missing = [t for t in parts.values() if t not in tensors]
        if missing:
            _malformed(f"'{name}' has no '{missing[0]}' beside it", method.upper())
        if dtype != "I32" or len(shape) != 2:
            _malformed(
                f"'{name}' is {dtype} {list(shape)}; {method.upper()} packs 2-D weights into int32", method.upper()
            )
        if tensors[parts["zero"]][1] != "I32" or tensors[parts["scale"]][1] not in ("F16", "BF16", "F32"):
            _malformed(f"'{parts['zero']}' is {tensors[parts['zero']][1]} and '{parts['scale']}' "
                       f"{tensors[parts['scale']][1]}; {method.upper()} packs zero points into int32 and stores "
                       "float scales", method.upper())  # fmt: skip
        _require_integers(tensors, parts, ("g_idx",), method.upper())
        pack = 32 // bits
        rows, cols = (shape[1], shape[0] * pack) if method == "gptq" else (shape[1] * pack, shape[0])
        group = cols if group_size <= 0 else min(group_size, cols)  # a group wider than a row: the row
        groups = -(-cols // group) if "g_idx" not in parts else tensors[parts["scale"]][0][0]
        want = {"scale": (groups, rows), "zero": (groups, rows // pack)}
        for role, expected in want.items():
            if tuple(tensors[parts[role]][0]) != expected:
                _malformed(f"'{parts[role]}' has shape {list(tensors[parts[role]][0])}, not {list(expected)} for "
                           f"'{name}' {list(shape)}", method.upper())  # fmt: skip
        scheme = PackedScheme(method, group, bits, symmetric=False, v1=fmt != "gptq_v2")
        out[stem + "weight"] = PackedWeight(stem + "weight", (rows, cols), parts, scheme)
    return out


def _require_integers(tensors: Mapping[str, tuple[tuple[int, ...], str]], parts: Mapping[str, str],
                      roles: tuple[str, ...], what: str) -> None:  # fmt: skip
    """The parts in ``roles`` (where the weight has them: its shape, its columns' groups) stored as
    integers: others would be read as numbers they do not hold."""
    for role in roles:
        if role in parts and not tensors[parts[role]][1].startswith(("I", "U")):
            _malformed(f"'{parts[role]}' is {tensors[parts[role]][1]}; it holds whole numbers, stored as integers",
                       what)  # fmt: skip


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _refuse(found: Quantization, why: str) -> NoReturn:
    if found.method.startswith("gptq") or found.method == "awq":
        why += (" (GPTQ and AWQ quantizers need calibration data to requantize a merged weight, which a checkpoint "
                "does not carry)")  # fmt: skip
    raise UnsupportedCheckpointError(
        f"the checkpoint is quantized: {found}; {why}",
        fix="merge into (or extract from) the unquantized checkpoint, then quantize the result",
    )
