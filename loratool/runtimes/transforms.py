"""Exact rewrites of an adapter's factors for runtimes that read less of a config than PEFT does."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..adapter import Adapter, LoraModule
from ..errors import LoraToolError, UnsupportedAdapterError


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


def sum_modules(a: LoraModule, b: LoraModule) -> LoraModule:
    """One module whose delta is ``a``'s plus ``b``'s: A stacked along the rank, B side by side.
    Exact: ``[B_a B_b] @ [A_a; A_b] = B_a A_a + B_b A_b``. A shared scaling is kept; otherwise each
    is folded into its B and the sum has scaling 1. Biases add; DoRA magnitudes cannot."""
    if a.kind != b.kind or a.weight_shape != b.weight_shape or a.use_rslora != b.use_rslora:
        raise ValueError("the two modules do not adapt one weight the same way (kind, shape or rsLoRA differ)")
    if a.magnitude is not None or b.magnitude is not None:
        raise ValueError("a DoRA module's magnitude rescales the whole row: two cannot be summed")
    shared = a.scaling if a.scaling == b.scaling else 1.0
    fa, fb = a.scaling / shared, b.scaling / shared
    rank = a.rank + b.rank
    bias = None
    if a.bias is not None or b.bias is not None:
        zero = a.lora_B.new_zeros(a.out_features)
        bias = _scaled(a.bias if a.bias is not None else zero, fa) + _scaled(b.bias if b.bias is not None else zero, fb)
    lora_b = torch.cat([_scaled(a.lora_B, fa), _scaled(b.lora_B, fb)], dim=1)  # (out, r_a + r_b)
    return replace(a, lora_A=torch.cat([a.lora_A, b.lora_A], dim=0), lora_B=lora_b,
                   alpha=shared * (math.sqrt(rank) if a.use_rslora else rank), bias=bias)  # fmt: skip


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
        UnsupportedAdapterError: no module is named ``fused``, or the sizes do not add up, or a part
            the adapter adapts on its own too cannot be summed with its piece (DoRA).

    A part the adapter already adapts on its own gets both deltas, exactly (:func:`sum_modules`).
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
            name = f"{parent}.{part}" if parent else part
            if name in modules:  # the adapter adapts this part on its own too: one module, both deltas
                try:
                    m = sum_modules(modules[name], m)
                except ValueError as e:
                    raise UnsupportedAdapterError(
                        f"splitting {path} gives {name}, which the adapter adapts on its own too, and {e}",
                        path=adapter.path, fix="split and merge the two adapters one after the other",
                    ) from None  # fmt: skip
            modules[name] = m
    return replace(adapter, modules=modules, config=_without_patterns(adapter.config))


def _without_patterns(config: dict[str, Any]) -> dict[str, Any]:
    """The config's per-module patterns name the old modules; the writer derives new ones."""
    return {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern", "target_modules")}


def unchanged_whole(adapter: Adapter, base: str | os.PathLike[str]) -> list[str]:
    """The whole tensors (``modules_to_save``) of ``adapter`` that only repeat ``base``'s, bit for bit:
    PEFT saves a targeted embedding whole even when it did not change. A runtime that takes no
    whole tensors serves the adapter the same without them."""
    from ..io.checkpoint import open_checkpoint

    with open_checkpoint(base) as ck:
        return sorted(
            k for k, t in adapter.whole.items()
            if k in ck and tuple(ck.info(k).shape) == tuple(t.shape) and torch.equal(ck.get(k).to(t.dtype), t)
        )  # fmt: skip
