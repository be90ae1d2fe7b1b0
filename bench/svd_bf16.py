"""Would bfloat16 products speed up extraction? Measured, and not taken.

On a CPU with AVX512-BF16 (Zen 4 here), torch's bf16 matrix products run about twice as fast as
float32 ones, and a bf16 pair's difference ``wf - wb`` needs no float32 copy. This script runs
the randomized SVD's block Krylov steps as loratool runs them (two steps, oversampling 8, rank 16)
but with the delta, the sketch and the basis's blocks in bf16, the blocks' rounding undone exactly
by a Cholesky factor of their Gram matrix (so Rayleigh-Ritz projects onto the span of the rounded
basis), and prints, on Llama-1B-shaped matrices:

- the time per element of each way, the delta's forming included (float32: widened a strip at a
  time into a reused buffer, as ``stream.pipeline.widen_difference`` does);
- the error of each, as a ratio to the exact truncation's, for the bench pair's slowly decaying
  deltas (2% of the weight) and for exactly rank-16 deltas (a merged LoRA) of 2%, 30% and 100% of
  the weight, all stored in bf16 as checkpoints are.

bf16's 8-bit significand puts every block a relative 2^-9 off the subspace it stands for, and the
product's bf16 output rounds the projection as much: where the truncation's own error is large
(slow spectra) that vanishes beside it; where it is small (a merged LoRA) it does not.

    python bench/svd_bf16.py
"""

from __future__ import annotations

import math
import time

import torch
from synth import slow_delta

from loratool.math.linalg import randomized_svd, squared_norm

RANK = 16


def bf16_block_krylov(a: torch.Tensor, k: int, gen: torch.Generator, oversample: int = 8, steps: int = 2):
    """``randomized_svd``'s block Krylov with bf16 products: ``a`` (m, n) bf16, m >= n."""
    m, n = a.shape
    w = k + oversample
    omega = torch.randn(n, w, generator=gen).to(torch.bfloat16)
    q, _ = torch.linalg.qr((a @ omega).float())
    basis, blocks, rows = q, [q.to(torch.bfloat16)], []
    while True:
        rows.append((a.T @ blocks[-1]).float())  # A^T times the rounded block: exact products, bf16 sums' output
        if len(rows) > steps:
            break
        p, _ = torch.linalg.qr(rows[-1])
        q = (a @ p.to(torch.bfloat16)).float()
        for _ in range(2):
            q, _ = torch.linalg.qr(q - basis @ (basis.T @ q))
        basis = torch.cat((basis, q), 1)
        blocks.append(q.to(torch.bfloat16))
    rounded = torch.cat(blocks, 1).double()  # the basis the products saw, not quite orthonormal
    chol = torch.linalg.cholesky(rounded.T @ rounded)  # rounded @ chol^-T is orthonormal
    proj = torch.linalg.solve_triangular(chol, torch.cat(rows, 1).double().T, upper=False)  # its Q^T A
    u_small, s, vh = torch.linalg.svd(proj.float(), full_matrices=False)
    q_orth = torch.linalg.solve_triangular(chol, rounded.T, upper=False).T.float()
    return q_orth @ u_small[:, :k], s[:k], vh[:k]


def relative_error(d: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float:
    return math.sqrt(squared_norm(d - (u * s) @ vh) / squared_norm(d))


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def pair(shape: tuple[int, int], kind: str, size: float, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if kind == "slow":
        d = slow_delta(shape, g)
    else:
        d = torch.randn(shape[0], RANK, generator=g) @ torch.randn(RANK, shape[1], generator=g)
    return w.bfloat16(), (w + d * (size * w.norm() / d.norm())).bfloat16()


def timings(shape: tuple[int, int]) -> tuple[float, float]:
    wb, wf = pair(shape, "slow", 0.02)
    buf32, buf16 = torch.empty(shape), torch.empty(shape, dtype=torch.bfloat16)
    step = max(1, (1 << 20) // shape[1])

    def f32() -> None:
        for i in range(0, shape[0], step):
            buf32[i : i + step].copy_(wf[i : i + step]).sub_(wb[i : i + step].to(torch.float32))
        randomized_svd(buf32, RANK, generator=torch.Generator().manual_seed(2))

    def bf16() -> None:
        torch.sub(wf, wb, out=buf16)
        bf16_block_krylov(buf16 if shape[0] >= shape[1] else buf16.T, RANK, torch.Generator().manual_seed(2))

    n = shape[0] * shape[1]
    return best_seconds(f32) / n * 1e9, best_seconds(bf16) / n * 1e9


def errors(shape: tuple[int, int], kind: str, size: float) -> tuple[float, float]:
    wb, wf = pair(shape, kind, size)
    d32, d16 = wf.float() - wb.float(), wf - wb
    exact = torch.linalg.svd(d32, full_matrices=False).S
    best = math.sqrt(float(exact[RANK:].double().square().sum()) / squared_norm(d32))
    r = randomized_svd(d32, RANK, generator=torch.Generator().manual_seed(2))
    tall = shape[0] >= shape[1]
    u, s, vh = bf16_block_krylov(d16 if tall else d16.T, RANK, torch.Generator().manual_seed(2))
    if not tall:
        u, vh = vh.T, u.T
    return relative_error(d32, r.U, r.S, r.Vh) / best, relative_error(d32, u, s, vh) / best


def main() -> None:
    shapes = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]
    print("ns per element, the delta's forming and rank-16 randomized SVD (best of 5)")
    print(f"  {'shape':>12s}  {'float32':>8s}  {'bf16':>8s}  bf16/float32")
    for shape in shapes:
        t32, t16 = timings(shape)
        print(f"  {str(shape):>12s}  {t32:8.2f}  {t16:8.2f}  {t16 / t32:.2f}x")
    print("error / the exact truncation's, rank 16")
    print(f"  {'shape':>12s}  {'delta':>22s}  {'float32':>8s}  {'bf16':>8s}")
    for shape in shapes[:3:2]:
        for kind, size in (("slow", 0.02), ("rank16", 0.02), ("rank16", 0.3), ("rank16", 1.0)):
            label = f"{'slow spectrum' if kind == 'slow' else 'rank 16'}, {size:.0%} of W"
            e32, e16 = errors(shape, kind, size)
            print(f"  {str(shape):>12s}  {label:>22s}  {e32:8.4f}  {e16:8.4f}")


if __name__ == "__main__":
    main()
