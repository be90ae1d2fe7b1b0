"""Which quantization a checkpoint uses, and the FP8 layouts loratool reads and writes exactly.

Read from config.json's ``quantization_config`` and the tensors' names, dtypes and shapes (headers
only): nothing here reads tensor data.
"""

from __future__ import annotations

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
_SCALE_DTYPES = ("F32", "BF16", "F16", "F64")
_SCALES = ("weight_scale_inv", "weight_scale")  # multiply the FP8 weight
_ACTIVATION_SCALES = ("input_scale", "output_scale", "input_scale_ub", "k_scale", "v_scale")


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
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    method = str(qc.get("quant_method") or "")
    if not method and found.method.startswith("fp8"):
        _refuse(found, "config.json has no quantization_config saying how its FP8 scales apply")
    if method not in _FP8_METHODS or (method == "compressed-tensors" and not _float8_groups(qc)):
        _refuse(found, "only FP8 (block-scaled, compressed-tensors float, FBGEMM) is supported")
    block = _config_block(qc)
    weights = {}
    for name, (shape, dtype) in tensors.items():
        if not dtype.startswith("F8_"):
            continue
        if name.rsplit(".", 1)[-1] in (*_SCALES, *_ACTIVATION_SCALES):
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
    companions = {n for n in tensors if n.rsplit(".", 1)[-1] in (*_SCALES, *_ACTIVATION_SCALES)}
    return Fp8Layout(method, weights, companions)


def _float8_groups(qc: Mapping[str, Any]) -> bool:
    """compressed-tensors: float-quantized 8-bit weights in every config group."""
    groups = qc.get("config_groups") or {}
    if qc.get("format") not in ("float-quantized", "naive-quantized") or not groups:
        return False
    specs = [g.get("weights") or {} for g in groups.values() if isinstance(g, Mapping)]
    return all(s.get("type") == "float" and s.get("num_bits") == 8 for s in specs)


def _config_block(qc: Mapping[str, Any]) -> tuple[int, int] | None:
    sizes = [qc.get("weight_block_size")]
    sizes += [(g.get("weights") or {}).get("block_structure") for g in (qc.get("config_groups") or {}).values()]
    for size in sizes:
        if isinstance(size, (list, tuple)) and len(size) == 2:
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


def _malformed(why: str) -> NoReturn:
    """A checkpoint that claims a layout loratool reads but breaks it: the file's fault, not the format's."""
    raise UnsupportedCheckpointError(
        f"the FP8 checkpoint is malformed: {why}",
        fix="re-download it, or re-export it with its producer's quantizer; loratool will not guess what it means",
    )


def _refuse(found: Quantization, why: str) -> NoReturn:
    raise UnsupportedCheckpointError(
        f"the checkpoint is quantized: {found}; {why}",
        fix="merge into (or extract from) the unquantized checkpoint, then quantize the result",
    )
