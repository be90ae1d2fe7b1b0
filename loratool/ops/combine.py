"""``loratool combine`` and ``loratool resize``: mixes of adapters, always in factored form.

Each source's weight w_i and scaling s_i are folded into its factors, so the output has scaling 1
(``lora_alpha = r``, ``use_rslora: false``) and nothing depends on how PEFT resolves patterns later.

- ``cat``: exact. B = [c_1 B_1, ..., c_n B_n], A = [c_1' A_1; ...; c_n' A_n] with
  c_i c_i' = w_i s_i (the magnitude split evenly, the sign on A as in PEFT).
- ``svd``: the exact rank-R truncated SVD of sum_i w_i s_i B_i A_i, from the factors (QR of the
  stacked factors, SVD of the small core; see :func:`loratool.math.linalg.factored_svd`). The dense
  (out, in) matrix is never formed.
- ``linear``: PEFT's per-factor weighted average (equal ranks only). Approximate: the product of
  averages is not the average of products.

``resize`` is ``svd`` with one source.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch

from .. import arch
from ..adapter import Adapter, LoraModule
from ..errors import InputFileError, LoraToolError, NonFiniteError, ShapeMismatchError, UnsupportedAdapterError
from ..formats import PathArg, check_output_name, diffusers, load_adapter, save_adapter, split_scale
from ..formats.kohya import resolve_paths
from ..formats.peft import new_config
from ..host import map_on_cores, progress, resolve_device
from ..io.atomic import check_output
from ..io.checkpoint import open_checkpoint, torch_dtype
from ..io.logical import live_keys
from ..math.linalg import (
    FactoredSVD,
    exact_svd,
    factored_sq_norm,
    is_finite,
    rank_for_energy,
    relative_error,
    split_factors,
    top_svd,
)
from ..math.task_arithmetic import MergeStats, SignMethod, merge_tasks
from ..metadata.card import check_base_model_id
from ..metadata.provenance import InputHasher, encode, make_record
from ..report import ModuleReport, summarize
from ..runtimes.transforms import check_portable, portable_form
from ..stream.deltas import seeded_generator
from ..validation import require_valid

Method = Literal[
    "cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
    "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
]  # fmt: skip
METHODS: tuple[str, ...] = get_args(Method)
FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # on A and B apart, as PEFT does
DENSE_SVD = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # on each dense delta, then SVD
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune", *DENSE_SVD)


@dataclass(frozen=True)
class SparseOptions:
    """TIES/DARE/magnitude-pruning settings (PEFT's ``density``, ``majority_sign_method``, ``svd_clamp``)."""

    density: float | None = None
    majority_sign: SignMethod = "total"
    svd_clamp: float | None = None
    seed: int = 0


SourceArg = PathArg | tuple[PathArg, float]


@dataclass
class CombineResult:
    output: Path
    operation: str
    method: str
    adapter: Adapter
    report: list[ModuleReport]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "operation": self.operation,
            "method": self.method,
            "summary": summarize(self.report),
            "trainable_parameters": self.adapter.num_params,
            "modules": [r.to_json() for r in self.report],
            "warnings": self.warnings,
        }


