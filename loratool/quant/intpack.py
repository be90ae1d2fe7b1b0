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

import torch

from .rounding import IntGrid

__all__ = [
    "AWQ_ORDER", "IntGrid", "awq_codes", "column_groups", "dequantize_int", "gptq_codes", "grid_of", "int_qparams",
    "pack_int32", "unpack_int32", "unpack_unsigned",
]  # fmt: skip


def grid_of(bits: int) -> IntGrid:
    return IntGrid(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 codes (rows, cols) of ``packed`` int32 (rows, ceil(cols * bits / 32)), offset removed."""
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


def column_groups(
    cols: int, group: int, g_idx: torch.Tensor | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Each column's group index (cols,) on ``device``: ``g_idx`` where the checkpoint has one
    (activation order), else consecutive groups of ``group`` columns."""
    if g_idx is not None:
        return g_idx.to(device, torch.int64)
    return torch.arange(cols, dtype=torch.int64, device=device) // group


def dequantize_int(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, groups: torch.Tensor
) -> torch.Tensor:
    """float32 (rows, cols) = (codes - zero) * scale, with per-(row, group) ``scale`` and ``zero``."""
    q = codes.to(torch.float32)
    if zero is not None:
        q = q - zero.to(torch.float32)[:, groups]
    return q.mul_(scale.to(torch.float32)[:, groups])


def int_qparams(
    w: torch.Tensor, groups: torch.Tensor, n_groups: int, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale in ``scale_dtype`` (rows, n_groups), zero codes int32 or None) as compressed-tensors'
    ``calculate_qparams`` sets them from each group's range (0 always inside it)."""
    rows = w.shape[0]
    index = groups[None, :].expand(rows, -1)
    lo = torch.zeros(rows, n_groups, device=w.device).scatter_reduce_(1, index, w, "amin")  # min(min, 0)
    hi = torch.zeros(rows, n_groups, device=w.device).scatter_reduce_(1, index, w, "amax")  # max(max, 0)
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
