"""The math of loratool, as pure functions over tensors: no I/O, no printing.

Float32 (or float64 where noted) inside; the device is the input's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..adapter import Kind, stored_transposed
from ..errors import LoraToolError


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

    The rule itself is :func:`loratool.adapter.stored_transposed`; a Conv2d weight (out, in, kh, kw)
    is seen as (out, in * kh * kw), the flattened A's columns (a view of a contiguous weight).
    """
    if w.dim() == 4:
        return w.view(w.shape[0], -1)
    return w.T if stored_transposed(kind) else w


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, kind: Kind) -> torch.Tensor:
    """The float32 delta a LoRA module adds to its base weight, in that weight's layout (a Conv2d weight's
    flattened: (out, in * kh * kw))."""
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
    """The spacing of ``dtype``'s values at magnitude ``x`` (float32 or float64, in ``x``'s dtype or wider):
    2^(exponent - mantissa bits). The power of two of a float is its exponent bits alone, so this
    masks them (torch's frexp and ldexp cost several times more on CPU); exact."""
    info = torch.finfo(dtype)
    if x.dtype == torch.float32 and info.tiny < torch.finfo(torch.float32).tiny:
        x = x.double()  # float64's units of float32 values: its smallest normal underflows float32
    a = x.abs().clamp_min(info.tiny)
    if a.dtype == torch.float32:
        power = (a.view(torch.int32) & 0x7F800000).view(torch.float32)  # 2^floor(log2 a)
    elif a.dtype == torch.float64:
        power = (a.view(torch.int64) & 0x7FF0000000000000).view(torch.float64)
    else:
        _, exp = torch.frexp(a)  # a = m * 2^exp, m in [0.5, 1)
        return torch.ldexp(torch.ones_like(a), exp - 1 - _MANTISSA_BITS[dtype])
    return power.mul_(2.0 ** -_MANTISSA_BITS[dtype])  # a power of two: exact


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
    return TruncatedSVD(U[:, :k], S[:k], Vh[:k], squared_norm(m) if sq_norm is None else sq_norm)


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
    top = float(m.abs().max()) if m.numel() else 0.0
    if _GRAM_SAFE < top < math.inf:  # the Gram matrix's entries would pass float32's range: by a power of
        e = math.frexp(top)[1]  # two, exactly, the same directions of a matrix whose largest value is 1
        scaled = top_svd(torch.ldexp(m, torch.tensor(-e)), k)
        return TruncatedSVD(scaled.U, torch.ldexp(scaled.S, torch.tensor(e)), scaled.Vh,
                            squared_norm(m) if sq_norm is None else sq_norm)  # fmt: skip
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
    return TruncatedSVD(u, s, vh, squared_norm(m) if sq_norm is None else sq_norm)


_GRAM_SAFE = 2.0**48  # top_svd's Gram matrix sums up to 2^24 products of values below this within float32


MAX_N_ITER = 32  # randomized_svd's power iterations at most, as the commands take them: past 8 little changes


def check_sketch(oversample: int, n_iter: int) -> None:
    """Refuse a randomized SVD's settings as a user gives them (extract, analyze) when out of range.

    Raises:
        LoraToolError: a negative ``oversample``, or ``n_iter`` past :data:`MAX_N_ITER`.
    """
    if oversample < 0:
        problem = f"--oversample must be 0 or more (got {oversample})"
    elif not 0 <= n_iter <= MAX_N_ITER:
        problem = (
            f"--n-iter must be from 0 to {MAX_N_ITER} (got {n_iter}): each iteration is two passes over every weight"
        )
    else:
        return
    raise LoraToolError(problem, fix="the defaults (--oversample 16 --n-iter 4) suit most models")


