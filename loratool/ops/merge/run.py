"""One merge or unmerge from start to end: load and plan, check the output and the quantized layout,
stream the shares, then the config, index and report (the :func:`apply_adapters` both commands call)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...adapter import Adapter
from ...formats import AdapterArg, refuse_adapter, split_scale
from ...host import resolve_device
from ...io.atomic import atomic_output, check_output
from ...io.checkpoint import Checkpoint, dtype_name, open_checkpoint, torch_dtype
from ...io.header import patch_metadata
from ...io.logical import RenamedView, model_view
from ...io.writer import TensorSpec, copy_aux_files
from ...metadata.provenance import InputHasher, encode, make_record
from ...quant import native, packed
from ...quant.rounding import KEPT_WARNING, NOISE_LIMIT, RULES, Kept, Rounding, Rule, default_rule
from ...stream.distributed import current
from .check import RoundTripCheck, require_round_trip
from .plan import files_of_adapter, for_the_base, load_adapters, plan_terms, set_vocab_size, stored_names
from .quantized import (
    check_activation_scales,
    check_conv_terms,
    check_fp8_plan,
    check_packed_plan,
    check_requantize,
    drop_quantization_config,
    fp8_specs,
    mixed_config,
    quantization_report,
    quantization_warnings,
    require_kept,
)
from .stream import Stream


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


def apply_adapters(
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
    max_units: float | None = None,
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
    if max_units is not None and not (max_units >= 0.0 and check is not None):
        raise ValueError(f"max_units needs check (the original base) and must be 0 or more, not {max_units!r}")
    usage = f"loratool {operation} {'BASE' if sign > 0 else 'MERGED'} ADAPTER[:SCALE]... -o OUT"
    refuse_adapter(base, "the checkpoint", usage)
    sources = [split_scale(a)[0] for a in adapters]
    inputs = [base, *(s for s in sources if not isinstance(s, Adapter)), *([check] if check is not None else [])]
    out = check_output(output, force=force, inputs=inputs)
    dev = resolve_device(device)
    loaded, warnings = load_adapters(adapters, sign, allow_pickle)
    out_dtype = torch_dtype(dtype) if dtype else None
    d = current()
    with open_checkpoint(base, allow_pickle=allow_pickle) as ckpt, contextlib.ExitStack() as stack:
        fp8 = ckpt.fp8_layout()  # None, or the FP8 layout to keep; any other quantization is refused
        low_bit = ckpt.packed_layout()  # None, or the MXFP4 / NVFP4 / INT4 weights to keep
        view = model_view(ckpt)  # packed weights (and a VLM's tensors) by the names and shapes adapters address
        loaded = for_the_base(loaded, ckpt, warnings)  # a diffusers LoRA file: the base component's modules
        terms, replace = plan_terms(view, loaded, sign, fan_in_fan_out, warnings)
        renamed = isinstance(view, RenamedView)
        if isinstance(view, RenamedView):  # the plan names tensors as the model does, the stream as the files do
            terms, replace = stored_names(view, terms, replace)
            view = view.inner
        check_fp8_plan(fp8, replace, str(ckpt.path))
        quantized = set(fp8.weights if fp8 else ()) | set(low_bit.weights if low_bit else ())
        check_conv_terms(terms, quantized, str(ckpt.path))
        layouts = [q for q in (fp8, low_bit) if q is not None]  # both in a compressed-tensors mixed checkpoint
        dequantize = bool(layouts) and out_dtype is not None
        if layouts and not dequantize:  # a quantized output carries the activation scales over as read
            check_activation_scales(ckpt)
        to_fp8 = check_requantize(requantize, low_bit, terms, dequantize, str(ckpt.path), renamed=renamed)
        check_packed_plan(low_bit, replace, terms, dequantize or bool(to_fp8), str(ckpt.path))
        packed_in_place = low_bit is not None and not dequantize and any(
            k in low_bit.weights and k not in to_fp8 for k in terms)  # fmt: skip
        if packed_in_place and min_kept is None and max_noise is None:
            min_kept, max_noise = KEPT_WARNING, NOISE_LIMIT  # a 4-bit grid: refuse rather than warn (bench_fp4)
        rule = Rounding(rounding or default_rule(dequantize, packed=packed_in_place), seed)
        bias_terms = {t.bias_key: t for ts in terms.values() for t in ts if t.bias_key}
        reference = stack.enter_context(open_checkpoint(check, allow_pickle=allow_pickle)) if check else None
        adapter_files = [f for a, _, _ in loaded if a.path for f in files_of_adapter(Path(a.path))]
        hasher = InputHasher([*ckpt.file_paths(), *adapter_files], enabled=d.is_main)
        drop = fp8.companions if fp8 and dequantize else set()
        layout = _layout(view if dequantize else ckpt, replace, out_dtype, drop=drop)
        if to_fp8:
            assert low_bit is not None
            layout = fp8_specs(layout, low_bit, to_fp8)
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
            share = Stream(view if dequantize else ckpt, replace, terms, bias_terms, dev, out_dtype,
                            reference, check_part,
                            fp8=fp8, dequantize=dequantize, rounding=rule, low_bit=low_bit, view=view,
                            to_fp8=to_fp8)  # fmt: skip
            share.write(root, [(f, specs) for f, specs in shards if f in mine], placeholder,
                         show_progress and d.is_main, operation)  # fmt: skip
            return check_part, share.requantized

        parts = d.gather(write_share)
        checks = [c for c, _ in parts]
        if layouts:
            result.quantization = quantization_report(layouts, dequantize, rule, [r for _, rs in parts for r in rs])
            if to_fp8:
                result.quantization["requantized_fp8"] = sorted(to_fp8)
            require_kept(result.quantization, min_kept, max_noise, rule)  # before the output moves into place
            result.warnings += quantization_warnings(result.quantization, rule)
            why = _why_subspace_ran_in_torch(dequantize, packed_in_place, dev) if rule.subspace else None
            if why and result.quantization["tensors"]:
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
            require_round_trip(result.check, max_units)  # before the output moves into place
        d.barrier()
        if d.is_main and not single_file:
            copy_aux_files(ckpt.root, tmp)
            if dequantize:
                drop_quantization_config(tmp / "config.json")
                (tmp / "hf_quant_config.json").unlink(missing_ok=True)  # ModelOpt's: the output is not quantized
            if to_fp8:
                mixed_config(tmp / "config.json", to_fp8)
            set_vocab_size(tmp / "config.json", ckpt, replace, result.warnings)
            if ckpt.index_file is not None:
                _rewrite_index(ckpt.index_file, tmp, layout)
    d.barrier()  # rank 0 has moved the output into place
    return result


def _why_subspace_ran_in_torch(dequantize: bool, packed_in_place: bool, device: torch.device) -> str | None:
    """Why a merge by the subspace rule ran its column loop as torch passes, or None where the
    compiled kernels ran it: in place into FP8 on any device (on the CPU beside a GPU), and in place
    into 4-bit layouts on the CPU."""
    if dequantize:
        return "its compiled kernels round onto FP8 and 4-bit grids only, not onto --dtype's"
    if native.library() is None:
        if os.environ.get("LORATOOL_NATIVE", "1") == "0":
            return "LORATOOL_NATIVE=0 turns loratool's compiled kernels off"
        return "loratool's compiled kernels are not built here: reinstall it with a C compiler on PATH"
    if not packed_in_place:
        return None if native.fp8_kernels() is not None else "its compiled FP8 passes disagreed with torch's here"
    if packed.subspace_compiled(device):
        return None
    if device.type != "cpu":
        return f"into 4-bit layouts its compiled loop runs on the CPU, and this merge ran on {device}"
    return "its compiled loop into 4-bit layouts disagreed with the torch passes here: see the warning before"


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


def _rewrite_index(index: Path, out_dir: Path, layout: list[tuple[str, list[TensorSpec]]]) -> None:
    data = json.loads(index.read_text())
    data.setdefault("metadata", {})["total_size"] = sum(s.nbytes for _, specs in layout for s in specs)
    data["weight_map"] = {s.name: fname for fname, specs in layout for s in specs}
    (out_dir / index.name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
