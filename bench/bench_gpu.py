"""GPU against CPU: loratool merge of a rank-16 adapter into the bf16 and the FP8 block-scaled
Llama-1B-shaped checkpoints of bench_merge and bench_fp8, with ``--device cuda`` and
``--device cpu`` on the same machine, beside a plain copy of the same files, all in one run.

Merge is streaming: the arithmetic is a rank-r product per weight (and FP8's dozen elementwise
passes), so a GPU pays off only if the bytes cross the bus as fast as the disk moves them. Beside
the copy: the read + write floor through loratool's own writer (O_DIRECT), the sha256 of the
checkpoint's files that every merge computes for its provenance, and each merge's CPU time.

    python bench/bench_gpu.py --workdir /tmp/loratool-bench [--layers 16]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import synth
from bench_fp8 import make_fp8
from bench_merge import make_adapter
from common import bench_main, copy_tree, direct_copy_tree, fresh, hash_seconds, machine, measure


def ensure_base(workdir: Path, layers: int) -> Path:
    """The bf16 base of bench_extract's pair (only the base: no fine-tune is needed here)."""
    base = workdir / f"1b-l{layers}" / "base"
    if not (base / "config.json").exists():
        synth.write(base, synth.llama_specs(**dict(synth.SHAPES_1B, layers=layers)), finetune=False, max_shard=10**9)
    return base


def run(workdir: Path, layers: int, rank: int, device: str, repeats: int = 2) -> dict[str, Any]:
    device = device if device.startswith("cuda") else "cuda"  # against the CPU: run_all passes "cpu" by default
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
    return "\n".join(lines)


def main() -> None:
    bench_main(__doc__, run, report, layers=16, rank=16)


if __name__ == "__main__":
    main()
