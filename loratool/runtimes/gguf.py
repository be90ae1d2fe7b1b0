"""llama.cpp LoRA adapters (GGUF), written and read back through the ``gguf`` package, llama.cpp's own library.

The conventions, as llama.cpp's ``convert_lora_to_gguf.py`` writes them and ``src/llama-adapter.cpp``
reads them:

- key/values ``general.architecture`` (the base's llama.cpp architecture: the loader refuses an
  adapter of another), ``general.type = adapter``, ``adapter.type = lora`` and one float32
  ``adapter.lora.alpha``;
- per adapted base tensor ``<gguf name>.lora_a`` (numpy (r, in)) and ``<gguf name>.lora_b``
  ((out, r)), named by the ``gguf`` package's tensor-name table for the architecture
  (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``); for the token embedding
  (num, dim) ``lora_a`` is PEFT's ``lora_embedding_A`` transposed, (num, r), and ``lora_b`` (dim, r);
- llama.cpp scales each pair by ``alpha / r`` with ``r`` that pair's own rank (``alpha = 0`` means
  1). One alpha cannot express modules whose ``alpha / r`` (or rsLoRA's ``alpha / sqrt(r)``)
  differ, so each module's true scaling is folded into its B: ``B' = B * scaling * r / alpha``;
- the converter rewrites some base weights, and a LoRA delta on them must follow: for Llama and
  Mistral the rows of ``q_proj`` and ``k_proj`` are permuted per head for llama.cpp's RoPE
  (``LlamaModel.permute``), so the rows of their B are permuted the same way.

Only architectures whose conversion loratool has checked are written; anything else is refused,
never guessed. :func:`read_gguf` undoes each step, for loratool's files and for llama.cpp's
``convert_lora_to_gguf.py``'s alike.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..adapter import Adapter, LoraModule
from ..arch import OUTPUT_LAYER, UNTIED_FIX, UNTIED_WHY, ties_word_embeddings, untied_partner
from ..errors import InputFileError, LoraToolError, MetadataError, Refusal, UnsupportedAdapterError
from ..formats.output import require_finite_output
from ..io.atomic import atomic_output

if TYPE_CHECKING:
    import numpy as np
    import torch

OutType = Literal["f32", "f16", "bf16", "q8_0"]
OUT_TYPES: tuple[OutType, ...] = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class Family:
    """How llama.cpp's converter treats one transformers architecture."""

    arch: str  # a gguf.MODEL_ARCH member
    rope_permute: bool  # q/k rows permuted per head (LlamaModel.permute)
    embedding_lora: bool = True  # False where the converter cuts the embedding (Gemma 3: to the tokenizer's size)


# transformers `architectures[0]` -> llama.cpp conversion, read from llama.cpp's conversion/*.py
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LLAMA", rope_permute=True),
    "MistralForCausalLM": Family("LLAMA", rope_permute=True),
    "Qwen2ForCausalLM": Family("QWEN2", rope_permute=False),
    "Qwen3ForCausalLM": Family("QWEN3", rope_permute=False),
    "GemmaForCausalLM": Family("GEMMA", rope_permute=False),
    "Gemma2ForCausalLM": Family("GEMMA2", rope_permute=False),
    "Gemma3ForCausalLM": Family("GEMMA3", rope_permute=False, embedding_lora=False),
    "Phi3ForCausalLM": Family("PHI3", rope_permute=False),
}
_MERGE_FIX = (
    "merge the adapter into the base (loratool merge) and convert the merged checkpoint "
    "with llama.cpp's convert_hf_to_gguf.py"
)


@dataclass
class GgufPlan:
    """Where each module goes in a llama.cpp adapter for one base, and what cannot go."""

    arch: str | None
    family: Family | None
    names: dict[str, str] = field(default_factory=dict)  # module path -> gguf base tensor name
    problems: list[Refusal] = field(default_factory=list)
    table: Any = None  # the gguf package's tensor-name map for the architecture (None: no family)


