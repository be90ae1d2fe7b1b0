"""Rounding a merged weight onto a low-precision grid, and what the rounded weight still carries.

Nearest rounding (what every quantizer does) is biased against a delta smaller than half a step
wherever the base already lies on the grid: the merged value rounds straight back to the base's
code, so a typical LoRA merged into FP8 mostly vanishes. Two rules keep it:

- ``stochastic``: up to the upper of the two neighbouring grid values with probability equal to
  the value's fractional position between them, so the written weights carry the delta in
  expectation, at the price of unbiased noise (1.1 to 4.4 times the delta's norm in
  bench_quant_keep).
- ``subspace`` (the default): nearest rounding in sequence along each row, every element's error
  fed forward into the row's later elements so that the row's accumulated error stays out of the
  adapter's input subspace (the span of its ``lora_A`` rows): GPTQ's sequential rounding with
  ``H = damping I + A^T A`` in place of a calibration Hessian. The error then has little part
  along the delta (``kept`` 0.84 to 0.99 in bench_quant_keep) and is kept away from what the
  adapter reads, with less noise than stochastic rounding's; deterministic, no seed.

The random numbers come from a counter-based stream: a hash of (seed, tensor name, row, column),
so that every element's draw is the same on any device, any number of threads and any split of
the weight into steps. The compiled kernels (``csrc/fp8.c``) compute the same hash bit for bit.

``kept`` measures the result where it matters: the share of the intended delta the written
weights carry, ``<W_written - W_base, delta> / ||delta||^2`` (1: all of it), and the ``noise``
beside it, ``||(W_written - W_base) - kept * delta|| / ||delta||``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

RULES = ("subspace", "stochastic", "nearest")
Rule = Literal["subspace", "stochastic", "nearest"]
DEFAULT_RULE: Rule = "subspace"  # into an FP8 layout; into a --dtype output: see default_rule
DAMPING = 0.01  # subspace's damping: of 1e-3, 1e-2, 0.1 and 1, best at every size on bench_quant_keep's pair (ad hoc)
KEPT_WARNING = 0.8  # a merge whose written weights carry less of its delta than this is warned about
NOISE_LIMIT = 1.0  # into a 4-bit grid in place, by default, a merge whose noise exceeds its delta's norm is refused

_M32 = 0xFFFFFFFF
# A 32-bit integer hash (two multiply-xorshift rounds; constants from Chris Wellons' hash
# prospector, chosen below 2^31 so that int64 products never overflow in torch).
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97


@dataclass(frozen=True)
class Rounding:
    """A rounding rule and, for ``stochastic``, the seed of its stream."""

    rule: Rule = DEFAULT_RULE
    seed: int = 0

    @property
    def stochastic(self) -> bool:
        return self.rule == "stochastic"

    @property
    def subspace(self) -> bool:
        return self.rule == "subspace"

    def key(self, tensor: str) -> int:
        """The stream's 32-bit key for one tensor: every tensor draws its own numbers."""
        digest = hashlib.sha256(f"{self.seed}\0{tensor}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def to_json(self) -> dict[str, object]:
        return {"rule": self.rule, "seed": self.seed if self.stochastic else None,
                "damping": DAMPING if self.subspace else None}  # fmt: skip


def default_rule(dequantized: bool, *, packed: bool = False) -> Rule:
    """The rule a merge uses unless told: subspace into an FP8 layout; stochastic into a dequantized
    (``--dtype``) output and into packed 4-bit layouts, where subspace is compiled only in its column
    loop (6 to 7 times slower than stochastic on bench_fp4's 4-layer merges, fp4 section of
    docs/benchmarks.md, for an effect within 0.014 of stochastic's wherever a 4-bit merge passes the
    default limits)."""
    return "stochastic" if dequantized or packed else DEFAULT_RULE


# -- the stream -----------------------------------------------------------------------------------
def hash32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash of each element of ``x`` (int64 holding values in [0, 2^32)), as csrc/fp8.c's ``mix32``."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 15)


def uniforms(key: int, row0: int, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 (rows, cols) in [0, 1), multiples of 2^-24: the draws of rows row0.. of a weight.

    Element (i, j) draws ``hash32(hash32(i ^ key) ^ j) >> 8``, a function of its place alone. The
    per-element hash runs in int32, whose products wrap to the low 32 bits that :func:`hash32`
    keeps (its logical shifts masked back out of the sign), in place: a quarter of the memory
    traffic of int64 and no fresh buffer per step (tests hold it to :func:`hash32`).
    """
    r = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)
    c = torch.arange(cols, dtype=torch.int32, device=device)
    x = hash32(r ^ key).to(torch.int32)[:, None] ^ c[None, :]  # (rows, cols): the same 32 bits
    t = torch.empty_like(x)
    for shift, mul in ((16, _MUL1), (15, _MUL2)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=t).bitwise_and_((1 << (32 - shift)) - 1))
        x.mul_(mul)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=t).bitwise_and_((1 << 17) - 1))
    return x.bitwise_right_shift_(8).bitwise_and_((1 << 24) - 1).to(torch.float32).mul_(2.0**-24)


# -- the grids ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A float format's value grid: mantissa bits, the smallest normal's exponent, the largest value."""

    mantissa: int
    min_exp: int
    top: float


@dataclass(frozen=True)
class IntGrid:
    """The integers ``lo..hi`` (a 4- or 8-bit integer code, zero points already added)."""

    lo: int
    hi: int


GRIDS = {
    torch.float8_e4m3fn: Grid(3, -6, 448.0),
    torch.float8_e5m2: Grid(2, -14, 57344.0),
    torch.float16: Grid(10, -14, 65504.0),
    torch.bfloat16: Grid(7, -126, float(torch.finfo(torch.bfloat16).max)),
}
E2M1 = Grid(1, 0, 6.0)  # FP4 (MXFP4, NVFP4): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; no torch dtype to cast to

GridLike = torch.dtype | Grid | IntGrid  # a torch dtype stands for its grid in GRIDS


def round_to_grid(x: torch.Tensor, grid: GridLike, u: torch.Tensor | None) -> torch.Tensor:
    """``x`` (float32) on a grid (a dtype's, :data:`E2M1`, or an :class:`IntGrid`), still float32
    (so that ``.to(dtype)`` is exact): nearest (ties to even) where ``u`` is None, else up with
    probability equal to the fractional position between the two neighbours, up when ``u``
    (uniform in [0, 1)) is below it. Beyond the format's largest value, the largest value
    (saturating, as the formats' quantizers do).

    Every step is exact in float32: the spacing at |x| is a power of two (the subnormals' below
    the smallest normal), so |x| / spacing, its floor and its fraction have no rounding.
    """
    if isinstance(grid, IntGrid):
        if u is None:
            return x.round().clamp_(grid.lo, grid.hi)
        below = x.floor()
        return below.add_((u < x - below).to(torch.float32)).clamp_(grid.lo, grid.hi)
    dtype = grid if isinstance(grid, torch.dtype) else None
    grid = GRIDS[grid] if isinstance(grid, torch.dtype) else grid
    if u is None and dtype is not None:
        return x.clamp(-grid.top, grid.top).to(dtype).to(torch.float32)
    a = x.abs().clamp_max_(grid.top)
    field = (a.view(torch.int32) >> 23).clamp_min_(grid.min_exp + 127)  # biased exponent, the subnormals' below
    biased = field.sub_(grid.mantissa)  # of the spacing, 2^(e - m)
    if grid.min_exp - grid.mantissa <= -127:  # bfloat16: near zero the spacing is a float32 subnormal
        spacing = torch.where(biased > 0, biased << 23, 1 << (biased + 22).clamp_min_(0)).view(torch.float32)
    else:
        spacing = (biased << 23).view(torch.float32)
    y = a.div_(spacing)  # steps above zero, exactly
    if u is None:  # a grid with no torch dtype: round half to even on the steps is ties-to-even on the grid
        return y.round_().mul_(spacing).copysign_(x)
    below = y.floor()
    up = (u < y.sub_(below)).to(torch.float32)  # the fraction, against the draw
    return below.add_(up).mul_(spacing).copysign_(x)


def quantize_values(x: torch.Tensor, dtype: torch.dtype, u: torch.Tensor | None) -> torch.Tensor:
    """``x`` (float32) as ``dtype``: torch's own cast without draws, else :func:`round_to_grid`
    stochastically; float32 passes through."""
    if dtype == torch.float32:
        return x.clone()
    return x.to(dtype) if u is None else round_to_grid(x, dtype, u).to(dtype)


# -- the subspace rule ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Subspace:
    """One weight's adapter input subspace, for :func:`round_subspace`: ``basis`` (cols, width)
    float32, row j the j-th column of an orthonormal basis of the span of the terms' right factors;
    ``gain`` (cols, width) float32, row j = M_j^-1 a_j with M_j = damping I + sum_{k > j} a_k a_k^T,
    the feedback that best moves an error at column j into the later columns within the span
    (GPTQ's update). Both are zero past ``rank``, up to ``width``, a power of two of at least 8:
    the feedback's products are summed pairwise."""

    basis: torch.Tensor
    gain: torch.Tensor
    rank: int

    @property
    def width(self) -> int:
        return int(self.basis.shape[1])


def subspace_of(rights: list[torch.Tensor], damping: float = DAMPING, chunk: int | None = None) -> Subspace:
    """The :class:`Subspace` of the right factors (each (r_i, cols), the stored weight's columns).

    ``chunk`` columns' r x r systems are solved at once (default: about 32 MiB of them).
    """
    stacked = torch.cat([r.double() for r in rights], 0).T  # (cols, sum r_i)
    q, tri = torch.linalg.qr(stacked)  # (cols, r)
    diag = tri.diagonal().abs()
    q = q[:, diag > diag.max() * 1e-6] if diag.numel() and float(diag.max()) > 0 else q[:, :0]
    cols, r = q.shape
    chunk = chunk or max(1, min(512, (1 << 22) // max(r * r, 1)))
    eye = torch.eye(r, dtype=torch.float64, device=q.device)
    gain = torch.empty(cols, r, dtype=torch.float64, device=q.device)
    seen = torch.zeros(r, r, dtype=torch.float64, device=q.device)  # sum of a_k a_k^T over the columns done
    for j0 in range(0, cols, chunk):  # sum_{k > j} = I - sum_{k <= j}, the basis being orthonormal
        a = q[j0 : j0 + chunk]  # (c, r)
        upto = seen + torch.cumsum(a[:, :, None] * a[:, None, :], dim=0)  # (c, r, r)
        gain[j0 : j0 + chunk] = torch.linalg.solve((1 + damping) * eye - upto, a[:, :, None])[:, :, 0]
        seen = upto[-1]
    width = max(8, 1 << max(r - 1, 0).bit_length())  # a power of two, at least 8: the kernel's sums go by 8

    def padded(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x.to(torch.float32), (0, width - r)).contiguous()

    return Subspace(padded(q), padded(gain), r)


def round_subspace(
    w: torch.Tensor, scale: torch.Tensor, grid: GridLike, space: Subspace, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """``w`` (float32 (rows, cols)) over ``scale`` (its elements' scales, (rows, cols)) on a grid
    (:func:`round_to_grid`'s) by the subspace rule, in scaled units (float32 on the grid; with
    ``zero``, each element's zero point (rows, cols), the codes ``round(w / scale + zero)``).
    Column by column, each row's value plus its feedback ``G . a_j`` is rounded to nearest, and its
    error ``e`` (real units) leaves ``G -= e gain_j``. The feedback's products are summed pairwise,
    (0+1)+(2+3).., over the rank padded with zeros to the basis' width: a fixed order that
    csrc/fp8.c's kernel follows too, so that both give the same bytes (and the kernel is not one
    long chain of additions)."""
    rows, cols = w.shape
    basis, gain = space.basis.to(w.device), space.gain.to(w.device)
    g = torch.zeros(rows, space.width, dtype=torch.float32, device=w.device)
    out = torch.empty_like(w)
    for j in range(cols):
        v = w[:, j]
        if space.rank:
            terms = g * basis[j]  # (rows, width)
            while terms.shape[1] > 1:
                terms = terms[:, 0::2] + terms[:, 1::2]
            v = v + terms[:, 0]
        s = scale[:, j]
        if zero is None:
            q = round_to_grid(v / s, grid, None)
            g -= (q * s - v)[:, None] * gain[j][None, :]
        else:
            q = round_to_grid(v / s + zero[:, j], grid, None)
            g -= ((q - zero[:, j]) * s - v)[:, None] * gain[j][None, :]
        out[:, j] = q
    return out


# -- what survived -------------------------------------------------------------------------------
@dataclass
class Kept:
    """Sums over the elements of a rounded merge, float64: delta = merged - base (the intended
    change, in float32 as computed), err = merged - written."""

    dd: float = 0.0  # <delta, delta>
    ed: float = 0.0  # <err, delta>
    ee: float = 0.0  # <err, err>

    def add(self, other: Kept) -> Kept:
        return Kept(self.dd + other.dd, self.ed + other.ed, self.ee + other.ee)

    @classmethod
    def of(cls, delta: torch.Tensor, err: torch.Tensor, chunk: int = 1 << 16) -> Kept:
        """The sums of ``delta`` and ``err`` (any shapes of equal size), in float64 a ``chunk`` at a
        time: no float64 copy of a whole weight."""
        d_all, e_all = delta.reshape(-1), err.reshape(-1)
        sums = torch.zeros(3, dtype=torch.float64, device=delta.device)
        for i in range(0, d_all.numel(), chunk):
            d, e = d_all[i : i + chunk].double(), e_all[i : i + chunk].double()
            sums += torch.stack([d @ d, e @ d, e @ e])
        dd, ed, ee = sums.tolist()
        return cls(dd, ed, ee)

    @property
    def kept(self) -> float | None:
        """<written - base, delta> / ||delta||^2; None without a delta."""
        return (self.dd - self.ed) / self.dd if self.dd > 0 else None

    @property
    def noise(self) -> float | None:
        """||(written - base) - kept * delta|| / ||delta||; None without a delta."""
        if self.dd <= 0:
            return None
        change = self.dd - 2 * self.ed + self.ee  # ||written - base||^2
        along = (self.dd - self.ed) ** 2 / self.dd  # its part along the delta
        return math.sqrt(max(change - along, 0.0) / self.dd)

    def to_json(self) -> dict[str, float | None]:
        return {"delta_norm": math.sqrt(self.dd), "kept": self.kept, "noise": self.noise}
