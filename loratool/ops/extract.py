"""``loratool extract``: a LoRA adapter from the difference of a fine-tune and its base.

For every 2-D weight that changed, delta = W_ft - W_base (float32, on the chosen device) is
truncated by SVD, delta ~= U_r S_r V_r^T, and written as B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T
with ``lora_alpha = r`` (scaling 1). Tensors LoRA cannot hold are kept whole (``keep_full``) or
reported as dropped with the norm of what is lost.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..adapter import Adapter, Kind, LoraModule, save_adapter
from ..card import check_base_model_id, is_hub_id
from ..checkpoint import Checkpoint, open_checkpoint, torch_dtype
from ..errors import LoraToolError, MissingKeyError, NonFiniteError, ShapeMismatchError
from ..linalg import (
    TruncatedSVD,
    allocate_budget,
    delta_as_out_in,
    exact_svd,
    randomized_svd,
    rank_for_energy,
    relative_error,
    residual_error,
    split_factors,
)
from ..output import check_output
from ..provenance import InputHasher, encode, make_record
from ..report import Dropped, ModuleReport, summarize
from ..runtime import compile_regex, prefetch, progress, resolve_device

# transformers model types whose 2-D projection weights are GPT-2 ``Conv1D`` (stored (in, out)).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
EMBEDDING_NAME = re.compile(
    r"(^|\.)(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|embeddings|embedding|tok_embeddings|shared)$"
)
DEFAULT_CAP = 256  # highest rank --energy/--budget consider when -r does not say


@dataclass
class ExtractResult:
    """What :func:`extract` wrote and how well the adapter holds the fine-tune."""

    output: Path
    adapter: Adapter
    report: list[ModuleReport]
    dropped: list[Dropped] = field(default_factory=list)
    kept_whole: list[str] = field(default_factory=list)
    unchanged: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "summary": summarize(self.report),
            "trainable_parameters": self.adapter.num_params,
            "modules": [r.to_json() for r in self.report],
            "dropped": [d.to_json() for d in self.dropped],
            "kept_whole": self.kept_whole,
            "unchanged_tensors": self.unchanged,
            "warnings": self.warnings,
        }


@dataclass
class _Pending:
    key: str
    module: str
    kind: Kind
    shape: tuple[int, int]
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
    oversample: int = 8,
    n_iter: int = 4,
    device: str = "auto",
    dtype: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    keep_full: str | None = None,
    fan_in_fan_out: bool | None = None,
    format: Literal["peft", "kohya"] = "peft",
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
        fan_in_fan_out: treat 2-D weights as GPT-2 ``Conv1D`` (in, out); default from config.json.
        format: ``peft`` or ``kohya``.
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
    _check_rank_options(rank, energy, budget, svd)
    check_base_model_id(base_model_id)
    out = check_output(output, force=force, inputs=[base, finetuned])
    dev = resolve_device(device)
    inc, exc = compile_regex(include, "--include"), compile_regex(exclude, "--exclude")
    keep = compile_regex(keep_full, "--keep-full")
    cap = rank if rank is not None else DEFAULT_CAP
    gen = torch.Generator(device="cpu").manual_seed(seed)

    with open_checkpoint(base, allow_pickle=allow_pickle) as b, open_checkpoint(
        finetuned, allow_pickle=allow_pickle
    ) as f:
        keys = _paired_keys(b, f)
        hasher = InputHasher([*b.file_paths(), *f.file_paths()])
        config = f.config() or b.config()
        conv1d = fan_in_fan_out if fan_in_fan_out is not None else config.get("model_type") in CONV1D_MODEL_TYPES
        tied = _tied_output(keys, config)  # (output embedding module, input embedding key) or None
        out_dtype = torch_dtype(dtype) if dtype else None
        result = ExtractResult(output=out, adapter=Adapter(), report=[])
        pending: list[_Pending] = []
        modules: dict[str, LoraModule] = {}
        reports: dict[str, ModuleReport] = {}

        def read_pair(key: str) -> tuple[str, torch.Tensor, torch.Tensor]:
            return key, b.get(key), f.get(key)

        pairs = prefetch((read_pair(k) for k in keys), depth=prefetch_depth)
        for key, wb, wf in progress(pairs, total=len(keys), desc="extract", enabled=show_progress):
            for name, t in (("base", wb), ("fine-tune", wf)):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"the {name} holds NaN or Inf", key=key, fix="repair the checkpoint")
            if not wb.is_floating_point():
                if not torch.equal(wb, wf):
                    norm = float(torch.linalg.vector_norm(wf.double() - wb.double()))
                    result.dropped.append(Dropped(key, norm, "an integer tensor changed"))
                continue
            delta = wf.to(dev, torch.float32) - wb.to(dev, torch.float32)
            if not bool(delta.any()):
                result.unchanged += 1
                continue
            if out_dtype is None:
                out_dtype = wf.dtype
            module = key[: -len(".weight")] if key.endswith(".weight") else key
            if tied and key == tied[0] + ".weight":
                continue  # the same tensor as the input embedding: its factors are reused below
            lora_ok = delta.dim() == 2 and key.endswith(".weight") and _selected(module, inc, exc)
            if not lora_ok:
                norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
                if keep and keep.search(key):
                    result.adapter.whole[key] = wf
                    result.kept_whole.append(key)
                else:
                    why = "not a 2-D weight" if delta.dim() != 2 or not key.endswith(".weight") else "not selected"
                    result.dropped.append(Dropped(key, norm, f"{why}; pass --keep-full to store it whole"))
                continue
            kind: Kind = "embedding" if EMBEDDING_NAME.search(module) else ("conv1d" if conv1d else "linear")
            matrix = delta_as_out_in(delta, kind)  # (out, in), the factors' orientation
            k = min(cap, *matrix.shape)
            if rank is not None and rank > min(matrix.shape) and budget is None and energy is None:
                result.warnings.append(f"{module}: rank {rank} clamped to {k}, the smaller side of {list(delta.shape)}")
            decomposed = (
                exact_svd(matrix, k)
                if svd == "exact"
                else randomized_svd(matrix, k, oversample=oversample, n_iter=n_iter, generator=gen)
            )
            if budget is not None:
                pending.append(_Pending(key, module, kind, tuple(delta.shape), decomposed))  # type: ignore[arg-type]
                continue
            r = k if energy is None else rank_for_energy(decomposed.S, decomposed.total_energy, energy, k)
            lora_b, lora_a = split_factors(decomposed, r)
            err = residual_error(matrix, lora_b, lora_a)  # consumes delta, which is no longer needed
            modules[module] = LoraModule(lora_A=lora_a.cpu(), lora_B=lora_b.cpu(), alpha=float(r), kind=kind)
            reports[module] = ModuleReport(module, tuple(delta.shape), r, err, decomposed.energy(r) / decomposed.total_energy, kind)  # type: ignore[arg-type]

        if budget is not None:
            _spend_budget(pending, budget, modules, reports, result)
        if tied and tied[1][: -len(".weight")] in modules:
            _tie_output_embedding(tied[0], tied[1][: -len(".weight")], modules, reports, result)
        if not modules and not result.adapter.whole:
            raise LoraToolError(
                "the fine-tune does not differ from the base in any tensor loratool can extract",
                path=str(finetuned),
                fix="check that BASE and FT are different checkpoints (and --include/--exclude)",
            )
        for d in result.dropped:
            result.warnings.append(f"dropped {d.key} (norm of change {d.norm:.4g}): {d.reason}")
        result.report = [reports[m] for m in modules]
        result.adapter.modules = modules
        result.adapter.config = _adapter_config(config, base_model_id)
        params = {
            "rank": rank, "energy": energy, "budget": budget, "svd": svd, "oversample": oversample,
            "n_iter": n_iter, "include": include, "exclude": exclude, "keep_full": keep_full,
            "fan_in_fan_out": conv1d, "format": format, "seed": seed, "dtype": str(out_dtype).replace("torch.", ""),
        }  # fmt: skip
        record = make_record(
            "extract", params, hasher.result(), report=[r.to_json() for r in result.report],
            extra={"dropped": [d.to_json() for d in result.dropped]},
        )  # fmt: skip
        result.adapter.metadata = encode(record)
        save_adapter(result.adapter, out, format=format, force=force, dtype=out_dtype)
    return result


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


def _paired_keys(b: Checkpoint, f: Checkpoint) -> list[str]:
    missing = [k for k in b.keys() if k not in f]
    extra = [k for k in f.keys() if k not in b]
    if missing or extra:
        key = (missing or extra)[0]
        where = "the fine-tune lacks" if missing else "the base lacks"
        count = len(missing) + len(extra)
        raise MissingKeyError(
            f"{where} this tensor ({count} unpaired in all)",
            path=str(f.path if missing else b.path),
            key=key,
            fix="BASE and FT must be the same architecture with the same tensor names",
        )
    for k in b.keys():
        ib, jf = b.info(k), f.info(k)
        if ib.shape != jf.shape:
            raise ShapeMismatchError(
                "base and fine-tune shapes differ",
                key=k,
                expected=list(ib.shape),
                got=list(jf.shape),
                fix="was the vocabulary resized? Extract from checkpoints of one architecture",
            )
    return b.keys()


def _tied_output(keys: list[str], config: dict[str, Any]) -> tuple[str, str] | None:
    """(``lm_head``, input embedding key) when config.json ties the output to the input embedding.

    A tied checkpoint stores the matrix once (GPT-2 has no ``lm_head.weight``), or twice with equal
    values; either way the fine-tune changed both uses of it at once.
    """
    archs = [str(a) for a in config.get("architectures") or []]
    if not config.get("tie_word_embeddings", True) or not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return None
    embeds = [k for k in keys if k.endswith(".weight") and EMBEDDING_NAME.search(k[: -len(".weight")])]
    embeds = [k for k in embeds if "embed_tokens" in k or "wte" in k or "word_embeddings" in k] or embeds
    return ("lm_head", embeds[0]) if embeds else None


def _tie_output_embedding(
    head: str, embed: str, modules: dict[str, LoraModule], reports: dict[str, ModuleReport], result: ExtractResult
) -> None:
    """Give the tied output layer the embedding's factors, transposed, so PEFT applies the delta to
    both uses of the shared matrix (PEFT adapts each module separately)."""
    e = modules[embed]
    # embedding: delta (num, dim) = (B_e @ A_e).T = A_e.T @ B_e.T = B_head @ A_head
    modules[head] = LoraModule(lora_A=e.lora_B.T.contiguous(), lora_B=e.lora_A.T.contiguous(), alpha=e.alpha)
    r = reports[embed]
    reports[head] = ModuleReport(head, r.shape, r.rank, r.relative_error, r.energy_kept, "linear")
    result.warnings.append(f"{head} is tied to {embed}: it gets the same factors, transposed")


def _selected(module: str, inc: re.Pattern[str] | None, exc: re.Pattern[str] | None) -> bool:
    return (inc is None or bool(inc.search(module))) and not (exc is not None and exc.search(module))


def _spend_budget(
    pending: list[_Pending], budget: int, modules: dict[str, LoraModule], reports: dict[str, ModuleReport], result: ExtractResult
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
        modules[p.module] = LoraModule(lora_A=lora_a.cpu(), lora_B=lora_b.cpu(), alpha=float(r), kind=p.kind)
        kept = p.svd.energy(r) / p.svd.total_energy
        reports[p.module] = ModuleReport(p.module, p.shape, r, relative_error(p.svd, r), kept, p.kind)


def _adapter_config(model_config: dict[str, Any], base_model_id: str | None) -> dict[str, Any]:
    archs = model_config.get("architectures") or []
    if base_model_id is None and is_hub_id(model_config.get("_name_or_path")):
        base_model_id = model_config["_name_or_path"]  # a Hub id the base's config.json records
    task = "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") or str(a).endswith("LMHeadModel") for a in archs) else None
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_id,
        "task_type": task,
        "use_rslora": False,
        "init_lora_weights": True,
    }
