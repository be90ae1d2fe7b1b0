"""``loratool merge`` and ``loratool unmerge``: W' = W +/- sum_i s_i * scaling_i * B_i @ A_i.

Streams the checkpoint one tensor at a time, in float32 on the chosen device, with one cast at the
end. The output keeps the input's layout: the same tensor names in the same shards, the index, and
the directory's other files (config, tokenizer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import arch, experts
from ..adapter import Adapter, Kind, LoraModule
from ..distributed import current
from ..errors import (
    AdapterLostError,
    MissingKeyError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedAdapterError,
    UnsupportedCheckpointError,
)
from ..formats import AdapterArg, load_adapter, refuse_adapter, split_scale
from ..formats.kohya import resolve_paths
from ..io.atomic import atomic_output, check_output
from ..io.checkpoint import Checkpoint, dtype_name, open_checkpoint, torch_dtype
from ..io.header import patch_metadata
from ..io.logical import ModelView, model_view
from ..io.writer import CheckpointWriter, TensorSpec, copy_aux_files
from ..linalg import RowFactors, add_lora, dora_rescale, is_finite, merge_rows, row_factors, unit_of_rounding
from ..pipeline import BackgroundWriter, BufferPool, fault_in, stream, to_device, widen
from ..provenance import InputHasher, encode, make_record
from ..quant import native, packed
from ..quant.fp8 import check_scale, dequantize_fp8, fp8_scratch_elements, merge_fp8_rows, quantize_fp8
from ..quant.layout import READ_ONLY, Fp8Layout, Fp8Scheme, PackedLayout, PackedWeight
from ..quant.rounding import (
    KEPT_WARNING,
    NOISE_LIMIT,
    RULES,
    Kept,
    Rounding,
    Rule,
    Subspace,
    default_rule,
    quantize_values,
    round_subspace,
    subspace_of,
    uniforms,
)
from ..runtime import available_cores, compute_threads, resolve_device, torch_threads
from ..validation import require_valid


@dataclass
class _Term:
    """One adapter module's contribution to one base tensor."""

    module: LoraModule
    kind: Kind
    factor: float  # sign * user scale * module scaling
    bias_key: str | None = None
    expert: int | None = None  # the slice of a 3-D experts parameter this term adds to


_CHECK_CHUNK = 1 << 18  # elements --check compares at a time (1 to 2 MiB a copy: reused, never fresh pages)


@dataclass
class RoundTripCheck:
    """How far an unmerged checkpoint is from the original base."""

    max_abs_diff: float = 0.0
    relative_diff: float = 0.0  # ||out - base||_F / ||base||_F over all tensors
    max_rounding_units: float = 0.0  # largest difference in units of rounding of the stored dtype
    elements_differing: int = 0
    elements: int = 0
    _sq_diff: float = 0.0
    _sq_base: float = 0.0

    def add(self, out: torch.Tensor, ref: torch.Tensor, merged: torch.Tensor, key: str | None = None) -> None:
        """Compare one restored tensor with the original; ``merged`` is the unmerge's input.

        In float64, a chunk of ``_CHECK_CHUNK`` elements at a time: the widened copies of a whole
        weight cost more in fresh pages than the arithmetic (45x the unmerge itself, before)."""
        if not out.is_floating_point():
            return
        if out.shape != ref.shape:
            raise ShapeMismatchError("--check BASE has this tensor in another shape", key=key,
                                     expected=list(out.shape), got=list(ref.shape))  # fmt: skip
        o, r, m = out.reshape(-1), ref.reshape(-1), merged.reshape(-1)
        # bfloat16 and float16 values, their differences and their units are exact in float32
        wide = torch.float32 if out.dtype in (torch.bfloat16, torch.float16) else torch.float64
        for i in range(0, o.numel(), _CHECK_CHUNK):
            oc, rc = o[i : i + _CHECK_CHUNK], r[i : i + _CHECK_CHUNK]
            if rc.dtype != oc.dtype:  # a base of another dtype: compared exactly, in float64
                oc, rc, wide = oc.double(), rc.double(), torch.float64
            rw = rc.to(wide)
            self._sq_base += float(torch.dot(rw, rw))  # the base's energy: a relative figure, float32 is plenty
            at = torch.nonzero(oc != rc).squeeze(1)  # a round trip brings most elements back exactly
            n = at.numel()
            if n == 0:
                continue
            od, rd, md = (t.index_select(0, at).to(wide) for t in (oc, rc, m[i : i + _CHECK_CHUNK]))
            diff = od - rd
            # A round trip rounds twice, at the magnitude of the merged and of the restored value.
            units = diff.abs() / unit_of_rounding(torch.maximum(rd.abs(), md.abs()), out.dtype)
            self.max_abs_diff = max(self.max_abs_diff, float(diff.abs().max()))
            self.max_rounding_units = max(self.max_rounding_units, float(units.max()))
            self._sq_diff += float(torch.sum(diff.square(), dtype=torch.float64))
            self.elements_differing += n
        self.relative_diff = (self._sq_diff / self._sq_base) ** 0.5 if self._sq_base else 0.0
        self.elements += out.numel()

    def add_fp8(self, out: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor],
                merged: tuple[torch.Tensor, torch.Tensor], scheme: Fp8Scheme) -> None:  # fmt: skip
        """Compare a restored FP8 weight (q, scale) with the original, dequantized. A round trip
        rounds on the merged grid and on the restored one, each with its own scales: a unit is the
        coarsest of the three grids' spacings at each element."""

        def values_and_unit(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return dequantize_fp8(q, scale, scheme).double(), fp8_steps(q, scale, scheme)

        (o, uo), (r, ur), (_, um) = values_and_unit(*out), values_and_unit(*ref), values_and_unit(*merged)
        diff = o - r
        if diff.numel():
            self.max_abs_diff = max(self.max_abs_diff, float(diff.abs().max()))
            units = diff.abs() / torch.maximum(torch.maximum(uo, ur), um)
            self.max_rounding_units = max(self.max_rounding_units, float(units.max()))
        q, ref_q = out[0], ref[0]
        self._sq_diff += float(diff.square().sum())
        self._sq_base += float(r.square().sum())
        self.relative_diff = (self._sq_diff / self._sq_base) ** 0.5 if self._sq_base else 0.0
        self.elements_differing += int((q.view(torch.uint8) != ref_q.view(torch.uint8)).sum())
        self.elements += q.numel()

    def add_grid(self, out: torch.Tensor, ref: torch.Tensor, unit: torch.Tensor, differing: int) -> None:
        """Compare restored values of a packed low-bit weight with the original's (float32), in
        ``unit``s, each element's coarsest grid step of the merged, restored and original grids;
        ``differing``: how many stored codes differ."""
        diff = out.double() - ref.double()
        if diff.numel():
            self.max_abs_diff = max(self.max_abs_diff, float(diff.abs().max()))
            self.max_rounding_units = max(self.max_rounding_units, float((diff.abs() / unit.double()).max()))
        self._sq_diff += float(diff.square().sum())
        self._sq_base += float(ref.double().square().sum())
        self.relative_diff = (self._sq_diff / self._sq_base) ** 0.5 if self._sq_base else 0.0
        self.elements_differing += differing
        self.elements += out.numel()

    @staticmethod
    def combine(parts: list[RoundTripCheck]) -> RoundTripCheck:
        """The check over all ranks' shares."""
        out = RoundTripCheck()
        for p in parts:
            out.max_abs_diff = max(out.max_abs_diff, p.max_abs_diff)
            out.max_rounding_units = max(out.max_rounding_units, p.max_rounding_units)
            out.elements_differing += p.elements_differing
            out.elements += p.elements
            out._sq_diff += p._sq_diff
            out._sq_base += p._sq_base
        out.relative_diff = (out._sq_diff / out._sq_base) ** 0.5 if out._sq_base else 0.0
        return out

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def fp8_steps(q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme) -> torch.Tensor:
    """Each element's FP8 unit of rounding at its value, in real units (float64)."""
    grid = dequantize_fp8(torch.ones_like(q), scale, scheme).double()  # each element's scale
    x = dequantize_fp8(q, scale, scheme).double()
    return unit_of_rounding((x / grid).abs(), q.dtype) * grid


@dataclass
class MergeResult:
    output: Path
    operation: str
    tensors_changed: int
    tensors_replaced: int
    tensors: int
    check: RoundTripCheck | None = None
    warnings: list[str] = field(default_factory=list)
    quantization: dict[str, Any] | None = None  # FP8 bases: the layout, the rounding and what it kept

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "output": str(self.output),
            "operation": self.operation,
            "tensors": self.tensors,
            "tensors_changed": self.tensors_changed,
            "tensors_replaced": self.tensors_replaced,
            "warnings": self.warnings,
        }
        if self.check is not None:
            d["check"] = self.check.to_json()
        if self.quantization is not None:
            d["quantization"] = self.quantization
        return d


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterArg],
    *,
    output: str | os.PathLike[str],
    device: str = "auto",
    dtype: str | None = None,
    fan_in_fan_out: bool | None = None,
    rounding: Rule | None = None,
    seed: int = 0,
    min_kept: float | None = None,
    max_noise: float | None = None,
    requantize: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = True,
) -> MergeResult:
    """Merge LoRA adapters into a checkpoint: W' = W + sum_i s_i * scaling_i * B_i @ A_i.

    Into a quantized (FP8) base, the merged weights are rounded back onto the base's grid (or, with
    ``dtype``, onto that dtype's), and how decides whether the adapter survives: nearest rounding
    writes the base back wherever the delta is below half a step (most of a typical LoRA), while
    the subspace and stochastic rules keep it (:mod:`loratool.quant.rounding`). The result's
    ``quantization`` reports ``kept``, the share of the delta the written weights carry. Plain
    checkpoints round to nearest, as PEFT.

    Args:
        base: the checkpoint (file or model directory) the adapters were trained on.
        adapters: adapter paths, or ``(path, scale)`` pairs (scale defaults to 1).
        output: where to write the merged checkpoint (a file for a file, a directory for a directory).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: the output's dtype for floating tensors (default: the base's).
        fan_in_fan_out: treat LoRA targets as GPT-2 ``Conv1D``; default from the adapter and config.
        rounding: onto a quantized base's grid: ``subspace`` (the default in an FP8 layout; its
            rounding error kept out of the adapter's input subspace), ``stochastic`` (unbiased; the
            default for a ``dtype`` output), or ``nearest`` (the quantizers' own rule, biased
            against small deltas).
        seed: the stochastic stream's seed; the bytes are the same for one seed on any device and
            any number of threads.
        min_kept: refuse (write nothing) when the merge's ``kept`` falls below this (0: never).
        max_noise: refuse (write nothing) when the rounding's ``noise`` exceeds this many times the
            delta's norm. Into a packed low-bit base in place, unless either is given, ``min_kept``
            0.8 and ``max_noise`` 1: on bench_fp4's trained pairs a 4-bit merge whose noise outgrew its
            delta could leave the model further from the merged one than the base was.
        requantize: ``"fp8"``: into a compressed-tensors NVFP4 or INT4/INT8 base, write the weights the
            adapters touch as FP8 128x128 block-scaled (the rest as they were), with a
            ``mixed-precision`` config that transformers loads.
        force: replace an existing output.

    Raises:
        AdapterLostError: ``kept`` is below ``min_kept``, or ``noise`` above ``max_noise``.
        MissingKeyError: an adapter module has no matching tensor in the base.
        ShapeMismatchError: an adapter module does not fit its tensor.
        UnsupportedAdapterError: adapters trained on a rewritten base (PiSSA, OLoRA, ...), DoRA.
        NonFiniteError: the merged weight holds NaN or Inf.

    Example:
        >>> loratool.merge("base/", ["adapter/", ("style/", 0.5)], output="merged/")
    """
    return _apply(+1, base, adapters, output=output, device=device, dtype=dtype, fan_in_fan_out=fan_in_fan_out,
                  rounding=rounding, seed=seed, min_kept=min_kept, max_noise=max_noise, force=force,
                  allow_pickle=allow_pickle,
                  show_progress=show_progress, requantize=requantize)  # fmt: skip