@dataclass
class GgufWritten:
    """What :func:`write_gguf` wrote."""

    path: Path
    arch: str
    alpha: float
    tensors: int
    parameters: int
    folded: list[str]  # modules whose scaling went into B


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise LoraToolError(
            "GGUF output needs the gguf package (llama.cpp's Python library)",
            fix="pip install 'loratool[gguf]'",
        ) from None
    return gguf


def plan_gguf(adapter: Adapter, config: Mapping[str, Any], tensors: Iterable[str] = ()) -> GgufPlan:
    """Map every module of ``adapter`` to its llama.cpp tensor for the base described by ``config``
    (its ``config.json``), listing every module llama.cpp cannot take. The name table covers the
    layers the adapter's modules and ``tensors`` (names) number, up to the config's count: no more is
    mapped."""
    gguf = require_gguf()
    names = config.get("architectures")
    arch_name = next(iter(names), None) if isinstance(names, list) and names else None
    family = FAMILIES.get(str(arch_name)) if arch_name is not None else None
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        if arch_name is None:
            problem = Refusal(
                "base", "the base's config.json names no architecture ('architectures'), so loratool cannot tell how "
                "llama.cpp lays out its tensors",
                "give the model folder that holds the base's config.json (as transformers saved it)",
            )  # fmt: skip
        else:
            problem = Refusal(
                "base", f"llama.cpp adapters are written for these architectures only: {known}; the base is "
                f"{arch_name}",
                "use a base of a supported family; other conversions rewrite weights in ways loratool has not checked",
            )  # fmt: skip
        return GgufPlan(arch=None, family=None, problems=[problem])
    arch = gguf.MODEL_ARCH[family.arch]
    layers = config.get("num_hidden_layers", 0)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        raise InputFileError(
            f"the base's config.json gives num_hidden_layers = {json.dumps(layers)[:40]}, not a whole number",
            fix="give the model folder whose config.json describes this adapter's base (as transformers saved it)",
        )
    numbered = [int(part) for n in [*adapter.modules, *tensors] for part in n.split(".") if part.isdigit()]
    table = gguf.get_tensor_name_map(arch, min(layers, 1 + max(numbered, default=-1)))
    plan = GgufPlan(arch=gguf.MODEL_ARCH_NAMES[arch], family=family, table=table)
    if adapter.whole:
        plan.problems += [
            Refusal(key, "llama.cpp adapters hold LoRA pairs only, not whole tensors (modules_to_save)", _MERGE_FIX)
            for key in sorted(adapter.whole)
        ]
    plan.problems += [
        Refusal(key, "llama.cpp adapters have no trainable tokens", _MERGE_FIX) for key in adapter.token_rows
    ]
    tied = ties_word_embeddings(config)
    if untied_partner(adapter, config):
        plan.problems.append(Refusal(OUTPUT_LAYER, UNTIED_WHY, UNTIED_FIX))
    for path, m in adapter.modules.items():
        why = _unsupported(path, m, family, tied)
        name = None if why else table.get_name(path + ".weight", try_suffixes=(".weight",))
        if why:
            plan.problems.append(Refusal(path, why, _MERGE_FIX))
        elif name is None:
            why = f"llama.cpp's {plan.arch} models have no tensor for this module"
            plan.problems.append(Refusal(path, why, _MERGE_FIX))
        else:
            plan.names[path] = name
    return plan


def refuse_for_gguf(adapter: Adapter, config: Mapping[str, Any]) -> GgufPlan:
    """:func:`plan_gguf`, raising for the first thing llama.cpp cannot take (and counting the rest)."""
    plan = plan_gguf(adapter, config)
    if plan.problems:
        raise plan.problems[0].error(adapter.path, len(plan.problems) - 1)
    if not plan.names:
        raise UnsupportedAdapterError("the adapter has no LoRA modules to write", path=adapter.path)
    return plan