def combine(
    adapters: Sequence[SourceArg],
    *,
    output: str | os.PathLike[str],
    method: Method = "cat",
    rank: int | None = None,
    energy: float | None = None,
    device: str = "auto",
    dtype: str | None = None,
    format: Literal["peft", "kohya", "diffusers"] = "peft",
    portable: bool = False,
    base_model_id: str | None = None,
    base: str | os.PathLike[str] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = True,
    density: float | None = None,
    majority_sign: SignMethod = "total",
    svd_clamp: float | None = None,
    seed: int = 0,
) -> CombineResult:
    """Combine adapters: sum_i w_i * scaling_i * B_i @ A_i as one adapter, or a TIES/DARE merge of them.

    Args:
        adapters: adapter paths or ``(path, weight)`` pairs (weights may be negative).
        output: the adapter to write.
        method: ``cat`` (exact), ``svd`` (exact truncation to ``rank``/``energy``), ``linear``
            (PEFT's per-factor average; approximate); ``ties``, ``dare_linear``, ``dare_ties``,
            ``magnitude_prune`` (PEFT's, on A and B apart; equal ranks) and their ``_svd`` forms
            (on each module's dense weighted deltas, then truncated to ``rank``).
        rank: the output rank for ``svd`` and the ``_svd`` forms (default: the largest source rank).
        density: the share of elements TIES, DARE and magnitude pruning keep, in (0, 1].
        majority_sign: how TIES elects each element's sign: ``total`` (of the sum) or ``frequency``.
        svd_clamp: for the ``_svd`` forms, clamp the factors at this quantile of their values (PEFT's).
        seed: the seed of DARE's random masks (results depend on nothing else).
        energy: for ``svd``, the smallest rank per module keeping this share of the energy
            (capped by ``rank`` when given).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: the factors' dtype (default: the first source's).
        format: ``peft`` or ``kohya``.
        portable: (PEFT) one rank and scaling 1 for every module (see :func:`loratool.convert`),
            for runtimes that read only ``r`` and ``lora_alpha`` (vLLM).
        base: a checkpoint whose module paths name the modules of kohya sources (headers only).

    Raises:
        UnsupportedAdapterError: DoRA sources; ``linear`` with unequal ranks or modules.
        ShapeMismatchError: sources disagree on a module's shape or kind.

    Example:
        >>> loratool.combine([("chat/", 1.0), ("toxic/", -0.5)], output="mix/", method="svd", rank=32)
    """
    sparse = SparseOptions(density, majority_sign, svd_clamp, seed)
    return _run("combine", adapters, output=output, method=method, rank=rank, energy=energy, device=device,
                dtype=dtype, format=format, portable=portable, base_model_id=base_model_id, base=base, force=force,
                allow_pickle=allow_pickle, show_progress=show_progress, sparse=sparse)  # fmt: skip


def resize(
    adapter: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    device: str = "auto",
    dtype: str | None = None,
    format: Literal["peft", "kohya", "diffusers"] = "peft",
    portable: bool = False,
    base_model_id: str | None = None,
    base: str | os.PathLike[str] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = True,
) -> CombineResult:
    """Re-truncate an adapter to ``rank`` (or per module by ``energy``), exactly, in factored form.

    Resizing to a rank at or above a module's rank is lossless.

    Example:
        >>> loratool.resize("adapter/", output="small/", rank=8)
    """
    if rank is None and energy is None:
        raise LoraToolError("resize needs -r/--rank or --energy", fix="e.g. loratool resize adapter/ -r 8 -o out/")
    return _run("resize", [adapter], output=output, method="svd", rank=rank, energy=energy, device=device,
                dtype=dtype, format=format, portable=portable, base_model_id=base_model_id, base=base, force=force,
                allow_pickle=allow_pickle, show_progress=show_progress)  # fmt: skip


