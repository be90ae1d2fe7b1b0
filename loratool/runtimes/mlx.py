"""mlx-lm adapter directories: ``adapters.safetensors`` + ``adapter_config.json``.

The layout, as mlx-lm (``mlx_lm/tuner/lora.py``, ``tuner/utils.py``) defines it:

- tensors ``<module path>.lora_a`` (in, r), ``<module path>.lora_b`` (r, out), and for DoRA
  ``<module path>.m`` (out,), the row norms of the adapted weight;
- the update is ``W (out, in) += scale * (lora_a @ lora_b).T`` with an absolute ``scale`` (not
  alpha / r); an embedding (num, dim) gets ``scale * lora_a @ lora_b``. Both are PEFT's
  ``scaling * B @ A`` with ``A = lora_a.T`` and ``B = lora_b.T``;
- ``adapter_config.json``: ``fine_tune_type`` (lora, dora, full), ``num_layers``, and
  ``lora_parameters`` {``rank``, ``scale``, ``dropout``, ``keys``}. mlx-lm builds every adapted
  layer at the one ``rank`` and ``scale``: a file whose modules differ in rank does not load.

mlx-lm applies ``keys`` to the last ``num_layers`` blocks (relative paths such as
``self_attn.q_proj``) and to the whole model (full paths). loratool writes full module paths, so
exactly the adapted modules get LoRA layers, whatever ``num_layers`` says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import arch
from ..adapter import Adapter, Kind, LoraModule
from ..arch import TensorSource, is_embedding
from ..errors import InputFileError, MissingKeyError, Refusal, ShapeMismatchError
from ..formats.output import require_finite_output
from ..io.atomic import atomic_output
from ..io.checkpoint import open_checkpoint
from ..io.writer import save_tensors
from ..metadata.provenance import with_tensors_digest

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
SLOTS = ("lora_a", "lora_b", "m")


def is_mlx_dir(directory: Path) -> bool:
    """An mlx-lm adapter directory: its config has ``lora_parameters`` or ``fine_tune_type``."""
    config = directory / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("lora_parameters" in data or "fine_tune_type" in data)


def read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except ValueError as e:
        raise InputFileError(f"{CONFIG_NAME} is not valid JSON: {e}", path=str(directory)) from None
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise InputFileError(
            "an mlx-lm full fine-tune (fine_tune_type: full) holds weights, not an adapter",
            path=str(directory),
            fix="use it as a checkpoint (e.g. extract an adapter from it)",
        )
    if kind not in ("lora", "dora"):
        raise InputFileError(f"unknown mlx-lm fine_tune_type {kind!r}", path=str(directory))
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or not isinstance(params.get("scale"), (int, float)):
        raise InputFileError(
            "lora_parameters.scale is missing: mlx-lm scales every module by it",
            path=str(directory / CONFIG_NAME),
            fix="add lora_parameters {rank, scale, dropout} as mlx-lm writes them",
        )
    return dict(config)


def read_mlx(directory: Path, *, lazy: bool = False) -> Adapter:
    """Read an mlx-lm adapter directory into PEFT's orientation (``A = lora_a.T``, ``B = lora_b.T``,
    ``alpha = scale * r``)."""
    config = read_config(directory)
    scale = float(config["lora_parameters"]["scale"])
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise MissingKeyError(f"no {WEIGHTS_NAME} beside {CONFIG_NAME}", path=str(directory))
    slots: dict[str, dict[str, torch.Tensor]] = {}
    with open_checkpoint(weights) as ck:
        metadata = ck.header_metadata
        for key in ck.keys():
            module, _, slot = key.rpartition(".")
            if slot not in SLOTS or not module:
                raise InputFileError(
                    f"unexpected tensor '{key}' in an mlx-lm adapter",
                    path=str(weights),
                    fix="mlx-lm adapters hold <module>.lora_a, .lora_b and (DoRA) .m",
                )
            slots.setdefault(module, {})[slot] = ck.get_meta(key) if lazy else ck.get(key)
    modules = {}
    for path, s in slots.items():
        a, b = s.get("lora_a"), s.get("lora_b")
        if a is None or b is None:
            raise MissingKeyError("has only one of lora_a/lora_b", path=str(weights), key=path)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise ShapeMismatchError(
                "lora_a (in, r) and lora_b (r, out) disagree on r (3-D expert adapters are not read yet)",
                path=str(weights),
                key=path,
                got=f"lora_a {list(a.shape)}, lora_b {list(b.shape)}",
            )
        r = int(a.shape[1])
        kind: Kind = "embedding" if is_embedding(path) else "linear"
        modules[path] = LoraModule(lora_A=a.T, lora_B=b.T, alpha=scale * r, kind=kind, magnitude=s.get("m"))
    peft_config: dict[str, Any] = {"peft_type": "LORA", "use_dora": config.get("fine_tune_type") == "dora"}
    model = config.get("model")
    if isinstance(model, str) and model:
        peft_config["base_model_name_or_path"] = model
    return Adapter(modules=modules, config=peft_config, metadata=metadata, format="mlx", path=str(directory))


def write_mlx(adapter: Adapter, out: Path, *, force: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter`` as an mlx-lm adapter directory, atomically.

    mlx-lm has one rank and one scale: an adapter whose modules agree on both is written as it is;
    otherwise each module's scaling is folded into its B and ranks are padded with zero rows and
    columns to the largest (the delta is unchanged; see :func:`loratool.runtimes.transforms.uniform_rank`).
    """
    from .transforms import uniform_rank

    _refuse(adapter)
    modules = adapter.modules
    if len({(m.rank, m.scaling) for m in modules.values()}) > 1:
        modules = uniform_rank(adapter).modules
    first = next(iter(modules.values()))
    tensors: dict[str, torch.Tensor] = {}
    for path, m in modules.items():
        for slot, t in (("lora_a", m.lora_A.T), ("lora_b", m.lora_B.T), ("m", m.magnitude)):
            if t is not None:
                t = t.detach().cpu()
                tensors[f"{path}.{slot}"] = (t.to(dtype) if dtype is not None else t).contiguous()
    config = {
        "fine_tune_type": "dora" if any(m.magnitude is not None for m in modules.values()) else "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": first.rank, "scale": first.scaling, "dropout": 0.0, "keys": sorted(modules)},
    }
    if adapter.base_model_name_or_path:
        config["model"] = adapter.base_model_name_or_path
    metadata = {"format": "mlx", **{k: v for k, v in adapter.metadata.items() if k != "format"}}
    require_finite_output(tensors, out)
    metadata = with_tensors_digest(metadata, tensors)
    with atomic_output(out, force=force, directory=True) as tmp:
        save_tensors(tmp / WEIGHTS_NAME, tensors, metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return out


def _refuse(adapter: Adapter) -> None:
    """What an mlx-lm adapter cannot hold: raise for the first."""
    if not adapter.modules:
        raise InputFileError("the adapter has no LoRA modules to write", path=adapter.path)
    problems = mlx_refusals(adapter)
    if problems:
        raise problems[0].error(adapter.path, len(problems) - 1)


def mlx_refusals(adapter: Adapter) -> list[Refusal]:
    """Everything in ``adapter`` that an mlx-lm adapter cannot hold."""
    out = [
        Refusal(key, "mlx-lm adapters hold LoRA factors only, not whole tensors (modules_to_save)",
                "merge the adapter into the base instead (loratool merge), or drop modules_to_save (convert --base "
                "MODEL leaves out those equal to the base's)")
        for key in sorted(adapter.whole)
    ]  # fmt: skip
    out += [Refusal(key, "mlx-lm has no trainable tokens", "merge the adapter instead") for key in adapter.token_rows]
    multimodal = sorted(p for p in adapter.modules if p.startswith("model.language_model.") or arch.is_vision_module(p))
    if multimodal:  # transformers' names of a vision-language model (arch.LIVE_NAMES)
        out.append(Refusal(
            multimodal[0], "a vision-language model's module: mlx-lm serves such a model's language part under the "
            "names its checkpoint holds (language_model.model...), not transformers', and no vision tower",
            "merge the adapter (loratool merge) and convert the merged model, or serve it with PEFT",
        ))  # fmt: skip
    experts: dict[str, int] = {}  # each 3-D experts parameter adapted -> its experts: one problem for all of them
    for path, m in sorted(adapter.modules.items()):
        if m.expert is not None:
            experts[path.rpartition(".")[0]] = m.expert[1]
            continue
        if m.bias is not None:
            out.append(Refusal(path, "mlx-lm LoRA layers have no bias (lora_bias)", "merge the adapter instead"))
        if m.magnitude is not None and m.kind == "embedding":
            why = "DoRA on an embedding: mlx-lm's has a magnitude per token, PEFT's one per embedding dimension"
            out.append(Refusal(path, why, "merge the adapter instead"))
        if m.kind == "conv1d":
            out.append(Refusal(path, "a GPT-2 Conv1D weight; mlx-lm's models store those transposed as Linear",
                               "not supported: convert adapters of Llama-style models"))  # fmt: skip
        if m.kind == "conv2d":
            out.append(Refusal(path, "a Conv2d LoRA: mlx-lm's LoRA layers are linear", "use PEFT"))
    out += [Refusal(path, f"mlx-lm has no LoRA layer for 3-D expert parameters ({n} experts adapted here)", "use PEFT")
            for path, n in experts.items()]  # fmt: skip
    return out


def tied_for_mlx_on(
    adapter: Adapter, base: str | os.PathLike[str] | None, *, allow_pickle: bool = False
) -> tuple[Adapter, list[Refusal], list[str]]:
    """:func:`tied_for_mlx` against the checkpoint ``base`` (its headers and, where PEFT saved the tied
    head, its embedding), or against no base."""
    if base is None:
        return tied_for_mlx(adapter, None, None)
    with open_checkpoint(base, allow_pickle=allow_pickle) as ck:
        return tied_for_mlx(adapter, arch.tied_output(list(ck.keys()), ck.config()), ck)


def tied_for_mlx(
    adapter: Adapter, tied: tuple[str, str] | None, base: TensorSource | None
) -> tuple[Adapter, list[Refusal], list[str]]:
    """An adapter as mlx-lm serves it on a base that may tie its output layer to its input embedding
    (``tied``: :func:`loratool.arch.tied_output` of ``base``; ``base`` None: not known), with what
    mlx-lm cannot serve and notes. mlx-lm's model of a tied base has no output layer of its own:
    its head is ``embed_tokens.as_linear``, which adds the embedding's LoRA too. So an adapter
    trained with PEFT's ensure_weight_tying (the head's LoRA the embedding's, transposed: PEFT
    applies it to both uses) is its embedding's LoRA alone there, the head's copy and the head's
    saved base layer left out (mlx-lm refused the copy: "not an adapter parameter in the model").
    On a tied base, a LoRA on the head alone (no layer to go to) and an embedding's LoRA trained
    without the head (PEFT changes the input embedding only; mlx-lm would change the head too)
    are refused; with no base to say, an embedding's LoRA gets a note."""
    import dataclasses

    head = arch.OUTPUT_LAYER
    if base is not None and tied is None:  # untied: mlx-lm has an output layer of its own for the head's LoRA
        if arch.untied_partner(adapter, {"tie_word_embeddings": False}):
            return adapter, [Refusal(head, arch.UNTIED_WHY, arch.UNTIED_FIX)], []
        return adapter, [], []
    if head in adapter.modules and arch.tied_copy_of(adapter.modules[head], adapter) is not None:
        kept = dataclasses.replace(
            adapter, modules={p: m for p, m in adapter.modules.items() if p != head},
            whole={k: t for k, t in adapter.whole.items() if k != head + ".weight"},  # PEFT's copy of the embedding
        )  # fmt: skip
        return kept, [], [f"mlx: left out {head}'s LoRA, the embedding's transposed (PEFT's ensure_weight_tying): "
                          "mlx-lm adds the embedding's LoRA to the tied output layer itself"]  # fmt: skip
    if base is None:
        embeds = [p for p, m in adapter.modules.items() if m.kind == "embedding"]
        if not embeds:
            return adapter, [], []
        note = (f"mlx: mlx-lm adds an embedding's LoRA ({embeds[0]}) to the output layer too where the base ties "
                "them (tie_word_embeddings), which PEFT does not: give --base to check")  # fmt: skip
        return adapter, [], [note]
    assert tied is not None
    key = tied[0] + ".weight"
    if key in adapter.whole and arch.is_tied_head_unchanged(base, tied, key, adapter.whole[key], adapter):
        adapter = dataclasses.replace(adapter, whole={k: t for k, t in adapter.whole.items() if k != key})
    refusals = []
    if tied[0] in adapter.modules:
        refusals.append(Refusal(
            tied[0], f"a LoRA on the output layer, which this base ties to its input embedding '{tied[1]}': mlx-lm's "
            "model of it has no output layer of its own (the head reads the embedding), so the LoRA has no layer to go "
            "to", f"serve the adapter with PEFT, or untie the base ({arch.UNTIE_STEPS}) and serve it in mlx-lm with "
            "this adapter",
        ))  # fmt: skip
    embed = tied[1].removesuffix(".weight")
    if embed in adapter.modules:
        refusals.append(Refusal(
            embed, "a LoRA on the embedding this base ties its output layer to: mlx-lm adds it to the output layer "
            "too (the head reads the embedding, LoRA included), where PEFT changes the input embedding only, so "
            "mlx-lm would serve another model", "serve the adapter with PEFT, or merge it (loratool merge: as PEFT's "
            "merge, it changes both uses) and convert the merged model with mlx-lm; an adapter trained with PEFT's "
            "ensure_weight_tying converts",
        ))  # fmt: skip
    return adapter, refusals, []


def reach_refusals(adapter: Adapter, config: dict[str, Any], total_layers: int | None) -> list[Refusal]:
    """The modules of an mlx-lm ``adapter`` that lie in blocks mlx-lm gives no LoRA layers, so that its
    loader refuses their tensors ("not an adapter parameter in the model"): mlx-lm adapts a module
    whose full path is in ``keys`` anywhere, but one selected by its path inside a block (or by no
    ``keys`` at all) only in the last ``num_layers`` blocks (every block where it is 0 or less).
    (Modules ``keys`` selects in no way are the structure check's: :mod:`loratool.validation`.)
    ``total_layers`` (the base's ``num_hidden_layers``) places the last blocks; without it, only an
    adapter on more blocks than ``num_layers`` is caught."""
    import re

    params = config.get("lora_parameters") or {}
    keys = params.get("keys") if isinstance(params, dict) else None
    n = config.get("num_layers", 16)  # mlx-lm's default, as its lora command sets it
    n = n if isinstance(n, int) and not isinstance(n, bool) else 16
    out: list[Refusal] = []
    blocks: dict[int, list[str]] = {}
    for path in sorted(adapter.modules):
        if isinstance(keys, list) and path in keys:
            continue  # a full path: adapted wherever it is
        match = re.search(r"(?:^|\.)layers\.(\d+)\.(.+)$", path)
        if match is None:
            continue  # outside the blocks: adapted by a full path in keys or not at all (the structure check's)
        layer, inside = int(match.group(1)), match.group(2)
        if isinstance(keys, list) and inside not in keys:
            continue  # selected by no key at all: validate's structure check reports it
        blocks.setdefault(layer, []).append(path)
    if n > 0 and blocks:
        first = total_layers - n if total_layers is not None else None
        if first is not None:
            out += [Refusal(p, f"mlx-lm adapts the last {n} of the base's {total_layers} blocks (num_layers), "
                               f"from block {first}; this module is in block {layer}",
                            "raise num_layers (or set it to -1 for every block), or name full paths in keys")
                    for layer, paths in sorted(blocks.items()) if layer < first for p in paths]  # fmt: skip
        elif len(blocks) > n:
            why = (f"mlx-lm adapts the last {n} blocks (num_layers), and the adapter has tensors in {len(blocks)} "
                   f"({min(blocks)} to {max(blocks)})")  # fmt: skip
            out.append(Refusal("num_layers", why, "raise num_layers (-1: every block), or name full paths in keys"))
    return out
