"""Integer weights packed into int32: compressed-tensors' ``pack-quantized`` format (W4A16, W8A16),
group-wise, symmetric or with zero points, as its ``PackedQuantizationCompressor`` writes them;
and, to be read only, GPTQ's and AWQ's (their quantizers need calibration data to requantize).

- A b-bit code q lies in [-2^(b-1), 2^(b-1) - 1]; it is stored as q + 2^(b-1), element i of a row
  at bit i * b of the row's int32 words (little-endian), densely, 32 elements in b words.
- ``weight_scale`` (rows, groups), ``weight_zero_point`` (asymmetric: int codes like the weight's,
  packed along the rows), ``weight_shape`` [rows, cols], and with activation ordering
  ``weight_g_idx`` (each column's group). Real weight = (q - zero) * scale.
- Its quantizer: symmetric scale = amax / ((hi - lo) / 2) (7.5 for 4 bits), asymmetric
  scale = (max - min) / (hi - lo) and zero = round(lo - min / scale), a zero scale replaced by the
  scale dtype's eps; codes = clamp(round(w / scale + zero), lo, hi).

Pure functions over 2-D tensors (rows, cols).
"""

from __future__ import annotations

import sys

import torch

from .rounding import IntGrid

__all__ = [
    "AWQ_ORDER", "IntGrid", "awq_codes", "column_groups", "dequantize_int", "gptq_codes", "grid_of", "group_range",
    "int_qparams", "pack_int32", "per_column", "unpack_int32", "unpack_unsigned",
]  # fmt: skip


