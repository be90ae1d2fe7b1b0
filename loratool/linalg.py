"""The math of loratool, as pure functions over tensors: no I/O, no printing.

Float32 (or float64 where noted) inside; the device is the input's.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import native
from .adapter import Kind, stored_transposed
from .arch import Fp8Scheme
from .runtime import torch_threads


class RowFactors(NamedTuple):
    """``factor * left @ right`` added to the weight's rows ``row0 .. row0 + len(left)`` (a 3-D
    experts parameter is merged as its (E*rows, cols) view, one expert's rows at a time)."""

    left: torch.Tensor  # (rows, r)
    right: torch.Tensor  # (r, cols)
    factor: float
    row0: int = 0


# -- orientation and the delta --------------------------------------------------------------------
def out_in(w: torch.Tensor, kind: Kind) -> torch.Tensor:
    """The (out, in) view of a tensor in ``kind``'s stored layout, and back (a view: writes go through).

    The rule itself is :func:`loratool.adapter.stored_transposed`.
    """
    return w.T if stored_transposed(kind) else w


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, kind: Kind) -> torch.Tensor:
    """The float32 delta a LoRA module adds to its base weight, in that weight's layout."""
    a = lora_A.to(torch.float32)
    b = lora_B.to(lora_A.device, torch.float32)
    delta = out_in(b @ a, kind)  # (out, r) @ (r, in) -> (out, in), then the stored layout
    return delta.mul_(scaling) if scaling != 1.0 else delta


# -- merge kernels --------------------------------------------------------------------------------
def add_lora(w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, factor: float, kind: Kind) -> torch.Tensor:
    """``w`` (float32, stored layout) += factor * B @ A, in place; returns ``w``."""
    a = lora_A.to(w.device, torch.float32)
    b = lora_B.to(w.device, torch.float32)
    out_in(w, kind).addmm_(b, a, alpha=factor)  # (out, r) @ (r, in) -> (out, in), written through the view
    return w


def row_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, factor: float, kind: Kind) -> RowFactors:
    """(left, right, factor) with delta = factor * left @ right in the stored weight's layout, so a
    block of the weight's rows needs only the matching rows of ``left``."""
    a, b = lora_A.float(), lora_B.float()
    if stored_transposed(kind):
        return RowFactors(a.T, b.T, factor)  # (in, r) @ (r, out): the transpose of B @ A
    return RowFactors(b, a, factor)  # (out, r) @ (r, in)