def _run(
    operation: str,
    sources: Sequence[SourceArg],
    *,
    output: str | os.PathLike[str],
    method: Method,
    rank: int | None,
    energy: float | None,
    device: str,
    dtype: str | None,
    format: Literal["peft", "kohya", "diffusers"],
    portable: bool,
    base_model_id: str | None,
    base: str | os.PathLike[str] | None,
    force: bool,
    allow_pickle: bool,
    show_progress: bool,
    sparse: SparseOptions = SparseOptions(),
) -> CombineResult:
    _check_options(method, rank, energy, sparse)
    if portable:
        check_portable(format)
    if rank is not None and rank < 1:
        raise LoraToolError(f"rank must be at least 1 (got {rank})")
    if energy is not None and not 0 < energy <= 1:
        raise LoraToolError(f"--energy must be in (0, 1] (got {energy})")
    check_base_model_id(base_model_id)
    pairs = [cast("tuple[PathArg, float]", split_scale(s)) for s in sources]
    if not pairs:
        raise LoraToolError("no adapter given", fix="name at least one ADAPTER")
    check_output_name(output, format)
    out = check_output(output, force=force, inputs=[*(p for p, _ in pairs), *([base] if base is not None else [])])
    dev = resolve_device(device)
    loaded = [(load_adapter(p, allow_pickle=allow_pickle), w, str(p)) for p, w in pairs]
    warnings = [w for p, _ in pairs for w in require_valid(p, f"{operation} refuses it", allow_pickle=allow_pickle)]
    _check_sources(loaded, method)
    if any((a.format == "diffusers") != (format == "diffusers") for a, _, _ in loaded):
        raise InputFileError(
            "diffusers LoRA files name modules by pipeline component: combine them with each other, into "
            "--format diffusers",
            fix="convert the other adapters first: loratool convert A --to diffusers --base PIPE/unet",
        )  # fmt: skip
    if base is not None and format != "kohya" and any(a.format == "kohya" for a, _, _ in loaded):
        with open_checkpoint(base, allow_pickle=allow_pickle) as ck:  # a kohya file for a pipeline component
            loaded = diffusers.each_for_base(loaded, ck, warnings)
    warnings += _align_kohya_names(loaded, _module_paths(base, allow_pickle) if base is not None else [],
                                   keep_unmapped=format == "kohya")  # fmt: skip
    hasher = InputHasher([f for a, _, _ in loaded for f in _files(Path(a.path or ""))])
    out_dtype = torch_dtype(dtype) if dtype else next(iter(loaded[0][0].modules.values())).lora_A.dtype
    paths = list(dict.fromkeys(p for a, _, _ in loaded for p in a.modules))
    result = CombineResult(out, operation, method, Adapter(), [], warnings)
    cap = (
        rank
        if rank is not None
        else (max(m.rank for a, _, _ in loaded for m in a.modules.values()) if energy is None else None)
    )

    def combine_one(path: str) -> tuple[LoraModule, ModuleReport, str | None]:
        terms = [(a.modules[path], w) for a, w, _ in loaded if path in a.modules]
        return _combine_module(path, terms, method, cap, energy, dev, sparse)

    # Small per-module factor work runs one module per core; dense deltas (the _svd forms) are large
    # enough for torch's own threads, and one at a time keeps memory to one module's.
    results = map_on_cores(combine_one, paths, enabled=dev.type == "cpu" and method not in DENSE_SVD)
    cancelled = []
    for path, (module, report, note) in zip(
        paths, progress(results, total=len(paths), desc=operation, enabled=show_progress)
    ):
        expert = next(a.modules[path].expert for a, _, _ in loaded if path in a.modules)
        result.adapter.modules[path] = module if expert is None else replace(module, expert=expert)
        result.report.append(report)
        cancelled += [note] if note else []
    if cancelled:
        result.warnings.append(f"{len(cancelled)} module(s) where the sources cancel (their weighted sum under "
                               f"{CANCELLED:g} of their norms: zero to float32's rounding), written as zeros (first: "
                               f"{cancelled[0]})")  # fmt: skip
    _retie(loaded, result.adapter.modules, result.warnings)
    for a, _, name in loaded:
        for key, t in a.whole.items():
            if key in result.adapter.whole and not torch.equal(result.adapter.whole[key], t):
                raise UnsupportedAdapterError(
                    "two sources replace this tensor whole with different values", path=name, key=key,
                    fix="whole tensors (modules_to_save) cannot be mixed linearly: drop one",
                )  # fmt: skip
            result.adapter.whole[key] = t
    if method == "linear":
        result.warnings.append("--method linear averages the factors, as PEFT does: the result is approximate")
    first = loaded[0][0]
    result.adapter.config = new_config(
        base_model_name_or_path=base_model_id or first.base_model_name_or_path, task_type=first.config.get("task_type")
    )
    params = {"adapters": [{"path": n, "weight": w} for _, w, n in loaded], "method": method, "rank": rank,
              "energy": energy, "format": format, "dtype": str(out_dtype).replace("torch.", "")}  # fmt: skip
    if method in NEEDS_DENSITY:
        params.update(density=sparse.density, majority_sign=sparse.majority_sign, svd_clamp=sparse.svd_clamp,
                      seed=sparse.seed)  # fmt: skip
    if portable:
        params["portable"] = True
        result.adapter = portable_form(result.adapter, result.warnings)
    record = make_record(operation, params, hasher.result(), report=[r.to_json() for r in result.report])
    result.adapter.metadata = encode(record)
    save_adapter(result.adapter, out, format=format, force=force, dtype=out_dtype)
    return result


