"""Choose the randomized SVD's defaults by measurement.

For matrices with slowly decaying spectra (power laws S_i ~ i^-p, the shape of real fine-tune
deltas) and planted low-rank-plus-noise ones, print the worst ratio of the randomized relative
error to the exact SVD's at the same rank, over a grid of oversampling and power iterations,
with the time each takes relative to the exact SVD; for an even number of iterations also block
Krylov, which keeps every iterate of half as many (``randomized_svd(krylov=True)``).

    python bench/svd_defaults.py [--size 1024]

Then, on Llama-1B-shaped matrices (power-law spectrum 0.5), the time and error of ranks 16, 64 and
128 by four power iterations and by block Krylov of two steps, and which one randomized_svd chooses
(block Krylov where its basis is at most a sixth of the smaller side).
"""

from __future__ import annotations

import argparse
import time

import torch

from loratool.math.linalg import exact_svd, randomized_svd, relative_error, residual_error, split_factors


def with_spectrum(m: int, n: int, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g))
    return (u * s) @ v.T  # (m, k) @ (k, n) -> (m, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--ranks", default="8,16,64")
    args = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = args.size
    k = n // 2
    i = torch.arange(1, k + 1, dtype=torch.float32)
    cases = {
        "power 0.3": i**-0.3,
        "power 0.5": i**-0.5,
        "power 1.0": i**-1.0,
        "rank16+noise": torch.where(i <= 16, 1.0, 0.02),
    }
    mats = {name: with_spectrum(n, 2 * n if "noise" in name else n // 2 * 3, s, g) for name, s in cases.items()}
    ranks = [int(r) for r in args.ranks.split(",")]
    exact_err, exact_time = {}, {}
    for name, m in mats.items():
        t = time.perf_counter()
        svd = exact_svd(m)
        exact_time[name] = time.perf_counter() - t
        for r in ranks:
            exact_err[name, r] = relative_error(svd, r)
    print(f"{'oversample':>10} {'n_iter':>6} {'method':>8} {'worst err ratio':>16} {'mean time / exact':>18}")
    for oversample in (4, 8, 16, 32):
        for n_iter in (1, 2, 3, 4, 6):
            for krylov in (False, True) if n_iter >= 4 and n_iter % 2 == 0 else (False,):
                worst, times = 1.0, []
                for name, m in mats.items():
                    for r in ranks:
                        t = time.perf_counter()
                        svd = randomized_svd(m, r, oversample=oversample, n_iter=n_iter, generator=g, krylov=krylov)
                        times.append((time.perf_counter() - t) / exact_time[name])
                        b, a = split_factors(svd, r)
                        worst = max(worst, residual_error(m.clone(), b, a) / exact_err[name, r])
                method = "krylov" if krylov else "power"
                print(f"{oversample:>10} {n_iter:>6} {method:>8} {worst:>16.5f} {sum(times) / len(times):>18.4f}")

    print(
        "\n4 iterations on Llama-1B shapes (power 0.5): ms, median of 5, and error ratio to exact;"
        " the basis as a share of the smaller side, and the automatic choice"
    )
    for shape in ((512, 2048), (2048, 2048), (8192, 2048)):
        s = torch.arange(1, min(shape) + 1, dtype=torch.float32) ** -0.5
        m = with_spectrum(*shape, s, g)
        full = exact_svd(m)
        for rank in (16, 64, 128):
            if 3 * (rank + 8) >= min(shape):
                continue
            exact = relative_error(full, rank)
            cells, by_krylov = [], {}
            for krylov in (False, True):
                runs = []
                for _ in range(5):
                    t = time.perf_counter()
                    svd = randomized_svd(m, rank, generator=torch.Generator().manual_seed(1), krylov=krylov)
                    runs.append(time.perf_counter() - t)
                by_krylov[krylov] = svd
                b, a = split_factors(svd, rank)
                ratio = residual_error(m.clone(), b, a) / exact
                cells.append(f"{'krylov' if krylov else 'power'} {sorted(runs)[2] * 1e3:6.1f} ms ({ratio:.5f})")
            auto = randomized_svd(m, rank, generator=torch.Generator().manual_seed(1))
            chosen = "krylov" if torch.equal(auto.S, by_krylov[True].S) else "power"
            share = 3 * (rank + 8) / min(shape)
            print(f"  {shape[0]:>5} x {shape[1]:<5} r {rank:<4} {share:4.2f}  " + "   ".join(cells) + f"   -> {chosen}")


if __name__ == "__main__":
    main()
