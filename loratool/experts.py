"""PEFT's LoRA on 3-D expert parameters (``target_parameters``), as loratool holds it: one module per expert.

PEFT (``lora.ParamWrapper``) adapts a parameter of shape (E, d1, d2) with one factor pair for all
E experts: ``lora_A`` (E*r, in) holds expert e's A in rows ``e*r .. e*r+r``, and ``lora_B``
(out, r*E) holds expert e's B in columns ``e, e+E, e+2E, ...`` (``B.reshape(out, r, E)[:, :, e]``);
expert e's delta is ``scaling * B_e @ A_e`` (out, in), added to ``param[e]`` as stored: (out, in),
or (in, out) for the experts transformers marks ``is_transposed`` (gpt-oss). Two parameters of one
module are nested: the first in the module's registration order sits under ``base_layer`` (its
keys read ``<module>.base_layer.lora_A.weight``), the second outside it.

loratool splits such a pair into one :class:`~loratool.adapter.LoraModule` per expert, named
``<parameter path>.<e>`` with ``expert = (e, E)``, so that inspect shows per-expert ranks and
combine and resize work per expert; the PEFT writer joins them again (ranks padded with zeros to
the largest, scalings folded into B when the experts disagree). Nothing here reads files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from .adapter import LoraModule, lora_scaling, pattern_lookup

# The order transformers' fused-experts classes register their parameters in (it decides PEFT's
# nesting); a module with two targeted parameters outside this list is refused, never guessed.
REGISTRATION_ORDER = ("gate_up_proj", "down_proj")
# model types whose fused experts are stored (E, in, out) (transformers: is_transposed=True)
TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss", "aria", "openai_privacy_filter"})

if TYPE_CHECKING:  # torch only where tensors are joined: validate and the registry's listings read headers
    import torch


def targeted_parameters(config: Mapping[str, Any], module: str) -> list[str]:
    """The parameter names of ``module`` that ``target_parameters`` selects (PEFT's match: the
    full ``module.param`` name, or a dotted suffix of it), in registration order."""
    targets = [str(t) for t in config.get("target_parameters") or []]
    names = {t.rsplit(".", 1)[-1] for t in targets}
    chosen = [n for n in names if any(f"{module}.{n}" == t or f"{module}.{n}".endswith("." + t) for t in targets)]
    return sorted(chosen, key=_order)


def _order(name: str) -> tuple[int, str]:
    return (REGISTRATION_ORDER.index(name) if name in REGISTRATION_ORDER else len(REGISTRATION_ORDER), name)


def wrapper_parameter(config: Mapping[str, Any], wrapper: str) -> str | None:
    """The parameter path a PEFT ``ParamWrapper`` key prefix adapts (``...experts.base_layer`` ->
    ``...experts.gate_up_proj``), or None when ``target_parameters`` selects nothing there.

    Raises:
        ValueError: two or more parameters of one module are targeted and their nesting order
            is not known.
    """
    depth = 0
    module = wrapper
    while module.endswith(".base_layer"):
        module, depth = module[: -len(".base_layer")], depth + 1
    params = targeted_parameters(config, module)
    if not params:
        return None
    if len(params) > 1 and any(p not in REGISTRATION_ORDER for p in params):
        raise ValueError(
            f"{module}: target_parameters names {', '.join(params)}; which of them PEFT nested under base_layer "
            "depends on the model's parameter order, known to loratool for " + ", ".join(REGISTRATION_ORDER)
        )
    index = len(params) - 1 - depth  # the first registered is wrapped first, so nested deepest
    if not 0 <= index < len(params):
        raise ValueError(f"{wrapper}: nested deeper than the {len(params)} targeted parameter(s) of {module}")
    return f"{module}.{params[index]}"


def parameter_wrapper(config_params: Sequence[str], parameter: str) -> str:
    """The PEFT key prefix for ``parameter`` among the targeted parameters of its module (the
    inverse of :func:`wrapper_parameter`)."""
    module, _, name = parameter.rpartition(".")
    siblings = sorted({p.rpartition(".")[2] for p in config_params if p.rpartition(".")[0] == module}, key=_order)
    depth = len(siblings) - 1 - siblings.index(name)
    return module + ".base_layer" * depth


def stored_kind(shape: Sequence[int], m: LoraModule, *, transposed_model: bool) -> Literal["linear", "conv1d"] | None:
    """How expert ``m``'s delta lies in a stored 3-D parameter of ``shape``: ``linear`` for
    (E, out, in), ``conv1d`` (the transpose, as loratool.adapter names it) for (E, in, out); None
    when it does not fit. A square expert is read by the model type (``transposed_model``)."""
    assert m.expert is not None
    out_in = (m.out_features, m.in_features)
    if len(shape) != 3 or shape[0] != m.expert[1] or tuple(shape[1:]) not in (out_in, out_in[::-1]):
        return None
    if out_in[0] == out_in[1]:
        return "conv1d" if transposed_model else "linear"
    return "linear" if tuple(shape[1:]) == out_in else "conv1d"


# Checkpoints that store experts apart, as transformers' conversion mapping fuses them on load:
# per expert, ``gate_up_proj`` is gate_proj's rows then up_proj's (Qwen2/3-MoE, DeepSeek, OLMoE and
# the rest of the qwen2_moe family), or w1's then w3's under ``block_sparse_moe`` (Mixtral); and
# ``down_proj`` is down_proj (w2). gpt-oss interleaves gate and up columns and is not among them.
_APART: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}


def apart_weights(
    parameter: str, e: int, shape_of: Callable[[str], Sequence[int] | None], *, transposed_model: bool
) -> list[tuple[str, tuple[int, int]]] | None:
    """The 2-D weights in which a checkpoint that stores experts apart keeps expert ``e`` of the
    fused ``parameter`` (``<...>.experts.gate_up_proj``), with their shapes, in the order
    transformers concatenates their rows; None where it holds no such weights. ``shape_of`` gives a
    key's stored shape (None: absent)."""
    if transposed_model:
        return None
    prefix, _, name = parameter.rpartition(".")
    for where in dict.fromkeys((prefix, prefix.replace(".mlp.experts", ".block_sparse_moe.experts"))):
        for names in _APART.get(name, ()):
            keys = [f"{where}.{e}.{n}.weight" for n in names]
            shapes = [shape_of(k) for k in keys]
            if all(s is not None and len(s) == 2 for s in shapes):
                return [(k, (int(s[0]), int(s[1]))) for k, s in zip(keys, shapes) if s is not None]
    return None


