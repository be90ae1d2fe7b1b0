"""Merge: loratool merge of a rank-16 adapter into a sharded bf16 Llama-shaped checkpoint, against a
plain copy of the same files (flushed to disk, as loratool's outputs are) in the same run, and
against the read + write floor (the same bytes read, then written through loratool's writer).

Also, as whole processes (interpreter start included), ``loratool merge`` against ``cp -r`` followed by
``sync``: what a user times at the shell. And the merge as a second run into the same base, whose
sha256 for the provenance record loratool then keeps from the first (loratool.metadata.digests).

On the 2-core CI VM a plain copy swings between 2 and 9 s for 2 GiB: buffered writes fault in
page-cache pages the host has reclaimed. loratool writes with O_DIRECT and does not pay that, so
the copy is timed best of three, alternated with the merges, and the floor is shown beside it.

    python bench/bench_merge.py --workdir /tmp/loratool-bench [--layers 16]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_extract import ensure_pair
from common import bench_main, copy_tree, direct_copy_tree, fresh, keep_digests, machine, measure, read_floor

from loratool.adapter import Adapter, LoraModule
from loratool.formats import save_adapter
from loratool.io.checkpoint import open_checkpoint

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base: Path, out: Path, rank: int) -> Path:
    """Random rank-``rank`` factors on every projection (bf16), as a fine-tuned LoRA would have."""
    if (out / "adapter_config.json").exists():
        return out
    g = torch.Generator().manual_seed(0)
    modules = {}
    with open_checkpoint(base) as ck:
        for info in ck.infos():
            module = info.name.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in TARGETS:
                o, i = info.shape
                modules[module] = LoraModule(
                    lora_A=(torch.randn(rank, i, generator=g) / i**0.5).bfloat16(),
                    lora_B=(torch.randn(o, rank, generator=g) * 1e-3).bfloat16(),
                    alpha=2.0 * rank,
                )
    save_adapter(Adapter(modules=modules, config={"peft_type": "LORA"}), out, force=True)
    return out


def timed_process(cmd: list[str]) -> float:
    """Seconds of one whole process, from start to exit."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def run(workdir: Path, layers: int, rank: int, device: str, small_layers: int = 4, repeats: int = 3) -> dict[str, Any]:
    pair = ensure_pair(workdir, layers)
    adapter = make_adapter(pair / "base", workdir / f"adapter-l{layers}", rank)
    floor = read_floor(pair / "base")
    home = keep_digests(fresh(workdir / "digest-home"), pair / "base", adapter)
    copies, floors, merges, peaks, cp_syncs, processes, warm = [], [], [], [], [], [], []
    for _ in range(repeats):  # alternated, best of each: this machine's I/O drifts from run to run
        cp_syncs.append(timed_process(["sh", "-c", f"cp -r {pair / 'base'} {fresh(workdir / 'copy')} && sync"]))
        fresh(workdir / "copy")
        processes.append(timed_process([sys.executable, "-m", "loratool", "merge", str(pair / "base"), str(adapter),
                                        "-o", str(fresh(workdir / "merged")), "-q"]))  # fmt: skip
        fresh(workdir / "merged")
        copies.append(copy_tree(pair / "base", fresh(workdir / "copy")))
        fresh(workdir / "copy")
        floors.append(direct_copy_tree(pair / "base", fresh(workdir / "copy")))
        fresh(workdir / "copy")
        merged = measure("merge", _args=[str(pair / "base"), [str(adapter)]], output=str(fresh(workdir / "merged")),
                         device=device, show_progress=False)  # fmt: skip
        merges.append(merged["seconds"])
        peaks.append(merged["peak_anon_mib"])
        fresh(workdir / "merged")
        warm.append(measure("merge", _args=[str(pair / "base"), [str(adapter)]], output=str(fresh(workdir / "merged")),
                            device=device, show_progress=False, _digests=home)["seconds"])  # fmt: skip
        fresh(workdir / "merged")
    small = ensure_pair(workdir, small_layers)
    small_adapter = make_adapter(small / "base", workdir / f"adapter-l{small_layers}", rank)
    peaks_small = [  # memory depends on how many buffers happen to be in flight: the largest of 3 runs
        measure("merge", _args=[str(small / "base"), [str(small_adapter)]],
                output=str(fresh(workdir / "merged-small")), device=device, show_progress=False)["peak_anon_mib"]
        for _ in range(repeats)
    ]  # fmt: skip
    return {
        "machine": machine(),
        "layers": layers,
        "rank": rank,
        "device": device,
        "gib": sum(f.stat().st_size for f in (pair / "base").iterdir()) / 2**30,
        "shards": len(list((pair / "base").glob("*.safetensors"))),
        "read_floor_s": floor,
        "copy_s": min(copies),
        "merge_s": min(merges),
        "merge_vs_copy": min(merges) / min(copies),
        "merge_kept_digests_s": min(warm),
        "merge_kept_digests_runs": warm,
        "cp_sync_s": min(cp_syncs),
        "process_s": min(processes),
        "cp_sync_runs": cp_syncs,
        "process_runs": processes,
        "read_write_s": min(floors),
        "merge_vs_read_write": min(merges) / min(floors),
        "copy_runs": copies,
        "read_write_runs": floors,
        "merge_runs": merges,
        "tensors_changed": merged["result"]["tensors_changed"],
        "peak_anon_mib": max(peaks),
        "peak_anon_mib_small": max(peaks_small),
        "small_layers": small_layers,
        "repeats": repeats,
    }


def report(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"merge a rank-{r['rank']} adapter into {r['gib']:.2f} GiB of bf16 weights in {r['shards']} shards "
            f"({r['layers']} layers, {r['tensors_changed']} tensors changed), device {r['device']}",
            f"  read floor                      {r['read_floor_s']:8.1f} s",
            f"  plain copy (+ fsync)            {r['copy_s']:8.1f} s   best of {', '.join(f'{x:.1f}' for x in r['copy_runs'])}",
            f"  loratool merge                  {r['merge_s']:8.1f} s   best of {', '.join(f'{x:.1f}' for x in r['merge_runs'])}",
            f"    the inputs' digests kept      {r['merge_kept_digests_s']:8.1f} s   best of "
            f"{', '.join(f'{x:.1f}' for x in r['merge_kept_digests_runs'])}  ({r['merge_kept_digests_s'] / r['copy_s']:.2f}x the "
            "copy; a second merge into the same base: not hashed again)",
            f"  read + write floor (O_DIRECT)   {r['read_write_s']:8.1f} s   best of {', '.join(f'{x:.1f}' for x in r['read_write_runs'])}",
            f"  merge / copy                    {r['merge_vs_copy']:8.2f}x",
            f"  merge / read + write floor      {r['merge_vs_read_write']:8.2f}x",
            "  whole processes (interpreter start included), best of each:",
            f"  cp -r && sync                   {r['cp_sync_s']:8.1f} s   runs {', '.join(f'{x:.1f}' for x in r['cp_sync_runs'])}",
            f"  loratool merge                  {r['process_s']:8.1f} s   runs {', '.join(f'{x:.1f}' for x in r['process_runs'])}",
            f"  merge / (cp -r && sync)         {r['process_s'] / r['cp_sync_s']:8.2f}x   (target: at most 1.2x)",
            f"  peak private memory             {r['peak_anon_mib']:.0f} MiB at {r['layers']} layers, "
            f"{r['peak_anon_mib_small']:.0f} MiB at {r['small_layers']} layers (largest of {r['repeats']} runs each)",
        ]
    )


def main() -> None:
    bench_main(__doc__, run, report, layers=16, rank=16)


if __name__ == "__main__":
    main()
