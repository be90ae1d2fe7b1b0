"""What to add where: the adapters loaded and checked, each module's term matched to its base tensor
(experts sliced, tied copies found, grown vocabularies), before a byte is written."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ... import arch, experts
from ...adapter import Adapter, Kind, LoraModule
from ...errors import (
    LoraToolError,
    MissingKeyError,
    ShapeMismatchError,
    UnsupportedAdapterError,
    UnsupportedCheckpointError,
)
from ...formats import AdapterArg, diffusers, load_adapter, split_scale
from ...formats.kohya import resolve_paths
from ...io.checkpoint import Checkpoint, dtype_name
from ...io.logical import RenamedView
from ...validation import require_float_weight, require_valid


@dataclass
class Term:
    """One adapter module's contribution to one base tensor."""

    module: LoraModule
    kind: Kind
    factor: float  # sign * user scale * module scaling
    bias_key: str | None = None
    expert: int | None = None  # the slice of a 3-D experts parameter this term adds to


# PEFT features whose adapters are not a plain weight delta
_NOT_MERGEABLE = {
    "alora_invocation_tokens": "an Activated LoRA acts only after its invocation tokens",
    "layer_replication": "layer_replication builds layers the checkpoint does not have",
}


def load_adapters(
    adapters: Sequence[AdapterArg], sign: int, allow_pickle: bool
) -> tuple[list[tuple[Adapter, float, str]], list[str]]:
    """The adapters and their scales, each checked as validate checks it (headers), and the warnings."""
    loaded, warnings = [], []
    for item in adapters:
        source, scale = split_scale(item)
        adapter = source if isinstance(source, Adapter) else load_adapter(source, allow_pickle=allow_pickle)
        if not isinstance(source, Adapter):
            refusal = f"{'merge' if sign > 0 else 'unmerge'} refuses it"
            warnings += require_valid(source, refusal, allow_pickle=allow_pickle)
        name = adapter.path or "adapter"
        if adapter.rewrites_base:
            raise UnsupportedAdapterError(
                f"init_lora_weights={adapter.config.get('init_lora_weights')!r} trained this adapter against a "
                "rewritten base weight, so adding it to the original base gives wrong weights",
                path=name,
                fix="convert it first with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))",
            )
        for field_name, what in _NOT_MERGEABLE.items():
            if adapter.config.get(field_name):
                raise UnsupportedAdapterError(
                    f"{field_name} is set: {what}, so its delta does not belong in the weights (PEFT refuses "
                    "to merge it too)",
                    path=name,
                    fix="serve it as an adapter with a runtime that supports the feature",
                )
        if adapter.use_dora and sign < 0:
            raise UnsupportedAdapterError(
                "DoRA adapters (use_dora) cannot be unmerged: the merge rescaled each row by a norm "
                "that only the original weight determines",
                path=name,
                fix="keep the original base checkpoint to go back to",
            )
        _require_float32_factors(adapter, scale, name)
        loaded.append((adapter, scale, name))
    if not loaded:
        raise MissingKeyError("no adapter given", fix="name at least one ADAPTER")
    return loaded, warnings


def _require_float32_factors(adapter: Adapter, scale: float, name: str) -> None:
    """The merge multiplies each module's product by ``scale * scaling`` in float32: refuse a factor
    beyond its range (a finite scale such as 1e38), naming the module, before any work is done."""
    top = torch.finfo(torch.float32).max
    for path, m in adapter.modules.items():
        if abs(scale * m.scaling) > top:
            raise LoraToolError(
                f"the scale {scale:g} times this module's scaling ({m.scaling:g}) is past float32's range "
                f"(+-{top:.6g}), in which the delta is computed", path=name, key=path,
                fix="give a smaller scale (ADAPTER:SCALE)",
            )  # fmt: skip


