"""Model conventions: what a checkpoint's tensor names and ``config.json`` say about its layers.

The one place that knows which model types store GPT-2 ``Conv1D`` weights, which names are
embeddings, when an output layer is tied to the input embedding, and which PEFT task type a
model has. Expert layouts belong here too (quantization has its package, :mod:`loratool.quant`). Nothing here
reads files.
"""

from __future__ import annotations

import re
from collections.abc import Container, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .adapter import Adapter, Kind, LoraModule

if TYPE_CHECKING:
    from torch import Tensor


class TensorSource(Protocol):
    """What the tied checks read of a checkpoint (a :class:`loratool.io.checkpoint.Checkpoint`, a view)."""

    def __contains__(self, key: str) -> bool: ...
    def info(self, key: str) -> Any: ...
    def get(self, key: str) -> Tensor: ...


# transformers model types whose 2-D projection weights are GPT-2 ``Conv1D`` (stored (in, out)).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
PARTLY_CONV1D_MODEL_TYPES = frozenset({"clvp"})  # Conv1D in its decoder's MLP, Linear elsewhere (transformers 5)
EMBEDDING_NAME = re.compile(
    r"(^|\.)(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|embeddings|embedding|tok_embeddings|shared)$"
)
# input embeddings an output layer can be tied to, most specific first
_TOKEN_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings")
OUTPUT_LAYER = "lm_head"


def conv1d_convention(config: Mapping[str, Any]) -> bool | None:
    """Whether config.json's model_type stores its adapted 2-D weights as GPT-2 ``Conv1D`` (True) or
    as ``nn.Linear`` (False); None where it cannot say: no model_type, or a model with both (CLVP).
    PEFT goes by the layer's class, whatever an adapter's ``fan_in_fan_out`` says."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type in PARTLY_CONV1D_MODEL_TYPES:
        return None
    return model_type in CONV1D_MODEL_TYPES


def uses_conv1d(config: Mapping[str, Any], override: bool | None = None) -> bool:
    """Whether the model's 2-D weights are GPT-2 ``Conv1D``: the user's override, else config.json's model_type."""
    return override if override is not None else config.get("model_type") in CONV1D_MODEL_TYPES


def require_override_agrees(config: Mapping[str, Any], override: bool | None, path: str) -> None:
    """Refuse ``--fan-in-fan-out`` / ``--no-fan-in-fan-out`` where config.json's model_type already
    says the opposite (:func:`conv1d_convention`): PEFT goes by the layer's class, so an adapter
    extracted that way is read transposed (a square weight) or not at all, and a merge that way is one
    PEFT never makes. The option is for checkpoints whose config.json cannot say."""
    from .errors import LoraToolError

    known = conv1d_convention(config)
    if override is None or known is None or override == known:
        return
    layers = "GPT-2 Conv1D layers, (in, out)" if known else "nn.Linear layers, (out, in)"
    raise LoraToolError(
        f"--{'' if override else 'no-'}fan-in-fan-out contradicts config.json: a {config.get('model_type')} "
        f"model has {layers}, and PEFT goes by the layer's class, so it would read such an adapter transposed "
        "or not at all", path=path,
        fix="leave the option out (it is for checkpoints whose config.json has no known model_type)",
    )  # fmt: skip


def is_embedding(module_path: str) -> bool:
    return EMBEDDING_NAME.search(module_path) is not None


def module_kind(module_path: str, conv1d: bool) -> Kind:
    """The layer kind of a 2-D weight named ``<module_path>.weight``, from its name and the model's convention."""
    if is_embedding(module_path):
        return "embedding"
    return "conv1d" if conv1d else "linear"


def weight_kind(
    kind: Kind, out_in: tuple[int, int], shape: tuple[int, ...], *, override: bool | None, conv1d_model: bool | None
) -> Kind:
    """The layer kind an adapter module of ``kind`` and (out, in) size takes on a base weight of ``shape``.

    The user's ``override`` decides, else the model's convention (:func:`conv1d_convention`: PEFT
    sets ``fan_in_fan_out`` by the layer's class, so an adapter that says True is still added to a
    Llama's Linear weights untransposed), else, where the model cannot say, the adapter's kind;
    where the shape can tell (a non-square weight), it has the last word: GPT-2's ``lm_head`` is a
    Linear among Conv1D layers.
    """
    if kind in ("embedding", "conv2d"):
        return kind
    if override is not None:
        want_conv1d = override
    else:
        want_conv1d = conv1d_model if conv1d_model is not None else kind == "conv1d"
    square = out_in[0] == out_in[1]
    if want_conv1d and shape == out_in and not square:
        return "linear"
    if not want_conv1d and shape == out_in[::-1] and not square and kind == "conv1d":
        return "conv1d"
    return "conv1d" if want_conv1d else "linear"