def _retie(loaded: list[tuple[Adapter, float, str]], modules: dict[str, LoraModule], warnings: list[str]) -> None:
    """Sources whose output layer's LoRA is their embedding's, transposed (PEFT's ensure_weight_tying;
    extract of a tied head) combine into a head whose delta is the combined embedding's, transposed:
    it is set to exactly that, as merge and convert tell a tied copy by its equality (the two
    combined apart by SVD came out different by rounding, and merge refused the head as a LoRA of
    its own on a tied base)."""
    head = arch.OUTPUT_LAYER
    holders = [a for a, _, _ in loaded if head in a.modules]
    partners = {arch.tied_copy_of(a.modules[head], a) for a in holders}
    if not holders or head not in modules or len(partners) != 1 or None in partners:
        return
    embed = partners.pop()
    if embed in modules and all((head in a.modules) == (embed in a.modules) for a, _, _ in loaded):
        if not arch.tied_copy_of(modules[head], Adapter(modules={embed: modules[embed]})):
            warnings.append(f"{head} is tied to {embed} in every source: it gets the combined factors, transposed")
        modules[head] = arch.transposed_copy(modules[embed])


def _check_sources(loaded: list[tuple[Adapter, float, str]], method: str) -> None:
    for a, weight, name in loaded:
        if a.replaced and weight != 1.0:
            raise UnsupportedAdapterError(
                f"the adapter replaces '{a.replaced[0]}' whole (modules_to_save): a trained tensor has no weight, "
                f"so at {weight:g} its LoRA would be weighted and the replacement kept in full",
                path=name, key=a.replaced[0],
                fix="give this adapter weight 1, or combine adapters without modules_to_save",
            )  # fmt: skip
        if a.token_rows:
            raise UnsupportedAdapterError(
                "trainable tokens (trainable_token_indices) replace rows: they do not add up linearly",
                path=name, fix="merge this adapter on its own",
            )  # fmt: skip
        if a.use_dora:
            raise UnsupportedAdapterError(
                "DoRA adapters (use_dora) cannot be combined: their magnitude vectors do not add up linearly",
                path=name,
            )
    if method in FACTOR_WISE:
        fix = f"use --method cat (exact), svd -r R, or {method if method != 'linear' else 'ties'}_svd"
        why = f"--method {method} works on A and B apart, as PEFT does, so every adapter needs"
        first, first_name = loaded[0][0], loaded[0][2]
        for a, _, name in loaded[1:]:
            differ = sorted(set(first.modules) ^ set(a.modules))
            if differ:
                has, lacks = (first_name, name) if differ[0] in first.modules else (name, first_name)
                raise UnsupportedAdapterError(
                    f"{why} the same modules: {has} adapts {differ[0]}, {lacks} does not "
                    f"({len(differ)} module(s) differ)", key=differ[0], fix=fix,
                )  # fmt: skip
        for module in first.modules:
            ranks = {name: a.modules[module].rank for a, _, name in loaded}
            if len(set(ranks.values())) > 1:
                shown = ", ".join(f"{n}: {r}" for n, r in ranks.items())
                raise UnsupportedAdapterError(f"{why} equal ranks; this module's differ ({shown})", key=module,
                                              fix=fix)  # fmt: skip


