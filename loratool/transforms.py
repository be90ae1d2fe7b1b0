"""Exact rewrites of an adapter's factors for runtimes that read less of a config than PEFT does."""

from __future__ import annotations

from dataclasses import replace

import torch

from .adapter import Adapter, LoraModule


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