def plan_terms(
    ckpt: Checkpoint,
    loaded: list[tuple[Adapter, float, str]],
    sign: int,
    fan_in_fan_out: bool | None,
    warnings: list[str] | None = None,
) -> tuple[dict[str, list[Term]], dict[str, torch.Tensor]]:
    """Which adapter modules add to which tensors, checked before any work is done (what the user
    should know of the plan goes to ``warnings``)."""
    config = ckpt.config()
    arch.require_override_agrees(config, fan_in_fan_out, str(ckpt.path))
    conv1d_model = arch.conv1d_convention(config)
    module_paths = [k[: -len(".weight")] for k in ckpt.keys() if k.endswith(".weight")]
    terms: dict[str, list[Term]] = {}
    replace: dict[str, torch.Tensor] = {}
    tied = arch.tied_output(list(ckpt.keys()), config)
    for adapter, scale, name in loaded:
        _refuse_tied_head(ckpt, config, tied, adapter, name)
        if arch.untied_partner(adapter, config):
            raise UnsupportedAdapterError(arch.UNTIED_WHY, path=name, key=arch.OUTPUT_LAYER, fix=arch.UNTIED_FIX)
        for key, t in adapter.whole.items():
            if key not in ckpt and arch.is_tied_head_unchanged(ckpt, tied, key, t, adapter):
                continue  # PEFT saves a tied head's base layer: the embedding the base stores for both
            if key not in ckpt:
                raise MissingKeyError(
                    "the adapter replaces this tensor, but the base has no such tensor",
                    path=name,
                    key=key,
                    fix="is this adapter for another model?",
                )
            is_base_layer = key.rsplit(".", 1)[0] in adapter.modules
            if sign < 0 and not is_base_layer:
                raise UnsupportedAdapterError(
                    "the adapter replaces this tensor whole (modules_to_save), so its original value "
                    "is not in the adapter and cannot be restored",
                    path=name,
                    key=key,
                    fix="restore from the original base checkpoint instead",
                )
            replace[key] = t
        _grow_tied_output(ckpt, config, adapter, replace)
        if adapter.replaced and scale != 1.0:
            raise UnsupportedAdapterError(
                f"the adapter replaces '{adapter.replaced[0]}' whole (modules_to_save): a trained tensor has no "
                f"scale, so at {scale:g} its LoRA would be scaled and the replacement written in full",
                path=name, key=adapter.replaced[0], fix="drop the :SCALE of this adapter",
            )  # fmt: skip
        if adapter.token_rows and scale != 1.0:
            raise UnsupportedAdapterError(
                f"trainable tokens replace rows: they cannot be merged at scale {scale}", path=name,
                fix="drop the :SCALE of this adapter",
            )  # fmt: skip
        _replace_token_rows(ckpt, config, adapter, replace, sign, name)
        if scale == 0 and warnings is not None:
            warnings.append(f"{name} at scale 0 adds nothing: its modules were checked against the base and left out")
        for path, module in adapter.modules.items():
            if module.expert is not None:
                for key, term in _expert_terms(ckpt, config, path, module, sign * scale, name):
                    if scale != 0:
                        terms.setdefault(key, []).append(term)
        found = resolve_paths(adapter, module_paths)
        for path, module in adapter.modules.items():
            if module.expert is not None:
                continue
            if path not in found and arch.is_tied_copy(module, adapter, found, config):
                continue  # the shared matrix is stored once, under the input embedding
            multimodal = arch.renamed_on_load(config)
            if path not in found and multimodal:
                raise UnsupportedCheckpointError(
                    f"the base has no '{path}.weight': {multimodal} is {arch.RENAMED_WHY}", path=name, key=path,
                    fix="merge into a text-only checkpoint of the same language model, or serve the adapter unmerged"
                    if sign > 0 else "unmerge from a text-only checkpoint of the same language model",
                )  # fmt: skip
            if path not in found and adapter.format == "kohya" and diffusers.component_of(ckpt.root, config):
                raise MissingKeyError(
                    f"no module of the base is named by this kohya prefix: {diffusers.KOHYA_LAYOUT_WHY}",
                    path=name, key=path, fix="convert the LoRA to diffusers' layout with diffusers or kohya's tools",
                )  # fmt: skip
            if path not in found:
                raise MissingKeyError(
                    "the adapter has this module, but the base has no matching '<module>.weight'",
                    path=name,
                    key=path,
                    fix="is this adapter for another model? Check base_model_name_or_path in adapter_config.json",
                )
            key = found[path] + ".weight"
            shape = tuple(replace[key].shape) if key in replace else ckpt.info(key).shape
            kind = arch.weight_kind(module.kind, (module.out_features, module.in_features), shape,
                                     override=fan_in_fan_out, conv1d_model=conv1d_model)  # fmt: skip
            expected = module.weight_shape if kind == module.kind else (module.weight_shape[1], module.weight_shape[0])
            if shape != expected:
                raise ShapeMismatchError(
                    f"the adapter's {module.kind} module does not fit the base weight",
                    path=name,
                    key=key,
                    expected=list(expected),
                    got=list(shape),
                    fix="is this adapter for another model (or size of it)?",
                )
            stored = dtype_name(replace[key].dtype) if key in replace else ckpt.info(key).dtype
            require_float_weight(stored, path=name, key=key)
            bias_key = None
            if module.bias is not None:
                bias_key = found[path] + ".bias"
                if bias_key not in ckpt:
                    raise UnsupportedAdapterError(
                        "the adapter has lora_bias but the base layer has no bias", path=name, key=key
                    )
            if sign < 0 and key in adapter.whole:
                continue  # the adapter stores this base layer's original weight: restoring it is the unmerge
            if module.magnitude is not None:
                _check_dora(module, kind, scale, name, key)
            if warnings is not None and tied and key == tied[1] and tied[0] + ".weight" not in ckpt:
                # no tied copy for the head (extract's, ensure_weight_tying's); mlx-lm serves both uses as merged
                if tied[0] not in adapter.modules and adapter.format != "mlx":
                    warnings.append(
                        f"{path} is tied to {tied[0]} in this base (one matrix): its merged delta changes the "
                        "output layer too, as PEFT's merge does, where the adapter served unmerged changes only "
                        "the input embedding (PEFT's ensure_weight_tying trains both uses)"
                    )
            if scale != 0:
                terms.setdefault(key, []).append(Term(module, kind, sign * scale * module.scaling, bias_key))
    rows = sorted(k for a, _, _ in loaded for k in a.token_rows if k in terms)
    if rows:
        raise UnsupportedAdapterError(
            "trainable tokens replace rows of this weight and a LoRA module adds to it: the result would "
            "depend on the order", key=rows[0], fix="merge the two adapters one after the other",
        )  # fmt: skip
    for key, ts in terms.items():
        if len(ts) > 1 and any(t.module.magnitude is not None for t in ts):
            raise UnsupportedAdapterError(
                "a DoRA module and another adapter change this weight: DoRA rescales the whole row, so the "
                "result would depend on the order",
                key=key,
                fix="merge the DoRA adapter on its own, then the others into its output",
            )
    return terms, replace