def unmerge(
    merged: str | os.PathLike[str],
    adapters: Sequence[AdapterArg],
    *,
    output: str | os.PathLike[str],
    check: str | os.PathLike[str] | None = None,
    device: str = "auto",
    dtype: str | None = None,
    fan_in_fan_out: bool | None = None,
    rounding: Rule | None = None,
    seed: int = 0,
    min_kept: float | None = None,
    max_noise: float | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = True,
) -> MergeResult:
    """Take merged adapters back out: W = W' - sum_i s_i * scaling_i * B_i @ A_i.

    In float32 the round trip is exact to rounding; in bf16/fp16 each element may land one unit
    of rounding away from the original. ``check`` (the original base) measures exactly that.

    From a quantized (FP8) checkpoint the subtraction is rounded as :func:`merge` rounds (nearest
    rounding would leave most of a small adapter in), and the restored codes lie within the
    merge's rounding and the unmerge's of the original (``check`` measures it, in FP8 steps), not
    on the original bytes.

    Args:
        merged: the merged checkpoint.
        adapters: the adapters (and scales) that were merged.
        output: where to write the restored checkpoint.
        check: the original base; the result reports the largest and relative difference from it.

    Raises:
        UnsupportedAdapterError: DoRA adapters (their merge cannot be undone from files alone).

    Example:
        >>> loratool.unmerge("merged/", ["adapter/"], output="restored/", check="base/")
    """
    return _apply(-1, merged, adapters, output=output, device=device, dtype=dtype, fan_in_fan_out=fan_in_fan_out,
                  rounding=rounding, seed=seed, min_kept=min_kept, max_noise=max_noise, force=force,
                  allow_pickle=allow_pickle,
                  show_progress=show_progress, check=check)  # fmt: skip


# PEFT features whose adapters are not a plain weight delta
_NOT_MERGEABLE = {
    "alora_invocation_tokens": "an Activated LoRA acts only after its invocation tokens",
    "layer_replication": "layer_replication builds layers the checkpoint does not have",
}


