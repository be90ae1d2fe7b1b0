"""Experiment, not part of run_all: would a fused FP8 kernel written with numba beat the torch passes
of :func:`loratool.quant.fp8.merge_fp8_rows`? Needs ``pip install numba`` (not a loratool dependency).

The same step as ``bench/fp8_step.py`` (2048 x 8192 e4m3, 128x128 blocks, a rank-16 term), one block
row at a time: the rank-r product by torch (``mm``, MKL), then two numba kernels, each one pass:
decode + scale + add, with the magnitude bits kept for the tile maxima; and divide + clamp + encode
(round to nearest even, by bit arithmetic) + decode + squared error. The codes and scales are
compared with merge_fp8_rows's (printed) before anything is timed; only e4m3, 128x128 blocks,
float32 scales and columns in whole blocks, as here.

    python bench/fp8_fused_numba.py
"""

from __future__ import annotations

import time

import numba as nb
import numpy as np
import torch
from common import machine
from numba import types
from numba.extending import intrinsic

from loratool.host import available_cores, torch_threads
from loratool.math.linalg import row_factors
from loratool.quant.fp8 import fp8_max, fp8_scratch_elements, merge_fp8_rows, quantize_fp8
from loratool.quant.layout import Fp8Scheme

U = np.uint32
# error_model="numpy": numba's default checks every float division for a zero divisor, which keeps
# the loop from vectorizing (a scalar loop, several times slower).
JIT = {"boundscheck": False, "error_model": "numpy", "cache": True, "parallel": True}


@intrinsic
def _f32(typingctx, x):  # type: ignore[no-untyped-def]
    """The float32 whose bits are the uint32 ``x``."""
    return types.float32(types.uint32), lambda ctx, b, sig, args: b.bitcast(args[0], ctx.get_value_type(types.float32))


@intrinsic
def _bits(typingctx, x):  # type: ignore[no-untyped-def]
    """The bits of the float32 ``x`` as a uint32."""
    return types.uint32(types.float32), lambda ctx, b, sig, args: b.bitcast(args[0], ctx.get_value_type(types.uint32))


@nb.njit(inline="always")
def _magnitude(code):  # type: ignore[no-untyped-def]
    """|value| of an e4m3 code, exactly, without making a denormal float32 (slow on x86)."""
    normal = _f32(((code & U(0x7F)) << U(20)) + U(120 << 23))
    sub = np.float32(code & U(7)) * np.float32(2.0**-9)
    return normal if (code & U(0x78)) != U(0) else sub


@nb.njit(**JIT)
def decode_add(q, scale_col, strip, mag):  # type: ignore[no-untyped-def]
    """strip += decode(q) * scale_col (per column); mag = the bits of |strip| (their max is the float max)."""
    rows, cols = q.shape
    for i in nb.prange(rows):
        for j in range(cols):
            code = U(q[i, j])
            m = _magnitude(code)
            v = (-m if (code & U(0x80)) != U(0) else m) * scale_col[j] + strip[i, j]
            strip[i, j] = v
            mag[i, j] = _bits(v) & U(0x7FFFFFFF)


@nb.njit(fastmath={"reassoc"}, **JIT)  # reassoc: only the error sum is reordered
def requantize(strip, scale_col, top, q_out, err):  # type: ignore[no-untyped-def]
    rows, cols = strip.shape
    for i in nb.prange(rows):
        e = np.float32(0.0)
        for j in range(cols):
            sc = scale_col[j]
            x = strip[i, j] / sc
            x = x if x < top else top
            x = x if x > -top else -top
            u = _bits(x)
            a = u & U(0x7FFFFFFF)
            normal = ((a + U(0x7FFFF) + ((a >> U(20)) & U(1))) >> U(20)) - U(960)  # round to 3 mantissa bits
            sub = U(np.int32(abs(x) * np.float32(512.0) + np.float32(8388608.0)) - np.int32(8388608))
            code = normal if a >= U(0x3C800000) else sub  # 2^-6: e4m3's smallest normal
            q_out[i, j] = np.uint8(code | ((u >> U(24)) & U(0x80)))
            r = (abs(x) - _magnitude(code)) * sc
            e += r * r
        err[i] = e