def fused_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int, int]]:
    """The fused 3-D parameters transformers would make of experts a checkpoint stores apart
    (``<...>.mlp.experts.gate_up_proj`` -> (E, rows, cols)), from its tensors' shapes: what a
    ``target_parameters`` adapter is checked against where only headers are read (the registry)."""
    experts_of: dict[str, dict[int, dict[str, tuple[int, int]]]] = {}
    for key, shape in shapes.items():  # <prefix>.experts.<e>.<name>.weight, 2-D
        parts = key.split(".")
        if len(parts) >= 5 and parts[-1] == "weight" and parts[-3].isdigit() and parts[-4] == "experts":
            if len(shape) == 2:
                prefix = ".".join(parts[:-4]).replace(".block_sparse_moe", ".mlp")  # Mixtral's, renamed
                experts_of.setdefault(prefix, {}).setdefault(int(parts[-3]), {})[parts[-2]] = (shape[0], shape[1])
    out: dict[str, tuple[int, int, int]] = {}
    for prefix, per_expert in experts_of.items():
        count = len(per_expert)
        if sorted(per_expert) != list(range(count)):
            continue
        for fused, layouts in _APART.items():
            for names in layouts:
                layout = {tuple(per_expert[e].get(n) for n in names) for e in range(count)}  # one for all experts
                if len(layout) != 1:
                    continue
                pieces = layout.pop()
                if all(p is not None for p in pieces) and len({p[1] for p in pieces if p}) == 1:
                    rows = sum(p[0] for p in pieces if p)
                    out[f"{prefix}.experts.{fused}"] = (count, rows, next(p[1] for p in pieces if p))
    return out


def split_apart(
    m: LoraModule, shapes: Sequence[tuple[int, int]]
) -> list[tuple[LoraModule, Literal["linear", "conv1d"]]] | None:
    """Expert ``m``'s delta cut into the 2-D weights of :func:`apart_weights` (each ``(rows, cols)``,
    stacked on the rows of the fused expert): one module per weight, exact (the rows of B, or the
    columns of A where the fused expert is stored transposed to m's (out, in)), with how it lies in
    that weight; None where they do not make up the fused expert's shape."""
    assert m.expert is not None
    cols = {c for _, c in shapes}
    rows = sum(r for r, _ in shapes)
    if len(cols) != 1:
        return None
    kind = stored_kind((m.expert[1], rows, cols.pop()), m, transposed_model=False)
    if kind is None:
        return None
    pieces: list[tuple[LoraModule, Literal["linear", "conv1d"]]] = []
    start = 0
    for r, _ in shapes:
        if kind == "linear":  # the fused expert is (out, in): its rows are B's
            piece = replace(m, lora_B=m.lora_B[start : start + r], expert=None)
        else:  # stored (in, out): its rows are A's columns
            piece = replace(m, lora_A=m.lora_A[:, start : start + r], expert=None)
        pieces.append((piece, kind))
        start += r
    return pieces


