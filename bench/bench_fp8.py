"""FP8 merge: loratool merge of a rank-16 adapter into a Llama-1B-shaped FP8 block-scaled checkpoint
(float8_e4m3fn weights, 128x128 ``weight_scale_inv``, DeepSeek-V3/Qwen3 layout), against a plain
copy of the same files and the read + write floor, in the same run (as bench_merge does for bf16).

Every projection is dequantized, merged in float32 and requantized to its blocks; the rest streams
through unchanged. The merge runs with each rounding rule (subspace, the default; stochastic;
nearest), each printed with the share of the delta the written weights carry (kept), and as a
bfloat16 checkpoint (``--dtype bfloat16``: the dequantized weights merged and rounded stochastically),
with the compiled kernels where they are built (loratool.quant.native), and again with torch's passes
alone (``LORATOOL_NATIVE=0``), for comparison.
Beside them: the merge's CPU time (all threads), and the sha256 of the base's files alone, which
every merge computes for its provenance record (DESIGN.md), on one core per file.

    python bench/bench_fp8.py --workdir /tmp/loratool-bench [--layers 16]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from bench_extract import ensure_pair
from bench_merge import TARGETS, make_adapter
from common import bench_main, copy_tree, direct_copy_tree, fresh, hash_seconds, machine, measure, read_floor
from shards import write_checkpoint

from loratool.host import available_cores
from loratool.io.checkpoint import open_checkpoint
from loratool.io.writer import TensorSpec
from loratool.quant import native
from loratool.quant.fp8 import quantize_fp8
from loratool.quant.layout import Fp8Scheme

BLOCK = (128, 128)


def make_fp8(bf16: Path, out: Path) -> Path:
    """``bf16`` with every projection quantized to FP8 in 128x128 blocks, streamed tensor by tensor."""
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    scheme = Fp8Scheme("block", BLOCK)
    with open_checkpoint(bf16) as ck:
        quantized = [i.name for i in ck.infos() if i.name.removesuffix(".weight").rsplit(".", 1)[-1] in TARGETS]
        specs = []
        for info in ck.infos():
            if info.name in quantized:
                o, i = info.shape
                specs.append(TensorSpec(info.name, info.shape, "F8_E4M3"))
                specs.append(TensorSpec(info.name + "_scale_inv", (-(-o // BLOCK[0]), -(-i // BLOCK[1])), "F32"))
            else:
                specs.append(TensorSpec(info.name, info.shape, info.dtype))

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for info in ck.infos():
                t = ck.get(info.name)
                if info.name in quantized:
                    q, s = quantize_fp8(
                        t.float(), scheme, torch.float8_e4m3fn, (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
                    )
                    yield info.name, q
                    yield info.name + "_scale_inv", s
                else:
                    yield info.name, t

        write_checkpoint(out, tensors(), specs, max_shard_bytes=800 * 10**6)
        config = ck.config()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def run(workdir: Path, layers: int, rank: int, device: str, repeats: int = 3) -> dict[str, Any]:
    pair = ensure_pair(workdir, layers)
    kernels = native.fp8_kernels() is not None
    adapter = make_adapter(pair / "base", workdir / f"adapter-l{layers}", rank)
    base = make_fp8(pair / "base", workdir / f"1b-l{layers}-fp8")
    floor = read_floor(base)
    hashed = hash_seconds(base)
    copies, floors, merges, nearest, stochastic, torch_merges, peaks, cpus = [], [], [], [], [], [], [], []
    dequantized: list[float] = []
    torch_dequantized: float | None = None
    for _ in range(repeats):  # alternated, best of each: this machine's I/O drifts from run to run
        copies.append(copy_tree(base, fresh(workdir / "copy")))
        fresh(workdir / "copy")
        floors.append(direct_copy_tree(base, fresh(workdir / "copy")))
        fresh(workdir / "copy")
        merged = measure("merge", _args=[str(base), [str(adapter)]], output=str(fresh(workdir / "merged-fp8")),
                         device=device, show_progress=False)  # fmt: skip
        merges.append(merged["seconds"])
        peaks.append(merged["peak_anon_mib"])
        cpus.append(merged["cpu_seconds"])
        near = measure("merge", _args=[str(base), [str(adapter)]], output=str(fresh(workdir / "merged-fp8")),
                       device=device, rounding="nearest", show_progress=False)  # fmt: skip
        nearest.append(near["seconds"])
        sto = measure("merge", _args=[str(base), [str(adapter)]], output=str(fresh(workdir / "merged-fp8")),
                      device=device, rounding="stochastic", show_progress=False)  # fmt: skip
        stochastic.append(sto["seconds"])
        dequantized.append(measure("merge", _args=[str(base), [str(adapter)]], output=str(fresh(workdir / "merged-fp8")),
                                   device=device, dtype="bfloat16", show_progress=False)["seconds"])  # fmt: skip
        if kernels:  # stochastic: the subspace rule's torch passes run column by column, minutes here
            torch_merges.append(_merge_without_kernels(base, adapter, workdir, device, rounding="stochastic"))
            if torch_dequantized is None:  # once: its torch passes take most of a minute
                torch_dequantized = _merge_without_kernels(base, adapter, workdir, device, dtype="bfloat16")
    result = merged["result"]
    fresh(workdir / "merged-fp8")
    return {
        "machine": machine(), "layers": layers, "rank": rank, "device": device,
        "gib": sum(f.stat().st_size for f in base.iterdir()) / 2**30,
        "shards": len(list(base.glob("*.safetensors"))), "read_floor_s": floor,
        "copy_s": min(copies), "merge_s": min(merges), "read_write_s": min(floors),
        "merge_vs_copy": min(merges) / min(copies), "merge_vs_read_write": min(merges) / min(floors),
        "copy_runs": copies, "read_write_runs": floors, "merge_runs": merges,
        "requantized": len(result["quantization"]["tensors"]),
        "kept": result["quantization"]["kept"], "noise": result["quantization"]["noise"],
        "nearest_s": min(nearest), "nearest_runs": nearest, "nearest_vs_copy": min(nearest) / min(copies),
        "nearest_kept": near["result"]["quantization"]["kept"], "nearest_noise": near["result"]["quantization"]["noise"],
        "stochastic_s": min(stochastic), "stochastic_runs": stochastic,
        "stochastic_vs_copy": min(stochastic) / min(copies), "stochastic_kept": sto["result"]["quantization"]["kept"],
        "stochastic_noise": sto["result"]["quantization"]["noise"],
        "peak_anon_mib": max(peaks), "repeats": repeats, "cores": available_cores(),
        "merge_cpu_s": cpus[merges.index(min(merges))],
        "kernels": "compiled (loratool.quant.native)" if kernels else "not built: torch's passes",
        "torch_merge_s": min(torch_merges, default=None), "torch_merge_runs": torch_merges,
        "sha256_s": hashed, "dequantized_s": min(dequantized), "dequantized_runs": dequantized,
        "torch_dequantized_s": torch_dequantized,
    }  # fmt: skip


def _merge_without_kernels(base: Path, adapter: Path, workdir: Path, device: str, **options: str) -> float:
    os.environ["LORATOOL_NATIVE"] = "0"
    try:
        return float(measure("merge", _args=[str(base), [str(adapter)]], output=str(fresh(workdir / "merged-fp8")),
                             device=device, show_progress=False, **options)["seconds"])  # fmt: skip
    finally:
        del os.environ["LORATOOL_NATIVE"]


def report(r: dict[str, Any]) -> str:
    runs = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    return "\n".join(
        [
            f"merge a rank-{r['rank']} adapter into {r['gib']:.2f} GiB of FP8 block-scaled weights (128x128) in "
            f"{r['shards']} shards ({r['layers']} layers, {r['requantized']} weights requantized), device {r['device']}",
            f"  read floor                      {r['read_floor_s']:8.1f} s",
            f"  plain copy (+ fsync)            {r['copy_s']:8.1f} s   best of {runs(r['copy_runs'])}",
            f"  loratool merge (subspace)       {r['merge_s']:8.1f} s   best of {runs(r['merge_runs'])}",
            f"  ... --rounding stochastic       {r['stochastic_s']:8.1f} s   best of {runs(r['stochastic_runs'])}",
            f"  ... --rounding nearest          {r['nearest_s']:8.1f} s   best of {runs(r['nearest_runs'])}",
            *(
                [
                    f"  stochastic, torch's passes alone {r['torch_merge_s']:7.1f} s   best of {runs(r['torch_merge_runs'])}"
                ]
                if r.get("torch_merge_s") is not None
                else []
            ),
            *(
                [
                    f"  --dtype bfloat16 (stochastic)  {r['dequantized_s']:8.1f} s   best of {runs(r['dequantized_runs'])}"
                    + (
                        f"; torch's passes alone {r['torch_dequantized_s']:.1f} s"
                        if r.get("torch_dequantized_s")
                        else ""
                    )
                ]
                if r.get("dequantized_s") is not None
                else []
            ),  # fmt: skip
            f"  read + write floor (O_DIRECT)   {r['read_write_s']:8.1f} s   best of {runs(r['read_write_runs'])}",
            f"  sha256 of the base's files      {r['sha256_s']:8.1f} s   (one after another; provenance needs them)",
            f"  CPU time of the fastest merge   {r['merge_cpu_s']:8.1f} s   ({r['merge_cpu_s'] / r['merge_s']:.1f} of "
            f"{r['cores']} cores busy on average)",
            f"  merge / copy                    {r['merge_vs_copy']:8.2f}x   (target: at most 1.5x; stochastic "
            f"{r['stochastic_vs_copy']:.2f}x, nearest {r['nearest_vs_copy']:.2f}x)",
            f"  merge / read + write floor      {r['merge_vs_read_write']:8.2f}x",
            f"  kept of the delta, subspace     {r['kept']:8.3f}    noise {r['noise']:.3f} of its norm",
            f"  kept of the delta, stochastic   {r['stochastic_kept']:8.3f}    noise {r['stochastic_noise']:.3f} of its norm",
            f"  kept of the delta, nearest      {r['nearest_kept']:8.3f}    noise {r['nearest_noise']:.3f} of its norm",
            f"  peak private memory             {r['peak_anon_mib']:.0f} MiB (largest of {r['repeats']} runs)",
            f"  FP8 kernels                     {r.get('kernels', 'n/a')}",
        ]
    )


def main() -> None:
    bench_main(__doc__, run, report, layers=16, rank=16)


if __name__ == "__main__":
    main()
