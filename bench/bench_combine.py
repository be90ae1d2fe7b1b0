"""Combine: four rank-64 adapters over Llama-1B-shaped modules mixed to rank 64 with `--method svd`
(factored: QR of the stacked factors and an SVD of a 256 x 256 core), against the dense approach
existing tools use (materialize each delta, sum, full SVD), in the same run: three alternated runs
of each, every one in a fresh process (a cold start faults in fresh memory, which this VM makes
costly and uneven), best of each.

    python bench/bench_combine.py --workdir /tmp/loratool-bench [--layers 2]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from common import bench_main, fresh, machine, measure
from synth import SHAPES_1B, llama_specs

from loratool.adapter import Adapter, LoraModule
from loratool.formats import load_adapter, save_adapter
from loratool.math.linalg import squared_norm

WEIGHTS = [1.0, 0.5, -0.3, 0.8]


def make_sources(workdir: Path, layers: int, rank: int) -> list[str]:
    specs = [(n.removesuffix(".weight"), s) for n, s in llama_specs(**dict(SHAPES_1B, layers=layers))
             if len(s) == 2 and "layers." in n]  # fmt: skip
    paths = []
    for i in range(len(WEIGHTS)):
        out = workdir / f"combine-src-l{layers}-{i}"
        paths.append(str(out))
        if (out / "adapter_config.json").exists():
            continue
        g = torch.Generator().manual_seed(i)
        modules = {
            name: LoraModule(
                lora_A=torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5,
                lora_B=torch.randn(shape[0], rank, generator=g) * 0.01,
                alpha=float(rank * (i + 1)),  # different scalings per source
                use_rslora=i % 2 == 1,
            )
            for name, shape in specs
        }
        save_adapter(Adapter(modules=modules, config={"peft_type": "LORA"}), out, force=True)
    return paths


def dense_combine(paths: list[str], weights: list[float], rank: int) -> dict[str, Any]:
    """The dense approach: materialize sum_i w_i s_i B_i A_i, then a full SVD, per module."""
    sources = [load_adapter(p) for p in paths]
    errors = {}
    for name in sources[0].modules:
        delta = None
        for a, w in zip(sources, weights):
            m = a.modules[name]
            term = (m.lora_B.float() @ m.lora_A.float()) * (w * m.scaling)  # (out, r) @ (r, in) -> (out, in)
            delta = term if delta is None else delta + term
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        approx = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        errors[name] = math.sqrt(squared_norm(delta - approx) / squared_norm(delta))
    return {"errors": errors}


def run(workdir: Path, layers: int, rank: int, device: str, repeats: int = 3) -> dict[str, Any]:
    paths = make_sources(workdir, layers, rank)
    ours_runs, dense_runs = [], []
    for _ in range(repeats):  # alternated, each in a fresh process; best of each
        ours_runs.append(measure("combine", _args=[[[p, w] for p, w in zip(paths, WEIGHTS)]],
                                 output=str(fresh(workdir / "combined")), method="svd", rank=rank, device=device,
                                 show_progress=False))  # fmt: skip
        dense_runs.append(measure("bench_combine:dense_combine", paths=paths, weights=WEIGHTS, rank=rank))
    ours = min(ours_runs, key=lambda r: r["seconds"])
    dense = min(dense_runs, key=lambda r: r["seconds"])
    ours_err = {m["module"]: m["relative_error"] for m in ours["result"]["modules"]}
    diffs = [abs(ours_err[k] - v) / v for k, v in dense["result"]["errors"].items()]
    return {
        "machine": machine(),
        "layers": layers,
        "modules": len(ours_err),
        "rank": rank,
        "device": device,
        "factored_s": ours["seconds"],
        "dense_s": dense["seconds"],
        "speedup": dense["seconds"] / ours["seconds"],
        "factored_runs": [r["seconds"] for r in ours_runs],
        "dense_runs": [r["seconds"] for r in dense_runs],
        "peak_anon_mib": ours["peak_anon_mib"],
        "peak_anon_mib_dense": dense["peak_anon_mib"],
        "max_error_difference": max(diffs),
        "mean_relative_error": sum(ours_err.values()) / len(ours_err),
    }


def report(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"combine 4 rank-{r['rank']} adapters to rank {r['rank']} (--method svd) over {r['modules']} modules "
            f"({r['layers']} Llama-1B layers), device {r['device']}",
            f"  loratool (factored SVD)         {r['factored_s']:8.2f} s   peak private memory {r['peak_anon_mib']:.0f} MiB",
            f"  dense (materialize, full SVD)   {r['dense_s']:8.2f} s   peak private memory {r['peak_anon_mib_dense']:.0f} MiB",
            f"  runs (best taken)               loratool {', '.join(f'{x:.2f}' for x in r['factored_runs'])} s; "
            f"dense {', '.join(f'{x:.1f}' for x in r['dense_runs'])} s",
            f"  speed-up                        {r['speedup']:8.1f}x",
            f"  error: largest relative difference from the dense result {r['max_error_difference']:.2e} "
            f"(mean relative error {r['mean_relative_error']:.4f})",
        ]
    )


def main() -> None:
    bench_main(__doc__, run, report, layers=2, rank=64)


if __name__ == "__main__":
    main()
