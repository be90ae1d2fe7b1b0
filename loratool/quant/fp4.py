"""FP4 (E2M1) weights with block scales: MXFP4 (OCP microscaling, gpt-oss) and NVFP4 (ModelOpt,
compressed-tensors). Codes, scales and their packing, as the producers define them:

- E2M1 codes are 4 bits, sign (8) and the index of the magnitude in 0, 0.5, 1, 1.5, 2, 3, 4, 6,
  packed two per byte, element 2k in the low nibble (transformers' ``FP4_VALUES`` and
  compressed-tensors' ``unpack_fp4_from_uint8`` agree).
- MXFP4: 32 values per block share an E8M0 scale, 2^(u8 - 127). A quantizer's scale is the block's
  absolute maximum over 6 rounded *up* to a power of two (triton_kernels' ``downcast_to_mxfp``,
  which gpt-oss and transformers use), so no value clips.
- NVFP4: 16 values per block share an FP8 E4M3 scale, times a float32 per-tensor scale. ModelOpt
  stores that as ``weight_scale_2`` = amax / (6 * 448), which multiplies; compressed-tensors as
  ``weight_global_scale`` = 6 * 448 / amax, which divides (its converter from ModelOpt inverts it).

Every function here is pure: 2-D tensors (rows, cols) in the stored orientation, groups along
the columns, float32 values.
"""

from __future__ import annotations

import torch

MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MXFP4_GROUP, NVFP4_GROUP = 32, 16
_FP8_TOP = 448.0  # NVFP4's block scales are e4m3fn
# index of a grid magnitude by twice its value (0, 1, 2, 3, 4, 6, 8, 12 -> 0..7)
_INDEX_OF_DOUBLE = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)


def decode_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 ``packed`` (..., n) holding two codes a byte: (..., 2n)."""
    lut = torch.tensor([*MAGNITUDES, *(-m for m in MAGNITUDES)], dtype=torch.float32, device=packed.device)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).to(torch.int32)  # (..., n, 2): low nibble first
    return lut[codes].reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def encode_e2m1(values: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n / 2): ``values`` (float32 on the E2M1 grid, n even) packed two a byte.
    A negative value (or -0) sets the sign bit, as the producers' packers do."""
    index = _INDEX_OF_DOUBLE.to(values.device)[(values.abs() * 2).to(torch.int32)]
    codes = index | (torch.signbit(values).to(torch.uint8) << 3)
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def group_scales(scale: torch.Tensor, cols: int, group: int) -> torch.Tensor:
    """Per-group scales (rows, groups) widened to each element, (rows, cols)."""
    return scale.repeat_interleave(group, dim=-1)[..., :cols]


def group_amax(w: torch.Tensor, group: int) -> torch.Tensor:
    """The absolute maximum of each group of ``group`` columns, (rows, ceil(cols / group))."""
    rows, cols = w.shape
    groups = -(-cols // group)
    padded = torch.nn.functional.pad(w.abs(), (0, groups * group - cols))  # zeros keep the maxima
    return padded.view(rows, groups, group).amax(dim=2)


# -- MXFP4 ----------------------------------------------------------------------------------------
def mxfp4_scale_values(exponents: torch.Tensor) -> torch.Tensor:
    """float32 2^(u8 - 127) of E8M0 scale bytes (0 is 2^-127, a float32 subnormal)."""
    return torch.ldexp(torch.ones(exponents.shape, device=exponents.device), exponents.to(torch.int32) - 127)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 (rows, groups * 32) of gpt-oss ``blocks`` (rows, groups, 16) and ``scales`` (rows, groups)."""
    rows, groups, _ = blocks.shape
    values = decode_e2m1(blocks).view(rows, groups, MXFP4_GROUP)
    return values.mul_(mxfp4_scale_values(scales)[:, :, None]).view(rows, groups * MXFP4_GROUP)


def mxfp4_exponents(w: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 scales (rows, groups) for ``w`` (rows, cols): each group's maximum over 6, rounded
    up to a power of two (triton_kernels' DequantScaleRoundingMode.ROUND_UP)."""
    bits = (group_amax(w, MXFP4_GROUP) / 6.0).view(torch.int32)
    return ((bits + 0x007FFFFF) & 0x7F800000).bitwise_right_shift(23).to(torch.uint8)


# -- NVFP4 ----------------------------------------------------------------------------------------
def nvfp4_element_scales(block: torch.Tensor, second: torch.Tensor, cols: int, divide: bool) -> torch.Tensor:
    """Each element's float32 scale (rows, cols): the e4m3 ``block`` scale (rows, groups) times
    ModelOpt's ``weight_scale_2`` (``divide`` False) or over compressed-tensors' ``weight_global_scale``."""
    per_block = block.to(torch.float32)
    per_block = per_block / second.float().reshape(()) if divide else per_block * second.float().reshape(())
    return group_scales(per_block, cols, NVFP4_GROUP)


def dequantize_nvfp4(packed: torch.Tensor, block: torch.Tensor, second: torch.Tensor, divide: bool) -> torch.Tensor:
    """float32 (rows, 2 * packed cols) of an NVFP4 weight."""
    values = decode_e2m1(packed)
    return values.mul_(nvfp4_element_scales(block, second, values.shape[1], divide))


def nvfp4_scales(w: torch.Tensor, divide: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(block scales e4m3fn (rows, groups), the per-tensor scale float32 (1,)) for ``w``, as the
    producers' quantizers set them: the tensor's maximum maps to 6 * 448, each block's to 6."""
    amax = w.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    multiply = amax / (6.0 * _FP8_TOP)  # ModelOpt's weight_scale_2
    per_block = (group_amax(w, NVFP4_GROUP) / 6.0) / multiply
    block = per_block.clamp_max_(_FP8_TOP).to(torch.float8_e4m3fn)
    second = (1.0 / multiply) if divide else multiply
    return block, second.reshape(1).to(torch.float32)