def merge_rows(
    w: torch.Tensor,
    factors: list[RowFactors],
    out: torch.Tensor,
    scratch: torch.Tensor,
    check: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """out = round(w + sum factor * left @ right), a block of rows at a time, in float32.

    Widening, the rank-r product, a ``check`` of the float32 block and the final rounding each
    stream the whole weight through memory once when done tensor by tensor; on a block that fits
    in cache they cost a fraction of that. ``scratch`` (float32, at least one row) bounds the
    block size; ``out`` has ``w``'s shape and the output dtype.
    """
    rows, cols = w.shape
    if scratch.numel() < cols:
        raise ValueError(f"scratch of {scratch.numel()} elements cannot hold a row of {cols}")
    step = max(1, scratch.numel() // max(cols, 1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block = scratch[: (stop - start) * cols].view(stop - start, cols).copy_(w[start:stop])  # (rows', cols)
        for left, right, factor, row0 in factors:
            lo, hi = max(start, row0), min(stop, row0 + left.shape[0])  # the rows of this block it covers
            if lo < hi:
                block[lo - start : hi - start].addmm_(left[lo - row0 : hi - row0], right, alpha=factor)
        if check is not None:
            check(block)
        out[start:stop].copy_(block)


def dora_rescale(w: torch.Tensor, magnitude: torch.Tensor, kind: Kind) -> torch.Tensor:
    """DoRA: each output row of ``w`` (= W + delta, float32) is rescaled to its learned magnitude, in place.

    W' = m / ||W + delta||_row * (W + delta), rows in the (out, in) orientation as PEFT computes them.
    """
    m = magnitude.to(w.device, torch.float32)  # (out,)
    rows = out_in(w, kind)  # (out, in) view
    rows.mul_((m / torch.linalg.vector_norm(rows, dim=1))[:, None])  # (out, in) * (out, 1)
    return w


_MANTISSA_BITS = {
    torch.float32: 23, torch.float16: 10, torch.bfloat16: 7, torch.float64: 52,
    torch.float8_e4m3fn: 3, torch.float8_e5m2: 2,
}  # fmt: skip


def unit_of_rounding(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s values at magnitude ``x`` (float64): 2^(exponent - mantissa bits)."""
    info = torch.finfo(dtype)
    _, exp = torch.frexp(x.clamp_min(info.tiny))  # x = m * 2^exp, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), exp - 1 - _MANTISSA_BITS[dtype])


# -- truncated SVD --------------------------------------------------------------------------------
@dataclass
class TruncatedSVD:
    """``U`` (m, k), ``S`` (k,), ``Vh`` (k, n) with k >= the rank that will be kept, plus the
    squared Frobenius norm of the matrix they approximate (float64, for exact energy shares)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    total_energy: float

    def energy(self, rank: int) -> float:
        """Sum of the top ``rank`` squared singular values (float64)."""
        return float(self.S[:rank].double().square().sum())

    def energy_share(self, rank: int) -> float:
        """Share of ``total_energy`` the top ``rank`` hold, in [0, 1]: the two are computed apart in
        float32, so a nearly exact fit can come out a few ulps above 1 (seen on CUDA)."""
        return 1.0 if self.total_energy <= 0 else min(1.0, self.energy(rank) / self.total_energy)


def exact_svd(matrix: torch.Tensor, k: int | None = None, *, sq_norm: float | None = None) -> TruncatedSVD:
    """Exact thin SVD (``torch.linalg.svd(full_matrices=False)``), truncated to ``k``.

    ``sq_norm`` is ||matrix||_F^2 when the caller knows it already.
    """
    m = matrix.to(torch.float32)
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    k = S.shape[0] if k is None else min(k, S.shape[0])
    return TruncatedSVD(U[:, :k], S[:k], Vh[:k], _sq_norm(m) if sq_norm is None else sq_norm)


def top_svd(matrix: torch.Tensor, k: int, *, sq_norm: float | None = None) -> TruncatedSVD:
    """The ``k`` largest singular triplets of a dense matrix, as accurate as :func:`exact_svd`'s and
    two to three times faster when ``k`` is well below the smaller dimension n (measured on CPU).

    The eigenvectors of the Gram matrix (n, n) span a subspace of 2k directions that holds the top
    k; one step of subspace iteration from there, then Rayleigh-Ritz (a (2k, n) SVD), gives the
    triplets. The Gram matrix squares the condition number, so its eigenvectors alone lose the
    directions below sqrt(eps) of the largest; the iteration step and the oversampling bring them
    back to the float32 accuracy of a direct SVD (tested against float64 on spectra decaying like
    1/i^2 and on flat Gaussian ones). Each triplet's residual ||M v - s u|| is then checked, and
    the direct SVD runs instead should one exceed what float32 rounding explains.
    """
    m = matrix.to(torch.float32)
    rows, cols = m.shape
    n = min(rows, cols)
    width = 2 * k
    if width >= n // 2:  # no cheaper than the direct SVD
        return exact_svd(m, k, sq_norm=sq_norm)
    tall = m if rows >= cols else m.T  # (big, n)
    _, v = torch.linalg.eigh(tall.T @ tall)  # ascending eigenvalues of the (n, n) Gram matrix
    q, _ = torch.linalg.qr(tall @ v[:, -width:])  # (big, 2k): one subspace iteration step...
    v, _ = torch.linalg.qr(tall.T @ q)  # (n, 2k)
    q, _ = torch.linalg.qr(tall @ v)  # (big, 2k)
    u_small, s, vh = torch.linalg.svd(q.T @ tall, full_matrices=False)  # ...then Rayleigh-Ritz: (2k, n)
    u, s, vh = q @ u_small[:, :k], s[:k], vh[:k]
    residual = (tall @ vh.T - u * s).norm(dim=0).max()  # (big, k): how far each triplet is from exact
    if s.numel() and not residual <= 16 * torch.finfo(torch.float32).eps * math.sqrt(n) * s[0]:
        return exact_svd(m, k, sq_norm=sq_norm)
    if tall is not m:
        u, vh = vh.T, u.T
    return TruncatedSVD(u, s, vh, _sq_norm(m) if sq_norm is None else sq_norm)


def randomized_svd(
    matrix: torch.Tensor,
    k: int,
    *,
    oversample: int = 8,
    n_iter: int = 4,
    generator: torch.Generator | None = None,
    sq_norm: float | None = None,
) -> TruncatedSVD:
    """Top-``k`` SVD by a randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4).

    ``n_iter`` power iterations, each re-orthonormalized by QR, sharpen a slowly decaying spectrum.
    Falls back to the exact SVD when ``k + oversample`` reaches the smaller dimension.
    """
    m = matrix.to(torch.float32)
    rows, cols = m.shape
    width = k + oversample
    if width >= min(rows, cols):
        return exact_svd(m, k, sq_norm=sq_norm)
    transpose = rows < cols  # work on the tall orientation: the sketch is (max, width)
    a = m.T if transpose else m
    gen_device = generator.device if generator is not None else a.device
    omega = torch.randn(a.shape[1], width, generator=generator, device=gen_device).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)  # (m, n) @ (n, w) -> (m, w)
    for _ in range(n_iter):
        z, _ = torch.linalg.qr(a.T @ q)  # (n, m) @ (m, w) -> (n, w)
        q, _ = torch.linalg.qr(a @ z)  # (m, n) @ (n, w) -> (m, w)
    small = q.T @ a  # (w, m) @ (m, n) -> (w, n)
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ u_small  # (m, w) @ (w, w) -> (m, w)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if transpose:
        u, vh = vh.T, u.T
    return TruncatedSVD(u, s, vh, _sq_norm(m) if sq_norm is None else sq_norm)


def factored_svd(
    Bs: list[torch.Tensor], As: list[torch.Tensor], k: int | None = None, *, dtype: torch.dtype = torch.float32
) -> TruncatedSVD:
    """Exact truncated SVD of ``sum_i B_i @ A_i`` without forming the (out, in) matrix."""
    return FactoredSVD.of(Bs, As, dtype=dtype).truncate(k)


@dataclass
class FactoredSVD:
    """The spectrum of ``M = sum_i B_i @ A_i`` from its factors, and its singular vectors on demand.

    Stack the factors, B = [B_1 .. B_n] (out, R) and A = [A_1; ..; A_n] (R, in). With Householder
    QRs B = Qb Rb and A^T = Qa Ra (``geqrf``, in ``dtype``), M = Qb (Rb Ra^T) Qa^T, so the SVD of
    the small core Rb Ra^T = Uc S Vc^T gives M's. The core is formed and decomposed in float64, so
    the energy shares (and the errors reported from them) do not cancel away.

    The vectors need neither Q: from core vc = s uc and core^T uc = s vc,
    u = Qb uc = Qb Rb Ra^T vc / s = B (Ra^T vc) / s and v = A^T (Rb^T uc) / s,
    one (out, R) @ (R, k) product each, only for the k vectors kept.
    """

    b: torch.Tensor  # (out, R), in dtype
    a: torch.Tensor  # (R, in)
    rb: torch.Tensor  # (R', R), float64
    ra: torch.Tensor  # (R'', R)
    uc: torch.Tensor  # (R', K), float64
    S: torch.Tensor  # (K,), float64
    vc: torch.Tensor  # (R'', K)
    total_energy: float

    @classmethod
    def of(cls, Bs: list[torch.Tensor], As: list[torch.Tensor], *, dtype: torch.dtype = torch.float32) -> FactoredSVD:
        b = torch.cat([x.to(dtype) for x in Bs], dim=1)  # (out, R)
        a = torch.cat([x.to(b.device, dtype) for x in As], dim=0)  # (R, in)
        rb = torch.geqrf(b)[0][: min(b.shape)].triu().double()  # b = Qb @ Rb; (R', R)
        ra = torch.geqrf(a.T.contiguous())[0][: min(a.shape)].triu().double()  # a.T = Qa @ Ra; (R'', R)
        core = rb @ ra.T  # (R', R) @ (R, R'') -> (R', R'')
        uc, s, vch = torch.linalg.svd(core, full_matrices=False)
        return cls(b, a, rb, ra, uc, s, vch.T, float(core.square().sum()))

    def truncate(self, k: int | None = None) -> TruncatedSVD:
        """U (out, k), S (k,), Vh (k, in) of the top k. Directions whose singular value is below
        the working precision times the largest are zero in M as stored, and get zero vectors."""
        k = self.S.shape[0] if k is None else min(k, self.S.shape[0])
        s = self.S[:k]
        floor = float(self.S[0]) * torch.finfo(self.b.dtype).eps if k else 0.0
        inv = torch.where(s > floor, 1.0 / s, torch.zeros_like(s))  # (k,)
        u = self.b @ ((self.ra.T @ self.vc[:, :k]) * inv).to(self.b.dtype)  # (out, R) @ (R, k)
        vh = ((self.rb.T @ self.uc[:, :k]) * inv).T.to(self.a.dtype) @ self.a  # (k, R) @ (R, in)
        return TruncatedSVD(u, s, vh, self.total_energy)  # S stays float64: exact energy shares


def factored_sq_norm(Bs: list[torch.Tensor], As: list[torch.Tensor]) -> float:
    """||sum_i B_i @ A_i||_F^2 from the factors: tr((B^T B)(A A^T)) with B, A stacked (float64)."""
    b = torch.cat([x.double() for x in Bs], dim=1)  # (out, R)
    a = torch.cat([x.to(b.device, torch.float64) for x in As], dim=0)  # (R, in)
    return float(((b.T @ b) * (a @ a.T)).sum())  # (R, R) * (R, R), summed = the trace of the product


def split_factors(
    svd: TruncatedSVD, rank: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of a rank-``rank`` truncation: B = U sqrt(S) (out, r), A = sqrt(S) Vh (r, in)."""
    root = svd.S[:rank].sqrt()
    b = (svd.U[:, :rank] * root).to(dtype)  # (out, r) * (r,) -> (out, r)
    a = (root[:, None] * svd.Vh[:rank]).to(dtype)  # (r, 1) * (r, in) -> (r, in)
    return b.contiguous(), a.contiguous()


def _sq_norm(m: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(m)) ** 2  # float32 accumulates blockwise: ~1e-7 relative


# -- rank rules -------------------------------------------------------------------------------------
def rank_for_energy(S: torch.Tensor, total_energy: float, fraction: float, cap: int) -> int:
    """Smallest r <= cap whose top-r squared singular values keep ``fraction`` of ``total_energy``."""
    if total_energy <= 0:
        return 0
    kept = torch.cumsum(S.double().square(), 0) / total_energy
    reached = torch.nonzero(kept >= fraction - 1e-12)
    r = int(reached[0]) + 1 if reached.numel() else S.shape[0]
    return max(1, min(r, cap))


def allocate_budget(spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int) -> dict[str, int]:
    """Spend ``budget`` parameters across modules where each rank buys the most energy per parameter.

    Module m's j-th rank costs ``costs[m]`` (= in + out) parameters and removes ``S_m[j]^2`` of
    squared error. Singular values fall within a module, so the marginal gains are sorted and the
    greedy choice over all modules is optimal (up to the last, partly fitting step).
    Returns rank per module (0 where nothing was bought).
    """
    gains: list[tuple[float, str, int]] = []
    for name, s in spectra.items():
        per_param = (s.double().square() / costs[name]).tolist()
        gains.extend((g, name, j) for j, g in enumerate(per_param))
    gains.sort(key=lambda t: (-t[0], t[1], t[2]))
    ranks = dict.fromkeys(spectra, 0)
    left = budget
    for gain, name, j in gains:
        if gain <= 0:
            break
        # within a module ranks are bought in order: j is always ranks[name] here
        if j == ranks[name] and costs[name] <= left:
            ranks[name] += 1
            left -= costs[name]
    return ranks


def relative_error(svd: TruncatedSVD, rank: int) -> float:
    """||M - M_r||_F / ||M||_F from the spectrum alone (the truncation is an orthogonal projection)."""
    if svd.total_energy <= 0:
        return 0.0
    return math.sqrt(max(0.0, svd.total_energy - svd.energy(rank)) / svd.total_energy)


def residual_error(
    matrix: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, *, norm: float | None = None
) -> float:
    """||M - B @ A||_F / ||M||_F, formed directly (consumes ``matrix`` in place).

    The spectral identity cancels catastrophically in float32 when the fit is nearly exact; one
    extra (out, r) @ (r, in) product is cheap next to the SVD and gives the error to the last bit.
    """
    if norm is None:
        norm = float(torch.linalg.vector_norm(matrix))
    if norm == 0:
        return 0.0
    matrix.addmm_(lora_B.to(matrix.dtype), lora_A.to(matrix.dtype), alpha=-1)  # (out, r) @ (r, in)
    return float(torch.linalg.vector_norm(matrix)) / norm


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. Any such element makes the sum non-finite, so one cheap reduction
    settles the common case; only a non-finite sum (or an overflow) needs the elementwise check."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


# -- FP8 weights: dequantize, requantize ----------------------------------------------------------
def _expand_scale(scale: torch.Tensor, shape: tuple[int, ...], scheme: Fp8Scheme) -> torch.Tensor:
    """``scale`` (float32) broadcastable to ``shape`` (out, in)."""
    s = scale.to(torch.float32)
    if scheme.kind == "tensor":
        return s.reshape(())
    if scheme.kind == "channel":
        return s.reshape(shape[0], 1)  # (out, 1)
    assert scheme.block is not None
    bo, bi = scheme.block
    full = s.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)  # (nb_o*bo, nb_i*bi)
    return full[: shape[0], : shape[1]]  # ragged last tiles cut back to the weight


def fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    """``q.to(float32)``, on CPU by :func:`fp8_to_float32_into`: torch converts e4m3 one element at
    a time there."""
    if q.device.type != "cpu" or q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return q.to(torch.float32)
    code = torch.empty(q.shape, dtype=torch.int16)
    return fp8_to_float32_into(q, torch.empty(q.shape, dtype=torch.float32), code)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme) -> torch.Tensor:
    """The float32 weight an FP8 ``q`` (out, in) and its ``scale`` stand for."""
    kernels = native.fp8_kernels() if q.device.type == "cpu" and q.dim() == 2 and q.is_contiguous() else None
    if kernels is None or not kernels.handles(q.dtype):
        return fp8_to_float32(q).mul_(_expand_scale(scale.to(q.device), tuple(q.shape), scheme))
    rows, cols = q.shape
    tile = {"block": scheme.block, "channel": (1, cols)}.get(scheme.kind) or (rows, cols)  # "tensor": one tile
    out = torch.empty(q.shape)
    if kernels.decode(q, out, 0, scale.to(torch.float32).reshape(-(-rows // tile[0]), -1).contiguous(), tile):
        out[q.view(torch.uint8).bitwise_and(0x7F) == 0x7F] = float("nan")  # e4m3fn NaN codes came out as 480
    return out


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)  # 448 for e4m3fn, 57344 for e5m2


def quantize_fp8(
    w: torch.Tensor, scheme: Fp8Scheme, dtype: torch.dtype, scale_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (float32, (out, in)) as FP8 ``dtype`` in ``scheme``: (q, scale), scale float32 of ``scale_shape``.

    Each scale is its group's absolute maximum over the format's largest value (the convention of
    DeepSeek's and compressed-tensors' quantizers), so every group uses the full FP8 range; an
    all-zero group gets scale 1. Values are rounded to nearest, after clamping to the range.
    """
    top = fp8_max(dtype)
    out_f, in_f = w.shape
    if scheme.kind == "tensor":
        amax = w.abs().amax().reshape(1, 1)
    elif scheme.kind == "channel":
        amax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
    else:
        assert scheme.block is not None
        bo, bi = scheme.block
        nb_o, nb_i = -(-out_f // bo), -(-in_f // bi)
        padded = torch.nn.functional.pad(w.abs(), (0, nb_i * bi - in_f, 0, nb_o * bo - out_f))  # zeros keep amax
        amax = padded.view(nb_o, bo, nb_i, bi).amax(dim=(1, 3))  # (nb_o, nb_i)
    scale = amax / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (w / _expand_scale(scale, (out_f, in_f), scheme)).clamp_(-top, top).to(dtype)
    return q, scale.reshape(scale_shape)


def merge_fp8_rows(
    q: torch.Tensor,
    scale: torch.Tensor,
    scheme: Fp8Scheme,
    factors: list[RowFactors],
    q_out: torch.Tensor,
    scale_out: torch.Tensor,
    check: Callable[[torch.Tensor], None] | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Dequantize ``q`` (out, in) a strip of rows at a time, add the rank-r terms in float32, and
    requantize each strip into ``q_out``/``scale_out`` (the same scheme, dtype and scale shape).

    A step is whole block rows (``block`` scheme) or any rows (``channel``), so every scale it needs
    lies inside it: at most about a million elements on CPU, so that nothing of the weight's size is
    widened at once, and the whole weight on a GPU (:data:`_GROUP_ELEMENTS`). ``tensor`` schemes need the
    whole weight's maximum first and are not taken here. Returns the squared
    norms (delta, requantization error): ||W' - W||^2 (from the factors) and ||stored - W'||^2.
    ``check`` is called with a merged strip (or the dequantized weight) that is not finite.
    ``scratch``: float32 working memory of at least :func:`fp8_scratch_elements` (else allocated).

    On CPU, where loratool's compiled kernels are built (:mod:`loratool.native`), each step is three
    passes of them around ``addmm``, one step per torch thread (:class:`_NativeFp8Steps`), to the
    same bytes as the torch passes below, which run otherwise and for steps holding a NaN or Inf.
    The time of those is elementwise passes over each strip, so there are as few as the arithmetic
    allows (about a dozen): float8 is decoded through float16 bit patterns (:func:`_fp8_bits_into`; torch
    converts e4m3 one element at a time on CPU), the power of two that decoding leaves out rides on
    the scale, the terms are added by ``addmm``, and the tile maxima that set the new scales also
    reveal a NaN or Inf. Every strip reuses one set of buffers: on the development VM a fresh
    buffer per step costs more in page faults than the arithmetic.
    """
    if scheme.kind == "tensor":
        raise ValueError("per-tensor scales need the whole weight: use dequantize_fp8 and quantize_fp8")
    rows, cols = q.shape
    top = fp8_max(q_out.dtype)
    s_in, s_out = scale.reshape(scale.shape[0], -1), scale_out.view(scale_out.shape[0], -1)
    fast = _NativeFp8Steps.make(q, scale, scheme, factors, q_out, scale_out)
    per_step = fast.step_elements(rows * cols) if fast is not None else None
    groups = list(_strip_groups(rows, cols, scheme, q.device, per_step))
    size = max(stop - start for start, stop, _ in groups) * cols
    need = _scratch_for(size)
    if scratch is None:
        scratch = torch.empty(need, dtype=torch.float32, device=q.device)
    elif scratch.numel() < need:
        raise ValueError(f"scratch holds {scratch.numel()} elements, {need} are needed")
    strip_buf, work_buf = scratch[:size], scratch[size : 2 * size]
    code_buf = scratch[2 * size : need].view(torch.int16)[:size]  # int16 codes in the last half-size
    lefts, rights = [left * factor for left, _, factor, _ in factors], [right for _, right, _, _ in factors]
    delta_sq = factored_sq_norm(lefts, rights) if factors else 0.0
    error_sq = torch.zeros((), dtype=torch.float64, device=q.device)  # summed where computed: no sync per step
    with torch_threads(1) if fast is not None else contextlib.nullcontext():  # the steps are the parallelism
        if fast is not None:
            groups = fast.run(groups, strip_buf)  # what is left: steps with a NaN code, NaN or Inf
        if check is not None and groups and fp8_has_nan_codes(q):
            check(fp8_to_float32(q))  # e4m3fn's NaN codes decode to finite numbers below: settle them here
        for start, stop, g in groups:
            n = (stop - start) * cols
            strip, work = strip_buf[:n].view(-1, cols), work_buf[:n].view(-1, cols)
            code = code_buf[:n].view(-1, cols)
            unit = _fp8_bits_into(q[start:stop], strip, code)
            tiles = (g, -1, cols)  # (block rows, rows of each, cols): every tile's scale broadcasts over its rows
            strip.view(tiles).mul_(_group_scale(s_in, start, stop, g, cols, scheme) * unit)  # exact: unit is 2^k
            for left, right, factor, _ in factors:
                strip.addmm_(left[start:stop], right, alpha=factor)  # (rows', r) @ (r, cols)
            torch.abs(strip, out=work)
            if scheme.kind == "block":
                assert scheme.block is not None
                bi = scheme.block[1]
                nb = -(-cols // bi)
                peak = work.view(tiles).amax(dim=1)  # (g, cols); amax keeps a NaN
                new = torch.nn.functional.pad(peak, (0, nb * bi - cols)).view(g, nb, bi).amax(dim=2) / top  # (g, nb)
                b0 = start // scheme.block[0]
                s_out[b0 : b0 + g] = torch.where(new > 0, new, torch.ones_like(new)).to(s_out.dtype)
            else:
                peak = work.amax(dim=1, keepdim=True)  # (rows', 1)
                new = peak / top
                s_out[start:stop] = torch.where(new > 0, new, torch.ones_like(new)).to(s_out.dtype)
            if check is not None and not bool(torch.isfinite(peak).all()):
                check(strip)
            new_scale = _group_scale(s_out, start, stop, g, cols, scheme)
            scaled = torch.div(strip.view(tiles), new_scale, out=work.view(tiles)).view(-1, cols)
            if bool((new < _TINY).any()):  # |W'| / (max|W'| / top) <= top (1 + 2^-22) unless a scale is subnormal
                scaled.clamp_(-top, top)
            q_out[start:stop] = scaled
            unit = _fp8_bits_into(q_out[start:stop], strip, code)  # the stored values / unit
            residual = scaled.sub_(strip, alpha=unit).view(tiles).mul_(new_scale).view(-1)  # W' - stored
            error_sq += torch.dot(residual, residual)
    return delta_sq, float(error_sq) + (fast.error_sq if fast is not None else 0.0)


class _NativeFp8Steps:
    """Steps of :func:`merge_fp8_rows` in the compiled kernels (:mod:`loratool.native`): decode and
    scale, torch's ``addmm`` for the terms, the new scales from the tile maxima, encode; the same
    bytes as the passes, in three passes over each step instead of a dozen. One step per torch thread at a time, each on
    one thread of its own (its strip stays in that core's cache; no OpenMP team spins between)."""

    def __init__(self, kernels: native.Fp8Kernels, q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme,
                 factors: list[RowFactors], q_out: torch.Tensor, scale_out: torch.Tensor) -> None:  # fmt: skip
        rows, cols = q.shape
        self.kernels, self.q, self.q_out, self.factors = kernels, q, q_out, factors
        self.block = scheme.block if scheme.kind == "block" and scheme.block is not None else (1, cols)
        self.s_in = scale.to(torch.float32).reshape(-(-rows // self.block[0]), -1).contiguous()
        self.s_out = scale_out.view(self.s_in.shape)
        self.parts = torch.get_num_threads()
        self.error_sq = 0.0

    @classmethod
    def make(cls, q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme, factors: list[RowFactors],
             q_out: torch.Tensor, scale_out: torch.Tensor) -> _NativeFp8Steps | None:  # fmt: skip
        """The native steps where they apply (CPU, e4m3fn or e5m2, contiguous), else None."""
        kernels = native.fp8_kernels() if q.device.type == "cpu" else None
        if kernels is None or not (kernels.handles(q.dtype) and kernels.handles(q_out.dtype)):
            return None
        if not (q.is_contiguous() and q_out.is_contiguous() and scale_out.is_contiguous()):
            return None
        return cls(kernels, q, scale, scheme, factors, q_out, scale_out)

    def step_elements(self, total: int) -> int:
        """Elements per step for a weight of ``total``: at most :data:`_GROUP_ELEMENTS`, and few enough
        that every part gets a step (:func:`_strip_groups` keeps a step to whole block rows)."""
        return max(1, min(_GROUP_ELEMENTS["cpu"], -(-total // self.parts)))

    def run(self, steps: list[tuple[int, int, int]], strip: torch.Tensor) -> list[tuple[int, int, int]]:
        """Merge ``steps`` (whole block rows each) into q_out and scale_out, each part (up to
        :attr:`parts`, on threads of their own) taking the next step as it finishes one; ``strip``
        is float32 scratch of the largest. Returns the steps whose merged rows hold a NaN or an Inf
        or whose codes hold one of e4m3fn's NaNs, for the torch passes (nothing of theirs is written
        but their scales, which those passes write again)."""
        errors: list[float | None] = [None] * len(steps)
        todo, taking = iter(range(len(steps))), threading.Lock()

        def part(buf: torch.Tensor) -> None:
            while True:
                with taking:
                    i = next(todo, None)
                if i is None:
                    return
                errors[i] = self.step(steps[i][0], steps[i][1], buf)

        with _PART_STRIPS_LOCK:  # the first part works in the caller's scratch, the others in kept strips
            while len(_PART_STRIPS) < min(self.parts, len(steps)) - 1:
                _PART_STRIPS.append(torch.empty(0))
            for i, kept in enumerate(_PART_STRIPS):
                if kept.numel() < strip.numel():  # grown once, not per weight: fresh memory costs page faults
                    _PART_STRIPS[i] = torch.empty(strip.numel())
            native.run_parts(part, [strip, *_PART_STRIPS][: min(self.parts, len(steps))])
        self.error_sq += sum(e for e in errors if e is not None)  # in step order: the same sum every run
        return [s for s, e in zip(steps, errors) if e is None]

    def step(self, start: int, stop: int, buf: torch.Tensor) -> float | None:
        """Rows start:stop merged; returns their squared requantization error, or None for a NaN or Inf
        (or a NaN code in ``q``, which decodes to a finite number)."""
        k, bo, cols = self.kernels, self.block[0], self.q.shape[1]
        b0, b1 = start // bo, -(-stop // bo)
        strip = buf[: (stop - start) * cols].view(-1, cols)
        s_in = self.s_in[b0:b1]
        if k.decode(self.q[start:stop], strip, 0, s_in, self.block):
            return None
        for left, right, factor, _ in self.factors:
            strip.addmm_(left[start:stop], right, alpha=factor)  # (rows', r) @ (r, cols)
        if self.s_out.dtype == torch.float32:
            s_new = self.s_out[b0:b1]
            if not k.scales(strip, 0, self.block, self.q_out.dtype, s_new):
                return None  # an Inf or a NaN: the torch passes write these scales again
        else:
            s_new = torch.empty(s_in.shape)
            if not k.scales(strip, 0, self.block, self.q_out.dtype, s_new):
                return None
            self.s_out[b0:b1] = s_new
            s_new = self.s_out[b0:b1].to(torch.float32)  # as stored: a bfloat16 scale is rounded
        return k.encode(strip, self.q_out[start:stop], 0, s_new, self.block)


_PART_STRIPS: list[torch.Tensor] = []  # float32 strips of the native steps' parts but the first
_PART_STRIPS_LOCK = threading.Lock()


def fp8_scratch_elements(rows: int, cols: int, scheme: Fp8Scheme, device: torch.device) -> int:
    """How much float32 scratch :func:`merge_fp8_rows` works in for a (rows, cols) weight on ``device``."""
    return _scratch_for(max(stop - start for start, stop, _ in _strip_groups(rows, cols, scheme, device)) * cols)


def _scratch_for(size: int) -> int:
    """Two float32 buffers of ``size`` and one int16 buffer, in float32 elements."""
    return 2 * size + (size + 1) // 2


_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32
# Elements per step of merge_fp8_rows. On CPU a step stays in cache through its dozen passes; on a
# GPU each pass is a kernel launch (microseconds, against a microsecond per 4 MB moved), so a step
# takes a whole weight.
_GROUP_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 27}


def _strip_groups(
    rows: int, cols: int, scheme: Fp8Scheme, device: torch.device, per_step: int | None = None
) -> Iterator[tuple[int, int, int]]:
    """(start, stop, block rows) steps over the rows: whole block rows (a ragged last one alone), or
    for per-channel scales any rows, about ``per_step`` (:data:`_GROUP_ELEMENTS`) at a time."""
    per_step = per_step or _GROUP_ELEMENTS.get(device.type, _GROUP_ELEMENTS["cpu"])
    if scheme.kind == "block":
        assert scheme.block is not None
        bo = scheme.block[0]
        per, full = max(1, per_step // (bo * cols)), rows // bo
        for b0 in range(0, full, per):
            b1 = min(b0 + per, full)
            yield b0 * bo, b1 * bo, b1 - b0
        if rows % bo:
            yield full * bo, rows, 1
    else:  # steps of equal size (to a row): no short last one, which BLAS might take a matrix-vector path for
        n = -(-rows // max(1, per_step // cols))
        for k in range(n):
            yield rows * k // n, rows * (k + 1) // n, 1


def _group_scale(scale: torch.Tensor, start: int, stop: int, g: int, cols: int, scheme: Fp8Scheme) -> torch.Tensor:
    """The float32 scales of rows start:stop, broadcastable to their (g, rows / g, cols) view."""
    if scheme.kind == "block":
        assert scheme.block is not None
        b0 = start // scheme.block[0]
        per_col = scale[b0 : b0 + g].to(torch.float32).repeat_interleave(scheme.block[1], dim=1)[:, :cols]
        return per_col.view(g, 1, cols)
    return scale[start:stop].to(torch.float32).view(1, -1, 1)  # (1, rows', 1)


def _fp8_bits_into(q: torch.Tensor, out: torch.Tensor, code: torch.Tensor) -> float:
    """``out[:] = q / unit`` (float8 -> float32) for the returned power of two ``unit``, exactly, for
    every finite code, in three integer passes and one conversion through ``code``, an int16 buffer
    of ``q``'s shape. e4m3fn's NaN codes come out as +-480 / unit (see :func:`fp8_has_nan_codes`).

    A float8 byte read as int8 and widened to int16 keeps its sign in the top bits. e5m2 shifted
    left by 8 is a float16 (unit 1). e4m3fn shifted left by 7 has its 4 exponent and 3 mantissa
    bits where a float16 has them, the value times 2^-8 (exponent bias 15 against 7, subnormals
    included), once bit 14, a copy of the sign, is cleared.
    """
    if q.device.type != "cpu" or q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        out.copy_(q)
        return 1.0
    code.copy_(q.view(torch.int8))  # sign-extended
    if q.dtype == torch.float8_e5m2:
        out.copy_(code.bitwise_left_shift_(8).view(torch.float16))
        return 1.0
    out.copy_(code.bitwise_left_shift_(7).bitwise_and_(~0x4000).view(torch.float16))
    return 256.0


def fp8_has_nan_codes(q: torch.Tensor) -> bool:
    """Whether an e4m3fn tensor holds a NaN (0x7F or 0xFF, the largest byte as int8 and as uint8)."""
    if q.dtype != torch.float8_e4m3fn:
        return False  # e5m2's NaN and Inf codes decode as such
    return int(q.view(torch.int8).amax()) == 0x7F or int(q.view(torch.uint8).amax()) == 0xFF


def fp8_to_float32_into(q: torch.Tensor, out: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``out[:] = q`` (float8 -> float32), exactly for every code, NaN included, through float16 bit
    patterns in the int16 buffer ``code`` (torch's own conversion of e4m3 runs one element at a
    time on CPU)."""
    unit = _fp8_bits_into(q, out, code)
    if unit != 1.0:
        out.mul_(unit)
    if fp8_has_nan_codes(q):
        out[q.view(torch.uint8).bitwise_and(0x7F) == 0x7F] = float("nan")
    return out