def _expert_terms(
    ckpt: Checkpoint, config: dict[str, Any], path: str, module: LoraModule, factor: float, name: str
) -> list[tuple[str, Term]]:
    """The terms of one expert of a 3-D parameter (loratool.experts): one, where the base stores the
    parameter whole, (E, out, in) or (E, in, out) for the experts transformers stores transposed;
    or one per 2-D weight where it stores the experts apart (gate_proj and up_proj for the fused
    gate_up_proj), as transformers fuses them on load."""
    assert module.expert is not None
    e, count = module.expert
    key = path.rpartition(".")[0]
    transposed = config.get("model_type") in experts.TRANSPOSED_EXPERT_MODEL_TYPES
    if key not in ckpt:
        apart = experts.apart_weights(key, e, ckpt.shape_of, transposed_model=transposed)
        if apart is None:
            raise MissingKeyError(
                "the adapter adapts this 3-D experts parameter, but the base stores it neither whole nor "
                "apart as transformers fuses it (gate_proj/up_proj/down_proj or Mixtral's w1/w3/w2 per expert)",
                path=name, key=key, fix="is this adapter for another model?",
            )  # fmt: skip
        pieces = experts.split_apart(module, [s for _, s in apart])
        if pieces is None:
            raise ShapeMismatchError(
                "the adapter's experts do not fit the base's per-expert weights", path=name, key=apart[0][0],
                expected=[module.out_features, module.in_features], got=[list(s) for _, s in apart],
                fix="is this adapter for another model?",
            )  # fmt: skip
        for k, _ in apart:
            require_float_weight(ckpt.info(k).dtype, path=name, key=k)
        return [(k, Term(piece, kind, factor * module.scaling)) for (k, _), (piece, kind) in zip(apart, pieces)]
    require_float_weight(ckpt.info(key).dtype, path=name, key=key)
    shape = tuple(ckpt.info(key).shape)
    kind = experts.stored_kind(shape, module, transposed_model=transposed)
    if kind is None:
        out_in = (module.out_features, module.in_features)
        raise ShapeMismatchError(
            "the adapter's experts do not fit this parameter", path=name, key=key,
            expected=[count, *(out_in[::-1] if transposed else out_in)], got=list(shape),
            fix="is this adapter for another model?",
        )  # fmt: skip
    return [(key, Term(module, kind, factor * module.scaling, expert=e))]


