"""``loratool extract``: a LoRA adapter from the difference of a fine-tune and its base.

For every 2-D weight that changed, delta = W_ft - W_base (float32, on the chosen device) is
truncated by SVD, delta ~= U_r S_r V_r^T, and written as B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T
with ``lora_alpha = r`` (scaling 1). Tensors LoRA cannot hold are kept whole (``keep_full``) or
reported as dropped with the norm of what is lost.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .. import arch, experts
from ..adapter import Adapter, Kind, LoraModule
from ..errors import InputFileError, LoraToolError, UnsupportedCheckpointError
from ..formats import check_output_name, diffusers, refuse_adapter, save_adapter
from ..formats.peft import new_config
from ..host import compile_regex, resolve_device
from ..io.atomic import check_output
from ..io.checkpoint import Checkpoint, open_checkpoint, torch_dtype
from ..io.directio import direct_io_enabled
from ..io.directread import resident_share
from ..io.logical import model_view
from ..math.linalg import (
    TruncatedSVD,
    allocate_budget,
    check_sketch,
    exact_svd,
    out_in,
    randomized_svd,
    rank_for_energy,
    relative_error,
    residual_error,
    split_factors,
    squared_norm,
)
from ..metadata.card import check_base_model_id, is_hub_id
from ..metadata.provenance import InputHasher, encode, make_record, to_hash
from ..quant.layout import Fp8Layout
from ..report import Dropped, ModuleReport, summarize
from ..runtimes.transforms import check_portable, portable_form
from ..stream.deltas import (
    Delta,
    DeltaReader,
    ExpertDeltas,
    fp8_companions,
    grown_vocabulary,
    module_generator,
    paired_keys,
    read_weight,
)
from ..stream.distributed import current
from ..stream.pipeline import BufferPool, give_back
from ..stream.workers import read_side_by_side, side_by_side_workers

DEFAULT_CAP = 256  # highest rank --energy/--budget consider when -r does not say
POOL_BYTES = 256 << 20  # delta buffers kept idle: a layer's sizes repeat, an embedding's or head's do not


@dataclass
class ExtractResult:
    """What :func:`extract` wrote and how well the adapter holds the fine-tune."""

    output: Path
    adapter: Adapter
    report: list[ModuleReport]
    dropped: list[Dropped] = field(default_factory=list)
    kept_whole: list[str] = field(default_factory=list)
    unchanged: int = 0
    grown: dict[str, int] = field(default_factory=dict)  # vocabulary tensor -> rows in the fine-tune
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "summary": summarize(self.report),
            "trainable_parameters": self.adapter.num_params,
            "modules": [r.to_json() for r in self.report],
            "dropped": [d.to_json() for d in self.dropped],
            "kept_whole": self.kept_whole,
            "grown_vocabulary": self.grown,
            "unchanged_tensors": self.unchanged,
            "warnings": self.warnings,
        }


@dataclass
class _Pending:
    key: str
    module: str
    kind: Kind
    shape: tuple[int, ...]
    svd: TruncatedSVD


def extract(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str],
    rank: int | None = 16,
    energy: float | None = None,
    budget: int | None = None,
    svd: Literal["randomized", "exact"] = "randomized",
    oversample: int = 16,
    n_iter: int = 4,
    device: str = "auto",
    dtype: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    keep_full: str | None = None,
    bias: bool = False,
    fan_in_fan_out: bool | None = None,
    format: Literal["peft", "kohya", "diffusers"] = "peft",
    portable: bool = False,
    base_model_id: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    seed: int = 0,
    show_progress: bool = True,
    prefetch_depth: int = 2,
) -> ExtractResult:
    """Extract a LoRA adapter from ``finetuned - base`` by truncated SVD.

    Args:
        base: the base checkpoint (file or model directory).
        finetuned: the fine-tuned checkpoint, with the same tensor names and shapes.
        output: the adapter directory (PEFT) or ``.safetensors`` file (kohya) to write.
        rank: the rank of every module (with ``energy``/``budget``: the highest rank allowed).
        energy: keep the smallest rank whose singular values hold this share of each delta's energy.
        budget: total trainable parameters, spent where each rank buys the most energy.
        svd: ``randomized`` (fast, default) or ``exact`` (``torch.linalg.svd``).
        oversample, n_iter: the randomized SVD's oversampling and power iterations.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: the factors' dtype (default: the fine-tune's).
        include, exclude: regexes on module paths (``re.search``) choosing what becomes LoRA.
        keep_full: regex on tensor names; changed tensors LoRA cannot hold are stored whole
            (``modules_to_save``) when they match, instead of being reported as dropped.
        bias: store the changed bias of a LoRA-adapted linear layer as its ``lora_B.bias`` (PEFT's
            ``lora_bias``, e.g. Qwen2's attention biases) instead of dropping it.
        fan_in_fan_out: treat 2-D weights as GPT-2 ``Conv1D`` (in, out); default from config.json.
        format: ``peft``, ``kohya`` or ``diffusers`` (a pipeline LoRA file, from a component's folder
            such as ``PIPE/unet``: modules under ``unet.``, as diffusers' ``load_lora_weights`` reads them).
        portable: (PEFT) one rank and scaling 1 for every module (see :func:`loratool.convert`),
            for runtimes that read only ``r`` and ``lora_alpha`` (vLLM).
        base_model_id: the base's Hub id, recorded as ``base_model_name_or_path``.
        force: replace an existing output.

    Returns:
        An :class:`ExtractResult` with the per-module report (rank, relative error, energy kept).

    Raises:
        MissingKeyError, ShapeMismatchError: the checkpoints do not pair up.
        NonFiniteError: NaN or Inf in a weight.
        LoraToolError: nothing changed, bad options.

    Example:
        >>> loratool.extract("base/", "finetuned/", output="adapter/", rank=16)
    """
    for path, role in ((base, "the base checkpoint"), (finetuned, "the fine-tuned checkpoint")):
        refuse_adapter(path, role, "loratool extract BASE FT -r RANK -o OUT (two checkpoints; to apply an adapter: "
                                   "loratool merge BASE ADAPTER -o OUT)")  # fmt: skip
    _check_rank_options(rank, energy, budget, svd)
    check_sketch(oversample, n_iter)
    check_base_model_id(base_model_id)
    if portable:
        check_portable(format)
    if format == "kohya" and (bias or keep_full):  # refused before the work, not when the file is written
        option = "--bias (lora_B's bias)" if bias else "--keep-full (whole tensors)"
        raise LoraToolError(f"kohya files have no place for what {option} stores",
                            fix="write the PEFT format instead, or leave the option out")  # fmt: skip
    check_output_name(output, format)
    out = check_output(output, force=force, inputs=[base, finetuned])
    dev = resolve_device(device)
    inc, exc = compile_regex(include, "--include"), compile_regex(exclude, "--exclude")
    keep = compile_regex(keep_full, "--keep-full")
    cap = rank if rank is not None else DEFAULT_CAP

    options = _Options(rank, energy, budget, svd, oversample, n_iter, seed, cap, inc, exc, keep, dev, bias=bias)
    d = current()
    with (
        open_checkpoint(base, allow_pickle=allow_pickle) as b_stored,
        open_checkpoint(finetuned, allow_pickle=allow_pickle) as f_stored,
    ):
        b, f = model_view(b_stored), model_view(f_stored)  # packed low-bit weights read dequantized, by model name
        component = diffusers.component_of(b_stored.root, b_stored.config()) if format == "diffusers" else None
        if format == "diffusers" and component is None:
            raise InputFileError(
                "--format diffusers names modules by pipeline component, and BASE is not a component's folder",
                path=str(base), fix="give the component's folder of the pipeline, e.g. PIPELINE/unet",
            )  # fmt: skip
        fp8 = (b.fp8_layout(), f.fp8_layout())  # FP8 weights are dequantized before the difference
        options.fp8 = fp8
        low_bit = f_stored.packed_layout()
        options.quantized_ft = {*(fp8[1].weights if fp8[1] else ()), *(low_bit.weights if low_bit else ())}
        grown = grown_vocabulary(b, f)
        keys = paired_keys(b, f, skip=fp8_companions(*fp8) | set(grown))
        config = f.config() or b.config()
        multimodal = arch.renamed_on_load(config)
        if multimodal:
            raise UnsupportedCheckpointError(
                f"{multimodal} is {arch.RENAMED_WHY}", path=str(finetuned),
                fix="extract from a text-only checkpoint of the same language model, or wait for loratool's "
                "multimodal name mapping",
            )  # fmt: skip
        arch.require_override_agrees(config, fan_in_fan_out, str(base))
        conv1d = arch.uses_conv1d(config, fan_in_fan_out)
        options.transposed_experts = config.get("model_type") in experts.TRANSPOSED_EXPERT_MODEL_TYPES
        tied = arch.tied_output(keys + grown, config)  # (output embedding module, input embedding key) or None
        grown_whole = _grown_whole(f, grown, tied) if d.is_main else {}
        skip = {tied[0] + ".weight"} if tied else set()  # the same matrix as the input embedding
        mine = [k for k in d.share((k, b.info(k).nbytes) for k in keys) if k not in skip]
        show = show_progress and d.is_main
        inputs = [*b.file_paths(), *f.file_paths()]
        hashed = to_hash(inputs) if d.is_main else frozenset()
        options.direct, options.direct_sides, streamed = _read_direct(b, f, (b_stored, f_stored), mine, options, hashed)
        hasher = InputHasher(inputs, enabled=d.is_main, streamed=streamed)
        options.tee = {path: digest.feed for path, digest in hasher.streams.items()}
        parts = d.gather(lambda: _extract_keys(b, f, mine, options, conv1d, prefetch_depth, show))
        whole = _Partial.join(parts, keys)

    result = ExtractResult(output=out, adapter=Adapter(), report=[], dropped=whole.dropped,
                           kept_whole=whole.kept_whole, unchanged=whole.unchanged, warnings=whole.warnings)  # fmt: skip
    result.adapter.whole = {**whole.whole, **grown_whole}
    result.grown = {k: int(v.shape[0]) for k, v in grown_whole.items()}
    for key, rows in result.grown.items():
        result.warnings.append(f"{key} grew to {rows} rows (tokens were added): stored whole (modules_to_save); "
                               "resize the base's embeddings to load it in PEFT")  # fmt: skip
    modules, reports = whole.modules, whole.reports
    if budget is not None:
        _spend_budget(whole.pending, budget, modules, reports, result)
        order = {m: i for i, m in enumerate(k.removesuffix(".weight") for k in keys)}
        modules = dict(sorted(modules.items(), key=lambda kv: order[kv[0]]))
    if tied and tied[1][: -len(".weight")] in modules:
        _tie_output_embedding(tied[0], tied[1][: -len(".weight")], modules, reports, result)
    _place_biases(whole.biases, modules, result, keep)
    if d.is_main:
        _whole_modules(finetuned, allow_pickle, keys, modules, reports, result)
    if budget is not None and whole.pending and not modules and not result.adapter.whole:
        cheapest = min(p.svd.U.shape[0] + p.svd.Vh.shape[1] for p in whole.pending)
        raise LoraToolError(
            f"--budget {budget} buys no rank: the cheapest module needs {cheapest} parameters (out + in) for rank 1",
            fix=f"give a --budget of at least {cheapest}",
        )
    if not modules and not result.adapter.whole:
        raise LoraToolError(
            "the fine-tune does not differ from the base in any tensor loratool can extract",
            path=str(finetuned),
            fix="check that BASE and FT are different checkpoints (and --include/--exclude)",
        )
    for dropped in result.dropped:
        result.warnings.append(f"dropped {dropped.key} (norm of change {dropped.norm:.4g}): {dropped.reason}")
    out_dtype = torch_dtype(dtype) if dtype else whole.dtype
    result.report = [reports[m] for m in modules]
    result.adapter.modules = modules
    result.adapter.config = _adapter_config(config, base_model_id)
    params = {
        "base": str(base), "finetuned": str(finetuned), "rank": rank, "energy": energy, "budget": budget,
        "svd": svd, "oversample": oversample, "n_iter": n_iter, "include": include, "exclude": exclude,
        "keep_full": keep_full, "bias": bias,
        "fan_in_fan_out": conv1d, "format": format, "seed": seed, "dtype": str(out_dtype).replace("torch.", ""),
        "portable": portable,
    }  # fmt: skip
    if portable:
        result.adapter = portable_form(result.adapter, result.warnings)
    if d.is_main:
        record = make_record(
            "extract", params, hasher.result(), report=[r.to_json() for r in result.report],
            extra={"dropped": [x.to_json() for x in result.dropped]},
        )  # fmt: skip
        result.adapter.metadata = encode(record)
        written = result.adapter
        if component is not None:  # diffusers: module paths under the pipeline component
            written = dataclasses.replace(written, modules={f"{component}.{p}": m for p, m in written.modules.items()})
        save_adapter(written, out, format=format, force=force, dtype=out_dtype)
    d.barrier()  # the output exists on every rank's return
    return result


@dataclass
class _Options:
    rank: int | None
    energy: float | None
    budget: int | None
    svd: str
    oversample: int
    n_iter: int
    seed: int
    cap: int
    include: re.Pattern[str] | None
    exclude: re.Pattern[str] | None
    keep: re.Pattern[str] | None
    device: torch.device
    fp8: tuple[Fp8Layout | None, Fp8Layout | None] = (None, None)  # of the base and of the fine-tune
    quantized_ft: set[str] = field(default_factory=set)  # the fine-tune's FP8 and packed weights: bf16 factors
    bias: bool = False  # changed biases of LoRA modules become lora_B.bias
    transposed_experts: bool = False  # 3-D experts stored (E, in, out), as transformers' is_transposed
    direct: frozenset[str] = frozenset()  # weights read with O_DIRECT (_read_direct), on these sides:
    direct_sides: tuple[bool, bool] = (False, False)  # (base, fine-tune)
    tee: dict[Path, Callable[[int, memoryview], None]] = field(default_factory=dict)  # files hashed from those reads


@dataclass
class _Partial:
    """What one process extracted from its share of the tensors."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    reports: dict[str, ModuleReport] = field(default_factory=dict)
    pending: list[_Pending] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    kept_whole: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unchanged: int = 0
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # key -> dtype of changed tensors
    # module -> (bias delta, its norm, the fine-tune's bias): placed once the LoRA modules are known
    biases: dict[str, tuple[torch.Tensor, float, torch.Tensor]] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype | None:
        return next(iter(self.dtypes.values()), None)

    @staticmethod
    def join(parts: list[_Partial], keys: list[str]) -> _Partial:
        """Every process's share, in checkpoint order: the same result whatever the split."""
        order = {k: i for i, k in enumerate(keys)}

        def by_key(module_or_key: str) -> int:
            return order.get(module_or_key, order.get(module_or_key + ".weight", len(order)))

        out = _Partial(unchanged=sum(p.unchanged for p in parts))
        for field_name in ("modules", "reports", "whole", "dtypes", "biases"):
            merged = {k: v for p in parts for k, v in getattr(p, field_name).items()}
            setattr(out, field_name, dict(sorted(merged.items(), key=lambda kv: by_key(kv[0]))))
        out.pending = sorted((x for p in parts for x in p.pending), key=lambda x: order[x.key])
        out.dropped = sorted((x for p in parts for x in p.dropped), key=lambda x: order[x.key])
        out.kept_whole = sorted((x for p in parts for x in p.kept_whole), key=lambda x: order[x])
        out.warnings = [w for p in parts for w in p.warnings]
        return out


def _extract_keys(
    b: Checkpoint, f: Checkpoint, keys: list[str], o: _Options, conv1d: bool, depth: int, show: bool
) -> _Partial:
    """Extract the tensors named by ``keys``: SVD of each changed 2-D weight, the rest kept or dropped."""
    pool = BufferPool(keep_bytes=POOL_BYTES)
    read = DeltaReader(b, f, o.device, pool, o.fp8, experts_apart=o.budget is None, direct=o.direct, base_unused=True,
                       direct_sides=o.direct_sides, tee=o.tee)  # fmt: skip
    # the exact SVD's workspace is a dense matrix's size (U, and LAPACK's): one at a time, on every core;
    # asked before the prefetch thread goes single-threaded (it reads this thread's count, fixing it)
    workers = side_by_side_workers(o.device) if o.svd != "exact" else 1

    def handle(item: Delta) -> _Partial:
        part = _Partial()
        _handle(item.key, item.base, item.finetuned, item.delta, item.norm, o, conv1d, part)
        if isinstance(item.delta, torch.Tensor):
            give_back(item.delta, pool)  # consumed; its memory serves the next delta
        return part

    try:
        parts = read_side_by_side(handle, read, keys, workers, depth=depth, desc="extract", show=show,
                                  size=lambda d: d.nbytes)  # fmt: skip
        return _Partial.join(parts, keys)
    finally:
        read.close()  # after the prefetch thread is done


def _read_direct(
    b: Checkpoint, f: Checkpoint, stored: tuple[Checkpoint, Checkpoint], keys: list[str], o: _Options,
    hashed: frozenset[Path],
) -> tuple[frozenset[str], tuple[bool, bool], frozenset[Path]]:  # fmt: skip
    """The weights to read with O_DIRECT (:mod:`loratool.io.directread`), from which sides, and the
    files to hash from those reads: the matrices and Conv2d kernels that would be factored, where only
    their delta is used, on the CPU, from each plain checkpoint whose files are mostly not in the page
    cache. Where this run hashes a checkpoint's files (``hashed``: their digests not kept), only if
    reading those weights in order goes through each such file forward and through nearly all of it:
    the file's hash is then taken from the same reads (the rest, its header and small tensors, read
    for it), so that no file is read twice (InputHasher's ``streamed``)."""
    if o.device.type != "cpu" or not direct_io_enabled():
        return frozenset(), (False, False), frozenset()
    chosen = [k for k in keys if k.endswith(".weight") and len(b.info(k).shape) in (2, 4)
              and _selected(k[: -len(".weight")], o.include, o.exclude)]  # fmt: skip
    sides, streamed = [False, False], set[Path]()
    for side, (view, ck) in enumerate(((b, stored[0]), (f, stored[1]))):
        if view is not ck or resident_share(ck.file_paths()) >= 0.5:
            continue
        files = hashed & set(ck.files)  # an index file is hashed apart, read twice: it is small
        if files and not _read_forward(ck, chosen, files):
            continue
        streamed |= files
        sides[side] = True
    if not any(sides):
        return frozenset(), (False, False), frozenset()
    return frozenset(chosen), (sides[0], sides[1]), frozenset(streamed)


def _read_forward(ck: Checkpoint, keys: list[str], files: frozenset[Path], share: float = 0.9) -> bool:
    """Whether reading ``keys`` in this order reads each of ``files`` forward (no tensor before one
    read already) and through at least ``share`` of its bytes."""
    end, covered = dict.fromkeys(files, 0), dict.fromkeys(files, 0)
    for k in keys:
        if (r := ck.byte_range(k)) is None:
            return False
        path, start, n = r
        if path in files:
            if start < end[path]:
                return False
            end[path], covered[path] = start + n, covered[path] + n
    return all(covered[p] >= share * p.stat().st_size for p in files)


def _handle(
    key: str, wb: torch.Tensor, wf: torch.Tensor, delta: torch.Tensor | ExpertDeltas | None, norm: float, o: _Options,
    conv1d: bool, part: _Partial,
) -> None:  # fmt: skip
    """One tensor: unchanged, an integer change (dropped), whole (kept or dropped), or LoRA factors."""
    if norm == 0:
        part.unchanged += 1
    elif delta is None:
        change = float(torch.linalg.vector_norm(wf.double() - wb.double()))
        part.dropped.append(Dropped(key, change, "an integer tensor changed"))
    else:
        part.dtypes[key] = torch.bfloat16 if key in o.quantized_ft else wf.dtype  # factors cannot be FP8 or 4-bit
        module = key[: -len(".weight")] if key.endswith(".weight") else key
        # delta is a tensor, or ExpertDeltas: a 3-D experts parameter, read an expert at a time
        if (
            isinstance(delta, torch.Tensor)
            and delta.dim() in (2, 4)  # a matrix, or a Conv2d kernel (out, in, kh, kw): PEFT's Conv2d LoRA
            and key.endswith(".weight")
            and _selected(module, o.include, o.exclude)
        ):
            _factor(key, module, delta, norm, o, conv1d, part)
        elif delta.dim() == 3 and _selected(key, o.include, o.exclude) and o.budget is None:
            _factor_experts(key, delta, o, part)
        elif o.bias and isinstance(delta, torch.Tensor) and delta.dim() == 1 and key.endswith(".bias"):
            part.biases[key[: -len(".bias")]] = (delta.to("cpu", copy=True), norm, wf)
        elif o.keep and o.keep.search(key) and "." not in key:
            part.dropped.append(Dropped(key, norm, "a tensor of no module: PEFT keeps whole modules "
                                                   "(modules_to_save), which this is not part of"))  # fmt: skip
        elif o.keep and o.keep.search(key):
            part.whole[key] = delta.finetuned_whole() if isinstance(delta, ExpertDeltas) else wf
            part.kept_whole.append(key)
        else:
            plain = delta.dim() in (2, 4) and key.endswith(".weight")
            why = "not selected" if plain else "not a 2-D weight or Conv2d kernel"
            part.dropped.append(Dropped(key, norm, f"{why}; pass --keep-full to store it whole"))


def _factor_experts(key: str, delta: torch.Tensor | ExpertDeltas, o: _Options, part: _Partial) -> None:
    """A 3-D experts parameter (E, out, in), or (E, in, out) where transformers stores it transposed:
    one truncated SVD per expert, each expert a module ``<key>.<e>`` (see :mod:`loratool.experts`).
    ``delta`` is read an expert at a time."""
    count = int(delta.shape[0])
    for e in range(count):
        module = f"{key}.{e}"
        d = delta[e]  # (a, b) float32
        norm = math.sqrt(squared_norm(d))
        if norm == 0:  # an expert the fine-tune left alone still needs its slot in PEFT's layout
            kind: Kind = "conv1d" if o.transposed_experts else "linear"
            out, inp = out_in(d, kind).shape
            part.modules[module] = LoraModule(d.new_zeros(1, inp).cpu(), d.new_zeros(out, 1).cpu(), 1.0, kind)
            part.reports[module] = ModuleReport(module, (int(d.shape[0]), int(d.shape[1])), 1, 0.0, 1.0, kind)
        else:
            _factor(module, module, d, norm, o, o.transposed_experts, part)
        if isinstance(delta, ExpertDeltas):
            delta.release(d)  # consumed; its buffer serves the next expert
        part.modules[module].expert = (e, count)


def _factor(key: str, module: str, delta: torch.Tensor, norm: float, o: _Options, conv1d: bool, part: _Partial) -> None:
    """Truncated SVD of one delta into LoRA factors (or, for --budget, a spectrum to allocate later)."""
    kind: Kind = "conv2d" if delta.dim() == 4 else arch.module_kind(module, conv1d)
    matrix = out_in(delta, kind)  # (out, in), the factors' orientation; a Conv2d kernel's (out, in * kh * kw)
    k = min(o.cap, *matrix.shape)
    if o.rank is not None and o.rank > min(matrix.shape) and o.budget is None and o.energy is None:
        part.warnings.append(f"{module}: rank {o.rank} clamped to {k}, the smaller side of {list(delta.shape)}")
    if o.svd == "exact":
        decomposed = exact_svd(matrix, k, sq_norm=norm**2)
    else:
        gen = module_generator(o.seed, module)
        decomposed = randomized_svd(matrix, k, oversample=o.oversample, n_iter=o.n_iter, generator=gen, sq_norm=norm**2)
    shape = tuple(int(n) for n in delta.shape)
    if o.budget is not None:
        part.pending.append(_Pending(key, module, kind, shape, _to_cpu(decomposed)))
        return
    r = k if o.energy is None else rank_for_energy(decomposed.S, decomposed.total_energy, o.energy, k)
    lora_b, lora_a = split_factors(decomposed, r)
    err = residual_error(matrix, lora_b, lora_a, norm=norm)  # consumes delta, no longer needed
    part.modules[module] = LoraModule(lora_A=lora_a.cpu(), lora_B=lora_b.cpu(), alpha=float(r), kind=kind,
                                      kernel=_kernel(shape))  # fmt: skip
    kept = decomposed.energy_share(r)
    part.reports[module] = ModuleReport(module, shape, r, err, kept, kind)


def _kernel(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """A Conv2d weight's (kh, kw), from its shape (out, in, kh, kw); None for a matrix."""
    return (shape[2], shape[3]) if len(shape) == 4 else None


def _to_cpu(svd: TruncatedSVD) -> TruncatedSVD:
    return TruncatedSVD(svd.U.cpu(), svd.S.cpu(), svd.Vh.cpu(), svd.total_energy)


def _check_rank_options(rank: int | None, energy: float | None, budget: int | None, svd: str) -> None:
    if rank is not None and rank < 1:
        raise LoraToolError(f"rank must be at least 1 (got {rank})")
    if energy is not None and not 0 < energy <= 1:
        raise LoraToolError(f"--energy must be in (0, 1] (got {energy})", fix="e.g. --energy 0.9")
    if energy is not None and budget is not None:
        raise LoraToolError("--energy and --budget are two rank rules: give one")
    if budget is not None and budget < 1:
        raise LoraToolError(f"--budget must be a positive number of parameters (got {budget})")
    if svd not in ("randomized", "exact"):
        raise LoraToolError(f"unknown --svd {svd!r}", fix="use randomized or exact")


def _place_biases(
    biases: dict[str, tuple[torch.Tensor, float, torch.Tensor]], modules: dict[str, LoraModule],
    result: ExtractResult, keep: re.Pattern[str] | None,
) -> None:  # fmt: skip
    """Each changed bias goes to its LoRA module's lora_B.bias (PEFT adds ``scaling * lora_B.bias``;
    extract's scaling is 1); a bias whose weight is no LoRA linear is kept whole or dropped, as
    without --bias."""
    for module, (delta, norm, finetuned) in biases.items():
        m, key = modules.get(module), module + ".bias"
        if m is not None and m.kind == "linear":
            m.bias = (delta / m.scaling).to(m.lora_B.dtype)
        elif keep is not None and keep.search(key):
            result.adapter.whole[key] = finetuned
            result.kept_whole.append(key)
        else:
            result.dropped.append(Dropped(key, norm, "its weight is not a LoRA linear layer; pass --keep-full "
                                                     "to store it whole"))  # fmt: skip


def _whole_modules(
    finetuned: str | os.PathLike[str], allow_pickle: bool, keys: list[str], modules: dict[str, LoraModule],
    reports: dict[str, ModuleReport], result: ExtractResult,
) -> None:  # fmt: skip
    """Every module with a tensor kept whole is kept whole, all its parameters (PEFT's ``modules_to_save``
    replaces a module with a copy and loads each of them: a bias kept alone, or a weight without its
    bias, does not load, ``KeyError``), and gets no LoRA (PEFT does not adapt a module it saves whole)."""
    held = {k.rsplit(".", 1)[0] for k in result.adapter.whole if "." in k}
    missing = [k for k in keys if k not in result.adapter.whole and "." in k and k.rsplit(".", 1)[0] in held]
    if missing:
        with open_checkpoint(finetuned, allow_pickle=allow_pickle) as stored:  # FP8 and packed weights dequantized
            f, fp8 = model_view(stored), stored.fp8_layout()
            result.adapter.whole.update({k: read_weight(f, fp8, k, torch.device("cpu")) for k in missing})
        result.kept_whole += missing
        result.dropped = [x for x in result.dropped if x.key not in missing]  # a changed bias goes with its module
    for module in sorted(held & set(modules)):
        del modules[module], reports[module]
        result.warnings.append(
            f"{module} is stored whole (modules_to_save), as --keep-full asks for one of its tensors, and so has "
            "no LoRA (PEFT does not adapt a module it saves whole); --bias stores a linear layer's changed bias "
            "as its lora_B.bias instead"
        )


def _grown_whole(f: Checkpoint, grown: list[str], tied: tuple[str, str] | None) -> dict[str, torch.Tensor]:
    """The grown vocabulary tensors, whole; a tied output layer's once, under the input embedding."""
    skip = {tied[0] + ".weight"} if tied else set()
    return {k: f.get(k) for k in grown if k not in skip}


def _tie_output_embedding(
    head: str, embed: str, modules: dict[str, LoraModule], reports: dict[str, ModuleReport], result: ExtractResult
) -> None:
    """Give the tied output layer the embedding's factors, transposed, so PEFT applies the delta to
    both uses of the shared matrix (PEFT adapts each module separately)."""
    modules[head] = arch.transposed_copy(modules[embed])
    r = reports[embed]
    reports[head] = ModuleReport(head, r.shape, r.rank, r.relative_error, r.energy_kept, "linear")
    result.warnings.append(f"{head} is tied to {embed}: it gets the same factors, transposed")


def _selected(module: str, inc: re.Pattern[str] | None, exc: re.Pattern[str] | None) -> bool:
    return (inc is None or bool(inc.search(module))) and not (exc is not None and exc.search(module))


def _spend_budget(
    pending: list[_Pending],
    budget: int,
    modules: dict[str, LoraModule],
    reports: dict[str, ModuleReport],
    result: ExtractResult,
) -> None:
    spectra = {p.module: p.svd.S for p in pending}
    costs = {p.module: p.svd.U.shape[0] + p.svd.Vh.shape[1] for p in pending}
    ranks = allocate_budget(spectra, costs, budget)
    for p in pending:
        r = ranks[p.module]
        if r == 0:
            norm = p.svd.total_energy**0.5
            result.dropped.append(Dropped(p.key, norm, "the --budget bought it no rank"))
            continue
        lora_b, lora_a = split_factors(p.svd, r)
        modules[p.module] = LoraModule(lora_A=lora_a.cpu(), lora_B=lora_b.cpu(), alpha=float(r), kind=p.kind,
                                       kernel=_kernel(p.shape))  # fmt: skip
        kept = p.svd.energy_share(r)
        reports[p.module] = ModuleReport(p.module, p.shape, r, relative_error(p.svd, r), kept, p.kind)


def _adapter_config(model_config: dict[str, Any], base_model_id: str | None) -> dict[str, Any]:
    if base_model_id is None and is_hub_id(model_config.get("_name_or_path")):
        base_model_id = model_config["_name_or_path"]  # a Hub id the base's config.json records
    return new_config(base_model_name_or_path=base_model_id, task_type=arch.task_type(model_config))
