"""GPU against CPU: loratool merge of a rank-16 adapter into the bf16 and the FP8 block-scaled
Llama-1B-shaped checkpoints of bench_merge and bench_fp8, with ``--device cuda`` and
``--device cpu`` on the same machine, beside a plain copy of the same files, all in one run.

Merge is streaming: the arithmetic is a rank-r product per weight (and FP8's dozen elementwise
passes), so a GPU pays off only if the bytes cross the bus as fast as the disk moves them. Beside
the copy: the read + write floor through loratool's own writer (O_DIRECT), the sha256 of the
checkpoint's files that every merge computes for its provenance, and each merge's CPU time.

Extraction too (``--extract-layers N``, 0 to skip; run_all runs 32): `extract -r 16` on a synthetic
Llama-7B-shaped pair (bench/synth.py's SHAPES_7B, N layers, written to --workdir on the device's own
disk) on the device, randomized and ``--svd exact``, against the read floor of the two checkpoints;
and ``--svd exact`` on the device against the host's CPU on a 2-layer pair of the same shapes (the
CPU's exact SVD of all 7B shapes takes hours).

    python bench/bench_gpu.py --workdir /tmp/loratool-bench [--layers 16] [--extract-layers 32]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import synth
from bench_extract import ensure_pair
from bench_fp8 import make_fp8
from bench_merge import make_adapter
from common import bench_main, copy_tree, direct_copy_tree, fresh, hash_seconds, machine, measure, read_floor


def ensure_base(workdir: Path, layers: int) -> Path:
    """The bf16 base of bench_extract's pair (only the base: no fine-tune is needed here)."""
    base = workdir / f"1b-l{layers}" / "base"
    if not (base / "config.json").exists():
        synth.write(base, synth.llama_specs(**dict(synth.SHAPES_1B, layers=layers)), finetune=False, max_shard=10**9)
    return base


def run(workdir: Path, layers: int, rank: int, device: str, repeats: int = 2,
        extract_layers: int | str | None = None) -> dict[str, Any]:  # fmt: skip
    device = device if device.startswith("cuda") else "cuda"  # against the CPU: run_all passes "cpu" by default
    out = run_merge(workdir, layers, rank, device, repeats)
    if (n := 32 if extract_layers is None else int(extract_layers)) > 0:
        out["extract"] = run_extract(workdir, n, rank, device)
    return out


def run_extract(workdir: Path, layers: int, rank: int, device: str, exact_layers: int = 2) -> dict[str, Any]:
    """extract on the device (randomized and exact) against the read floor, and exact against the host's CPU."""
    pair = ensure_pair(workdir, layers, preset="7b")
    floor = read_floor(pair / "base", pair / "ft")
    common = dict(base=str(pair / "base"), finetuned=str(pair / "ft"), rank=rank, show_progress=False)
    fast = measure("extract", output=str(fresh(workdir / "gpu-rand")), device=device, **common)
    exact = measure("extract", output=str(fresh(workdir / "gpu-exact")), device=device, svd="exact", **common)
    small = ensure_pair(workdir, exact_layers, preset="7b")
    on_small = dict(common, base=str(small / "base"), finetuned=str(small / "ft"), svd="exact")
    exact_dev = measure("extract", output=str(fresh(workdir / "gpu-exact-small")), device=device, **on_small)
    exact_cpu = measure("extract", output=str(fresh(workdir / "cpu-exact-small")), device="cpu", **on_small)
    return {"layers": layers, "exact_layers": exact_layers, "floor": floor, "randomized": fast["seconds"],
            "exact": exact["seconds"], "exact_small": exact_dev["seconds"], "exact_small_cpu": exact_cpu["seconds"],
            "peak_mib": fast["peak_anon_mib"]}  # fmt: skip