def _unsupported(path: str, m: LoraModule, family: Family, tied: bool) -> str | None:
    if m.expert is not None:
        return "LoRA on a 3-D experts parameter: no architecture llama.cpp adapters are written for has one"
    if m.magnitude is not None:
        return "llama.cpp has no DoRA (a magnitude vector per module)"
    if m.bias is not None:
        return "llama.cpp's LoRA pairs have no bias (lora_bias)"
    if m.kind == "conv1d":
        return "a GPT-2 Conv1D weight: no architecture llama.cpp adapters are written for"
    if m.kind == "conv2d":
        return "a Conv2d LoRA: llama.cpp's LoRA pairs are matrices of language models"
    if m.kind == "embedding" and not family.embedding_lora:
        return "llama.cpp's converter cuts this embedding to the tokenizer's size: its LoRA would not fit"
    if m.kind == "embedding" and tied:  # llama.cpp's output is then the token embedding, LoRA lookups by name
        return (
            "the base ties its output layer to this embedding, and llama.cpp applies the embedding's LoRA to "
            "the output layer too, where its factors do not fit: llama.cpp aborts (GGML_ASSERT in build_lora_mm)"
        )
    if path.split(".")[-1] == "lm_head" and tied:
        return "the base ties lm_head to the input embedding: llama.cpp's model has no separate output tensor"
    return None


def llama_cpp_alpha(modules: Mapping[str, LoraModule]) -> float:
    """The one ``adapter.lora.alpha``: the value most modules already imply (``scaling * r``), so
    that their B is written as it is; float32, as llama.cpp reads it."""
    import numpy as np

    implied = Counter(float(np.float32(_implied_alpha(m))) for m in modules.values())
    nonzero = [(n, a) for a, n in implied.items() if a != 0]
    return max(nonzero, key=lambda t: t[0])[1] if nonzero else 1.0


def _implied_alpha(m: LoraModule) -> float:
    return m.scaling * m.rank if m.use_rslora else m.alpha


def fold_factor(m: LoraModule, alpha: float) -> float:
    """What B is multiplied by so that llama.cpp's ``alpha / r`` gives the module's true scaling."""
    return _implied_alpha(m) / alpha


def rope_heads(config: Mapping[str, Any], leaf: str, rows: int) -> int:
    """The heads llama.cpp's rope permutation splits a q_proj's (``num_attention_heads``) or a
    k_proj's (``num_key_value_heads``, else the former) ``rows`` into: a positive whole number that
    parts them into pairs; refused, naming the field, where config.json says otherwise."""
    field = "num_key_value_heads" if leaf == "k_proj" and config.get("num_key_value_heads") else "num_attention_heads"
    heads = config.get(field)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or rows % (2 * heads):
        raise InputFileError(
            f"the base's config.json gives {field} = {json.dumps(heads)[:40]}, which does not part the "
            f"{rows} rows of a {leaf} into pairs of rows a head, as llama.cpp's rope permutation needs",
            fix="give the model folder whose config.json describes this adapter's base (as transformers saved it)",
        )
    return heads


