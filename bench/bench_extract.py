"""Extraction: loratool's randomized SVD against the exact full SVD existing extractors use.

Synthesizes a bf16 Llama-shaped pair (default: ~1.1B parameters, hidden 2048, intermediate 8192,
16 layers, slowly decaying delta spectra; bench/synth.py; ``--preset 7b``: Llama-7B's hidden 4096 and
intermediate 11008, the memory compared at half the layers), then in the same run times
`extract -r 16` (randomized, the default) and `extract -r 16 --svd exact` (torch.linalg.svd on
every delta, as kohya's and mergekit's extractors do), compares their per-module errors, and
checks that peak memory does not grow with the number of layers; the randomized extraction also
as a second run on the same pair, whose sha256 digests loratool then keeps from the first
(loratool.metadata.digests). Where the page cache can be
dropped (root on Linux), the read floor and each extraction start from a cold cache, so that both
read from the disk, but for one more extraction with the pair in the page cache (the extraction's own
work); elsewhere all read what the cache holds. With ``--mergekit PATH`` (a
``mergekit-extract-lora``, installed in a virtual environment of its own), bench_mergekit's
comparison follows on the same pair: both as whole processes, times, memories, per-module errors
and the KL at the output of a tiny trained Llama.

    python bench/bench_extract.py --workdir /tmp/loratool-bench [--layers 16] [--device cpu] [--mergekit PATH]
    python bench/bench_extract.py --workdir /tmp/loratool-bench --preset 7b --layers 2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import synth
from common import bench_main, drop_page_cache, fresh, keep_digests, machine, measure, read_floor


def ensure_pair(workdir: Path, layers: int, preset: str = "1b") -> Path:
    root = workdir / f"{preset}-l{layers}"
    if not (root / "ft" / "config.json").exists():
        shapes = dict(synth.SHAPES_1B if preset == "1b" else synth.SHAPES_7B, layers=layers)
        specs = synth.llama_specs(**shapes)
        synth.write(root / "base", specs, finetune=False, max_shard=10**9)
        synth.write(root / "ft", specs, finetune=True, max_shard=10**9)
    return root


def run(workdir: Path, layers: int, rank: int, device: str, small_layers: int = 4, mergekit: str | None = None,
        preset: str | None = None) -> dict[str, Any]:  # fmt: skip
    preset = preset or "1b"
    if preset not in ("1b", "7b"):
        raise SystemExit(f"--preset is 1b or 7b, not {preset!r}")
    if preset == "7b":  # its layers are four times the 1B's: the memory check compares half as many
        small_layers = max(1, layers // 2)
    pair = ensure_pair(workdir, layers, preset)
    cold = drop_page_cache()
    floor = read_floor(pair / "base", pair / "ft")
    common = dict(base=str(pair / "base"), finetuned=str(pair / "ft"), rank=rank, device=device, show_progress=False)
    drop_page_cache()
    fast = measure("extract", output=str(fresh(workdir / "out-rand")), **common)
    home = keep_digests(fresh(workdir / "digest-home"), pair / "base", pair / "ft")
    drop_page_cache()
    warm = measure("extract", output=str(fresh(workdir / "out-rand")), _digests=home, **common)
    read_floor(pair / "base", pair / "ft")  # into the page cache: what the extraction costs with no disk
    cached = measure("extract", output=str(fresh(workdir / "out-rand")), _digests=home, **common)
    drop_page_cache()
    exact = measure("extract", output=str(fresh(workdir / "out-exact")), svd="exact", **common)
    errs_fast = {m["module"]: m["relative_error"] for m in fast["result"]["modules"]}
    errs_exact = {m["module"]: m["relative_error"] for m in exact["result"]["modules"]}
    ratios = [errs_fast[m] / errs_exact[m] for m in errs_exact if errs_exact[m] > 0]
    small = ensure_pair(workdir, small_layers, preset)
    common_small = dict(common, base=str(small / "base"), finetuned=str(small / "ft"))
    fast_small = measure("extract", output=str(fresh(workdir / "out-small")), **common_small)
    if mergekit and preset != "1b":
        raise SystemExit("--mergekit compares on the 1B-shaped pair (bench_mergekit's)")
    if mergekit:
        import bench_mergekit  # it imports this module's ensure_pair

        versus = bench_mergekit.run(workdir, layers, rank, mergekit)  # the same pair
    return {
        "machine": machine(),
        "layers": layers,
        "preset": preset,
        "rank": rank,
        "device": device,
        "modules": len(errs_fast),
        "read_floor_s": floor,
        "cold": cold,
        "randomized_s": fast["seconds"],
        "randomized_kept_digests_s": warm["seconds"],
        "randomized_cached_s": cached["seconds"],
        "exact_s": exact["seconds"],
        "speedup": exact["seconds"] / fast["seconds"],
        "randomized_vs_read_floor": fast["seconds"] / floor,
        "error_ratio_worst": max(ratios),
        "error_ratio_mean": sum(ratios) / len(ratios),
        "mean_relative_error_randomized": sum(errs_fast.values()) / len(errs_fast),
        "mean_relative_error_exact": sum(errs_exact.values()) / len(errs_exact),
        "peak_anon_mib": fast["peak_anon_mib"],
        "peak_anon_mib_exact": exact["peak_anon_mib"],
        "peak_anon_mib_small": fast_small["peak_anon_mib"],
        "small_layers": small_layers,
        "peak_rss_mib": fast["peak_rss_mib"],
        "mergekit": versus if mergekit else None,
    }


def report(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"extract -r {r['rank']} on {r['layers']} {'Llama-7B-shaped ' if r.get('preset') == '7b' else ''}layers "
            f"({r['modules']} modules, bf16), device {r['device']}",
            f"  read floor (both checkpoints)   {r['read_floor_s']:8.1f} s   "
            + ("from the disk (page cache dropped before it and before each extraction but one)" if r.get("cold")
               else "from the page cache as it was"),
            f"  loratool (randomized SVD)       {r['randomized_s']:8.1f} s   {r['randomized_vs_read_floor']:.2f}x the read floor",
            f"    the inputs' digests kept      {r['randomized_kept_digests_s']:8.1f} s   "
            f"{r['randomized_kept_digests_s'] / r['read_floor_s']:.2f}x  (a second run on the same pair: not hashed again)",
            f"    and the pair in page cache    {r['randomized_cached_s']:8.1f} s   "
            "(digests kept, nothing read from the disk: the extraction's own work)",
            f"  exact full SVD                  {r['exact_s']:8.1f} s",
            f"  speed-up                        {r['speedup']:8.1f}x",
            f"  error ratio randomized/exact    worst {r['error_ratio_worst']:.4f}, mean {r['error_ratio_mean']:.4f}"
            f"  (mean relative error {r['mean_relative_error_randomized']:.4f} vs {r['mean_relative_error_exact']:.4f})",
            f"  peak private memory             {r['peak_anon_mib']:.0f} MiB at {r['layers']} layers, "
            f"{r['peak_anon_mib_small']:.0f} MiB at {r['small_layers']} layer{'s' if r['small_layers'] != 1 else ''} "
            f"(exact: {r['peak_anon_mib_exact']:.0f} MiB)",
        ]
        + (["  mergekit-extract-lora           not run (--mergekit PATH runs it)"] if not r.get("mergekit")
           else ["against mergekit:", *("  " + line for line in bench_mergekit_report(r["mergekit"]).splitlines())])
    )  # fmt: skip


def bench_mergekit_report(r: dict[str, Any]) -> str:
    import bench_mergekit

    return bench_mergekit.report(r)


def main() -> None:
    bench_main(
        __doc__, run, report, layers=16, rank=16,
        options={"--mergekit": "a mergekit-extract-lora to compare with",
                 "--preset": "the pair's shapes: 1b (default) or 7b (bench/synth.py's SHAPES_7B)"},
    )  # fmt: skip


if __name__ == "__main__":
    main()