def run_merge(workdir: Path, layers: int, rank: int, device: str, repeats: int) -> dict[str, Any]:
    base = ensure_base(workdir, layers)
    adapter = make_adapter(base, workdir / f"adapter-l{layers}", rank)
    checkpoints = {"bf16": base, "fp8": make_fp8(base, workdir / f"1b-l{layers}-fp8")}
    out: dict[str, Any] = {"machine": machine(), "layers": layers, "rank": rank, "repeats": repeats}
    for name, ckpt in checkpoints.items():
        runs: dict[str, list[float]] = {"copy": [], "floor": [], device: [], "cpu": []}
        cpu_s: dict[str, list[float]] = {device: [], "cpu": []}
        for _ in range(repeats):  # alternated, best of each
            runs["copy"].append(copy_tree(ckpt, fresh(workdir / "copy")))
            fresh(workdir / "copy")
            runs["floor"].append(direct_copy_tree(ckpt, fresh(workdir / "copy")))
            fresh(workdir / "copy")
            for dev in (device, "cpu"):
                m = measure("merge", _args=[str(ckpt), [str(adapter)]], output=str(fresh(workdir / "merged")),
                            device=dev, show_progress=False)  # fmt: skip
                runs[dev].append(m["seconds"])
                cpu_s[dev].append(m["cpu_seconds"])
            fresh(workdir / "merged")
        out[name] = {k: min(v) for k, v in runs.items()} | {"runs": runs, "sha256": hash_seconds(ckpt)}
        out[name]["cpu_s"] = {dev: cpu_s[dev][runs[dev].index(min(runs[dev]))] for dev in cpu_s}  # of the fastest
        out[name]["gib"] = sum(f.stat().st_size for f in ckpt.iterdir()) / 2**30
    out["device"] = device
    return out


def report(r: dict[str, Any]) -> str:
    dev = r["device"]
    lines = [f"merge a rank-{r['rank']} adapter ({r['layers']} Llama-1B layers), --device {dev} against --device cpu, "
             f"best of {r['repeats']}"]  # fmt: skip
    for name in ("bf16", "fp8"):
        x = r[name]
        lines += [
            f"  {name} ({x['gib']:.2f} GiB)   copy {x['copy']:5.1f} s   {dev} {x[dev]:5.1f} s   cpu {x['cpu']:5.1f} s"
            f"   {dev}/cpu {x[dev] / x['cpu']:.2f}x   {dev}/copy {x[dev] / x['copy']:.2f}x   cpu/copy {x['cpu'] / x['copy']:.2f}x",
            f"      read + write floor (O_DIRECT) {x['floor']:.1f} s   sha256 of the files {x['sha256']:.1f} s   "
            f"CPU time of the merges: {dev} {x['cpu_s'][dev]:.1f} s, cpu {x['cpu_s']['cpu']:.1f} s",
            "      runs: " + "; ".join(f"{k} " + ", ".join(f"{v:.1f}" for v in vs) for k, vs in x["runs"].items()),
        ]
    return "\n".join(lines + (report_extract(r["extract"], r["rank"], dev) if "extract" in r else []))


def report_extract(e: dict[str, Any], rank: int, dev: str) -> list[str]:
    return [
        f"extract -r {rank} on a Llama-7B-shaped pair ({e['layers']} layers, bf16), --device {dev}",
        f"  read floor (both checkpoints) {e['floor']:6.1f} s",
        f"  randomized SVD                {e['randomized']:6.1f} s   {e['randomized'] / e['floor']:.2f}x the read floor"
        f"   (target 1.5x; peak private memory {e['peak_mib']:.0f} MiB)",
        f"  --svd exact                   {e['exact']:6.1f} s   {e['exact'] / e['floor']:.2f}x the read floor",
        f"  --svd exact on {e['exact_layers']} layers: {dev} {e['exact_small']:.1f} s, the host's CPU "
        f"{e['exact_small_cpu']:.1f} s, {e['exact_small_cpu'] / e['exact_small']:.1f}x (target 10x)",
    ]


def main() -> None:
    bench_main(__doc__, run, report, layers=16, rank=16,
               options={"--extract-layers": "layers of the 7B-shaped extract pair (0: merge only; default 32)"})  # fmt: skip


if __name__ == "__main__":
    main()