def grid_of(bits: int) -> IntGrid:
    return IntGrid(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 codes (rows, cols) of ``packed`` int32 (rows, ceil(cols * bits / 32)), offset removed."""
    if bits in (4, 8) and sys.byteorder == "little" and packed.is_contiguous():  # whole bytes: no gathers
        raw = packed.view(torch.uint8)  # (rows, words * 4), element i's bits from bit i * bits on
        if bits == 4:
            raw = torch.stack((raw & 0x0F, raw >> 4), dim=-1).reshape(packed.shape[0], -1)
        return raw[:, :cols].to(torch.int32).sub_(1 << (bits - 1))
    rows, words = packed.shape
    w = packed.to(torch.int64) & 0xFFFFFFFF  # each word's 32 bits, unsigned
    start = torch.arange(cols, dtype=torch.int64, device=packed.device) * bits
    word, shift = start // 32, start % 32
    low = (w[:, word] >> shift) & ((1 << bits) - 1)
    spill = shift + bits - 32  # bits that continue in the next word (never for 1, 2, 4 or 8 bits)
    if bool((spill > 0).any()):
        nxt = w[:, (word + 1).clamp_max(words - 1)]
        high = (nxt & ((1 << spill.clamp_min(0)) - 1)) << (bits - spill.clamp_min(0))
        low = torch.where(spill > 0, (w[:, word] >> shift) | high, low) & ((1 << bits) - 1)
    return (low - (1 << (bits - 1))).to(torch.int32)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (rows, ceil(cols * bits / 32)) of integer ``codes`` (rows, cols) in the b-bit range."""
    rows, cols = codes.shape
    words = -(-cols * bits // 32)
    if bits in (4, 8) and sys.byteorder == "little":  # whole bytes, then read as int32 words
        byte = (codes + (1 << (bits - 1))).to(torch.uint8)
        byte = torch.nn.functional.pad(byte, (0, words * 32 // bits - cols))
        if bits == 4:
            pairs = byte.view(rows, -1, 2)
            byte = pairs[..., 0] | (pairs[..., 1] << 4)
        return byte.contiguous().view(torch.int32)
    value = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    start = torch.arange(cols, dtype=torch.int64, device=codes.device) * bits
    word, shift = start // 32, start % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=codes.device)
    out.index_add_(1, word, value << shift)  # disjoint bits: the sum is the bitwise or
    spill = shift + bits - 32
    if bool((spill > 0).any()):
        over = spill > 0
        out.index_add_(1, word[over] + 1, value[:, over] >> (bits - spill[over]))
    out = out[:, :words] & 0xFFFFFFFF
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # the same bits, as int32


def column_groups(group: int, g_idx: torch.Tensor | None, device: torch.device | str = "cpu") -> torch.Tensor | int:
    """Each column's group index (cols,) on ``device`` where the checkpoint orders its columns
    (``g_idx``, activation order); else ``group``, the size of consecutive groups."""
    return g_idx.to(device, torch.int64) if g_idx is not None else group


def per_column(t: torch.Tensor, groups: torch.Tensor | int, cols: int) -> torch.Tensor:
    """Per-(row, group) values (rows, n_groups) widened to each column, (rows, cols): ``groups`` is
    each column's group (activation order) or, for consecutive groups, their size."""
    if isinstance(groups, int):
        return t.repeat_interleave(groups, dim=1)[:, :cols]
    return t[:, groups]


def group_range(x: torch.Tensor, groups: torch.Tensor | int, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each row's groups, (rows, n_groups) each."""
    rows, cols = x.shape
    if isinstance(groups, int):
        padded = groups * n_groups - cols
        if padded:  # the last group short: pad it with its own first column, which changes neither
            x = torch.cat([x, x[:, (n_groups - 1) * groups :][:, :1].expand(rows, padded)], dim=1)
        x3 = x.view(rows, n_groups, groups)
        return x3.amin(dim=2), x3.amax(dim=2)
    index = groups[None, :].expand(rows, -1)
    lo = torch.full((rows, n_groups), float("inf"), device=x.device).scatter_reduce_(1, index, x, "amin")
    hi = torch.full((rows, n_groups), float("-inf"), device=x.device).scatter_reduce_(1, index, x, "amax")
    return lo, hi


def dequantize_int(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, groups: torch.Tensor | int
) -> torch.Tensor:
    """float32 (rows, cols) = (codes - zero) * scale, with per-(row, group) ``scale`` and ``zero``."""
    rows, cols = codes.shape
    q = codes.to(torch.float32)
    if isinstance(groups, int) and cols % groups == 0:  # broadcast over (rows, n_groups, group): no widening
        q3 = q.view(rows, -1, groups)
        if zero is not None:
            q3.sub_(zero.to(torch.float32)[:, :, None])
        return q3.mul_(scale.to(torch.float32)[:, :, None]).view(rows, cols)
    if zero is not None:
        q = q - per_column(zero.to(torch.float32), groups, cols)
    return q.mul_(per_column(scale.to(torch.float32), groups, cols))


def int_qparams(
    w: torch.Tensor, groups: torch.Tensor | int, n_groups: int, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale in ``scale_dtype`` (rows, n_groups), zero codes int32 or None) as compressed-tensors'
    ``calculate_qparams`` sets them from each group's range (0 always inside it)."""
    lo, hi = group_range(w, groups, n_groups)
    lo, hi = lo.clamp_max_(0.0), hi.clamp_min_(0.0)  # min(min, 0), max(max, 0)
    grid = grid_of(bits)
    span = float(grid.hi - grid.lo)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / (span / 2)
    else:
        scale = (hi - lo) / span
    eps = torch.finfo(scale_dtype).eps if scale_dtype.is_floating_point else 1.0
    stored = scale.to(scale_dtype)
    stored = torch.where(stored == 0, torch.full_like(stored, eps), stored)
    if symmetric:
        return stored, None
    zero = (grid.lo - lo / stored.to(torch.float32)).round_().clamp_(grid.lo, grid.hi)
    return stored, zero.to(torch.int32)


# -- GPTQ and AWQ (read only) -----------------------------------------------------------------------
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM packing: nibble k of a word holds column 8j + AWQ_ORDER[k]


def unpack_unsigned(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Unsigned codes (rows, cols) of int32 words (rows, cols * bits / 32), element k at bit k * bits."""
    return unpack_int32(packed, bits, cols) + (1 << (bits - 1))


def gptq_codes(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, out_features: int, *,
               v1: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(codes (out, in), zeros (out, groups)) of GPTQ's ``qweight`` (in * bits / 32, out), packed along
    the inputs, and ``qzeros`` (groups, out * bits / 32), packed along the outputs; the v1 checkpoint
    format (AutoGPTQ's) stores each zero point less one."""
    in_features = qweight.shape[0] * 32 // bits
    codes = unpack_unsigned(qweight.T.contiguous(), bits, in_features)  # (out, in)
    zeros = unpack_unsigned(qzeros, bits, out_features).T.contiguous()  # (out, groups)
    return codes, zeros + 1 if v1 else zeros


def awq_codes(qweight: torch.Tensor, qzeros: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (out, in), zeros (out, groups)) of AWQ GEMM's 4-bit ``qweight`` (in, out / 8) and
    ``qzeros`` (groups, out / 8), both packed along the outputs in :data:`AWQ_ORDER`."""
    order, cols = torch.tensor(AWQ_ORDER, device=qweight.device), torch.arange(out_features, device=qweight.device)
    # position 8j + k holds column 8j + AWQ_ORDER[k]: the column c = 8j + m sits at 8j + index of m in the order
    where = (cols // 8) * 8 + torch.argsort(order)[cols % 8]
    codes = unpack_unsigned(qweight, 4, out_features)[:, where].T.contiguous()
    zeros = unpack_unsigned(qzeros, 4, out_features)[:, where].T.contiguous()
    return codes, zeros