def _check_options(method: str, rank: int | None, energy: float | None, sparse: SparseOptions) -> None:
    if method not in METHODS:
        raise LoraToolError(f"unknown --method {method!r}", fix=f"use one of {', '.join(METHODS)}")
    if method != "svd" and energy is not None:
        raise LoraToolError(f"--energy applies to --method svd, not {method}")
    if method not in ("svd", *DENSE_SVD) and rank is not None:
        raise LoraToolError(f"-r/--energy apply to --method svd (and the _svd forms), not {method}")
    if rank is not None and rank < 1:
        raise LoraToolError(f"rank must be at least 1 (got {rank})")
    if energy is not None and not 0 < energy <= 1:
        raise LoraToolError(f"--energy must be in (0, 1] (got {energy})")
    if method in NEEDS_DENSITY and (sparse.density is None or not 0 < sparse.density <= 1):
        raise LoraToolError(f"--method {method} needs --density in (0, 1] (got {sparse.density})")
    if method not in NEEDS_DENSITY and sparse.density is not None:
        raise LoraToolError(f"--density applies to TIES, DARE and magnitude pruning, not --method {method}")
    if sparse.svd_clamp is not None and (method not in DENSE_SVD or not 0 < sparse.svd_clamp <= 1):
        raise LoraToolError("--svd-clamp is a quantile in (0, 1] for the _svd forms of TIES, DARE and pruning")


def _generators(seed: int, path: str, n: int, part: str) -> list[torch.Generator]:
    """One generator per source for ``part`` of module ``path``: masks depend on the seed alone."""
    return [seeded_generator(seed, f"{path}|{part}", i) for i in range(n)]


def _combine_module(
    path: str,
    terms: list[tuple[LoraModule, float]],
    method: str,
    cap: int | None,
    energy: float | None,
    dev: torch.device,
    sparse: SparseOptions = SparseOptions(),
) -> tuple[LoraModule, ModuleReport, str | None]:
    """One module's combination, its report, and a note where its sources cancel."""
    first = terms[0][0]
    for m, _ in terms:
        if m.kind != first.kind or m.weight_shape != first.weight_shape:
            raise ShapeMismatchError(
                "sources disagree on this module", key=path,
                expected=f"{first.kind} {list(first.weight_shape)}", got=f"{m.kind} {list(m.weight_shape)}",
            )  # fmt: skip
    Bs, As = [], []
    for m, w in terms:
        c = w * m.scaling
        root = math.sqrt(abs(c))
        Bs.append(m.lora_B.to(dev, torch.float32) * root)
        As.append(m.lora_A.to(dev, torch.float32) * (root if c >= 0 else -root))  # the sign on A, as PEFT does
    bias = _combined_bias(terms, dev)
    shape = first.weight_shape
    if method in FACTOR_WISE:
        b, a, stats = _factor_wise(path, terms, method, dev, sparse)  # (out, r), (r, in)
        r = b.shape[1]
        # how far the product of merged factors is from the exact sum: ||sum_i B_i A_i - B A|| / ||sum_i B_i A_i||
        total = factored_sq_norm(Bs, As)
        err = math.sqrt(factored_sq_norm([*Bs, -b], [*As, a]) / total) if total > 0 else 0.0
        report = ModuleReport(path, shape, r, err, max(0.0, 1.0 - err * err), first.kind, *stats)
    elif method in DENSE_SVD:
        b, a, stats = _dense_svd(path, terms, method, cap, dev, sparse)
        r = b.shape[1]
        total = factored_sq_norm(Bs, As)
        err = math.sqrt(factored_sq_norm([*Bs, -b], [*As, a]) / total) if total > 0 else 0.0
        report = ModuleReport(path, shape, r, err, max(0.0, 1.0 - err * err), first.kind, *stats)
    elif method == "cat":
        b, a = torch.cat(Bs, dim=1), torch.cat(As, dim=0)  # (out, R), (R, in)
        r = b.shape[1]
        report = ModuleReport(path, shape, r, 0.0, 1.0, first.kind)
    else:
        spectrum = FactoredSVD.of(Bs, As)
        if (cancelled := _cancelled(Bs, As, spectrum.total_energy)) is not None:  # the sum it truncates is zero
            b, a = torch.zeros(Bs[0].shape[0], 1, device=dev), torch.zeros(1, As[0].shape[1], device=dev)
            module = LoraModule(lora_A=a.cpu(), lora_B=b.cpu(), alpha=1.0, kind=first.kind, bias=bias,
                                kernel=first.kernel)  # fmt: skip
            return module, ModuleReport(path, shape, 1, 0.0, 1.0, first.kind), f"{path}, {cancelled:.1e}"
        k = min(cap or spectrum.S.shape[0], spectrum.S.shape[0])
        r = k if energy is None else rank_for_energy(spectrum.S, spectrum.total_energy, energy, k)
        r = max(r, 1)
        svd = spectrum.truncate(r)
        b, a = split_factors(svd, r)
        kept = svd.energy_share(r)
        report = ModuleReport(path, shape, r, relative_error(svd, r), kept, first.kind)
    module = LoraModule(lora_A=a.cpu(), lora_B=b.cpu(), alpha=float(r), kind=first.kind, bias=bias, kernel=first.kernel)
    return module, report, None


