"""``loratool analyze``: the LoRA paper's rank analysis (section 7) on checkpoints and adapters.

Three inputs, three analyses, one result shape (:class:`AnalyzeResult`):

- ``BASE FT``: per changed 2-D weight (or Conv2d kernel, flattened as extract flattens it), the
  top-K singular values of ``FT - BASE`` (streamed like extract: one delta in memory at a time, the
  same randomized SVD and seed, so the spectrum is the one extract truncates), the energy curve, the
  rank for 50/90/99% of the energy, the stable rank, the amplification factor for the ranks asked,
  and the rank extract would choose for ``energy`` or a global ``budget`` (the same allocator).
- ``ADAPTER``: per module, the whole spectrum of ``scaling * B @ A`` from the factors (never the
  dense matrix) and its effective rank; with ``base``, the amplification factor too.
- ``ADAPTER OTHER``: the above for the first, and per module both hold, the normalized subspace
  similarity phi(i, j) of their A factors, summarized by module type and by layer.

The math is in :mod:`loratool.analysis.spectral`; the report's plots in :mod:`loratool.analysis.plots`.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .. import arch
from ..adapter import Adapter, Kind, LoraModule
from ..analysis import spectral
from ..errors import LoraToolError
from ..formats import is_adapter, load_adapter
from ..formats.kohya import resolve_paths
from ..host import compile_regex, progress, resolve_device
from ..io.atomic import check_output
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.logical import live_keys, model_view
from ..math.linalg import (
    FactoredSVD,
    allocate_budget,
    check_sketch,
    exact_svd,
    out_in,
    randomized_svd,
    rank_for_energy,
)
from ..report import Dropped
from ..stream.deltas import Delta, DeltaReader, fp8_companions, module_generator, paired_keys, read_weight
from ..stream.pipeline import BufferPool, give_back, widen
from ..stream.workers import read_side_by_side, side_by_side_workers
from ..validation import require_float_weight, require_valid

Mode = Literal["checkpoints", "adapter", "adapters"]
DEFAULT_TOP_K = 64
DEFAULT_AMPLIFICATION_RANKS = (1, 4, 16, 64)


@dataclass
class ModuleAnalysis:
    """One module's spectrum and what follows from it (JSON keys as in the issue's contract)."""

    module: str
    kind: str
    shape: tuple[int, ...]  # the base weight's shape as stored
    singular_values: list[float]  # the top K (checkpoints) or all (adapters), descending
    energy: list[float]  # energy[r-1]: the share of ||dW||_F^2 the top r hold
    rank_for_energy: dict[str, int | None]  # None: more than the K computed are needed
    stable_rank: float
    norm: float  # ||dW||_F
    amplification: dict[int, float] = field(default_factory=dict)  # rank -> ||dW_r||_F / ||U_r^T W V_r||_F
    effective_rank: float | None = None  # adapters: exp(entropy of sigma / sum sigma)
    rank: int | None = None  # adapters: the stored rank
    extract_rank: int | None = None  # the rank extract would give it (--energy / --budget)
    subspace_similarity: list[list[float]] | None = None  # two adapters: phi[i-1][j-1]

    @property
    def group(self) -> tuple[str, int | None]:
        return arch.module_group(self.module)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "module": self.module, "kind": self.kind, "shape": list(self.shape),
            "singular_values": self.singular_values, "energy": self.energy,
            "rank_for_energy": self.rank_for_energy, "stable_rank": self.stable_rank, "norm": self.norm,
            "amplification": {str(r): _finite_or_none(a) for r, a in self.amplification.items()},
        }  # fmt: skip
        for name in ("effective_rank", "rank", "extract_rank", "subspace_similarity"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d


@dataclass
class AnalyzeResult:
    """What :func:`analyze` measured, per module and summarized by module type and layer."""

    mode: Mode
    inputs: list[str]
    top_k: int | None  # checkpoints: K singular values per module; adapters: all (None)
    modules: list[ModuleAnalysis]
    skipped: list[Dropped] = field(default_factory=list)  # changed tensors that are not analyzed
    only_in: dict[str, list[str]] = field(default_factory=dict)  # two adapters: modules one lacks
    warnings: list[str] = field(default_factory=list)
    report: Path | None = None

    def summary(self) -> dict[str, Any]:
        """Per module type and per layer: how many modules, the median rank for each energy share,
        the median stable rank, the median amplification per rank, and the mean phi."""
        return {"by_type": _summarize(self.modules, 0), "by_layer": _summarize(self.modules, 1)}

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "inputs": self.inputs,
            "top_k": self.top_k,
            "summary": self.summary(),
            "modules": [m.to_json() for m in self.modules],
            "skipped": [s.to_json() for s in self.skipped],
            "only_in": self.only_in,
            "report": str(self.report) if self.report else None,
            "warnings": self.warnings,
        }


def analyze(
    first: str | os.PathLike[str],
    second: str | os.PathLike[str] | None = None,
    *,
    base: str | os.PathLike[str] | None = None,
    top_k: int = DEFAULT_TOP_K,
    svd: Literal["randomized", "exact"] = "randomized",
    oversample: int = 16,
    n_iter: int = 4,
    seed: int = 0,
    amplification_ranks: Sequence[int] = DEFAULT_AMPLIFICATION_RANKS,
    energy: float | None = None,
    budget: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    fan_in_fan_out: bool | None = None,
    device: str = "auto",
    report: str | os.PathLike[str] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    show_progress: bool = True,
) -> AnalyzeResult:
    """Rank analysis of a fine-tune (``BASE FT``), an adapter, or two adapters.

    Args:
        first, second: two checkpoints (base, fine-tune), one adapter, or two adapters.
        base: with adapters, a checkpoint: the amplification factor needs its weights (and kohya
            module names resolve against it).
        top_k: singular values per module for checkpoints (adapters give all ``r``).
        svd, oversample, n_iter, seed: the SVD, as in extract (same seed: same spectrum).
        amplification_ranks: the ranks r of ||dW_r||_F / ||U_r^T W V_r||_F (those <= K).
        energy, budget: also report the rank extract would choose under this rule (capped at K).
        include, exclude: regexes on module paths (``re.search``).
        fan_in_fan_out: GPT-2 ``Conv1D`` weights; default from config.json.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        report: write a self-contained HTML report with plots here (needs ``loratool[plot]``).
        force: replace an existing report.

    Returns:
        An :class:`AnalyzeResult`; ``.to_json()`` is what ``--json`` prints.

    Raises:
        LoraToolError: inputs of mixed kinds, bad options, nothing to analyze, matplotlib missing.

    Example:
        >>> r = loratool.analyze("base/", "finetuned/", top_k=64)
        >>> {m.module: m.rank_for_energy["0.9"] for m in r.modules}
    """
    if top_k < 1:
        raise LoraToolError(f"--top-k must be at least 1 (got {top_k})")
    if energy is not None and budget is not None:
        raise LoraToolError("--energy and --budget are two rank rules: give one")
    if energy is not None and not 0 < energy <= 1:
        raise LoraToolError(f"--energy must be in (0, 1] (got {energy})", fix="e.g. --energy 0.9")
    if budget is not None and budget < 1:
        raise LoraToolError(f"--budget must be a positive number of parameters (got {budget})")
    if svd not in ("randomized", "exact"):
        raise LoraToolError(f"unknown --svd {svd!r}", fix="use randomized or exact")
    check_sketch(oversample, n_iter)
    if any(r < 1 for r in amplification_ranks):
        raise LoraToolError(f"amplification ranks must be positive (got {list(amplification_ranks)})")
    out = None
    if report is not None:
        from ..analysis import plots

        plots.require_matplotlib()
        inputs = [p for p in (first, second, base) if p is not None]
        out = check_output(report, force=force, inputs=inputs)
    select = _Selection(compile_regex(include, "--include"), compile_regex(exclude, "--exclude"))
    dev = resolve_device(device)
    mode = _mode(Path(first), None if second is None else Path(second))

    if mode == "checkpoints":
        assert second is not None
        if base is not None:
            raise LoraToolError("--base is for adapters: with BASE FT the base is the first argument")
        result = _analyze_checkpoints(
            first, second, top_k=top_k, svd=svd, oversample=oversample, n_iter=n_iter, seed=seed,
            ranks=amplification_ranks, select=select, fan_in_fan_out=fan_in_fan_out, device=dev,
            allow_pickle=allow_pickle, show=show_progress,
        )  # fmt: skip
    else:
        result = _analyze_adapters(
            first, second, base=base, ranks=amplification_ranks, select=select, device=dev,
            allow_pickle=allow_pickle, show=show_progress,
        )  # fmt: skip
    if not result.modules:
        raise LoraToolError(
            "nothing to analyze: no module " + ("changed" if mode == "checkpoints" else "has LoRA factors"),
            path=str(first),
            fix="check the inputs (and --include/--exclude)",
        )
    _extract_ranks(result.modules, energy, budget)
    if out is not None:
        from ..analysis import plots

        plots.write_report(result.to_json() | {"report": str(out)}, out, force=force)
        result.report = out
    return result


@dataclass
class _Selection:
    include: Any
    exclude: Any

    def __call__(self, module: str) -> bool:
        inc, exc = self.include, self.exclude
        return (inc is None or bool(inc.search(module))) and not (exc is not None and exc.search(module))


def _mode(first: Path, second: Path | None) -> Mode:
    kinds = [is_adapter(p) for p in (first, second) if p is not None]
    if second is None:
        if not kinds[0]:
            raise LoraToolError(
                "one checkpoint alone has no update to analyze",
                path=str(first),
                fix="give BASE FINETUNED (two checkpoints), or an adapter",
            )
        return "adapter"
    if kinds[0] != kinds[1]:
        which = second if kinds[0] else first
        raise LoraToolError(
            "one input is an adapter and the other a checkpoint",
            path=str(which),
            fix="give BASE FINETUNED (two checkpoints) or ADAPTER [OTHER]; "
            "for an adapter's amplification factor, pass the checkpoint as --base",
        )
    return "adapters" if kinds[0] else "checkpoints"


# -- BASE FT --------------------------------------------------------------------------------------------
def _analyze_checkpoints(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    *,
    top_k: int,
    svd: str,
    oversample: int,
    n_iter: int,
    seed: int,
    ranks: Sequence[int],
    select: _Selection,
    fan_in_fan_out: bool | None,
    device: torch.device,
    allow_pickle: bool,
    show: bool,
) -> AnalyzeResult:
    result = AnalyzeResult("checkpoints", [str(base), str(finetuned)], top_k, [])
    with (
        open_checkpoint(base, allow_pickle=allow_pickle) as b_stored,
        open_checkpoint(finetuned, allow_pickle=allow_pickle) as f_stored,
    ):
        b, f = model_view(b_stored), model_view(f_stored)  # packed low-bit weights read dequantized
        fp8 = (b.fp8_layout(), f.fp8_layout())
        keys = paired_keys(b, f, skip=fp8_companions(*fp8))
        config = f.config() or b.config()
        conv1d = arch.uses_conv1d(config, fan_in_fan_out)
        tied = arch.tied_output(keys, config)
        keys = [k for k in keys if not (tied and k == tied[0] + ".weight")]  # the input embedding's matrix
        pool = BufferPool()
        read = DeltaReader(b, f, device, pool, fp8)
        opts = _SvdOptions(top_k, svd, oversample, n_iter, seed, ranks)

        def handle(d: Delta) -> ModuleAnalysis | Dropped | None:
            module = d.key.removesuffix(".weight")
            if not isinstance(d.delta, torch.Tensor):  # an integer tensor, or unchanged (ExpertDeltas: not asked for)
                return Dropped(d.key, d.norm, "an integer tensor changed") if d.norm else None
            weight = d.delta.dim() in (2, 4) and d.key.endswith(".weight")  # a matrix or a Conv2d kernel
            out: ModuleAnalysis | Dropped | None = None
            if d.norm > 0 and weight and select(module):
                kind: Kind = "conv2d" if d.delta.dim() == 4 else arch.module_kind(module, conv1d)
                out = _analyze_delta(module, kind, d, opts, pool, device)
            elif d.norm > 0:
                out = Dropped(d.key, d.norm, "not selected" if weight else "not a 2-D weight or Conv2d kernel")
            give_back(d.delta, pool)  # consumed; its memory serves the next delta
            return out

        # as extract: two tensors at once on the CPU, each on its share of the threads, the reader on one
        workers = side_by_side_workers(device) if svd != "exact" else 1
        for out in read_side_by_side(handle, read, keys, workers, depth=2, desc="analyze", show=show,
                                     size=lambda d: d.nbytes):  # fmt: skip
            if isinstance(out, ModuleAnalysis):
                result.modules.append(out)
            elif out is not None:
                result.skipped.append(out)
    return result


@dataclass
class _SvdOptions:
    top_k: int
    svd: str
    oversample: int
    n_iter: int
    seed: int
    ranks: Sequence[int]


def _analyze_delta(
    module: str, kind: Kind, d: Delta, o: _SvdOptions, pool: BufferPool, device: torch.device
) -> ModuleAnalysis:
    """One changed weight: the top-K SVD of its delta (extract's, seed for seed) and the
    amplification factor against the base weight."""
    assert isinstance(d.delta, torch.Tensor)
    matrix = out_in(d.delta, kind)  # (out, in); a Conv2d kernel's (out, in * kh * kw), as extract factors it
    k = min(o.top_k, *matrix.shape)
    if o.svd == "exact":
        svd = exact_svd(matrix, k, sq_norm=d.norm**2)
    else:
        gen = module_generator(o.seed, module)
        svd = randomized_svd(matrix, k, oversample=o.oversample, n_iter=o.n_iter, generator=gen, sq_norm=d.norm**2)
    a = _describe(module, kind, tuple(d.delta.shape), svd.S, svd.total_energy, complete=k == min(matrix.shape))
    weight = widen(d.base, device, pool)  # float32 (FP8 bases arrive dequantized)
    a.amplification = spectral.amplification(svd.U, svd.S, svd.Vh, out_in(weight, kind), o.ranks)
    give_back(weight, pool)
    return a


def _describe(
    module: str, kind: Kind, shape: tuple[int, ...], S: torch.Tensor, total: float, complete: bool
) -> ModuleAnalysis:
    """A module's spectrum (``S`` of an update whose squared norm is ``total``) and what follows."""
    return ModuleAnalysis(
        module=module,
        kind=kind,
        shape=tuple(int(n) for n in shape),
        singular_values=S.double().tolist(),
        energy=spectral.energy_curve(S, total),
        rank_for_energy=spectral.ranks_for_energy(S, total, complete=complete),
        stable_rank=spectral.stable_rank(S, total),
        norm=total**0.5,
    )


# -- ADAPTER [OTHER] ----------------------------------------------------------------------------------
def _analyze_adapters(
    first: str | os.PathLike[str],
    second: str | os.PathLike[str] | None,
    *,
    base: str | os.PathLike[str] | None,
    ranks: Sequence[int],
    select: _Selection,
    device: torch.device,
    allow_pickle: bool,
    show: bool,
) -> AnalyzeResult:
    paths = [p for p in (first, second) if p is not None]
    checked = [w for p in paths for w in require_valid(p, "analyze refuses it", allow_pickle=allow_pickle)]
    one = load_adapter(first, allow_pickle=allow_pickle)
    other = load_adapter(second, allow_pickle=allow_pickle) if second is not None else None
    if other is not None:  # kohya prefixes name the same modules as the other's paths
        other.modules = _renamed(other, list(one.modules))
        one.modules = _renamed(one, list(other.modules))
    mode: Mode = "adapter" if other is None else "adapters"
    result = AnalyzeResult(mode, [str(p) for p in paths], None, [])
    result.warnings += checked
    if one.use_dora:
        result.warnings.append(f"{first}: DoRA's magnitude is not in the spectrum: it is that of scaling * B @ A")
    for key in one.whole:
        result.skipped.append(Dropped(key, float(torch.linalg.vector_norm(one.whole[key].double())), "stored whole"))
    names = [m for m in one.modules if select(m)]
    with open_checkpoint(base, allow_pickle=allow_pickle) if base is not None else _no_checkpoint() as ck:
        weights = _weight_keys(one, ck, result) if ck is not None else {}
        fp8 = ck.fp8_layout() if ck is not None else None  # FP8 base weights are read dequantized
        for name in progress(names, desc="analyze", enabled=show):
            m = one.modules[name]
            spectrum = FactoredSVD.of([m.lora_B.to(device) * m.scaling], [m.lora_A.to(device)], dtype=torch.float64)
            a = _describe(name, m.kind, m.weight_shape, spectrum.S, spectrum.total_energy, True)
            if name in weights and ck is not None:
                require_float_weight(ck.info(weights[name]).dtype, path=str(base), key=weights[name],
                                     consequence="; its amplification factor would measure that rounding")  # fmt: skip
                t = spectrum.truncate()
                w = read_weight(ck, fp8, weights[name], device).to(device, torch.float64)  # as stored: on the CPU
                a.amplification = spectral.amplification(t.U, t.S, t.Vh, out_in(w, m.kind), ranks)
            a.effective_rank = spectral.effective_rank(spectrum.S)
            a.rank = m.rank
            result.modules.append(a)
    if other is not None:
        _similarities(result, one, other, names)
    return result


def _no_checkpoint() -> contextlib.nullcontext[None]:
    return contextlib.nullcontext(None)


def _renamed(adapter: Adapter, paths: list[str]) -> dict[str, LoraModule]:
    """The adapter's modules, those that name one of ``paths`` under another spelling (kohya) renamed to it."""
    found = resolve_paths(adapter, paths)
    return {found.get(name, name): m for name, m in adapter.modules.items()}


def _weight_keys(adapter: Adapter, ck: Checkpoint, result: AnalyzeResult) -> dict[str, str]:
    """Adapter module -> the base's weight key (kohya prefixes resolved); warns about the rest."""
    stored = live_keys(ck)  # a vision-language model's tensors by the names its adapters use
    module_paths = [k.removesuffix(".weight") for k in stored if k.endswith(".weight")]
    found = resolve_paths(adapter, module_paths)
    missing = [m for m in adapter.modules if m not in found]
    if missing:
        result.warnings.append(
            f"{len(missing)} module(s) have no weight in --base (first: {missing[0]}): no amplification factor"
        )
    return {m: stored[p + ".weight"] for m, p in found.items()}


def _similarities(result: AnalyzeResult, one: Adapter, other: Adapter, names: list[str]) -> None:
    by_name = {a.module: a for a in result.modules}
    both = [n for n in names if n in other.modules]
    result.only_in = {
        result.inputs[0]: [n for n in names if n not in other.modules],
        result.inputs[1]: [n for n in other.modules if n not in one.modules],
    }
    if not both:
        raise LoraToolError(
            "the two adapters share no module: there is nothing to compare",
            path=result.inputs[1],
            fix="compare adapters of one base model",
        )
    for n in both:
        a1, a2 = one.modules[n].lora_A, other.modules[n].lora_A
        if a1.shape[1] != a2.shape[1]:
            raise LoraToolError(
                f"the A factors have different input sizes ({a1.shape[1]} and {a2.shape[1]})",
                key=n,
                fix="compare adapters of one base model",
            )
        by_name[n].subspace_similarity = spectral.subspace_similarity(a1, a2).tolist()


# -- extract's rank rules, summaries --------------------------------------------------------------------
def _extract_ranks(modules: list[ModuleAnalysis], energy: float | None, budget: int | None) -> None:
    """The rank extract would choose for each module under ``--energy`` or ``--budget``, from the
    singular values computed (so capped at K), with extract's own rules."""
    spectra = {m.module: torch.tensor(m.singular_values, dtype=torch.float64) for m in modules}
    if energy is not None:
        for m in modules:
            m.extract_rank = rank_for_energy(spectra[m.module], m.norm**2, energy, max(len(m.singular_values), 1))
    elif budget is not None:
        ranks = allocate_budget(spectra, {m.module: sum(m.shape) for m in modules}, budget)  # a rank costs in + out
        for m in modules:
            m.extract_rank = ranks[m.module]


def _summarize(modules: Iterable[ModuleAnalysis], by: int) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[ModuleAnalysis]] = defaultdict(list)
    for m in modules:
        key = m.group[by]
        groups["none" if key is None else str(key)].append(m)
    out = {}
    for key, ms in groups.items():
        entry: dict[str, Any] = {
            "modules": len(ms),
            "median_stable_rank": statistics.median(m.stable_rank for m in ms),
            "median_rank_for_energy": {
                share: _median_or_none([m.rank_for_energy[share] for m in ms]) for share in ms[0].rank_for_energy
            },
        }
        amp_ranks = sorted({r for m in ms for r in m.amplification})
        if amp_ranks:
            entry["median_amplification"] = {
                str(r): _finite_or_none(statistics.median(m.amplification[r] for m in ms if r in m.amplification))
                for r in amp_ranks
            }
        phis = [m.subspace_similarity for m in ms if m.subspace_similarity is not None]
        if phis:
            entry["mean_phi_top"] = statistics.fmean(p[0][0] for p in phis)
            entry["mean_phi"] = statistics.fmean(statistics.fmean(v for row in p for v in row) for p in phis)
        out[key] = entry
    return out


def _finite_or_none(x: float) -> float | None:
    """An amplification factor for JSON: None where it is infinite (the base weight has nothing in the
    update's subspace: :func:`.spectral.amplification`), which JSON cannot spell."""
    return x if math.isfinite(x) else None


def _median_or_none(values: list[int | None]) -> float | None:
    """The median rank, or None when some module needs more than the K computed."""
    if any(v is None for v in values):
        return None
    return float(statistics.median(v for v in values if v is not None))
