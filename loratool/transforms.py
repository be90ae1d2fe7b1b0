"""Exact rewrites of an adapter's factors for runtimes that read less of a config than PEFT does."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from .adapter import Adapter, LoraModule
from .errors import LoraToolError, UnsupportedAdapterError


def fold_scaling(m: LoraModule, rank: int | None = None) -> LoraModule:
    """The same delta with scaling 1: ``B' = scaling * B`` (and the bias, which PEFT scales with
    it), ``alpha = r``, and, when ``rank`` is larger, A and B padded with zero rows and columns.

    ``scaling * B @ A == B' @ A'`` exactly in real arithmetic; in floating point B' is rounded once.
    """
    r = rank or m.rank
    if r < m.rank:
        raise ValueError(f"cannot pad rank {m.rank} down to {r}")
    s = m.scaling
    b = m.lora_B.to(torch.float32) * s if s != 1 else m.lora_B.to(torch.float32)
    b = b.to(m.lora_B.dtype)
    a = m.lora_A
    if r > m.rank:
        a = torch.cat([a, a.new_zeros(r - m.rank, a.shape[1])], dim=0)  # (r, in)
        b = torch.cat([b, b.new_zeros(b.shape[0], r - m.rank)], dim=1)  # (out, r)
    bias = None if m.bias is None else (m.bias.to(torch.float32) * s).to(m.bias.dtype)
    return replace(m, lora_A=a, lora_B=b, alpha=float(r), use_rslora=False, bias=bias)


def uniform_rank(adapter: Adapter) -> Adapter:
    """Every module at the largest rank R with scaling 1 (``alpha = r = R``).

    Runtimes that read one ``r`` and one ``lora_alpha`` (vLLM), or build every layer at one rank
    and scale (mlx-lm), then apply every module's delta right; PEFT reads it without
    ``rank_pattern`` or ``alpha_pattern``. Padding costs (R - r) * (in + out) zeros per module.
    """
    top = max((m.rank for m in adapter.modules.values()), default=0)
    modules = {p: fold_scaling(m, top) for p, m in adapter.modules.items()}
    config = {k: v for k, v in adapter.config.items() if k not in ("rank_pattern", "alpha_pattern")}
    config["use_rslora"] = False
    return replace(adapter, modules=modules, config=config)


def check_portable(format: str) -> None:
    """``--portable`` is a PEFT form: refuse it, before any work, for another output format."""
    if format != "peft":
        raise LoraToolError(
            f"--portable is for PEFT output; {format} files already say each module's scale",
            fix="leave out --portable, or write PEFT",
        )


def portable_form(adapter: Adapter, warnings: list[str]) -> Adapter:
    """:func:`uniform_rank` for ``--portable``, saying in ``warnings`` what padding costs."""
    before = adapter.num_params
    out = uniform_rank(adapter)
    if out.num_params > before:
        top = max(m.rank for m in out.modules.values())
        warnings.append(f"ranks padded with zeros to {top} (--portable): {out.num_params - before} more parameters")
    return out


def fuse_modules(parts: Sequence[LoraModule]) -> LoraModule:
    """One module whose delta is the parts' deltas stacked by rows, as PEFT fuses projections:
    A stacked along the rank, B block-diagonal. Exact: row block i of ``B @ A`` is ``B_i @ A_i``.

    Parts that share a scaling keep it (B as it was); otherwise each scaling is folded into its
    block of B and the fused module has scaling 1. Biases and DoRA magnitudes (both per output
    row) are concatenated.
    """
    if len({m.in_features for m in parts}) > 1 or any(m.kind != "linear" for m in parts):
        raise ValueError("fused parts must be linear layers with the same input size")
    if len({m.magnitude is None for m in parts}) > 1:
        raise ValueError("either every part or none has a DoRA magnitude")
    rslora = parts[0].use_rslora
    scalings = {m.scaling for m in parts}
    shared = scalings.pop() if len(scalings) == 1 else 1.0
    factors = [m.scaling / shared for m in parts]  # exactly 1.0 where the parts share a scaling
    blocks = [_scaled(m.lora_B, f) for m, f in zip(parts, factors)]
    rank = sum(m.rank for m in parts)
    bias = None
    if any(m.bias is not None for m in parts):
        bias = torch.cat([
            _scaled(m.bias, f) if m.bias is not None else m.lora_B.new_zeros(m.out_features)
            for m, f in zip(parts, factors)
        ])  # fmt: skip
    magnitude = (
        None if parts[0].magnitude is None else torch.cat([m.magnitude for m in parts if m.magnitude is not None])
    )
    return LoraModule(
        lora_A=torch.cat([m.lora_A for m in parts], dim=0),
        lora_B=torch.block_diag(*blocks),  # type: ignore[no-untyped-call]
        alpha=shared * (math.sqrt(rank) if rslora else rank),
        use_rslora=rslora,
        bias=bias,
        magnitude=magnitude,
    )


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    return t if factor == 1.0 else (t.to(torch.float32) * factor).to(t.dtype)


def split_module(m: LoraModule, sizes: Sequence[int]) -> list[LoraModule]:
    """The parts of a fused module, by output rows: each gets the shared A, its rows of B (and of
    the bias and DoRA magnitude), and the same rank and alpha. Exact."""
    if sum(sizes) != m.out_features:
        raise ValueError(f"the parts' sizes {list(sizes)} do not add up to the fused module's {m.out_features} rows")
    out = []
    for lo, hi in zip(itertools.accumulate(sizes, initial=0), itertools.accumulate(sizes)):
        out.append(replace(
            m, lora_A=m.lora_A.clone(), lora_B=m.lora_B[lo:hi].clone(),
            bias=None if m.bias is None else m.bias[lo:hi].clone(),
            magnitude=None if m.magnitude is None else m.magnitude[lo:hi].clone(),
        ))  # fmt: skip
    return out


def fuse(adapter: Adapter, fused: str, parts: Sequence[str]) -> Adapter:
    """``adapter`` with the modules named ``parts`` (leaf names such as q_proj, k_proj, v_proj)
    under each parent replaced by one module ``<parent>.<fused>`` (see :func:`fuse_modules`).

    Raises:
        UnsupportedAdapterError: no part is adapted, a parent lacks some parts (its fused delta
            would need rows the adapter does not have), or the parts cannot be fused.
    """
    groups: dict[str, dict[str, LoraModule]] = {}
    for path, m in adapter.modules.items():
        parent, _, leaf = path.rpartition(".")
        if leaf in parts:
            groups.setdefault(parent, {})[leaf] = m
    if not groups:
        raise UnsupportedAdapterError(f"no module named {' or '.join(parts)} to fuse into {fused}", path=adapter.path)
    modules = {p: m for p, m in adapter.modules.items() if p.rpartition(".")[2] not in parts}
    for parent, found in sorted(groups.items()):
        missing = [p for p in parts if p not in found]
        where = f"{parent}.{fused}" if parent else fused
        if missing:
            raise UnsupportedAdapterError(
                f"{where} needs every part adapted; {', '.join(missing)} is not",
                path=adapter.path,
                fix="fuse only the parts an adapter targets in every layer",
            )
        if where in modules:
            raise UnsupportedAdapterError(f"{where} is adapted already", path=adapter.path)
        try:
            modules[where] = fuse_modules([found[p] for p in parts])
        except ValueError as e:
            raise UnsupportedAdapterError(f"{where}: {e}", path=adapter.path) from None
    return replace(adapter, modules=modules, config=_without_patterns(adapter.config))


def split(adapter: Adapter, fused: str, parts: Sequence[str], sizes: Callable[[str], Sequence[int]]) -> Adapter:
    """``adapter`` with every module ``<parent>.<fused>`` replaced by ``<parent>.<part>`` modules;
    ``sizes(parent)`` gives the parts' output sizes (from the base they are for).

    Raises:
        UnsupportedAdapterError: no module is named ``fused``, or the sizes do not add up.
    """
    targets = [p for p in adapter.modules if p.rpartition(".")[2] == fused]
    if not targets:
        raise UnsupportedAdapterError(f"no module named {fused} to split", path=adapter.path)
    modules = {p: m for p, m in adapter.modules.items() if p not in targets}
    for path in targets:
        parent = path.rpartition(".")[0]
        try:
            pieces = split_module(adapter.modules[path], sizes(parent))
        except ValueError as e:
            raise UnsupportedAdapterError(f"{path}: {e}", path=adapter.path) from None
        for part, m in zip(parts, pieces):
            modules[f"{parent}.{part}" if parent else part] = m
    return replace(adapter, modules=modules, config=_without_patterns(adapter.config))


def _without_patterns(config: dict[str, Any]) -> dict[str, Any]:
    """The config's per-module patterns name the old modules; the writer derives new ones."""
    return {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern", "target_modules")}