def randomized_svd(
    matrix: torch.Tensor,
    k: int,
    *,
    oversample: int = 16,
    n_iter: int = 4,
    generator: torch.Generator | None = None,
    sq_norm: float | None = None,
    krylov: bool | None = None,
) -> TruncatedSVD:
    """Top-``k`` SVD by a randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4) of
    ``k + oversample`` columns, then Rayleigh-Ritz.

    ``n_iter`` power iterations, each re-orthonormalized by QR, sharpen a slowly decaying spectrum.
    Where the sketch is thin next to the matrix (the blocks below, together, at most a sixth of its
    smaller side, and the matrix at least 2^20 elements) and ``n_iter`` is even and at least 4, half
    as many steps keep every iterate instead (block Krylov: Musco & Musco 2015): an orthonormal basis
    of ``[A W, (A A^T) A W, ..., (A A^T)^(n_iter / 2) A W]``. That basis holds the last block, all
    that power iterations keep, and reaches the error of twice as many of them (at most as large, or
    within 3e-4 of it). It is built as block Lanczos builds it (:func:`_block_krylov`), each block
    orthogonal to those before it, so that the products ``A^T q`` the steps take are also the rows
    of ``Q^T A`` that Rayleigh-Ritz needs: six products with a block of the sketch's width in all,
    where four power iterations take ten. Past a sixth, or on small matrices, the basis's QR and
    orthogonalization cost more than the products saved; below 4, one block Krylov step is less
    accurate than two power iterations (``bench/svd_defaults.py`` prints errors and times of both).
    ``krylov`` True or False asks for one or the other (True: ``n_iter // 2`` steps; power
    iterations where that basis would fill the smaller side).
    Falls back to the exact SVD when ``k + oversample`` reaches the smaller dimension.

    The default oversampling, 16, puts a rank-16 extraction within 5e-5 of the exact truncation's
    error in every module of the bench's Llama-1B-shaped pair (8: within 5e-4 to 9e-4) and its KL at
    the output of a tiny trained model within 0.4% of the exact SVD's (8: 0.5-1.4%), for about a
    tenth more time (docs/benchmarks.md, extract section).
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
    basis = (n_iter // 2 + 1) * width
    if krylov is None:
        krylov = n_iter >= 4 and n_iter % 2 == 0 and 6 * basis <= min(rows, cols) and rows * cols >= 1 << 20
    krylov = krylov and basis < min(rows, cols)
    q, _ = torch.linalg.qr(thin_product(a, omega))  # (m, n) @ (n, w) -> (m, w)
    if krylov:
        u, s, vh = _block_krylov(a, q, n_iter // 2, k)
    else:
        for _ in range(n_iter):
            z, _ = torch.linalg.qr(thin_product(a.T, q))  # (n, m) @ (m, w) -> (n, w)
            q, _ = torch.linalg.qr(thin_product(a, z))  # (m, n) @ (n, w) -> (m, w)
        small = thin_product(a.T, q).T  # (w, m) @ (m, n) -> (w, n)
        u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
        u = q @ u_small[:, :k]  # (m, w) @ (w, k) -> (m, k)
        s, vh = s[:k], vh[:k]
    if transpose:
        u, vh = vh.T, u.T
    return TruncatedSVD(u, s, vh, squared_norm(m) if sq_norm is None else sq_norm)


def thin_product(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``a @ x`` for a large float32 matrix ``a`` (m, n) and a thin ``x`` (n, w): the randomized SVD's products.

    On the CPU through oneDNN's matrix product where torch has it: MKL's, which ``@`` calls, runs
    at about half the CPU's peak when ``x`` has a few dozen columns; oneDNN's took 0.52-0.84x its
    time on the Llama-1B shapes at w = 24, 1.02x on one (``bench/svd_products.py``). It copies the thin
    operand (transposed), never the matrix: 8 and 19 MiB above ``@``'s peak for ``A W`` and ``A^T Q``
    with a 128256 x 2048 ``A`` (measured). Both are float32 throughout
    (errors of order n * eps, summed in another order). The result is ``(x^T a^T)^T``: an (m, w)
    view of a (w, m) tensor, which is the column-major layout the QR that follows wants.
    """
    if not (a.device.type == "cpu" and a.dtype == x.dtype == torch.float32 and a.dim() == x.dim() == 2
            and min(a.shape[0], a.shape[1], x.shape[1]) > 0 and _onednn_works()):  # fmt: skip
        return a @ x
    return _onednn_linear(x.T.contiguous(), a).T  # input (w, n) @ weight (m, n)^T -> (w, m)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` by oneDNN (torch's private op for compiled graphs' linear layers)."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return out


_ONEDNN: list[bool] = []  # set by the first thin_product: whether oneDNN's product is there and right


def _onednn_works() -> bool:
    """Whether torch's oneDNN product exists here and gives ``@``'s result on a product that float32
    holds exactly (small integers): checked once; anything else keeps ``@``."""
    if not _ONEDNN:
        try:
            g = torch.Generator().manual_seed(0)
            a = torch.randint(-8, 8, (96, 80), generator=g).float()
            x = torch.randint(-8, 8, (80, 24), generator=g).float()
            ok = torch.equal(_onednn_linear(x.T.contiguous(), a).T, a @ x)
        except (RuntimeError, AttributeError, TypeError):  # no such op (a build without oneDNN), or another signature
            ok = False
        _ONEDNN.append(bool(ok))
    return _ONEDNN[0]