def rope_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` of a q/k weight's rows (per head: interleaved halves)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_pair(
    path: str, m: LoraModule, *, alpha: float, family: Family, config: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_a, lora_b) in float32 as llama.cpp wants them for one module (numpy orientation)."""
    import torch

    a = m.lora_A.detach().to(torch.float32)
    b = m.lora_B.detach().to(torch.float32)
    factor = fold_factor(m, alpha)
    if factor != 1.0:
        b = b * factor
    leaf = path.split(".")[-1]
    if family.rope_permute and leaf in ("q_proj", "k_proj"):
        b = rope_permute(b, rope_heads(config, leaf, b.shape[0]))
    if m.kind == "embedding":
        a = a.T  # (num, r): llm_build_inp_embd takes A's rows by token id
    return a.contiguous(), b.contiguous()


def write_gguf(
    adapter: Adapter,
    out: Path,
    *,
    config: Mapping[str, Any],
    outtype: OutType = "f32",
    force: bool = False,
    name: str | None = None,
    provenance: str | None = None,
) -> GgufWritten:
    """Write ``adapter`` as a llama.cpp LoRA adapter for the base whose ``config.json`` is ``config``.

    Raises:
        UnsupportedAdapterError: a module llama.cpp cannot take (each is named; nothing is written).
    """
    import torch

    gguf = require_gguf()
    plan = refuse_for_gguf(adapter, config)
    assert plan.arch is not None and plan.family is not None
    alpha = llama_cpp_alpha(adapter.modules)
    qtype = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    ftype = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[outtype]
    fits = getattr(torch, _RANGE_OF[outtype])
    folded: list[str] = []
    parameters = 0
    with atomic_output(out, force=force, directory=False) as tmp:
        writer = gguf.GGUFWriter(tmp, plan.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if name:
            writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType[ftype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if provenance:
            writer.add_string("loratool.metadata.provenance", provenance)
        for path, base_name in plan.names.items():
            m = adapter.modules[path]
            a, b = gguf_pair(path, m, alpha=alpha, family=plan.family, config=config)
            if fold_factor(m, alpha) != 1.0:
                folded.append(path)
            for suffix, t in ((".lora_a", a), (".lora_b", b)):
                require_finite_output({base_name + suffix: t.to(fits)}, out, wider="--outtype f32")
                data, raw = _encode(gguf, t.numpy(), qtype)
                writer.add_tensor(base_name + suffix, data, raw_dtype=raw)
                parameters += t.numel()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GgufWritten(out, plan.arch, alpha, 2 * len(plan.names), parameters, folded)


# the dtype whose range a tensor of each output type must fit: Q8_0 stores float16 scales, and rows
# that do not divide into its blocks of 32 as float16 (_encode)
_RANGE_OF = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "float16"}


def _encode(gguf: Any, data: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """Quantize as llama.cpp's converter does: Q8_0 where a row divides into blocks of 32, else F16."""
    want = gguf.GGMLQuantizationType[qtype]
    try:
        return gguf.quants.quantize(data, want), want
    except gguf.QuantError:
        f16 = gguf.GGMLQuantizationType.F16
        return gguf.quants.quantize(data, f16), f16


# --- reading back -----------------------------------------------------------------------------


@dataclass
class GgufRead:
    """A llama.cpp LoRA adapter read back into module paths of its base: :func:`read_gguf`."""

    adapter: Adapter
    arch: str
    alpha: float
    dropped: list[str]  # norm tensors, which llama.cpp itself skips


def read_gguf(path: str | Path, *, config: Mapping[str, Any], base_keys: Iterable[str]) -> GgufRead:
    """Read a llama.cpp LoRA adapter (loratool's or llama.cpp's ``convert_lora_to_gguf.py``'s) as
    PEFT factors for the base whose ``config.json`` is ``config`` and whose tensor names are
    ``base_keys``: every pair named back to its module path, llama.cpp's q/k row permutation
    undone, embeddings' ``lora_a`` transposed back, and ``alpha / r`` (``alpha = 0``: 1) as each
    module's scaling. Exact: the factors come back as they were written (quantized types
    dequantized as llama.cpp does).

    ``*_norm.weight`` tensors (mergekit's extractions carry them) are left out, as llama.cpp's
    loader skips them; they are listed in :attr:`GgufRead.dropped`.

    Raises:
        InputFileError: not a GGUF file, a GGUF model rather than a LoRA adapter, a pair with one
            half missing or ranks that disagree, a tensor of a kind llama.cpp does not load.
        UnsupportedAdapterError: an adapter for another architecture, or a tensor the base has no
            module for (each named).
    """
    import torch

    gguf = require_gguf()
    where = str(path)
    fields, tensors = _read_gguf_file(gguf, Path(path))
    kind_of = fields.get("general.type"), fields.get(gguf.Keys.Adapter.TYPE)
    if kind_of != ("adapter", "lora"):
        raise InputFileError(
            f"not a llama.cpp LoRA adapter (general.type {kind_of[0]!r}, adapter.type {kind_of[1]!r})", path=where,
            fix="give a GGUF written by loratool convert --to gguf or llama.cpp's convert_lora_to_gguf.py",
        )  # fmt: skip
    if fields.get(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS) is not None:
        raise UnsupportedAdapterError(
            "an activated LoRA (adapter.alora.invocation_tokens): loratool has no aLoRA", path=where,
            fix="convert the original PEFT adapter instead",
        )  # fmt: skip
    base_keys = list(base_keys)
    plan = plan_gguf(Adapter(), config, base_keys)  # the base's family and names (no adapter: nothing to refuse)
    if plan.family is None:
        raise plan.problems[0].error(where)
    arch = str(fields.get("general.architecture"))
    if arch != plan.arch:
        raise UnsupportedAdapterError(
            f"the adapter is for llama.cpp's {arch!r} models; the base is {plan.arch!r}", path=where,
            fix="pass the checkpoint the adapter was made for as --base",
        )  # fmt: skip
    alpha = fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise MetadataError(
            f"adapter.lora.alpha is {alpha!r}: llama.cpp needs one finite number", path=where,
            fix="write the adapter again",
        )  # fmt: skip
    alpha = float(alpha)
    paths = _module_paths(plan, base_keys)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    dropped: list[str] = []
    for name, data in tensors.items():
        stem, _, suffix = name.rpartition(".")
        if suffix in ("lora_a", "lora_b"):
            pairs.setdefault(stem, {})[suffix] = data
        elif name.endswith("_norm.weight"):
            dropped.append(name)
        else:
            raise InputFileError(
                f"tensor {name!r} is neither a lora_a nor a lora_b (llama.cpp refuses it too)", path=where,
                fix="give a llama.cpp LoRA adapter",
            )  # fmt: skip
    modules: dict[str, LoraModule] = {}
    for stem, pair in sorted(pairs.items()):
        if len(pair) != 2:
            missing = ({"lora_a", "lora_b"} - set(pair)).pop()
            raise InputFileError(f"{stem} has no {missing}", path=where, fix="the file is incomplete: write it again")
        module = paths.get(stem)
        if module is None:
            raise UnsupportedAdapterError(
                f"{stem}: the base has no module llama.cpp names so", path=where,
                fix="pass the checkpoint the adapter was made for as --base",
            )  # fmt: skip
        a, b = (torch.from_numpy(pair[k].astype("float32", copy=True)) for k in ("lora_a", "lora_b"))
        embedding = stem == "token_embd.weight"
        if embedding:
            a = a.T.contiguous()  # llama.cpp's (num, r) back to PEFT's (r, num)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InputFileError(
                f"{stem}: lora_a {tuple(pair['lora_a'].shape)} and lora_b {tuple(pair['lora_b'].shape)} do not "
                "share a rank", path=where, fix="the file is damaged: write it again",
            )  # fmt: skip
        b = _unpermute(module, b, plan.family, config)
        rank = a.shape[0]
        modules[module] = LoraModule(a, b, alpha=alpha if alpha else float(rank),
                                     kind="embedding" if embedding else "linear")  # fmt: skip
    peft_config: dict[str, Any] = {"peft_type": "LORA"}
    adapter = Adapter(modules=modules, config=peft_config, format="peft", path=where)
    return GgufRead(adapter, arch, alpha, dropped)


def _read_gguf_file(gguf: Any, path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The key/values and the tensors (float32, numpy orientation) of a GGUF file."""
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {k: f.contents() for k, f in reader.fields.items()}
        tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    except (ValueError, KeyError, IndexError, OSError, NotImplementedError) as e:
        raise InputFileError(
            f"not a readable GGUF file ({e})", path=str(path),
            fix="the file is truncated or not GGUF: download or write it again",
        ) from None  # fmt: skip
    return fields, tensors


def _module_paths(plan: GgufPlan, base_keys: Iterable[str]) -> dict[str, str]:
    """llama.cpp tensor name -> the base's module path, for every weight of the base."""
    out: dict[str, str] = {}
    for key in base_keys:
        if key.endswith(".weight"):
            name = plan.table.get_name(key, try_suffixes=(".weight",))
            if name is not None:
                out.setdefault(name, key.removesuffix(".weight"))
    return out


def _unpermute(module: str, b: torch.Tensor, family: Family, config: Mapping[str, Any]) -> torch.Tensor:
    """The inverse of :func:`rope_permute` on B's rows, where the converter permuted them."""
    leaf = module.split(".")[-1]
    if not (family.rope_permute and leaf in ("q_proj", "k_proj")):
        return b
    rows = b.shape[0]
    heads = rope_heads(config, leaf, rows)
    return b.reshape(heads, rows // heads // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape).contiguous()