def _check_dora(module: LoraModule, kind: Kind, scale: float, name: str, key: str) -> None:
    """DoRA merges as PEFT's does: linear and Conv1D layers, at the adapter's own scale."""
    if kind in ("embedding", "conv2d"):
        raise UnsupportedAdapterError(f"DoRA on {kind} layers cannot be merged by loratool yet", path=name, key=key)
    if scale != 1.0:
        raise UnsupportedAdapterError(
            f"a DoRA adapter merges at scale 1 only (got {scale}): its magnitudes are absolute",
            path=name,
            key=key,
            fix="drop the :SCALE of this adapter",
        )
    if tuple(module.magnitude.shape) != (module.out_features,):  # type: ignore[union-attr]
        raise ShapeMismatchError(
            "lora_magnitude_vector does not match the layer's output size",
            path=name,
            key=key,
            expected=[module.out_features],
            got=list(module.magnitude.shape),  # type: ignore[union-attr]
        )


def _refuse_tied_head(
    ckpt: Checkpoint, config: dict[str, Any], tied: tuple[str, str] | None, adapter: Adapter, name: str
) -> None:
    """A LoRA on an output layer the base stores only as its tied input embedding (Llama 3.2 1B and
    3B, Gemma, small Qwens: PEFT saves it with the layer's weight as ``base_layer``). The two uses
    share one matrix: adding the head's delta to it changes the input embedding too, which PEFT's
    merge_and_unload does and the adapter served unmerged does not. Refused, by name, rather than
    merged either way (the extracted tied copy :func:`is_tied_copy` recognizes is another case)."""
    if tied is None or tied[0] + ".weight" in ckpt:
        return
    head = tied[0] + ".weight"
    if head in adapter.whole and not arch.is_tied_head_unchanged(ckpt, tied, head, adapter.whole[head], adapter):
        raise UnsupportedCheckpointError(
            f"the adapter replaces '{tied[0]}' whole (modules_to_save), which this base ties to its input embedding "
            f"'{tied[1]}' (tie_word_embeddings): the checkpoint holds one matrix for both, so writing the trained "
            "head there would replace the input embedding as well",
            path=name, key=head,
            fix=f"untie the base first ({arch.UNTIE_STEPS}), then merge into that; or serve the adapter unmerged",
        )  # fmt: skip
    if tied[0] not in adapter.modules:
        return
    if arch.is_tied_copy(adapter.modules[tied[0]], adapter, adapter.modules, config):
        return
    raise UnsupportedCheckpointError(
        f"the adapter has a LoRA on '{tied[0]}', which this base ties to its input embedding '{tied[1]}' "
        "(tie_word_embeddings): the checkpoint holds one matrix for both, so merging the head's delta changes "
        "the input embedding as well (PEFT's merge_and_unload does so), and the merged model would not behave "
        "as the adapter does",
        path=name, key=tied[0],
        fix=f"serve the adapter unmerged, or untie the base first ({arch.UNTIE_STEPS}), then merge into that",
    )  # fmt: skip


def _grown_rows(ckpt: Checkpoint, replace: dict[str, torch.Tensor]) -> dict[str, int]:
    """Replaced vocabulary tensors with more rows than the base's: tokens were added."""
    out = {}
    for key, t in replace.items():
        old = tuple(ckpt.info(key).shape)
        if t.dim() == 2 and len(old) == 2 and t.shape[1] == old[1] and t.shape[0] > old[0]:
            out[key] = int(t.shape[0])
    return out


