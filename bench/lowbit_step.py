"""The packed low-bit kernels' passes (csrc/lowbit.c) on one thread, against the torch passes they
replace, per format and rounding rule: ns per element of one strip (512 x 2048, a Llama-1B
projection's share), for the decode and for requantizing base + delta, the delta a rank-16
product about 1% of the weight's norm (so that nearly every group keeps its scale, as in a merge),
formed on each side (torch: a matrix product, then the passes; compiled: in the one pass).

    python bench/lowbit_step.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from loratool.quant import native, packed
from loratool.quant.layout import PackedScheme, PackedWeight

ROWS, COLS = 512, 2048
FORMATS: dict[str, tuple[PackedScheme, dict[str, torch.Tensor]]] = {
    "mxfp4": (PackedScheme("mxfp4", 32), {"codes": torch.empty(ROWS, COLS // 32, 16, dtype=torch.uint8),
                                          "scale": torch.empty(ROWS, COLS // 32, dtype=torch.uint8)}),
    "nvfp4": (PackedScheme("nvfp4", 16, divide=True), {"codes": torch.empty(ROWS, COLS // 2, dtype=torch.uint8),
                                                       "scale": torch.empty(ROWS, COLS // 16, dtype=torch.float8_e4m3fn),
                                                       "global": torch.empty(1)}),
    "int4 (groups of 128)": (PackedScheme("int", 128, 4, True),
                             {"codes": torch.empty(ROWS, COLS // 8, dtype=torch.int32),
                              "scale": torch.empty(ROWS, COLS // 128, dtype=torch.bfloat16)}),
    "int4 asym (groups of 32)": (PackedScheme("int", 32, 4, False),
                                 {"codes": torch.empty(ROWS, COLS // 8, dtype=torch.int32),
                                  "scale": torch.empty(ROWS, COLS // 32, dtype=torch.bfloat16)}),
}  # fmt: skip


def ns_per_element(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats / (ROWS * COLS) * 1e9


def torch_merge(w: PackedWeight, parts: dict[str, torch.Tensor], terms: packed.LowRank, key: int | None) -> None:
    before = packed._torch_dequantize(w, parts)
    packed.requantize(w, before + terms.left @ terms.right, parts, before=before, key=key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    packed.available_cores = native.available_cores = lambda: 1  # the compiled passes on this thread alone
    if packed._kernels() is None:
        raise SystemExit("the compiled kernels are not built here (no C compiler at install, or LORATOOL_NATIVE=0)")
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(ROWS, COLS, generator=g) * 0.02
    terms = packed.LowRank(torch.randn(ROWS, 16, generator=g) * 0.00005, torch.randn(16, COLS, generator=g))
    print(
        f"one thread, a {ROWS} x {COLS} strip; ns per element, torch passes / compiled (requantize includes forming"
        " the rank-16 delta and base + delta)"
    )
    for name, (scheme, like) in FORMATS.items():
        w = PackedWeight("w", (ROWS, COLS), {role: role for role in like}, scheme)
        parts = packed.requantize(w, w0, like, keep_scales=False).parts
        decode = (ns_per_element(partial(packed._torch_dequantize, w, parts), args.repeats),
                  ns_per_element(partial(packed._dequantize_native, w, parts), args.repeats))  # fmt: skip
        print(f"  {name:<26} decode      {decode[0]:6.2f} / {decode[1]:5.2f}  ({decode[0] / decode[1]:.1f}x)")
        for rule, key in (("nearest", None), ("stochastic", 0x5EED)):
            slow = ns_per_element(partial(torch_merge, w, parts, terms, key), max(1, args.repeats // 4))
            fast = ns_per_element(partial(packed.requantize_native, w, parts, terms, key=key), args.repeats)
            print(f"  {name:<26} {rule:<11} {slow:6.2f} / {fast:5.2f}  ({slow / fast:.1f}x)")


if __name__ == "__main__":
    main()