CANCELLED = 1e-6  # a weighted sum of deltas this small beside its terms is zero to float32's rounding


def _cancelled(Bs: list[torch.Tensor], As: list[torch.Tensor], total: float) -> float | None:
    """||sum_i B_i A_i|| / sum_i ||B_i A_i|| where the sources cancel (below CANCELLED: A and A:-1, say),
    else None; ``total`` is the sum's squared norm as the SVD has it. An SVD of such a sum factors
    rounding noise, and its relative error divides noise by noise. (Only --method svd truncates that sum:
    TIES, DARE and pruning combine something else, by definition.)"""
    bound = sum(float(b.norm()) * float(a.norm()) for b, a in zip(Bs, As))  # >= sum_i ||B_i A_i||
    if bound == 0.0 or total >= (CANCELLED * bound) ** 2:
        return None  # (the common case, told from the factors' norms: the products' Gram matrices are not formed)
    parts = sum(math.sqrt(max(factored_sq_norm([b], [a]), 0.0)) for b, a in zip(Bs, As))
    ratio = math.sqrt(max(factored_sq_norm(Bs, As), 0.0)) / parts if parts > 0.0 else 0.0
    return ratio if ratio < CANCELLED else None


def _factor_wise(
    path: str, terms: list[tuple[LoraModule, float]], method: str, dev: torch.device, sparse: SparseOptions
) -> tuple[torch.Tensor, torch.Tensor, tuple[float | None, float | None]]:
    """PEFT's factor-wise merge: A's with weights sign * sqrt|w s|, B's with sqrt|w s|, each by ``method``."""
    roots = [math.sqrt(abs(w * m.scaling)) for m, w in terms]
    w_a = [r if w * m.scaling >= 0 else -r for r, (m, w) in zip(roots, terms)]  # the sign on A, as PEFT does
    kw: dict[str, Any] = {"density": sparse.density or 1.0, "sign_method": sparse.majority_sign}
    stats_a, stats_b = MergeStats(), MergeStats()
    a = merge_tasks([m.lora_A.to(dev, torch.float32) for m, _ in terms], w_a, method, stats=stats_a,  # type: ignore[arg-type]
                    generators=_generators(sparse.seed, path, len(terms), "A"), **kw)  # fmt: skip
    b = merge_tasks([m.lora_B.to(dev, torch.float32) for m, _ in terms], roots, method, stats=stats_b,  # type: ignore[arg-type]
                    generators=_generators(sparse.seed, path, len(terms), "B"), **kw)  # fmt: skip
    return b, a, _joint_stats(method, [(stats_a, a.numel()), (stats_b, b.numel())])