# How transformers renames a checkpoint's tensors when it loads the model, per family (its
# conversion_mapping.py, read at the source for transformers 5: "Qwen2VLForConditionalGeneration",
# which Qwen2.5-VL shares, and "llava" with the "LlavaModel" scope, which Gemma 3 shares), as
# (pattern, replacement) applied in order; each leaves a name already in the model's form alone.
# tests/test_multimodal.py checks every rule against the models transformers builds.
_QWEN_VL = ((r"^visual\.", "model.visual."), (r"^model\.(?!language_model\.|visual\.)", "model.language_model."))
_LLAVA = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.", "model.language_model."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
)
LIVE_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen2_vl": _QWEN_VL, "qwen2_5_vl": _QWEN_VL, "llava": _LLAVA, "gemma3": _LLAVA,
    "llama4": (),  # saved under the names the model holds
}  # fmt: skip


def live_name_rules(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """The renaming rules of a multimodal family loratool maps (() where the names need none), or
    None for a text-only model (nothing to rename) or a family whose mapping is unknown."""
    if not is_multimodal(config):
        return None
    return LIVE_NAMES.get(str(config.get("model_type")))


def live_name(rules: tuple[tuple[str, str], ...], name: str) -> str:
    """A tensor's name on disk as the loaded model names it (transformers' renaming on load)."""
    for pattern, replacement in rules:
        renamed = re.sub(pattern, replacement, name, count=1)
        if renamed != name:
            return renamed
    return name


def is_multimodal(config: Mapping[str, Any]) -> bool:
    return any(k in config for k in ("vision_config", "audio_config"))


def is_vision_module(module_path: str) -> bool:
    """A module of a vision-language model's vision tower or projector (by its live name)."""
    return bool(re.search(r"(^|\.)(visual|vision_tower|vision_model|multi_modal_projector)\.", module_path))


def renamed_on_load(config: Mapping[str, Any]) -> str | None:
    """The architecture of a multimodal checkpoint (a ``vision_config`` or ``audio_config``) whose
    tensors transformers renames on load by rules loratool does not know (:data:`LIVE_NAMES` has the
    ones it knows: Qwen2-VL, Qwen2.5-VL, LLaVA, Gemma 3, Llama 4), so that PEFT's module paths are
    not the names on disk; None otherwise. Such checkpoints are refused rather than written or
    matched under names PEFT would load as nothing."""
    if not is_multimodal(config) or config.get("model_type") in LIVE_NAMES:
        return None
    names = config.get("architectures")
    return str(names[0]) if isinstance(names, list) and names else str(config.get("model_type") or "multimodal")


RENAMED_WHY = (
    "a vision-language (multimodal) checkpoint of a family whose renaming on load loratool does not know: "
    "transformers renames its tensors when it loads the model (model.layers.0... becomes "
    "model.language_model.layers.0..., visual... becomes model.visual...), and an adapter named after the tensors "
    "on disk would load in PEFT as a no-op (loratool maps Qwen2-VL, Qwen2.5-VL, LLaVA, Gemma 3 and Llama 4)"
)


# A multimodal family's tie where config.json does not say (its config class's default in transformers 5:
# Gemma 3 ties, Qwen2-VL, Qwen2.5-VL, LLaVA and Llama 4 do not), and the families whose config also takes a
# tie that pre-v5 saves placed in text_config (their __post_init__ forwards it to the outer config).
_MULTIMODAL_TIES = {"gemma3": True}
_TIES_IN_TEXT_CONFIG = frozenset({"qwen2_vl", "qwen2_5_vl", "llava"})


def ties_word_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether the output layer shares the input embedding, as transformers reads config.json: a text
    model ties unless it says not; a vision-language model by its family's rule (Qwen2.5-VL 3B and
    Gemma 3 tie, LLaVA and Llama 4 do not)."""
    if not is_multimodal(config):
        return bool(config.get("tie_word_embeddings", True))
    family = str(config.get("model_type"))
    text = config.get("text_config")
    in_text = isinstance(text, Mapping) and bool(text.get("tie_word_embeddings", False))
    return bool(config.get("tie_word_embeddings", _MULTIMODAL_TIES.get(family, False))) or (
        in_text and family in _TIES_IN_TEXT_CONFIG
    )


def is_causal_lm(config: Mapping[str, Any]) -> bool:
    archs = [str(a) for a in config.get("architectures") or []]
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def has_output_layer(config: Mapping[str, Any]) -> bool:
    """A language model's head (``lm_head``) is the model's: a causal LM's, or a vision-language
    model's whose renaming loratool knows (``...ForConditionalGeneration``, its head at the top)."""
    archs = [str(a) for a in config.get("architectures") or []]
    multimodal = live_name_rules(config) is not None and any(a.endswith("ForConditionalGeneration") for a in archs)
    return is_causal_lm(config) or multimodal


def task_type(config: Mapping[str, Any]) -> str | None:
    """PEFT's ``task_type`` for a model config (``CAUSAL_LM`` or unknown)."""
    return "CAUSAL_LM" if is_causal_lm(config) else None


