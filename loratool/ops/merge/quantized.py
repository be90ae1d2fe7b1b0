"""Merges into quantized bases: checks of the FP8 and packed 4-bit plans, ``--requantize fp8``'s layout
and config, and the report of what the rounding kept, with the refusals of ``--min-kept``/``--max-noise``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ...errors import AdapterLostError, NonFiniteError, UnsupportedCheckpointError
from ...io.checkpoint import Checkpoint
from ...io.writer import TensorSpec
from ...quant.fp8 import check_scale
from ...quant.layout import ACTIVATION_SCALES, READ_ONLY, Fp8Layout, PackedLayout
from ...quant.rounding import KEPT_WARNING, Kept, Rounding
from .plan import Term

FP8_BLOCK = (128, 128)  # merge --requantize fp8: compressed-tensors' FP8_BLOCK scheme, DeepSeek's and Qwen's blocks


def check_fp8_plan(fp8: Fp8Layout | None, replace: dict[str, torch.Tensor], path: str) -> None:
    whole = sorted(k for k in replace if fp8 is not None and (k in fp8.weights or k in fp8.companions))
    if whole:
        raise UnsupportedCheckpointError(
            f"the adapter replaces the FP8 tensor '{whole[0]}' whole, and its layout cannot take a float tensor",
            path=path,
            fix="merge into the unquantized checkpoint, or pass --dtype bfloat16 for a dequantized output",
        )


def check_activation_scales(ckpt: Checkpoint) -> None:
    """Refuse NaN, Inf or negative activation and KV-cache scales (``input_scale``, ``k_scale``, NVFP4's
    ``input_global_scale``...), which a merge in a quantized layout writes as read: the runtime would
    compute NaN or nonsense at those layers, with nothing to say why.

    Raises:
        NonFiniteError: naming the tensor and the value.
    """
    names = (*ACTIVATION_SCALES, "input_global_scale")
    for key in ckpt.keys():
        if key.rsplit(".", 1)[-1] in names:
            check_scale(key, ckpt.get(key), what="the activation scale")


def check_conv_terms(terms: dict[str, list[Term]], quantized: set[str], path: str) -> None:
    """Conv2d LoRA goes into plain weights only: the quantized layouts loratool writes are matrices'."""
    conv = sorted(k for k, ts in terms.items() if k in quantized and any(t.kind == "conv2d" for t in ts))
    if conv:
        raise UnsupportedCheckpointError(
            f"a Conv2d LoRA adapts the quantized weight '{conv[0]}': loratool requantizes matrices only",
            path=path, key=conv[0], fix="merge into the unquantized checkpoint",
        )  # fmt: skip


def check_requantize(requantize: str | None, low_bit: PackedLayout | None, terms: dict[str, list[Term]],
                      dequantize: bool, path: str, *, renamed: bool = False) -> set[str]:  # fmt: skip
    """The packed weights ``--requantize fp8`` writes as FP8 (those the adapters touch), checked."""
    if requantize is None:
        return set()
    if requantize != "fp8":
        raise ValueError(f"requantize must be 'fp8', not {requantize!r}")
    if renamed:
        raise UnsupportedCheckpointError(
            "--requantize fp8 names the modules it writes as FP8 in the config's groups, and a vision-language "
            "model's modules have one name in its files and another once loaded: loratool has not checked which "
            "one the loaders match", path=path,
            fix="merge in place without it, pass --dtype bfloat16, or serve the adapter unmerged",
        )  # fmt: skip
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


def fp8_specs(layout: list[tuple[str, list[TensorSpec]]], low_bit: PackedLayout,
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


def mixed_config(config: Path, to_fp8: set[str]) -> None:
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


def check_packed_plan(low_bit: PackedLayout | None, replace: dict[str, torch.Tensor], terms: dict[str, list[Term]],
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


def quantization_report(
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
    steps = []
    if rounding.rule == "nearest":  # the default rule is rounding.default_rule's: subspace into FP8 in place only
        fp8_in_place = report["grid"] == "FP8" and not report["dequantized"]
        steps.append("--rounding subspace (the default: keeps the delta)" if fp8_in_place else
                     "--rounding stochastic (the default) or subspace (keeps the most, much slower)")  # fmt: skip
    if not report["dequantized"]:
        steps.append("--dtype bfloat16 for a dequantized checkpoint")
    steps.append("serving the adapter unmerged")
    if report["grid"] != "FP8" and not report["dequantized"]:
        if report.get("method") == "compressed-tensors" and "requantized_fp8" not in report:
            steps.append("--requantize fp8 for the weights it touches")
        steps.append("--min-kept 0 to write it all the same")
    return "; ".join(steps)


def require_kept(report: dict[str, Any], min_kept: float | None, max_noise: float | None, rounding: Rounding) -> None:
    kept, noise = report["kept"], report["noise"]
    if kept is None:
        return
    if not (math.isfinite(kept) and (noise is None or math.isfinite(noise))):
        unmeasured = [t["tensor"] for t in report["tensors"]
                      if not all(math.isfinite(t[f]) for f in ("kept", "noise") if t[f] is not None)]  # fmt: skip
        raise NonFiniteError(
            "the merged deltas are too large to measure what the rounding kept of them (their squares pass float32's "
            f"range); nothing was written. Unmeasured: {', '.join(unmeasured[:3]) or 'the sum over all weights'}"
            + (f" and {len(unmeasured) - 3} more" if len(unmeasured) > 3 else ""),
            fix="check the scales given with the adapters (ADAPTER:SCALE)",
        )
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


def quantization_warnings(report: dict[str, Any], rounding: Rounding) -> list[str]:
    kept = report["kept"]
    if kept is None or kept >= KEPT_WARNING:
        return []
    return [
        f"the written weights carry only {kept:.0%} of the adapter's delta (kept, over {len(report['tensors'])} "
        f"weights; lowest {_names(_short_of(report, KEPT_WARNING))}): rounding onto the "
        f"{'output dtype' if report['dequantized'] else report['grid'] + ' grid'} erased the rest. Try "
        f"{_remedy(report, rounding)}"
    ]


def drop_quantization_config(config: Path) -> None:
    """A dequantized output is a plain checkpoint: its config.json must not claim a quantization."""
    if config.is_file():
        data = json.loads(config.read_text())
        data.pop("quantization_config", None)
        data.pop("compression_config", None)
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
