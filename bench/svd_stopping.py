"""Would the randomized SVD's block Krylov steps stop early where the subspace has converged?

The extraction's SVD takes two block Krylov steps on every module (``randomized_svd``'s default,
six products of the sketch's width); each step stopped short saves two of them. This prints, for
Llama-1B-shaped deltas, the error of the rank-``k`` truncation after 0 to 3 steps relative to the
exact truncation's (from ``torch.linalg.svdvals``), and the a-posteriori test a stopping rule
would use: the energy the last step added to the top ``k`` Ritz values, over the energy still
outside them (both known without the exact SVD: ``||A||^2 - sum of the Ritz values squared`` is
the truncation's error squared). A rule that stops when that share is small can only save
products on the modules where it is small after a step that the default would have followed
with another.

Two kinds of delta, each ``ft - base`` of bfloat16 checkpoints at 2% of the weight's norm:
``slow`` is bench/synth.py's (256 directions falling like i^-0.6 over a noise floor: the bench
pair's, a full fine-tune's shape); ``merged lora`` is a rank-16 adapter merged into the base
(what extraction from a merged model meets), whose delta is rank 16 plus bfloat16's rounding.

    python bench/svd_stopping.py [--rank 16] [--seeds 2]
"""

from __future__ import annotations

import argparse
import math

import torch
from synth import slow_delta

from loratool.math.linalg import randomized_svd, squared_norm

SHAPES = ((512, 2048), (2048, 2048), (8192, 2048), (2048, 8192))


def deltas(shape: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    """``ft - base`` in float32 for each kind, the base a bfloat16 weight of N(0, 0.02) entries."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    lora = torch.randn(shape[0], 16, generator=g) @ torch.randn(16, shape[1], generator=g)
    out = {}
    for kind, d in (("slow", slow_delta(shape, g)), ("merged lora", lora)):
        ft = (w + d * (0.02 * w.norm() / d.norm())).to(torch.bfloat16)
        out[kind] = ft.float() - w.to(torch.bfloat16).float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    k, steps = args.rank, range(4)
    print(
        f"rank {k}, sketch width {k + 8}: error / exact truncation's error after each block Krylov step "
        "(step 2: today's default), and the last step's gain in the top-k energy / the energy left outside"
    )
    print(f"{'kind':>12} {'shape':>12} {'seed':>4} | " + " ".join(f"{'step ' + str(s):>8}" for s in steps)
          + " | " + " ".join(f"{'gain ' + str(s):>9}" for s in steps[1:]))  # fmt: skip
    for shape in SHAPES:
        for seed in range(args.seeds):
            for kind, d in deltas(shape, seed).items():
                total = squared_norm(d)
                exact = float((torch.linalg.svdvals(d)[:k].double() ** 2).sum())
                left, ratios = [], []
                for s in steps:  # the same sketch each time: step s's Krylov space holds step s - 1's
                    svd = randomized_svd(d, k, n_iter=2 * s, krylov=s > 0, generator=torch.Generator().manual_seed(0))
                    left.append(total - float((svd.S.double() ** 2).sum()))
                    ratios.append(math.sqrt(max(left[-1], 0.0) / (total - exact)))
                gains = [(left[s - 1] - left[s]) / left[s] for s in steps[1:]]
                print(f"{kind:>12} {shape[0]:>5} x {shape[1]:<5} {seed:>4} | " + " ".join(f"{r:8.5f}" for r in ratios)
                      + " | " + " ".join(f"{x:9.2e}" for x in gains))  # fmt: skip


if __name__ == "__main__":
    main()
