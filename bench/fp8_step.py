"""The FP8 merge's arithmetic alone: ns per element of :func:`loratool.quant.fp8.merge_fp8_rows` on one
Llama-1B down_proj-sized weight (2048 x 8192, e4m3, 128x128 blocks, a rank-16 term), in memory,
best of 7, by each rounding rule, on one thread and on every core, with the compiled kernels
(loratool.quant.native) where they are built and with torch's passes (``LORATOOL_NATIVE=0``; the
subspace rule's run column by column, and are left out: minutes), and each compiled pass alone on
one thread over one step of 128 rows (decode and scale, the tile maxima, the rounding of each rule
with the kept sums, as a merge calls it; ``addmm`` between them for comparison). No I/O.

    python bench/fp8_step.py
"""

from __future__ import annotations

import os
import time

import torch
from common import machine

from loratool.host import available_cores, torch_threads
from loratool.math.linalg import row_factors
from loratool.quant import native
from loratool.quant.fp8 import fp8_scratch_elements, merge_fp8_rows, quantize_fp8
from loratool.quant.layout import Fp8Scheme
from loratool.quant.rounding import Rounding, subspace_of

RULES = ("nearest", "stochastic", "subspace")


def ns_per_element(
    threads: int, rule: str, rows: int = 2048, cols: int = 8192, rank: int = 16, repeats: int = 7
) -> float:
    g = torch.Generator().manual_seed(0)
    scheme = Fp8Scheme("block", (128, 128))
    w = torch.randn(rows, cols, generator=g) * 0.02
    q, s = quantize_fp8(w, scheme, torch.float8_e4m3fn, (-(-rows // 128), -(-cols // 128)))
    a, b = torch.randn(rank, cols, generator=g) / cols**0.5, torch.randn(rows, rank, generator=g) * 1e-3
    terms = [row_factors(a, b, 2.0, "linear")]
    key = Rounding("stochastic").key("w") if rule == "stochastic" else None
    space = subspace_of([terms[0].right]) if rule == "subspace" else None
    q_out, s_out = torch.empty_like(q), torch.empty_like(s)
    scratch = torch.empty(fp8_scratch_elements(rows, cols, scheme, q.device))
    best = float("inf")
    with torch_threads(threads):
        for _ in range(repeats):
            t = time.perf_counter()
            merge_fp8_rows(q, s, scheme, terms, q_out, s_out, None, scratch, key=key, space=space)
            best = min(best, time.perf_counter() - t)
    return best / (rows * cols) * 1e9


def pass_ns_per_element(kernels: native.Fp8Kernels, rows: int = 128, cols: int = 8192, repeats: int = 31
                        ) -> dict[str, float]:  # fmt: skip
    """ns per element of each pass of one native step, best of ``repeats``, on one thread."""
    g = torch.Generator().manual_seed(0)
    block, fmt = (128, 128), torch.float8_e4m3fn
    w = torch.randn(rows, cols, generator=g) * 0.02
    q, s = quantize_fp8(w, Fp8Scheme("block", block), fmt, (-(-rows // 128), -(-cols // 128)))
    a, b = torch.randn(16, cols, generator=g) / cols**0.5, torch.randn(rows, 16, generator=g) * 1e-3
    strip, q_out, s_out = torch.empty(rows, cols), torch.empty_like(q), torch.empty_like(s)
    base, sums, space = (q, s), torch.zeros(3, dtype=torch.float64), subspace_of([a])
    passes = {
        "decode and scale": lambda: kernels.decode(q, strip, 0, s, block),
        "addmm (torch)": lambda: strip.addmm_(b, a, alpha=2.0),
        "tile maxima": lambda: kernels.scales(strip, 0, block, fmt, s_out),
        "nearest": lambda: kernels.encode(strip, q_out, 0, s_out, block, base=base, sums=sums),
        "stochastic": lambda: kernels.encode(strip, q_out, 0, s_out, block, stream=(7, 0), base=base, sums=sums),
        "subspace": lambda: kernels.subspace(strip, q_out, 0, s_out, block, base=base, space=space, sums=sums),
    }
    out = {}
    with torch_threads(1):
        for name, fn in passes.items():
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            out[name] = best / (rows * cols) * 1e9
    return out


def main() -> None:
    print(f"merge_fp8_rows, 2048 x 8192 e4m3 (128x128 blocks), rank 16, best of 7; {machine()}")
    paths = ["native", "torch"] if native.fp8_kernels() is not None else ["torch"]
    for path in paths:
        os.environ["LORATOOL_NATIVE"] = "1" if path == "native" else "0"
        for rule in RULES if path == "native" else RULES[:2]:
            for threads in sorted({1, available_cores()}):
                ns = ns_per_element(threads, rule)
                print(f"  {path:6s}  {rule:10s}  {threads:2d} thread(s)   {ns:5.2f} ns per element")
    os.environ["LORATOOL_NATIVE"] = "1"
    kernels = native.fp8_kernels()
    if kernels is not None:
        print("  one native step (128 x 8192), pass by pass, one thread (rounding: the rule's encode, kept sums too):")
        for name, ns in pass_ns_per_element(kernels).items():
            print(f"    {name:18s} {ns:5.2f} ns per element")


if __name__ == "__main__":
    main()
