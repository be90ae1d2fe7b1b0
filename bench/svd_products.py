"""The randomized SVD's products on the CPU: oneDNN's (``linalg.thin_product``) against MKL's (``@``).

The extraction's SVD spends most of its time in products of a delta (m, n) with a block of the
sketch's width (w = rank + 8 = 24 at rank 16): ``A W`` and ``A^T Q``. MKL's single-precision
product, which torch's ``@`` calls on x86 CPUs, runs at about half the CPU's peak when one side is
this thin; oneDNN's, which torch also ships (and which ``thin_product`` calls), runs faster there.
This prints, for the Llama-1B shapes, in the same run and alternated:

- each product's speed (GFLOP/s) both ways, and the ratio of their times;
- the whole rank-16 randomized SVD (``randomized_svd``'s defaults) both ways, per element, and the
  relative difference of the singular values the two give (float32 sums in two orders).

    python bench/svd_products.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from loratool.math import linalg

SHAPES = ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192))
WIDTH = 24


def alternated(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best seconds of each, the calls interleaved so that the machine's drift falls on both."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # oneDNN builds its kernel for a shape on the first call
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def with_matmul(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with every thin product taken by ``@`` (the path before oneDNN)."""

    def run() -> object:
        saved = linalg._ONEDNN[:]
        linalg._ONEDNN[:] = [False]
        try:
            return fn()
        finally:
            linalg._ONEDNN[:] = saved

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not linalg._onednn_works():
        raise SystemExit("torch's oneDNN product is not there (or disagrees): thin_product is @ on this machine")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats}, alternated")
    print(f"products with a block of width {WIDTH}, GFLOP/s")
    print(f"  {'shape':>12s}  {'product':>8s}  {'@ (MKL)':>8s}  {'oneDNN':>8s}  oneDNN/@ time")
    g = torch.Generator().manual_seed(0)
    for m, n in SHAPES:
        a = torch.randn(m, n, generator=g)
        tall = a if m >= n else a.T  # randomized_svd works on the tall orientation
        w, q = torch.randn(tall.shape[1], WIDTH, generator=g), torch.randn(tall.shape[0], WIDTH, generator=g)
        flops = 2 * m * n * WIDTH
        for label, mat, x in (("A W", tall, w), ("A^T Q", tall.T, q)):
            t = alternated({"mm": lambda mat=mat, x=x: mat @ x, "dnn": lambda mat=mat, x=x: linalg.thin_product(mat, x)},
                           args.repeats)  # fmt: skip
            print(f"  {str((m, n)):>12s}  {label:>8s}  {flops / t['mm'] / 1e9:8.0f}  {flops / t['dnn'] / 1e9:8.0f}"
                  f"  {t['dnn'] / t['mm']:.2f}x")  # fmt: skip
    print("rank-16 randomized SVD (the extraction's defaults), ns per element")
    print(f"  {'shape':>12s}  {'@ (MKL)':>8s}  {'oneDNN':>8s}  oneDNN/@  singular values' largest relative difference")
    total = {"mm": 0.0, "dnn": 0.0}
    for m, n in SHAPES:
        d = torch.randn(m, n, generator=g) * 0.01

        def svd(d: torch.Tensor = d) -> linalg.TruncatedSVD:
            return linalg.randomized_svd(d, 16, generator=torch.Generator().manual_seed(1))

        t = alternated({"mm": with_matmul(svd), "dnn": svd}, args.repeats)
        s_mm, s_dnn = with_matmul(svd)().S, svd().S  # type: ignore[attr-defined]
        diff = float(((s_dnn - s_mm).abs() / s_mm).max())
        per = {k: v / (m * n) * 1e9 for k, v in t.items()}
        print(f"  {str((m, n)):>12s}  {per['mm']:8.2f}  {per['dnn']:8.2f}  {t['dnn'] / t['mm']:7.2f}x  {diff:.1e}")
        layer_count = {(2048, 2048): 2, (512, 2048): 2, (8192, 2048): 2, (2048, 8192): 1}[(m, n)]
        for k in total:
            total[k] += layer_count * t[k]
    print(f"  one Llama-1B layer (q, o, k, v, gate, up, down): @ {total['mm'] * 1e3:.0f} ms, oneDNN "
          f"{total['dnn'] * 1e3:.0f} ms, {total['dnn'] / total['mm']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
