"""Model conventions: what a checkpoint's tensor names and ``config.json`` say about its layers.

The one place that knows which model types store GPT-2 ``Conv1D`` weights, which names are
embeddings, when an output layer is tied to the input embedding, and which PEFT task type a
model has. Quantization and expert layouts belong here too. Nothing here reads files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .adapter import Kind
from .errors import UnsupportedCheckpointError

# transformers model types whose 2-D projection weights are GPT-2 ``Conv1D`` (stored (in, out)).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
EMBEDDING_NAME = re.compile(
    r"(^|\.)(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|embeddings|embedding|tok_embeddings|shared)$"
)
# input embeddings an output layer can be tied to, most specific first
_TOKEN_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings")
OUTPUT_LAYER = "lm_head"


def uses_conv1d(config: Mapping[str, Any], override: bool | None = None) -> bool:
    """Whether the model's 2-D weights are GPT-2 ``Conv1D``: the user's override, else config.json's model_type."""
    return override if override is not None else config.get("model_type") in CONV1D_MODEL_TYPES


def is_embedding(module_path: str) -> bool:
    return EMBEDDING_NAME.search(module_path) is not None


def module_kind(module_path: str, conv1d: bool) -> Kind:
    """The layer kind of a 2-D weight named ``<module_path>.weight``, from its name and the model's convention."""
    if is_embedding(module_path):
        return "embedding"
    return "conv1d" if conv1d else "linear"


def weight_kind(
    kind: Kind, out_in: tuple[int, int], shape: tuple[int, ...], *, override: bool | None, conv1d_model: bool
) -> Kind:
    """The layer kind an adapter module of ``kind`` and (out, in) size takes on a base weight of ``shape``.

    The user's ``override`` decides, else the adapter's kind or the model's convention; where the
    shape can tell (a non-square weight), it has the last word: GPT-2's ``lm_head`` is a Linear
    among Conv1D layers.
    """
    if kind == "embedding":
        return "embedding"
    want_conv1d = override if override is not None else (kind == "conv1d" or conv1d_model)
    square = out_in[0] == out_in[1]
    if want_conv1d and shape == out_in and not square:
        return "linear"
    if not want_conv1d and shape == out_in[::-1] and not square and kind == "conv1d":
        return "conv1d"
    return "conv1d" if want_conv1d else "linear"


def ties_word_embeddings(config: Mapping[str, Any]) -> bool:
    """transformers' default: an output layer shares the input embedding unless config.json says not."""
    return bool(config.get("tie_word_embeddings", True))


def is_causal_lm(config: Mapping[str, Any]) -> bool:
    archs = [str(a) for a in config.get("architectures") or []]
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def task_type(config: Mapping[str, Any]) -> str | None:
    """PEFT's ``task_type`` for a model config (``CAUSAL_LM`` or unknown)."""
    return "CAUSAL_LM" if is_causal_lm(config) else None


def tied_output(keys: list[str], config: Mapping[str, Any]) -> tuple[str, str] | None:
    """(output layer module, input embedding key) when config.json ties the output to the input embedding.

    A tied checkpoint stores the matrix once (GPT-2 has no ``lm_head.weight``), or twice with equal
    values; either way a fine-tune changed both uses of it at once.
    """
    if not ties_word_embeddings(config) or not is_causal_lm(config):
        return None
    embeds = [k for k in keys if k.endswith(".weight") and is_embedding(k[: -len(".weight")])]
    embeds = [k for k in embeds if any(name in k for name in _TOKEN_EMBEDDINGS)] or embeds
    return (OUTPUT_LAYER, embeds[0]) if embeds else None


# -- quantized checkpoints ----------------------------------------------------------------------------
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


def refuse_quantized(found: Quantization | None, path: str, operation: str) -> None:
    """Until loratool supports a quantized layout, it refuses it: adding a delta to packed or scaled
    numbers as if they were plain weights writes a wrong checkpoint without a sign."""
    if found is not None:
        raise UnsupportedCheckpointError(
            f"the checkpoint is quantized: {found}; {operation} would treat quantized numbers as plain weights",
            path=path,
            fix=f"{operation} a dequantized (float32/bfloat16/float16) copy of the checkpoint instead",
        )