def _replace_token_rows(
    ckpt: Checkpoint, config: dict[str, Any], adapter: Adapter, replace: dict[str, torch.Tensor], sign: int, name: str
) -> None:
    """PEFT's trainable tokens: the adapter's rows replace the weight's rows at their indices (PEFT's
    ``index_copy``), in a tied output layer too where the base stores one."""
    tied = arch.tied_output(list(ckpt.keys()), config)
    for key, (indices, rows) in adapter.token_rows.items():
        if sign < 0:
            raise UnsupportedAdapterError(
                "trainable tokens replace rows whose original values the adapter does not keep", path=name, key=key,
                fix="restore from the original base checkpoint instead",
            )  # fmt: skip
        if key not in ckpt:
            raise MissingKeyError("the adapter's trainable tokens are for a weight the base lacks", path=name, key=key)
        targets = [key] + ([tied[0] + ".weight"] if tied and tied[1] == key and tied[0] + ".weight" in ckpt else [])
        for target in targets:
            current = replace[target] if target in replace else ckpt.get(target)
            if current.dim() != 2 or rows.shape != (len(indices), current.shape[1]) or max(indices) >= current.shape[0]:
                raise ShapeMismatchError(
                    "the trainable tokens do not fit this weight", path=name, key=target,
                    expected=f"{len(indices)} rows of {current.shape[-1]}, indices below {current.shape[0]}",
                    got=f"{list(rows.shape)}, largest index {max(indices)}",
                )  # fmt: skip
            replace[target] = current.clone().index_copy_(0, torch.tensor(indices), rows.to(current.dtype))


def _grow_tied_output(
    ckpt: Checkpoint, config: dict[str, Any], adapter: Adapter, replace: dict[str, torch.Tensor]
) -> None:
    """A grown input embedding of a tied model is one matrix: where the base also stores the output
    layer, it grows with it (the adapter holds the tensor once, under the input embedding)."""
    tied = arch.tied_output(list(ckpt.keys()), config)
    if tied is None:
        return
    head, embed = tied[0] + ".weight", tied[1]
    if embed in replace and head in ckpt and head not in adapter.whole and embed in _grown_rows(ckpt, replace):
        replace[head] = replace[embed]


def set_vocab_size(config_path: Path, ckpt: Checkpoint, replace: dict[str, torch.Tensor], warnings: list[str]) -> None:
    """config.json's vocab_size follows a vocabulary the merge grew."""
    grown = _grown_rows(ckpt, replace)
    if not grown or not config_path.is_file():
        return
    rows = max(grown.values())
    data = json.loads(config_path.read_text())
    old = data.get("vocab_size")
    if isinstance(old, int) and old < rows:
        data["vocab_size"] = rows
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    warnings.append(f"the vocabulary grew to {rows} rows ({', '.join(sorted(grown))}); config.json says so: "
                    "add the new tokens to the tokenizer you ship with it")  # fmt: skip


def files_of_adapter(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in (path / "adapter_model.safetensors", path / "adapter_config.json") if p.is_file()]


def stored_names(
    view: RenamedView, terms: dict[str, list[Term]], replace: dict[str, torch.Tensor]
) -> tuple[dict[str, list[Term]], dict[str, torch.Tensor]]:
    """A plan made against a vision-language checkpoint's live names, in the names its files hold."""
    name = view.inner_name
    renamed = {
        name(key): [dataclasses.replace(t, bias_key=name(t.bias_key) if t.bias_key else None) for t in ts]
        for key, ts in terms.items()
    }
    return renamed, {name(key): t for key, t in replace.items()}


def for_the_base(
    loaded: list[tuple[Adapter, float, str]], ckpt: Checkpoint, warnings: list[str]
) -> list[tuple[Adapter, float, str]]:
    """diffusers and kohya files, which hold modules by pipeline component, cut to the component the
    base is (``PIPE/unet``); what they hold for other components is left out, saying so."""
    return diffusers.each_for_base(loaded, ckpt, warnings, ": merge the file into their own component's folder too")