def _block_krylov(
    a: torch.Tensor, q: torch.Tensor, steps: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz on the block Krylov space ``[Q0, (A A^T) Q0, ..., (A A^T)^steps Q0]`` of the
    orthonormal (m, w) block ``q`` = Q0: the top ``k`` of ``U``, ``S``, ``Vh``.

    Block Lanczos with full reorthogonalization: each new block ``A p`` (``p`` an orthonormal basis
    of the previous block's ``A^T q``) is made orthonormal to all blocks before it, twice (once
    leaves it orthogonal only to ``eps * ||A p|| / ||its new part||``, twice to ``eps``: Giraud et al.
    2005). The basis ``Q`` is then orthonormal, so ``Q^T A`` is the blocks' ``(A^T q)^T`` stacked,
    products the steps take anyway: the last block costs one product more, and no pass with the whole
    basis is needed. Its SVD comes from the QR of its transpose (n, b): ``R^T``'s (b, b) SVD.
    """
    basis, rows = q, []  # Q (m, b), orthonormal, and A^T times each of its blocks: Q^T A = cat(rows, 1)^T
    while True:
        z = thin_product(a.T, q)  # (n, m) @ (m, w) -> (n, w)
        rows.append(z)
        if len(rows) > steps:
            break
        p, _ = torch.linalg.qr(z)
        q = thin_product(a, p)  # (m, n) @ (n, w) -> (m, w)
        for _ in range(2):
            q, _ = torch.linalg.qr(q - basis @ (basis.T @ q))  # (m, b) @ (b, w): its part new to the basis
        basis = torch.cat((basis, q), dim=1)
    p, r = torch.linalg.qr(torch.cat(rows, dim=1))  # Q^T A = (P R)^T = R^T P^T, P (n, b)
    u_small, s, wh = torch.linalg.svd(r.T)  # (b, b)
    return basis @ u_small[:, :k], s[:k], wh[:k] @ p.T  # (m, k), (k,), (k, b) @ (b, n) -> (k, n)


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


def squared_norm(t: torch.Tensor) -> float:
    """||t||_F^2: the norms of its rows (its last dimension, or runs of 4096 elements of a 1-D or very
    wide tensor), in float32 (float64 for a float64 ``t``), their squares summed in float64.

    torch's norm of a whole float32 tensor runs long serial sums on the CPU: measured, its square was
    off by 2.5e-3 (relative) on 2^24 elements and by 1.6e-2 on 2^26, an error that the errors and
    energy shares computed from it carry (and the spectral identity magnifies). Rows of a few
    thousand elements stay within a few ulps. A NaN or Inf anywhere gives a non-finite sum; finite
    values whose squares pass float32's range (above about 1.8e19) are summed again in float64.
    """
    if t.numel() == 0:
        return 0.0
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # bf16 and f16 summed in float32
    total = _squared_norm(t, dtype)
    return _squared_norm(t, torch.float64) if total == math.inf and dtype != torch.float64 else total


def _squared_norm(t: torch.Tensor, dtype: torch.dtype) -> float:
    if t.dim() == 2 and t.stride(-1) != 1 and t.stride(-2) == 1:
        t = t.T  # a transposed view (a Conv1D or experts delta as (out, in)): its columns are the contiguous runs
    if t.dim() >= 2 and t.shape[-1] <= 1 << 16:
        rows = torch.linalg.vector_norm(t, dim=-1, dtype=dtype)
    else:
        flat = t.reshape(-1)
        whole = flat.numel() - flat.numel() % 4096
        rows = torch.cat([torch.linalg.vector_norm(flat[:whole].view(-1, 4096), dim=1, dtype=dtype),
                          torch.linalg.vector_norm(flat[whole:], dtype=dtype).reshape(1)])  # fmt: skip
    return float(rows.double().square().sum())


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
        norm = math.sqrt(squared_norm(matrix))
    if norm == 0:
        return 0.0
    matrix.addmm_(lora_B.to(matrix.dtype), lora_A.to(matrix.dtype), alpha=-1)  # (out, r) @ (r, in)
    return math.sqrt(squared_norm(matrix)) / norm


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. Any such element makes the sum non-finite, so one cheap reduction
    settles the common case; only a non-finite sum (or an overflow) needs the elementwise check."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())  # no isfinite for float8
