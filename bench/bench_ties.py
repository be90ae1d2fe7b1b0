"""TIES: loratool combine --method ties_svd of 4 rank-64 adapters on Llama-1B shapes, against PEFT's
add_weighted_adapter(combination_type="ties_svd") on the same adapters, in the same run.

PEFT works on a model: it builds the base in memory, loads every adapter into it, and merges module
by module (a full SVD, ``full_matrices=True``, of each dense delta). loratool reads the adapters'
files and never needs the base. Both run in fresh processes; peak private memory is measured as in
the other benches.

    python bench/bench_ties.py --workdir /tmp/loratool-bench [--layers 2]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_combine import WEIGHTS, make_sources
from common import bench_main, fresh, machine, measure

DENSITY = 0.5


def peft_ties_svd(paths: list[str], weights: list[float], rank: int, density: float, layers: int) -> dict[str, Any]:
    """PEFT's way: a Llama-1B-shaped model of ``layers`` layers in memory, the adapters loaded into it."""
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000)  # fmt: skip
    model = PeftModel.from_pretrained(LlamaForCausalLM(config), paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(p, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(paths))]
    model.add_weighted_adapter(names, weights, "mix", combination_type="ties_svd", svd_rank=rank, density=density)
    return {"modules": sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "mix" in m.lora_A)}


def run(workdir: Path, layers: int, rank: int, device: str, repeats: int = 2) -> dict[str, Any]:
    paths = make_sources(workdir, layers, rank)
    ours, theirs = [], []
    for _ in range(repeats):  # alternated, best of each
        ours.append(measure("combine", _args=[[[p, w] for p, w in zip(paths, WEIGHTS)]],
                            output=str(fresh(workdir / "ties-ours")), method="ties_svd", density=DENSITY, rank=rank,
                            device=device, show_progress=False))  # fmt: skip
        theirs.append(measure("bench_ties:peft_ties_svd", paths=paths, weights=WEIGHTS, rank=rank, density=DENSITY,
                              layers=layers))  # fmt: skip
    best_ours, best_theirs = min(ours, key=lambda m: m["seconds"]), min(theirs, key=lambda m: m["seconds"])
    return {
        "machine": machine(), "layers": layers, "rank": rank, "device": device, "density": DENSITY,
        "modules": len(best_ours["result"]["modules"]),
        "ours_s": best_ours["seconds"], "peft_s": best_theirs["seconds"],
        "ours_runs": [m["seconds"] for m in ours], "peft_runs": [m["seconds"] for m in theirs],
        "ours_mib": max(m["peak_anon_mib"] for m in ours), "peft_mib": max(m["peak_anon_mib"] for m in theirs),
    }  # fmt: skip


def report(r: dict[str, Any]) -> str:
    runs = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    return "\n".join(
        [
            f"combine 4 rank-{r['rank']} adapters with ties_svd (density {r['density']}) to rank {r['rank']} over "
            f"{r['modules']} modules ({r['layers']} Llama-1B layers), device {r['device']}",
            f"  loratool                        {r['ours_s']:8.1f} s   best of {runs(r['ours_runs'])}; "
            f"peak private memory {r['ours_mib']:.0f} MiB",
            f"  PEFT add_weighted_adapter       {r['peft_s']:8.1f} s   best of {runs(r['peft_runs'])}; "
            f"peak private memory {r['peft_mib']:.0f} MiB (the model included: PEFT needs it)",
            f"  speed-up                        {r['peft_s'] / r['ours_s']:8.1f}x   (target: at least 5x)",
            f"  memory                          {r['peft_mib'] / r['ours_mib']:8.1f}x less   (target: at least 3x)",
        ]
    )


def main() -> None:
    bench_main(__doc__, run, report, layers=2, rank=64)


if __name__ == "__main__":
    main()