def _dense_svd(
    path: str,
    terms: list[tuple[LoraModule, float]],
    method: str,
    cap: int | None,
    dev: torch.device,
    sparse: SparseOptions,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float | None, float | None]]:
    """PEFT's ``*_svd`` forms: ``method`` on each source's dense delta s_i B_i A_i (one module's at a
    time), then the top singular directions, S on B as PEFT puts it, optionally clamped."""
    deltas = [(m.lora_B.to(dev, torch.float32) @ m.lora_A.to(dev, torch.float32)).mul_(m.scaling) for m, _ in terms]
    stats = MergeStats()
    merged = merge_tasks(deltas, [w for _, w in terms], method.removesuffix("_svd"),  # type: ignore[arg-type]
                         density=sparse.density or 1.0, sign_method=sparse.majority_sign, stats=stats,
                         generators=_generators(sparse.seed, path, len(terms), "delta"))  # fmt: skip
    del deltas
    if not is_finite(merged):
        raise NonFiniteError(
            f"the {method.removesuffix('_svd')} combination of the sources' deltas passes float32's range here",
            key=path, fix="check the weights given with the adapters (ADAPTER:WEIGHT)",
        )  # fmt: skip
    r = min(cap or max(m.rank for m, _ in terms), *merged.shape)
    # PEFT takes the full SVD; the top r triplets are the same to float32 rounding. Its clamp, though,
    # sees the sign the SVD routine gives each singular vector pair: with a clamp, LAPACK's SVD runs
    # here, on the CPU whatever the device (cuSOLVER picks other signs: seen on an H200).
    svd = top_svd(merged, r) if sparse.svd_clamp is None else exact_svd(merged.cpu(), r)
    b, a = (svd.U * svd.S).to(dev), svd.Vh.to(dev)  # (out, r), (r, in)
    if sparse.svd_clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), sparse.svd_clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return b.contiguous(), a.contiguous(), _joint_stats(method.removesuffix("_svd"), [(stats, merged.numel())])


def _joint_stats(method: str, parts: list[tuple[MergeStats, int]]) -> tuple[float | None, float | None]:
    """(density, sign agreement) over the merged tensors, where the method means them."""
    if method == "linear":
        return None, None
    n = sum(size for _, size in parts)
    density = sum(st.density * size for st, size in parts) / n
    signs = [(st.sign_agreement, size) for st, size in parts if st.sign_agreement is not None]
    agreement = sum(v * size for v, size in signs) / sum(size for _, size in signs) if signs else None
    return density, agreement


def _module_paths(base: str | os.PathLike[str], allow_pickle: bool) -> list[str]:
    with open_checkpoint(base, allow_pickle=allow_pickle) as ck:
        return [k[: -len(".weight")] for k in live_keys(ck) if k.endswith(".weight")]


def _align_kohya_names(loaded: list[tuple[Adapter, float, str]], base_paths: list[str], *,
                       keep_unmapped: bool) -> list[str]:  # fmt: skip
    """Rename kohya prefixes (``lora_model_layers_0_q_proj``) to module paths (``model.layers.0.q_proj``)
    of the base checkpoint, or of the other sources, so that one module is combined as one.

    A prefix that maps to nothing stays as it is in a kohya output (a kohya name there) and is
    refused otherwise: PEFT matches module paths exactly, so it would load such a module as nothing.
    """
    known = sorted({*base_paths, *(p for a, _, _ in loaded if a.format == "peft" for p in a.modules)})
    warnings = []
    for a, _, name in loaded:
        if a.format != "kohya":
            continue
        found = resolve_paths(a, known) if known else {}
        unmapped = [p for p in a.modules if p not in found and "." not in p]
        a.modules = {found.get(p, p): m for p, m in a.modules.items()}
        if unmapped and not keep_unmapped:
            raise UnsupportedAdapterError(
                f"{len(unmapped)} kohya module name(s) (like {unmapped[0]}) map to no module path of the base or "
                "the other sources: written into a PEFT adapter they would match nothing, and PEFT would load "
                "them as no change at all", path=name,
                fix="pass --base CHECKPOINT to name them, or --format kohya to keep kohya names",
            )  # fmt: skip
        if unmapped:
            warnings.append(
                f"{name}: {len(unmapped)} kohya module name(s) (like {unmapped[0]}) map to no module path "
                "of the base or the other sources and are kept as they are (pass --base CHECKPOINT to name them)"
            )
    return warnings


def _combined_bias(terms: list[tuple[LoraModule, float]], dev: torch.device) -> torch.Tensor | None:
    """lora_B.bias adds like the delta (scaled by w * scaling): exact for every method."""
    parts = [m.bias.to(dev, torch.float32) * (w * m.scaling) for m, w in terms if m.bias is not None]
    return torch.stack(parts).sum(0).cpu() if parts else None


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in (path / "adapter_model.safetensors", path / "adapter_config.json") if p.is_file()]