def _load_all(
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
        loaded.append((adapter, scale, name))
    if not loaded:
        raise MissingKeyError("no adapter given", fix="name at least one ADAPTER")
    return loaded, warnings


def _plan(
    ckpt: Checkpoint, loaded: list[tuple[Adapter, float, str]], sign: int, fan_in_fan_out: bool | None
) -> tuple[dict[str, list[_Term]], dict[str, torch.Tensor]]:
    """Which adapter modules add to which tensors, checked before any work is done."""
    config = ckpt.config()
    conv1d_model = arch.uses_conv1d(config)
    module_paths = [k[: -len(".weight")] for k in ckpt.keys() if k.endswith(".weight")]
    terms: dict[str, list[_Term]] = {}
    replace: dict[str, torch.Tensor] = {}
    for adapter, scale, name in loaded:
        for key, t in adapter.whole.items():
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
        if adapter.token_rows and scale != 1.0:
            raise UnsupportedAdapterError(
                f"trainable tokens replace rows: they cannot be merged at scale {scale}", path=name,
                fix="drop the :SCALE of this adapter",
            )  # fmt: skip
        _replace_token_rows(ckpt, config, adapter, replace, sign, name)
        for path, module in adapter.modules.items():
            if module.expert is not None:
                for key, term in _expert_terms(ckpt, config, path, module, sign * scale, name):
                    terms.setdefault(key, []).append(term)
        found = resolve_paths(adapter, module_paths)
        for path, module in adapter.modules.items():
            if module.expert is not None:
                continue
            if path not in found and _is_tied_copy(path, module, adapter, found, config):
                continue  # the shared matrix is stored once, under the input embedding
            multimodal = arch.renamed_on_load(config)
            if path not in found and multimodal:
                raise UnsupportedCheckpointError(
                    f"the base has no '{path}.weight': {multimodal} is {arch.RENAMED_WHY}", path=name, key=path,
                    fix="merge into a text-only checkpoint of the same language model, or serve the adapter unmerged"
                    if sign > 0 else "unmerge from a text-only checkpoint of the same language model",
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
            terms.setdefault(key, []).append(_Term(module, kind, sign * scale * module.scaling, bias_key))
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
) -> list[tuple[str, _Term]]:
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
        return [(k, _Term(piece, kind, factor * module.scaling)) for (k, _), (piece, kind) in zip(apart, pieces)]
    shape = tuple(ckpt.info(key).shape)
    kind = experts.stored_kind(shape, module, transposed_model=transposed)
    if kind is None:
        out_in = (module.out_features, module.in_features)
        raise ShapeMismatchError(
            "the adapter's experts do not fit this parameter", path=name, key=key,
            expected=[count, *(out_in[::-1] if transposed else out_in)], got=list(shape),
            fix="is this adapter for another model?",
        )  # fmt: skip
    return [(key, _Term(module, kind, factor * module.scaling, expert=e))]


def _check_dora(module: LoraModule, kind: Kind, scale: float, name: str, key: str) -> None:
    """DoRA merges as PEFT's does: linear and Conv1D layers, at the adapter's own scale."""
    if kind == "embedding":
        raise UnsupportedAdapterError("DoRA on embeddings cannot be merged by loratool yet", path=name, key=key)
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


def _is_tied_copy(
    path: str, module: LoraModule, adapter: Adapter, found: dict[str, str], config: dict[str, Any]
) -> bool:
    """An output layer tied to an embedding, absent from the checkpoint, whose factors are the
    embedding module's transposed (what extract writes for tied weights): merging it would add the
    same delta to the shared matrix twice."""
    if not arch.ties_word_embeddings(config):
        return False
    for other_path, other in adapter.modules.items():
        if other.kind == "embedding" and other_path in found and other.rank == module.rank:
            if torch.equal(other.lora_B.T, module.lora_A) and torch.equal(other.lora_A.T, module.lora_B):
                return other.scaling == module.scaling
    return False


def _apply(
    sign: int,
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterArg],
    *,
    output: str | os.PathLike[str],
    device: str,
    dtype: str | None,
    fan_in_fan_out: bool | None,
    rounding: Rule | None,
    seed: int,
    min_kept: float | None,
    force: bool,
    allow_pickle: bool,
    show_progress: bool,
    check: str | os.PathLike[str] | None = None,
    max_noise: float | None = None,
    requantize: str | None = None,
) -> MergeResult:
    operation = "merge" if sign > 0 else "unmerge"
    if rounding is not None and rounding not in RULES:
        raise ValueError(f"rounding must be one of {', '.join(RULES)}, not {rounding!r}")
    if min_kept is not None and not 0.0 <= min_kept <= 1.0:
        raise ValueError(f"min_kept must lie in [0, 1], not {min_kept!r}")
    if max_noise is not None and not max_noise >= 0.0:
        raise ValueError(f"max_noise must be 0 or more, not {max_noise!r}")
    usage = f"loratool {operation} {'BASE' if sign > 0 else 'MERGED'} ADAPTER[:SCALE]... -o OUT"
    refuse_adapter(base, "the checkpoint", usage)
    sources = [split_scale(a)[0] for a in adapters]
    inputs = [base, *(s for s in sources if not isinstance(s, Adapter)), *([check] if check is not None else [])]
    out = check_output(output, force=force, inputs=inputs)
    dev = resolve_device(device)
    loaded, warnings = _load_all(adapters, sign, allow_pickle)
    out_dtype = torch_dtype(dtype) if dtype else None
    d = current()
    with open_checkpoint(base, allow_pickle=allow_pickle) as ckpt, contextlib.ExitStack() as stack:
        fp8 = ckpt.fp8_layout()  # None, or the FP8 layout to keep; any other quantization is refused
        low_bit = ckpt.packed_layout()  # None, or the MXFP4 / NVFP4 / INT4 weights to keep
        view = model_view(ckpt)  # packed weights by the names and shapes adapters address
        terms, replace = _plan(view, loaded, sign, fan_in_fan_out)
        _check_fp8_plan(fp8, replace, str(ckpt.path))
        layouts = [q for q in (fp8, low_bit) if q is not None]  # both in a compressed-tensors mixed checkpoint
        dequantize = bool(layouts) and out_dtype is not None
        to_fp8 = _check_requantize(requantize, low_bit, terms, dequantize, str(ckpt.path))
        _check_packed_plan(low_bit, replace, terms, dequantize or bool(to_fp8), str(ckpt.path))
        packed_in_place = low_bit is not None and not dequantize and any(
            k in low_bit.weights and k not in to_fp8 for k in terms)  # fmt: skip
        if packed_in_place and min_kept is None and max_noise is None:
            min_kept, max_noise = KEPT_WARNING, NOISE_LIMIT  # a 4-bit grid: refuse rather than warn (bench_fp4)
        rule = Rounding(rounding or default_rule(dequantize, packed=packed_in_place), seed)
        bias_terms = {t.bias_key: t for ts in terms.values() for t in ts if t.bias_key}
        reference = stack.enter_context(open_checkpoint(check, allow_pickle=allow_pickle)) if check else None
        adapter_files = [f for a, _, _ in loaded if a.path for f in _adapter_files(Path(a.path))]
        hasher = InputHasher([*ckpt.file_paths(), *adapter_files], enabled=d.is_main)
        drop = fp8.companions if fp8 and dequantize else set()
        layout = _layout(view if dequantize else ckpt, replace, out_dtype, drop=drop)
        if to_fp8:
            assert low_bit is not None
            layout = _fp8_specs(layout, low_bit, to_fp8)
        params = {
            "adapters": [{"path": n, "scale": s} for _, s, n in loaded], "device": str(dev),
            "dtype": dtype, "fan_in_fan_out": fan_in_fan_out,
            **({"rounding": rule.to_json()} if layouts else {}), **({"requantize": requantize} if to_fp8 else {}),
        }  # fmt: skip
        result = MergeResult(out, operation, len(terms) + len(bias_terms), len(replace), len(ckpt), warnings=warnings)
        single_file = ckpt.path.is_file()
        # Each rank writes a size-balanced share of the shards into rank 0's temporary directory.
        tmp = stack.enter_context(atomic_output(out, force=force, directory=not single_file)) if d.is_main else None
        tmp = Path(d.broadcast(str(tmp)))
        root = tmp.parent if single_file else tmp
        shards = [(tmp.name if single_file else fname, specs) for fname, specs in layout]
        mine = d.share((f, sum(x.nbytes for x in specs)) for f, specs in shards)
        placeholder = {"format": "pt", **encode(make_record(operation, params, hasher.placeholder()))}

        def write_share() -> tuple[RoundTripCheck | None, list[tuple[str, Kept]]]:
            check_part = RoundTripCheck() if reference is not None else None
            share = _Stream(view if dequantize else ckpt, replace, terms, bias_terms, dev, out_dtype,
                            reference, check_part,
                            fp8=fp8, dequantize=dequantize, rounding=rule, low_bit=low_bit, view=view,
                            to_fp8=to_fp8)  # fmt: skip
            share.write(root, [(f, specs) for f, specs in shards if f in mine], placeholder,
                         show_progress and d.is_main, operation)  # fmt: skip
            return check_part, share.requantized

        parts = d.gather(write_share)
        checks = [c for c, _ in parts]
        if layouts:
            result.quantization = _quantization_report(layouts, dequantize, rule, [r for _, rs in parts for r in rs])
            if to_fp8:
                result.quantization["requantized_fp8"] = sorted(to_fp8)
            _require_kept(result.quantization, min_kept, max_noise, rule)  # before the output moves into place
            result.warnings += _quantization_warnings(result.quantization, rule)
            torch_passes = dequantize or native.fp8_kernels() is None or packed_in_place
            if rule.subspace and torch_passes and result.quantization["tensors"]:
                why = (
                    "its compiled kernels round onto FP8 grids only"
                    if dequantize or packed_in_place
                    else "loratool's compiled kernels are not built here: reinstall it with a C compiler on PATH"
                )
                result.warnings.append(f"the subspace rule ran as torch passes, column by column ({why}), which is "
                                       "slow on large models; --rounding stochastic is fast everywhere")  # fmt: skip
        elif min_kept is not None or max_noise is not None:
            result.warnings.append("--min-kept applies to quantized bases: this one is not, so its merged weights "
                                   "were rounded to nearest in the output dtype, as PEFT merges")  # fmt: skip
        final = {"format": "pt", **encode(make_record(operation, params, hasher.result()))} if d.is_main else None
        final = d.broadcast(final)
        for fname in mine:
            patch_metadata(root / fname, final or {})
        if reference is not None:
            result.check = RoundTripCheck.combine([c for c in checks if c is not None])
        d.barrier()
        if d.is_main and not single_file:
            copy_aux_files(ckpt.root, tmp)
            if dequantize:
                _drop_quantization_config(tmp / "config.json")
                (tmp / "hf_quant_config.json").unlink(missing_ok=True)  # ModelOpt's: the output is not quantized
            if to_fp8:
                _mixed_config(tmp / "config.json", to_fp8)
            _set_vocab_size(tmp / "config.json", ckpt, replace, result.warnings)
            if ckpt.index_file is not None:
                _rewrite_index(ckpt.index_file, tmp, layout)
    d.barrier()  # rank 0 has moved the output into place
    return result