def rank_of(config: Mapping[str, Any], parameter: str) -> int:
    found = pattern_lookup(config.get("rank_pattern") or {}, parameter)
    return int(found if found is not None else config.get("r", 8))


def split_experts(
    parameter: str, lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int, alpha: float, use_rslora: bool
) -> dict[str, LoraModule]:
    """PEFT's (E*r, in) / (out, r*E) pair as E modules ``<parameter>.<e>``.

    Raises:
        ValueError: the shapes do not hold a whole number of experts of rank ``rank``.
    """
    rows, cols = int(lora_A.shape[0]), int(lora_B.shape[1])
    if rank <= 0 or rows % rank or rows != cols:
        raise ValueError(
            f"lora_A {list(lora_A.shape)} and lora_B {list(lora_B.shape)} do not hold experts of rank {rank}"
        )
    experts = rows // rank
    a = lora_A.reshape(experts, rank, lora_A.shape[1])  # (E, r, in)
    b = lora_B.reshape(lora_B.shape[0], rank, experts)  # (out, r, E)

    def own(t: torch.Tensor) -> torch.Tensor:  # each expert's factors apart from the stacked ones
        # (a lazy read's meta tensors hold no data, and cloning a strided meta view costs torch a 0.3 s
        # import of its symbolic shapes: every validate and merge of an experts adapter paid it)
        return t if t.is_meta else t.clone()

    return {
        f"{parameter}.{e}": LoraModule(
            lora_A=own(a[e]), lora_B=own(b[:, :, e]), alpha=alpha, use_rslora=use_rslora, expert=(e, experts)
        )
        for e in range(experts)
    }


def join_experts(modules: Sequence[LoraModule]) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(lora_A, lora_B, r, alpha) in PEFT's layout for the experts 0..E-1 of one parameter.

    Experts of one rank and scaling are written as they are; otherwise lower ranks are padded with
    zeros to the largest and each expert's scaling is folded into its B, with scaling 1 for all
    (``alpha = r``, or ``sqrt(r)`` under rsLoRA). Exact either way.
    """
    import torch

    rank, alpha = joined_rank_alpha(modules)
    rslora = modules[0].use_rslora
    same = len({(m.rank, m.scaling) for m in modules}) == 1
    a_parts, b_parts = [], []
    for m in modules:
        a, b = m.lora_A, m.lora_B
        if not same:
            b = (b.to(torch.float32) * (m.scaling / lora_scaling(alpha, rank, use_rslora=rslora))).to(m.lora_B.dtype)
        if m.rank < rank:
            a = torch.cat([a, a.new_zeros(rank - m.rank, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - m.rank)], dim=1)
        a_parts.append(a)
        b_parts.append(b)
    lora_A = torch.cat(a_parts)  # (E*r, in)
    lora_B = torch.stack(b_parts, dim=2).reshape(b_parts[0].shape[0], rank * len(modules))  # (out, r*E)
    return lora_A, lora_B, rank, alpha


def joined_rank_alpha(modules: Sequence[LoraModule]) -> tuple[int, float]:
    """The rank and alpha PEFT's config gives the experts of one parameter once joined: theirs when
    they agree, else the largest rank with scaling 1."""
    rank = max(m.rank for m in modules)
    if len({(m.rank, m.scaling) for m in modules}) == 1:
        return rank, modules[0].alpha
    return rank, math.sqrt(rank) if modules[0].use_rslora else float(rank)


def group_experts(modules: Mapping[str, LoraModule]) -> dict[str, list[tuple[str, LoraModule]]]:
    """Expert modules by parameter, each list in expert order."""
    groups: dict[str, list[tuple[str, LoraModule]]] = {}
    for path, m in modules.items():
        if m.expert is not None:
            groups.setdefault(path.rpartition(".")[0], []).append((path, m))
    for items in groups.values():
        items.sort(key=lambda pm: pm[1].expert[0] if pm[1].expert else 0)
    return groups