def fused(q, s, left, right, q_out, s_out, strip, mag, err, block=128):  # type: ignore[no-untyped-def]
    rows, cols = q.shape
    top = np.float32(fp8_max(q.dtype))
    qn, qon = q.view(torch.uint8).numpy(), q_out.view(torch.uint8).numpy()
    total = 0.0
    for b0 in range(0, rows, block):
        b1 = min(b0 + block, rows)
        st = strip[: b1 - b0]
        torch.mm(left[b0:b1], right, out=st)
        decode_add(qn[b0:b1], s[b0 // block].repeat_interleave(block)[:cols].numpy(), st.numpy(), mag[: b1 - b0])
        peak = torch.from_numpy(mag[: b1 - b0].view(np.float32)).view(b1 - b0, -1, block).amax(dim=(0, 2))
        new = peak / float(top)
        s_out[b0 // block] = torch.where(new > 0, new, torch.ones_like(new))
        requantize(
            st.numpy(), s_out[b0 // block].repeat_interleave(block)[:cols].numpy(), top, qon[b0:b1], err[: b1 - b0]
        )
        total += float(err[: b1 - b0].astype(np.float64).sum())
    return total


def main() -> None:
    rows, cols, rank = 2048, 8192, 16
    g = torch.Generator().manual_seed(0)
    scheme = Fp8Scheme("block", (128, 128))
    w = torch.randn(rows, cols, generator=g) * 0.02
    q, s = quantize_fp8(w, scheme, torch.float8_e4m3fn, (rows // 128, cols // 128))
    a, b = torch.randn(rank, cols, generator=g) / cols**0.5, torch.randn(rows, rank, generator=g) * 1e-3
    terms = [row_factors(a, b, 2.0, "linear")]
    left, right = (terms[0][0] * terms[0][2]).contiguous(), terms[0][1].contiguous()
    q_ref, s_ref = torch.empty_like(q), torch.empty_like(s)
    scratch = torch.empty(fp8_scratch_elements(rows, cols, scheme, q.device))
    err_ref = merge_fp8_rows(q, s, scheme, terms, q_ref, s_ref, None, scratch).ee  # nearest, as fused() rounds
    q_new, s_new = torch.empty_like(q), torch.empty_like(s)
    strip, mag, err = torch.empty(128, cols), np.empty((128, cols), np.uint32), np.zeros(128, np.float32)
    err_new = fused(q, s, left, right, q_new, s_new, strip, mag, err)
    same = int((q_new.view(torch.uint8) == q_ref.view(torch.uint8)).sum())
    print(f"FP8 step, 2048 x 8192 e4m3 (128x128 blocks), rank 16, best of 7; {machine()}; numba {nb.__version__}")
    print(f"  codes equal to merge_fp8_rows: {same} of {q.numel()}; scales equal: {torch.equal(s_new, s_ref)}; "
          f"squared error {err_new:.6g} against {err_ref:.6g}")  # fmt: skip
    for threads in sorted({1, available_cores()}):
        nb.set_num_threads(threads)
        timings = {}
        with torch_threads(threads):
            for name, step in [
                (
                    "torch passes (merge_fp8_rows)",
                    lambda: merge_fp8_rows(q, s, scheme, terms, q_ref, s_ref, None, scratch),
                ),
                ("numba fused + torch mm", lambda: fused(q, s, left, right, q_new, s_new, strip, mag, err)),
            ]:
                best = float("inf")
                for _ in range(7):
                    t = time.perf_counter()
                    step()
                    best = min(best, time.perf_counter() - t)
                timings[name] = best / q.numel() * 1e9
        for name, ns in timings.items():
            print(f"  {threads:2d} thread(s)  {name:32s} {ns:5.2f} ns per element")


if __name__ == "__main__":
    main()