def tied_output(keys: list[str], config: Mapping[str, Any]) -> tuple[str, str] | None:
    """(output layer module, input embedding key) when config.json ties the output to the input embedding.

    A tied checkpoint stores the matrix once (GPT-2 has no ``lm_head.weight``), or twice with equal
    values; either way a fine-tune changed both uses of it at once.
    """
    if not ties_word_embeddings(config) or not has_output_layer(config):
        return None
    embeds = [k for k in keys if k.endswith(".weight") and is_embedding(k[: -len(".weight")])]
    embeds = [k for k in embeds if any(name in k for name in _TOKEN_EMBEDDINGS)] or embeds
    return (OUTPUT_LAYER, embeds[0]) if embeds else None


def is_tied_copy(module: LoraModule, adapter: Adapter, found: Container[str], config: Mapping[str, Any]) -> bool:
    """An output layer tied to an embedding, absent from the checkpoint, whose factors are the
    embedding module's transposed (what extract writes for tied weights): merging it would add the
    same delta to the shared matrix twice."""
    if not ties_word_embeddings(config):
        return False
    partner = tied_copy_of(module, adapter)
    return partner is not None and partner in found


def tied_copy_of(module: LoraModule, adapter: Adapter) -> str | None:
    """The embedding module of ``adapter`` whose LoRA ``module`` holds transposed, at its scaling
    (PEFT's ensure_weight_tying, and extract for a tied head), or None. Factors read lazily (``meta``)
    are compared by their shapes: what a check from headers alone can tell."""
    for other_path, other in adapter.modules.items():
        if other.kind == "embedding" and other.rank == module.rank and other.scaling == module.scaling:
            if _transposed(other.lora_B, module.lora_A) and _transposed(other.lora_A, module.lora_B):
                return other_path
    return None


def _transposed(a: Tensor, b: Tensor) -> bool:
    if a.is_meta or b.is_meta:
        return tuple(a.T.shape) == tuple(b.shape)
    return a.T.equal(b)


def untied_partner(adapter: Adapter, base_config: Mapping[str, Any]) -> str | None:
    """The output layer of an adapter trained with PEFT's ensure_weight_tying (its LoRA the embedding's,
    transposed) where the base does not tie the two: PEFT adds the tied partner only for a base that
    ties it, so it would load one use's factors of the two the adapter trained, while a merge or a
    runtime would apply both. Refused by name, not guessed; None where it does not apply."""
    head = adapter.modules.get(OUTPUT_LAYER)
    if not adapter.config.get("ensure_weight_tying") or head is None or ties_word_embeddings(base_config):
        return None
    return OUTPUT_LAYER if tied_copy_of(head, adapter) is not None else None


# How to untie a tied base, for the fixes that need one: the head stored as a matrix of its own.
UNTIE_STEPS = "store lm_head.weight as a copy of the embedding and set tie_word_embeddings to false in config.json"

UNTIED_WHY = (
    "the adapter was trained with PEFT's ensure_weight_tying on a model whose output layer is its input embedding "
    "(its LoRA on both, the same factors transposed), and this base does not tie them (tie_word_embeddings false): "
    "PEFT would load the factors of one use only here, while the adapter changed both"
)
UNTIED_FIX = "use the tied base it was trained on"


def transposed_copy(embedding: LoraModule) -> LoraModule:
    """A tied output layer's LoRA from its embedding's: the same delta, transposed (the embedding's
    (num, dim) delta is (B_e @ A_e).T = A_e.T @ B_e.T), at the same scaling."""
    return LoraModule(lora_A=embedding.lora_B.T.contiguous(), lora_B=embedding.lora_A.T.contiguous(),
                      alpha=embedding.alpha, use_rslora=embedding.use_rslora)  # fmt: skip


def is_tied_head_unchanged(
    ckpt: TensorSource, tied: tuple[str, str] | None, key: str, t: Tensor, adapter: Adapter | None = None
) -> bool:
    """``key`` names the output layer a tied base does not store, and ``t`` is the embedding: the one
    the base stores, or the one the adapter keeps as the embedding's base layer (what an unmerge
    restores; grown, where the fine-tune added tokens: what the merge writes into the one matrix)."""
    if tied is None or key != tied[0] + ".weight" or tied[1] not in ckpt:
        return False
    kept = adapter.whole.get(tied[1]) if adapter is not None else None
    if kept is not None and t.shape == kept.shape and t.equal(kept):
        return True
    return tuple(t.shape) == tuple(ckpt.info(tied[1]).shape) and t.equal(ckpt.get(tied[1]).to(t.dtype))


_LAYER = re.compile(r"(?:^|[._])(\d+)(?=[._]|$)")


def module_group(module_path: str) -> tuple[str, int | None]:
    """(module type, layer) for summaries: the layer is the first number in the path, the type what
    follows it with any further numbers (experts) starred.

    ``model.layers.3.self_attn.q_proj`` -> (``self_attn.q_proj``, 3);
    ``model.layers.0.block_sparse_moe.experts.7.w1`` -> (``block_sparse_moe.experts.*.w1``, 0);
    ``lm_head`` -> (``lm_head``, None).
    """
    m = _LAYER.search(module_path)
    if m is None:
        return module_path, None
    rest = module_path[m.end() + 1 :] or module_path
    return _LAYER.sub(lambda n: n.group(0).replace(n.group(1), "*"), rest), int(m.group(1))