@dataclass
class _Stream:
    """One pass over a share of the checkpoint: read, add the terms in float32, cast once, write."""

    ckpt: Checkpoint
    replace: dict[str, torch.Tensor]
    terms: dict[str, list[_Term]]
    bias_terms: dict[str, _Term]
    device: torch.device
    out_dtype: torch.dtype | None
    reference: Checkpoint | None
    check: RoundTripCheck | None
    fp8: Fp8Layout | None = None
    dequantize: bool = False  # FP8 weights are written in out_dtype, their scales dropped
    rounding: Rounding = field(default_factory=Rounding)  # onto the FP8 grid, or out_dtype's when dequantizing
    pool: BufferPool = field(default_factory=BufferPool)
    low_bit: PackedLayout | None = None  # MXFP4 / NVFP4 / INT4 weights (by logical name)
    view: Checkpoint | None = None  # the base as the model holds it: packed weights dequantized on read
    _reference_model: Checkpoint | None = None  # --check's base, likewise
    to_fp8: set[str] = field(default_factory=set)  # packed weights written as FP8 blocks (merge --requantize fp8)
    requantized: list[tuple[str, Kept]] = field(default_factory=list)  # per quantized weight changed: what it kept
    _stash: dict[str, tuple[torch.Tensor, bool]] = field(default_factory=dict)  # an FP8 pair's other half (pooled?)
    _later: set[str] = field(default_factory=set)  # FP8 pair members that come after their partner

    def __post_init__(self) -> None:
        # FP8 weights to rewrite (those with terms, or all when dequantizing), by weight and by scale key
        self._pair_of: dict[str, str] = {}
        for wkey, w in self.fp8.weights.items() if self.fp8 else []:
            if self.dequantize or wkey in self.terms:
                self._pair_of[wkey] = wkey
                self._pair_of[w.scale_key] = wkey
        # packed weights to requantize in place: each stored part -> the logical weight (computed at its first part)
        self._group_of: dict[str, str] = {}
        for wkey, pw in self.low_bit.weights.items() if self.low_bit and not self.dequantize else []:
            if wkey in self.to_fp8:  # written as an FP8 weight and its scale, named as compressed-tensors names them
                self._group_of.update({wkey: wkey, wkey + "_scale": wkey})
            elif wkey in self.terms:
                self._group_of.update({name: wkey for name in pw.parts.values()})
        if self.device.type == "cuda":  # the factors cross once (a small pageable copy per weight waits on the GPU)
            on_gpu: dict[int, LoraModule] = {}
            for m in {id(t.module): t.module for ts in self.terms.values() for t in ts}.values():
                a, b = m.lora_A.to(self.device, torch.float32), m.lora_B.to(self.device, torch.float32)
                on_gpu[id(m)] = dataclasses.replace(m, lora_A=a, lora_B=b)
            self.terms = {
                k: [dataclasses.replace(t, module=on_gpu[id(t.module)]) for t in ts] for k, ts in self.terms.items()
            }

    def write(self, root: Path, shards: list[tuple[str, list[TensorSpec]]], metadata: dict[str, str], show: bool,
              desc: str) -> None:  # fmt: skip
        # Three stages on three threads: read (prefetch), add the terms (here), and write
        # (BackgroundWriter, which also rounds to the output dtype where that is left to it).
        writer = BackgroundWriter(CheckpointWriter(root, shards, metadata=metadata, index_name=None), pool=self.pool)
        keys = [s.name for _, specs in shards for s in specs]
        position = {k: i for i, k in enumerate(keys)}
        # the member of an FP8 pair that comes second is computed with the first: never read it
        self._later = {k for k, i in position.items() if k in self._pair_of and position.get(self._partner(k), i) < i}
        first: dict[str, int] = {}
        for k, i in position.items():
            if k in self._group_of:
                first.setdefault(self._group_of[k], i)
        self._later |= {k for k in self._group_of if position.get(k, -1) != first.get(self._group_of[k])}
        threads = compute_threads() if self.device.type == "cpu" else contextlib.nullcontext()
        with threads:
            try:
                for key, w_in, w32 in stream(self._read, keys, desc=desc, show=show):
                    w, out_dtype, pooled = self._result(key, w_in, w32)
                    writer.write(key, w, out_dtype, recycle=pooled)
                writer.close()
            except BaseException:
                writer.abort()
                raise

    def _result(self, key: str, w_in: torch.Tensor, w32: torch.Tensor | None) -> tuple[torch.Tensor, torch.dtype, bool]:
        """The result for ``key`` (the input where nothing changes), the dtype to write it in, and
        whether the tensor is the pool's (the writer hands it back once written)."""
        if key in self._pair_of:
            return self._fp8_result(key, w_in)
        if key in self._group_of or (self.dequantize and self.low_bit is not None and key in self.low_bit.weights):
            return self._packed_result(key)
        out_dtype = self.out_dtype if (self.out_dtype is not None and w_in.is_floating_point()) else w_in.dtype
        if w32 is None and self._blocked(key):
            w, pooled = self._merge_blocked(key, w_in, out_dtype), True
        elif w32 is None:
            w, pooled = w_in, False
        else:
            w, pooled = self._add(key, w32, out_dtype, w_in), self.device.type == "cpu"
        if self.check is not None and self.reference is not None:
            w = w.to("cpu", out_dtype)
            self.check.add(w, _reference_tensor(self.reference, key), w_in, key)
        return w, out_dtype, pooled

    def _partner(self, key: str) -> str:
        """The other member of ``key``'s FP8 pair (a weight's scale, a scale's weight)."""
        assert self.fp8 is not None
        wkey = self._pair_of[key]
        return self.fp8.weights[wkey].scale_key if key == wkey else wkey

    def _fp8_result(self, key: str, w_in: torch.Tensor) -> tuple[torch.Tensor, torch.dtype, bool]:
        """An FP8 weight or its scale: dequantize, add the terms in float32, requantize to the same
        scheme (or keep float32 for a dequantized output). The pair is computed when its first
        member comes up; the other waits in ``_stash`` for its own turn in the file order."""
        if key in self._stash:
            t, pooled = self._stash.pop(key)
            return t, t.dtype, pooled
        assert self.fp8 is not None
        wkey = self._pair_of[key]
        info = self.fp8.weights[wkey]
        q = w_in if key == wkey else self.ckpt.get(wkey)
        scale = w_in if key == info.scale_key else self.ckpt.get(info.scale_key)
        check_scale(info.scale_key, scale)
        if self.dequantize or info.scheme.kind == "tensor" or self._has_dora(wkey):
            q_new, s_new = self._fp8_whole(wkey, q, scale, info.scheme)
            if self.dequantize:
                return q_new, q_new.dtype, False  # float, in out_dtype; its scale is not in the layout
        else:
            q_new, s_new = self._fp8_strips(wkey, q, scale, info.scheme)
        if self.check is not None and self.reference is not None:
            fp8_there = wkey in self.reference and self.reference.info(wkey).dtype.startswith("F8_")
            if fp8_there and info.scale_key in self.reference:  # the original in this FP8 layout too
                ref_q, ref_s = (
                    _reference_tensor(self.reference, wkey),
                    _reference_tensor(self.reference, info.scale_key),
                )
                self.check.add_fp8((q_new.cpu(), s_new.cpu()), (ref_q, ref_s), (q.cpu(), scale), info.scheme)
            else:  # stored otherwise (packed, say, before merge --requantize fp8): its values, in FP8 steps
                restored = dequantize_fp8(q_new.cpu(), s_new.cpu(), info.scheme)
                unit = fp8_steps(q_new.cpu(), s_new.cpu(), info.scheme)
                differing = restored.numel()  # other codes altogether
                ref = _reference_tensor(self._reference_view(), wkey).float()
                self.check.add_grid(restored, ref, unit, differing)
        pooled = q_new.device.type == "cpu"  # a new tensor of its own: the pool takes it back once written
        s_new = s_new.to(scale.dtype)  # both leave a GPU on the writer's thread
        mine, other = ((q_new, pooled), (s_new, False)) if key == wkey else ((s_new, False), (q_new, pooled))
        self._stash[info.scale_key if key == wkey else wkey] = other
        return mine[0], mine[0].dtype, mine[1]

    def _prefetched(self, key: str) -> bool:
        """Whether _read readies ``key`` for the device (an FP8 pair's first member): on CPU its pages
        faulted in, so that the strips never wait on the disk (a copy into a pool buffer, as before,
        costs a second pass over every byte on a core the strips share); to a GPU, sent, so that
        they never wait on the bus."""
        return key in self._pair_of and key not in self._later

    def _has_dora(self, key: str) -> bool:
        return any(t.module.magnitude is not None for t in self.terms.get(key, []))

    def _fp8_strips(
        self, key: str, q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge and requantize in steps of rows (:func:`merge_fp8_rows`): memory of a step on CPU,
        of the weight on a GPU."""
        # The subspace rule runs column by column: in the compiled kernels on the CPU even beside a GPU,
        # where torch would launch a few kernels per column.
        kernels = native.fp8_kernels()
        device = torch.device("cpu") if self.rounding.subspace and kernels is not None else self.device
        q_dev, s_dev = q.to(device), scale.to(device)
        q_new, s_new = self.pool.take(q.shape, q.dtype, device), torch.empty_like(s_dev)
        factors = [row_factors(t.module.lora_A.to(device), t.module.lora_B.to(device), t.factor, t.kind)
                   for t in self.terms[key]]  # fmt: skip
        stream, space = self._rule_for(key, [f.right for f in factors])

        def check(strip: torch.Tensor) -> None:
            if not is_finite(strip):  # the base is only dequantized whole to name the cause
                _require_finite(strip, torch.float32, key, dequantize_fp8(q_dev, s_dev, scheme))

        # One call over the whole weight. With the compiled kernels (loratool.quant.native) each step runs
        # whole on one core, on every core but one: the reader, writer and hasher keep the last, as
        # in the other streaming operations (compute_threads). Without them each step's passes run
        # on torch's threads, on every core (on 2 cores 4.5-5.6 s against 5.4-6.7 s with one core
        # left free: the reader and writer mostly wait in system calls).
        scratch = self.pool.take((fp8_scratch_elements(q.shape[0], q.shape[1], scheme, device),), torch.float32, device)
        if device.type != "cpu":
            threads: contextlib.AbstractContextManager[int] = contextlib.nullcontext(1)
        elif kernels is not None:
            threads = compute_threads(reserved=1)
        else:
            threads = torch_threads(available_cores())
        try:
            with threads:
                kept = merge_fp8_rows(q_dev, s_dev, scheme, factors, q_new, s_new, check, scratch, key=stream,
                                      space=space)  # fmt: skip
        finally:
            self.pool.give(scratch)
        self.requantized.append((key, kept))
        return q_new, s_new

    # -- packed low-bit weights (MXFP4, NVFP4, INT4/INT8) ------------------------------------------
    def _packed_result(self, key: str) -> tuple[torch.Tensor, torch.dtype, bool]:
        """A packed weight's part (requantized in place: the weight is computed at its first part, the
        others wait in ``_stash``), or the whole weight in the output dtype when dequantizing."""
        if key in self._stash:
            t, pooled = self._stash.pop(key)
            return t, t.dtype, pooled
        assert self.low_bit is not None
        if self.dequantize:
            w = self.low_bit.weights[key]
            out = self._packed_each(w, self._packed_dequantized).cpu()
            return out, out.dtype, False
        w = self.low_bit.weights[self._group_of[key]]
        if w.name in self.to_fp8:
            q, scale = (t.cpu() for t in self._packed_to_fp8(w))
            mine, other = (q, (scale, False)) if key == w.name else (scale, (q, False))
            self._stash[w.name + "_scale" if key == w.name else w.name] = other
            return mine, mine.dtype, False
        pieces = [self._packed_requantized(w, e) for e in (range(w.experts) if w.experts else [None])]
        new = {role: (torch.stack([p[role] for p in pieces]) if w.experts and role in ("codes", "scale")
                      else pieces[0][role]).cpu() for role in w.parts}  # fmt: skip
        for role, name in w.parts.items():
            if name != key:
                self._stash[name] = (new[role], False)
        mine = new[next(role for role, name in w.parts.items() if name == key)]
        return mine, mine.dtype, False

    def _parts(self, w: PackedWeight, expert: int | None = None) -> packed.Parts:
        """``w``'s stored tensors (one expert's) on the merge's device."""
        assert isinstance(self.view, ModelView)
        return {role: t.to(self.device) for role, t in self.view.parts(w, expert).items()}

    def _packed_each(self, w: PackedWeight, one: Callable[[PackedWeight, int | None], torch.Tensor]) -> torch.Tensor:
        """``one(w, expert)`` for each expert of a 3-D parameter (a 2-D weight: ``one(w, None)``), stacked."""
        if w.experts is None:
            return one(w, None)
        return torch.stack([one(w, e) for e in range(w.experts)])

    def _packed_dequantized(self, w: PackedWeight, expert: int | None) -> torch.Tensor:
        """One weight (or expert) dequantized, the terms added, in the output dtype by the rounding rule."""
        assert self.view is not None and self.out_dtype is not None
        before = packed.logical(w, packed.dequantize(w, self._parts(w, expert))).contiguous()
        name = w.name if expert is None else f"{w.name}.{expert}"
        if w.name not in self.terms:
            _require_finite(before, self.out_dtype, name, before)
            return quantize_values(before, self.out_dtype, None)
        merged = before.clone()
        factors = self._stored_factors(w, expert)
        stored = merged.T if w.transposed else merged  # merged is as the model holds it: this is its stored view
        for left, right, factor, _ in factors:
            stored.addmm_(left, right, alpha=factor)  # (rows, r) @ (r, cols), written through the view
        _require_finite(merged, self.out_dtype, name, before)
        # the rule rounds the model's rows: their right factors are the stored ones' left, transposed
        stream, space = self._rule_for(name, [f.left.T if w.transposed else f.right for f in factors])
        if space is not None and self.out_dtype != torch.float32:
            written = round_subspace(merged, torch.ones_like(merged), self.out_dtype, space).to(self.out_dtype)
        else:
            rows, cols = merged.shape
            u = uniforms(stream, 0, rows, cols, merged.device) if stream is not None else None
            written = quantize_values(merged, self.out_dtype, u)
        self.requantized.append((name, Kept.of(merged - before, merged - written.float())))
        if self.check is not None and self.reference is not None:
            ref = _reference_tensor(self._reference_view(), w.name)
            self.check.add(written.cpu(), ref[expert] if expert is not None else ref, merged.cpu(), w.name)
        return written

    def _packed_requantized(self, w: PackedWeight, expert: int | None) -> packed.Parts:
        """One weight (or expert) dequantized, the terms added, requantized in its format by the rule,
        a strip of rows at a time (rows round independently; temporaries of a strip's size, reused,
        where a weight's would cost more in fresh pages than in arithmetic); the whole weight at
        once where NVFP4 needs a new tensor scale."""
        parts = self._parts(w, expert)
        name = w.name if expert is None else f"{w.name}.{expert}"
        factors = self._stored_factors(w, expert)
        stream, space = self._rule_for(name, [f.right for f in factors])
        rows = w.rows_cols[0]
        step = packed.strip_rows(w) if space is None else rows  # subspace: a column loop, its overhead per strip
        try:
            pieces = [self._packed_strip(w, name, parts, factors, start, min(rows, start + step), stream, space)
                      for start in range(0, rows, step)]  # fmt: skip
        except packed.NeedsFreshScales:
            pieces = [self._packed_strip(w, name, parts, factors, 0, rows, stream, space, keep=False)]
        out = packed.join_rows(w, [p for p, _ in pieces])
        kept = Kept()
        for _, k in pieces:
            kept = kept.add(k)
        self.requantized.append((name, kept))
        return out

    def _packed_strip(self, w: PackedWeight, name: str, parts: packed.Parts, factors: list[RowFactors], start: int,
                      stop: int, stream: int | None, space: Subspace | None,
                      keep: bool = True) -> tuple[packed.Parts, Kept]:  # fmt: skip
        """Rows start:stop of a packed weight merged and requantized: their parts and kept sums."""
        sub = packed.rows_of(w, parts, start, stop) if (start, stop) != (0, w.rows_cols[0]) else parts
        before = packed.dequantize(w, sub)  # (rows', cols) as stored
        merged = before.clone()
        for left, right, factor, _ in factors:
            merged.addmm_(left[start:stop], right, alpha=factor)  # (rows', r) @ (r, cols)
        _require_finite(merged, torch.float32, name, before)
        out = packed.requantize(w, merged, sub, before=before, key=stream, space=space, keep_scales=keep, row0=start)
        if self.check is not None and self.reference is not None:
            ref = _reference_tensor(self._reference_view(), w.name)
            expert = int(name.rsplit(".", 1)[1]) if w.experts is not None else None
            ref = packed.to_stored(w, ref[expert] if expert is not None else ref)[start:stop]
            restored = packed.dequantize(w, out.parts)
            unit = torch.maximum(packed.steps(w, out.parts, restored), packed.steps(w, sub, before))
            differing = int((out.parts["codes"] != sub["codes"]).sum())
            self.check.add_grid(restored.cpu(), ref.float(), unit.cpu(), differing)
        return out.parts, out.kept

    def _stored_factors(self, w: PackedWeight, expert: int | None) -> list[RowFactors]:
        """The terms of ``w`` (of ``expert``) as factors of its stored orientation: delta = factor *
        left @ right, (rows, r) @ (r, cols), on the merge's device."""
        out = []
        for t in self.terms.get(w.name, []):
            if w.experts is not None and t.expert != expert:
                continue
            if t.module.magnitude is not None:
                raise UnsupportedCheckpointError(
                    "a DoRA adapter rescales whole rows of this packed low-bit weight; loratool merges DoRA into "
                    "plain and FP8 weights only", key=w.name, fix="pass --dtype bfloat16 for a dequantized output",
                )  # fmt: skip
            f = row_factors(t.module.lora_A.to(self.device), t.module.lora_B.to(self.device), t.factor, t.kind)
            out.append(RowFactors(f.right.T, f.left.T, f.factor) if w.transposed else f)  # stored = logical.T
        return out

    def _packed_to_fp8(self, w: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        """A packed 2-D weight dequantized, the terms added, and written as FP8 e4m3 in 128x128 blocks
        by the rounding rule: (weight, its block scales)."""
        assert w.experts is None
        before = packed.dequantize(w, self._parts(w))  # 2-D, not transposed: as the model holds it
        merged = before.clone()
        factors = self._stored_factors(w, None)
        for left, right, factor, _ in factors:
            merged.addmm_(left, right, alpha=factor)  # (rows, r) @ (r, cols)
        _require_finite(merged, torch.float32, w.name, before)
        stream, space = self._rule_for(w.name, [f.right for f in factors])
        rows, cols = merged.shape
        shape = (-(-rows // FP8_BLOCK[0]), -(-cols // FP8_BLOCK[1]))
        scheme = Fp8Scheme("block", FP8_BLOCK)
        q, scale = quantize_fp8(merged, scheme, torch.float8_e4m3fn, shape, key=stream, space=space)
        self.requantized.append((w.name, Kept.of(merged - before, merged - dequantize_fp8(q, scale, scheme))))
        return q, scale

    def _reference_view(self) -> Checkpoint:
        """--check's base as the model holds it (packed weights dequantized), opened once."""
        assert self.reference is not None
        if self._reference_model is None:
            self._reference_model = model_view(self.reference)
        return self._reference_model

    def _rule_for(self, key: str, rights: list[torch.Tensor]) -> tuple[int | None, Subspace | None]:
        """(the stochastic stream's key, the subspace) of tensor ``key``: at most one, none for nearest."""
        if self.rounding.subspace:
            return None, subspace_of(rights)
        return (self.rounding.key(key) if self.rounding.stochastic else None), None

    def _fp8_whole(
        self, key: str, q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize the whole weight, add the terms (DoRA too), then requantize it, or, for a
        dequantized output, return it in the output dtype (and the old scale, unused)."""
        before = dequantize_fp8(q.to(self.device), scale, scheme)  # (out, in) float32
        out_dtype = self.out_dtype if self.dequantize and self.out_dtype is not None else torch.float32
        if key not in self.terms:  # dequantized only: nothing to keep, so no draws
            assert self.dequantize and self.out_dtype is not None
            _require_finite(before, self.out_dtype, key, before)  # e.g. beyond float16's range
            return quantize_values(before, self.out_dtype, None), scale
        w32 = self._add(key, before.clone(), out_dtype, before)
        rights = [row_factors(t.module.lora_A, t.module.lora_B, t.factor, t.kind).right.to(w32.device)
                  for t in self.terms[key]] if self.rounding.subspace else []  # fmt: skip
        stream, space = self._rule_for(key, rights)
        if self.dequantize:
            assert self.out_dtype is not None
            rows, cols = w32.shape
            if space is not None and self.out_dtype != torch.float32:  # onto the dtype's grid: a scale of 1
                written = round_subspace(w32, torch.ones_like(w32), self.out_dtype, space).to(self.out_dtype)
            else:
                u = uniforms(stream, 0, rows, cols, w32.device) if stream is not None else None
                written = quantize_values(w32, self.out_dtype, u)
            self.requantized.append((key, Kept.of(w32 - before, w32 - written.float())))
            return written, scale
        q_new, s_new = quantize_fp8(w32, scheme, q.dtype, tuple(scale.shape), key=stream, space=space)
        self.requantized.append((key, Kept.of(w32 - before, w32 - dequantize_fp8(q_new, s_new, scheme))))
        return q_new, s_new

    def _blocked(self, key: str) -> bool:
        """On CPU, plain LoRA terms on a matrix go through :func:`merge_rows`, a block of rows at a time
        (DoRA rescales whole rows of the result, and a ``lora_bias`` adds to a separate 1-D tensor;
        FP8 weights are dequantized whole)."""
        ts = self.terms.get(key)
        return (
            self.device.type == "cpu"
            and ts is not None
            and all(t.module.magnitude is None for t in ts)
            and key not in self._pair_of
        )

    def _read(self, key: str) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        if key in self._later:
            return key, torch.empty(0), None  # its result waits in _stash
        if key in self._group_of or (self.dequantize and self.low_bit is not None and key in self.low_bit.weights):
            return key, torch.empty(0), None  # a packed weight: its parts are read where it is computed
        w = self.replace[key] if key in self.replace else self.ckpt.get(key)
        if self._prefetched(key) and self.device.type == "cuda":  # read and sent here, on the prefetch thread
            return key, to_device(w, self.device), None
        if self._prefetched(key):
            return key, fault_in(w), None
        changes = key in self.terms or key in self.bias_terms
        if not changes or self._blocked(key) or key in self._pair_of:
            return key, w, None
        return key, w, widen(w, self.device, self.pool)

    def _merge_blocked(self, key: str, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        out = self.pool.take(w.shape, out_dtype, self.device)
        rows = w.shape[-2] if w.dim() == 3 else 0  # 3-D experts: expert e is rows e*rows.. of (E*rows, cols)
        factors = [row_factors(t.module.lora_A, t.module.lora_B, t.factor, t.kind)._replace(row0=(t.expert or 0) * rows)
                   for t in self.terms[key]]  # fmt: skip
        scratch = self.pool.take((max(BLOCK_ELEMENTS, w.shape[-1]),), torch.float32, self.device)  # >= one row
        w2, out2 = w.reshape(-1, w.shape[-1]), out.view(-1, w.shape[-1])
        try:
            merge_rows(w2, factors, out2, scratch, check=lambda block: _require_finite(block, out_dtype, key, w))
        except BaseException:
            self.pool.give(out)
            raise
        finally:
            self.pool.give(scratch)
        return out

    def _add(self, key: str, w32: torch.Tensor, out_dtype: torch.dtype, w_in: torch.Tensor) -> torch.Tensor:
        """w32 (float32, a private copy of ``w_in``) plus every term for ``key``; refuses a non-finite result."""
        if key in self.terms:
            for t in self.terms[key]:
                add_lora(w32 if t.expert is None else w32[t.expert], t.module.lora_A, t.module.lora_B, t.factor, t.kind)
            dora = next((t for t in self.terms[key] if t.module.magnitude is not None), None)
            if dora is not None and dora.module.magnitude is not None:
                dora_rescale(w32, dora.module.magnitude, dora.kind)
        bias = self.bias_terms.get(key)
        if bias is not None and bias.module.bias is not None:
            w32.add_(bias.module.bias.to(w32.device, torch.float32), alpha=bias.factor)
        _require_finite(w32, out_dtype, key, w_in)
        return w32


BLOCK_ELEMENTS = 1 << 20  # float32 scratch of 4 MiB: a block stays in cache through all its steps


def _require_finite(w32: torch.Tensor, out_dtype: torch.dtype, key: str, base: torch.Tensor) -> None:
    """Refuse NaN or Inf in a merged weight, and values that would round to Inf in float16, naming the
    cause: the base itself (adapters are checked when loaded), or a delta too large for the dtype."""
    if not is_finite(w32):
        if not is_finite(base):
            raise NonFiniteError(
                "the base checkpoint holds NaN or Inf in this tensor", key=key, fix="repair or download the base again"
            )
        raise NonFiniteError(
            "adding the adapter overflowed float32 (values beyond 3.4e38)",
            key=key,
            fix="the scale you gave or the adapter's factors are far too large: check them (loratool inspect ADAPTER)",
        )
    if out_dtype == torch.float16 and w32.numel() and float(w32.abs().max()) > torch.finfo(out_dtype).max:
        raise NonFiniteError(
            "the merged weight does not fit float16 (values beyond 65504)",
            key=key,
            fix="check the scale you gave and the adapter's factors, or write another --dtype",
        )


def _layout(
    ckpt: Checkpoint, replace: dict[str, torch.Tensor], out_dtype: torch.dtype | None, *, drop: set[str]
) -> list[tuple[str, list[TensorSpec]]]:
    """The input's shards, tensor order and shapes, with the output dtype, less the tensors in ``drop``
    (the scales of a checkpoint written dequantized, whose FP8 weights take the output dtype)."""
    layout: dict[str, list[TensorSpec]] = {}
    for info in ckpt.infos():
        if info.name in drop:
            continue
        shape = tuple(replace[info.name].shape) if info.name in replace else info.shape
        dt = info.dtype
        if out_dtype is not None and (dt in ("F64", "F32", "F16", "BF16") or (drop and dt.startswith("F8_"))):
            dt = dtype_name(out_dtype)
        layout.setdefault(info.file, []).append(TensorSpec(info.name, shape, dt))
    return list(layout.items())


def _check_fp8_plan(fp8: Fp8Layout | None, replace: dict[str, torch.Tensor], path: str) -> None:
    whole = sorted(k for k in replace if fp8 is not None and (k in fp8.weights or k in fp8.companions))
    if whole:
        raise UnsupportedCheckpointError(
            f"the adapter replaces the FP8 tensor '{whole[0]}' whole, and its layout cannot take a float tensor",
            path=path,
            fix="merge into the unquantized checkpoint, or pass --dtype bfloat16 for a dequantized output",
        )


FP8_BLOCK = (128, 128)  # merge --requantize fp8: compressed-tensors' FP8_BLOCK scheme, DeepSeek's and Qwen's blocks


def _check_requantize(requantize: str | None, low_bit: PackedLayout | None, terms: dict[str, list[_Term]],
                      dequantize: bool, path: str) -> set[str]:  # fmt: skip
    """The packed weights ``--requantize fp8`` writes as FP8 (those the adapters touch), checked."""
    if requantize is None:
        return set()
    if requantize != "fp8":
        raise ValueError(f"requantize must be 'fp8', not {requantize!r}")
    if dequantize:
        raise ValueError("--requantize and --dtype exclude each other: --dtype writes every weight dequantized")
    if low_bit is None:
        raise UnsupportedCheckpointError(
            "--requantize fp8 writes the weights an adapter touches in a packed low-bit base (NVFP4, INT4/INT8) as "
            "FP8; this base has none", path=path, fix="leave --requantize out",
        )  # fmt: skip
    if low_bit.method != "compressed-tensors":
        why = {
            "mxfp4": "transformers' MXFP4 config has no way to say that some experts are FP8",
            "modelopt (NVFP4)": "loratool writes mixed checkpoints in compressed-tensors' config, not ModelOpt's",
        }
        raise UnsupportedCheckpointError(
            f"--requantize fp8 needs a compressed-tensors base (its config_groups can mix schemes); this one is "
            f"{low_bit.method}: {why.get(low_bit.method, 'its loaders read one scheme')}", path=path,
            fix="merge in place without it, pass --dtype bfloat16, or serve the adapter unmerged",
        )  # fmt: skip
    touched = {k for k in terms if k in low_bit.weights}
    experts = sorted(k for k in touched if low_bit.weights[k].experts is not None)
    if experts:
        raise UnsupportedCheckpointError("--requantize fp8 writes 2-D weights; this one is 3-D experts",
                                         key=experts[0], path=path)  # fmt: skip
    return touched


def _fp8_specs(layout: list[tuple[str, list[TensorSpec]]], low_bit: PackedLayout,
               to_fp8: set[str]) -> list[tuple[str, list[TensorSpec]]]:  # fmt: skip
    """The output layout with each weight of ``to_fp8`` stored as an FP8 weight and its block scales
    where its first part stood, its packed parts and activation scales gone."""
    gone = {t: w for w in to_fp8 for t in low_bit.weights[w].stored}
    out = []
    for fname, specs in layout:
        kept: list[TensorSpec] = []
        for spec in specs:
            w = gone.get(spec.name)
            if w is None:
                kept.append(spec)
            elif spec.name == low_bit.weights[w].parts["codes"]:
                rows, cols = low_bit.weights[w].shape
                shape = (-(-rows // FP8_BLOCK[0]), -(-cols // FP8_BLOCK[1]))
                kept += [TensorSpec(w, (rows, cols), "F8_E4M3"), TensorSpec(w + "_scale", shape, "F32")]
        out.append((fname, kept))
    return out


def _mixed_config(config: Path, to_fp8: set[str]) -> None:
    """config.json of a ``--requantize fp8`` output: compressed-tensors ``mixed-precision``, each group
    with its format, and a group of FP8 blocks naming the modules written so (an exact name takes
    precedence over the other groups' regexes and class names in compressed-tensors' matching)."""
    data = json.loads(config.read_text())
    key = "quantization_config" if "quantization_config" in data else "compression_config"
    qc = dict(data[key])
    groups = {name: {**g, "format": g.get("format") or qc.get("format")} for name, g in qc["config_groups"].items()}
    groups["loratool_fp8_block"] = {
        "targets": sorted(w.removesuffix(".weight") for w in to_fp8),
        "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": list(FP8_BLOCK),
                    "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128,
                              "symmetric": True, "dynamic": True},
        "format": "float-quantized",
    }  # fmt: skip
    data[key] = {**qc, "format": "mixed-precision", "config_groups": groups}
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _check_packed_plan(low_bit: PackedLayout | None, replace: dict[str, torch.Tensor], terms: dict[str, list[_Term]],
                       dequantize: bool, path: str) -> None:  # fmt: skip
    if low_bit is None or dequantize:
        return
    read_only = sorted(k for k in terms if k in low_bit.weights and low_bit.weights[k].scheme.format in READ_ONLY)
    if read_only:
        raise UnsupportedCheckpointError(
            f"the base is {low_bit.method}-quantized ('{read_only[0]}'): its quantizer needs calibration data to "
            "requantize a merged weight, which a checkpoint does not carry, so loratool does not merge into it in "
            "place",
            path=path, fix="pass --dtype bfloat16 for a dequantized output, or serve the adapter unmerged",
        )  # fmt: skip
    whole = sorted(k for k in replace if k in low_bit.weights)
    if whole:
        raise UnsupportedCheckpointError(
            f"the adapter replaces the packed low-bit weight '{whole[0]}' whole, and its layout cannot take a float "
            "tensor", path=path,
            fix="pass --dtype bfloat16 for a dequantized output, or merge into the unquantized checkpoint",
        )  # fmt: skip


def _quantization_report(
    layouts: list[Fp8Layout | PackedLayout], dequantized: bool, rounding: Rounding, records: list[tuple[str, Kept]]
) -> dict[str, Any]:
    """The layout, the rounding, and what the written weights carry of the delta: ``kept`` and
    ``noise`` (:class:`loratool.quant.rounding.Kept`) per weight and over all of them."""
    total = Kept()
    for _, k in records:
        total = total.add(k)
    tensors = [{"tensor": key, **k.to_json()} for key, k in sorted(records, key=lambda r: r[0])]
    grids = []
    for layout in layouts:
        bits = {w.scheme.bits for w in layout.weights.values()} if isinstance(layout, PackedLayout) else {8}
        grids.append("FP8" if isinstance(layout, Fp8Layout) else f"{max(bits)}-bit")
    described = [layout.describe() for layout in layouts]
    head = {**{k: v for d in reversed(described) for k, v in d.items()},  # the first layout's method
            "schemes": sorted({s for d in described for s in d["schemes"]}),
            "quantized_weights": sorted({w for d in described for w in d["quantized_weights"]})}  # fmt: skip
    return {**head, "grid": " and ".join(grids), "dequantized": dequantized, "rounding": rounding.to_json(),
            **total.to_json(), "tensors": tensors}  # fmt: skip


def _short_of(report: dict[str, Any], threshold: float) -> list[dict[str, Any]]:
    """The weights whose own ``kept`` is below ``threshold``, the worst first."""
    low = [t for t in report["tensors"] if t["kept"] is not None and t["kept"] < threshold]
    return sorted(low, key=lambda t: t["kept"])


def _names(tensors: list[dict[str, Any]], most: int = 3) -> str:
    shown = ", ".join(f"{t['tensor']} ({t['kept']:.2f})" for t in tensors[:most])
    return shown + (f" and {len(tensors) - most} more" if len(tensors) > most else "")


def _remedy(report: dict[str, Any], rounding: Rounding) -> str:
    steps = ["--rounding subspace (the default: keeps the delta)"] if rounding.rule == "nearest" else []
    if not report["dequantized"]:
        steps.append("--dtype bfloat16 for a dequantized checkpoint")
    steps.append("serving the adapter unmerged")
    if report["grid"] != "FP8" and not report["dequantized"]:
        if report.get("method") == "compressed-tensors" and "requantized_fp8" not in report:
            steps.append("--requantize fp8 for the weights it touches")
        steps.append("--min-kept 0 to write it all the same")
    return "; ".join(steps)


def _require_kept(report: dict[str, Any], min_kept: float | None, max_noise: float | None, rounding: Rounding) -> None:
    kept, noise = report["kept"], report["noise"]
    if kept is None:
        return
    if min_kept is not None and min_kept > 0 and kept < min_kept:  # 0: write whatever it keeps
        raise AdapterLostError(
            f"the written weights carry {kept:.3f} of the adapter's delta, below --min-kept {min_kept:g}; nothing "
            f"was written. Lowest: {_names(_short_of(report, min_kept) or report['tensors'])}",
            fix=f"try {_remedy(report, rounding)}",
        )
    if max_noise is not None and noise is not None and noise > max_noise:
        noisiest = sorted(report["tensors"], key=lambda t: -(t["noise"] or 0))
        shown = ", ".join(f"{t['tensor']} ({t['noise']:.2f})" for t in noisiest[:3])
        raise AdapterLostError(
            f"rounding onto the {report['grid']} grid adds noise {noise:.2f} times the adapter's delta, above "
            f"--max-noise {max_noise:g}: the written weights would change more by rounding than by the adapter; "
            f"nothing was written. Noisiest: {shown}",
            fix=f"try {_remedy(report, rounding)}",
        )


def _quantization_warnings(report: dict[str, Any], rounding: Rounding) -> list[str]:
    kept = report["kept"]
    if kept is None or kept >= KEPT_WARNING:
        return []
    return [
        f"the written weights carry only {kept:.0%} of the adapter's delta (kept, over {len(report['tensors'])} "
        f"weights; lowest {_names(_short_of(report, KEPT_WARNING))}): rounding onto the "
        f"{'output dtype' if report['dequantized'] else report['grid'] + ' grid'} erased the rest. Try "
        f"{_remedy(report, rounding)}"
    ]


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


def _set_vocab_size(config_path: Path, ckpt: Checkpoint, replace: dict[str, torch.Tensor], warnings: list[str]) -> None:
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


def _drop_quantization_config(config: Path) -> None:
    """A dequantized output is a plain checkpoint: its config.json must not claim a quantization."""
    if config.is_file():
        data = json.loads(config.read_text())
        data.pop("quantization_config", None)
        data.pop("compression_config", None)
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _rewrite_index(index: Path, out_dir: Path, layout: list[tuple[str, list[TensorSpec]]]) -> None:
    data = json.loads(index.read_text())
    data.setdefault("metadata", {})["total_size"] = sum(s.nbytes for _, specs in layout for s in specs)
    data["weight_map"] = {s.name: fname for fname, specs in layout for s in specs}
    (out_dir / index.name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _reference_tensor(reference: Checkpoint, key: str) -> torch.Tensor:
    if key not in reference:
        raise MissingKeyError("--check BASE lacks this tensor", path=str(reference.path), key=key)
    return reference.get(key)


def _adapter_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in (path / "adapter_model.safetensors", path / "adapter_config.json") if p.is_file()]
