"""Extract on mixture-of-experts checkpoints (experts stored per expert, as Mixtral and Qwen3-MoE do).

A synthetic MoE pair (8 experts x 4 layers: each expert's gate/up/down, the router, attention)
against a dense pair holding the same number of modules of the same shapes (the expert MLPs laid
out as dense layers), in the same run: time per module should match, and peak memory should not
grow with the number of layers (an 8-layer MoE pair beside the 4-layer one).

    python bench/bench_moe.py --workdir /tmp/loratool-bench [--layers 4] [--rank 16]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import synth
from common import bench_main, fresh, machine, measure

HIDDEN, EXPERT_FF, EXPERTS, KV = 1024, 1408, 8, 256


def _attention(p: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (f"{p}.self_attn.k_proj.weight", (KV, HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (KV, HIDDEN)), (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN))]  # fmt: skip


def _mlp(p: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{p}.gate_proj.weight", (EXPERT_FF, HIDDEN)), (f"{p}.up_proj.weight", (EXPERT_FF, HIDDEN)),
            (f"{p}.down_proj.weight", (HIDDEN, EXPERT_FF))]  # fmt: skip


def moe_specs(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    specs: list[tuple[str, tuple[int, ...]]] = []
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += _attention(p) + [(f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN))]
        for e in range(EXPERTS):
            specs += _mlp(f"{p}.mlp.experts.{e}")
    return specs


def dense_specs(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The same modules of the same shapes as :func:`moe_specs`, as dense layers (no router)."""
    specs: list[tuple[str, tuple[int, ...]]] = []
    for i in range(layers * EXPERTS):
        p = f"model.layers.{i}"
        specs += (_attention(p) if i < layers else []) + _mlp(f"{p}.mlp")
    return specs


def moe3d_specs(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Experts stored as 3-D parameters, as transformers holds them (E, out, in): gate and up fused."""
    specs: list[tuple[str, tuple[int, ...]]] = []
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += _attention(p) + [(f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN)),
                                  (f"{p}.mlp.experts.gate_up_proj", (EXPERTS, 2 * EXPERT_FF, HIDDEN)),
                                  (f"{p}.mlp.experts.down_proj", (EXPERTS, HIDDEN, EXPERT_FF))]  # fmt: skip
    return specs


def dense3d_specs(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """:func:`moe3d_specs`' modules as 2-D dense layers of the same shapes."""
    specs: list[tuple[str, tuple[int, ...]]] = []
    for i in range(layers * EXPERTS):
        p = f"model.layers.{i}"
        specs += (_attention(p) if i < layers else []) + [(f"{p}.mlp.gate_up_proj.weight", (2 * EXPERT_FF, HIDDEN)),
                                                          (f"{p}.mlp.down_proj.weight", (HIDDEN, EXPERT_FF))]  # fmt: skip
    return specs


def ensure(workdir: Path, name: str, specs: list[tuple[str, tuple[int, ...]]]) -> Path:
    root = workdir / name
    if not (root / "ft" / "config.json").exists():
        synth.write(root / "base", specs, finetune=False, max_shard=10**9)
        synth.write(root / "ft", specs, finetune=True, max_shard=10**9)
    return root


def run(workdir: Path, layers: int, rank: int, device: str) -> dict[str, Any]:
    pairs = {"moe": ensure(workdir, f"moe-l{layers}", moe_specs(layers)),
             "dense": ensure(workdir, f"dense-l{layers}", dense_specs(layers)),
             "moe_big": ensure(workdir, f"moe-l{2 * layers}", moe_specs(2 * layers)),
             "moe3d": ensure(workdir, f"moe3d-l{layers}", moe3d_specs(layers)),
             "dense3d": ensure(workdir, f"dense3d-l{layers}", dense3d_specs(layers))}  # fmt: skip
    out: dict[str, Any] = {"machine": machine(), "layers": layers, "rank": rank, "device": device}
    for name, pair in pairs.items():
        m = measure("extract", base=str(pair / "base"), finetuned=str(pair / "ft"), rank=rank, device=device,
                    output=str(fresh(workdir / f"out-{name}")), show_progress=False)  # fmt: skip
        modules = m["result"]["modules"]
        experts = [x for x in modules if ".experts." in x["module"]]
        out[name] = {"seconds": m["seconds"], "modules": len(modules), "experts": len(experts),
                     "peak_anon_mib": m["peak_anon_mib"], "per_module_s": m["seconds"] / len(modules)}  # fmt: skip
    out["per_module_ratio"] = out["moe"]["per_module_s"] / out["dense"]["per_module_s"]
    out["per_module_ratio_3d"] = out["moe3d"]["per_module_s"] / out["dense3d"]["per_module_s"]
    return out


def report(r: dict[str, Any]) -> str:
    moe, dense, big, m3, d3 = r["moe"], r["dense"], r["moe_big"], r["moe3d"], r["dense3d"]
    return "\n".join([
        f"extract -r {r['rank']}, {EXPERTS} experts x {r['layers']} layers (hidden {HIDDEN}, expert FF {EXPERT_FF}, "
        f"bf16), device {r['device']}",
        f"  MoE   {moe['modules']:4d} modules ({moe['experts']} expert projections + router + attention)  "
        f"{moe['seconds']:6.1f} s   {1000 * moe['per_module_s']:.0f} ms per module",
        f"  dense {dense['modules']:4d} modules of the same shapes                           "
        f"{dense['seconds']:6.1f} s   {1000 * dense['per_module_s']:.0f} ms per module",
        f"  per module, MoE / dense: {r['per_module_ratio']:.2f}x",
        f"  peak private memory: {moe['peak_anon_mib']:.0f} MiB at {r['layers']} layers, "
        f"{big['peak_anon_mib']:.0f} MiB at {2 * r['layers']} layers ({big['modules']} modules)",
        "experts as 3-D parameters (E, out, in), gate and up fused; one SVD per expert:",
        f"  MoE   {m3['modules']:4d} modules ({m3['experts']} expert slices + router + attention)      "
        f"{m3['seconds']:6.1f} s   {1000 * m3['per_module_s']:.0f} ms per module   "
        f"peak {m3['peak_anon_mib']:.0f} MiB",
        f"  dense {d3['modules']:4d} modules of the same shapes                           "
        f"{d3['seconds']:6.1f} s   {1000 * d3['per_module_s']:.0f} ms per module   peak {d3['peak_anon_mib']:.0f} MiB",
        f"  per module, MoE / dense: {r['per_module_ratio_3d']:.2f}x",
    ])  # fmt: skip


def main() -> None:
    bench_main(__doc__, run, report, layers=4, rank=16)


if __name__ == "__main__":
    main()
