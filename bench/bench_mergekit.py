"""extract against mergekit's extractor (``mergekit-extract-lora``) on one synthetic Llama-1B-shaped pair.

Both run as whole processes (interpreter start included; private memory, RssAnon, sampled every
20 ms: the checkpoint pages a process maps are page cache, not counted), one after the other, each
after the pair was read once (from the page cache, then), on the same pair
(bench/synth.py: a slowly decaying spectrum over a noise floor, as full fine-tunes have); each
adapter's per-module error against the true delta, ||dW - scaling * B @ A||_F / ||dW||_F, is computed
here from the files, and the best rank-r error (exact SVD) is the floor both approach. At the output,
both extract the same rank from a tiny Llama trained here (bench_quant_keep's pair: 300 steps on one
generated language, 150 on another), each adapter is loaded through PEFT, and the KL of the
fine-tune against base + adapter on held-out text is printed beside `--svd exact`'s (loratool with
the settings mergekit's ``--no-embed-lora`` implies: embeddings, head and norms stored whole).

    python bench/bench_mergekit.py --mergekit /path/to/venv/bin/mergekit-extract-lora [--layers 16]
    LORATOOL_MERGEKIT=/path/to/venv/bin/mergekit-extract-lora python bench/run_all.py --only mergekit

mergekit is not a dependency: install it in a virtual environment of its own
(``pip install torch==2.13.0 mergekit``) and name its ``mergekit-extract-lora``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import synth
import torch
from bench_extract import ensure_pair
from common import fresh, machine, read_floor

from loratool.formats import load_adapter
from loratool.io.checkpoint import open_checkpoint
from loratool.math.linalg import squared_norm


def private_mib(pid: int) -> float:
    """RssAnon of a process: its own memory, not the checkpoint pages it maps (which RSS counts)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(seconds, peak private memory in MiB, sampled every 20 ms) of one process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, private_mib(proc.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - t
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{err[-3000:]}")
    return seconds, peak


def module_errors(
    adapter_dir: Path, base: Path, ft: Path, spectra: dict[str, torch.Tensor] | None = None
) -> dict[str, tuple[float, float]]:
    """Per module: (this adapter's relative error, the best rank-r error) against ft - base; each
    delta's singular values kept in ``spectra`` for the next adapter."""
    adapter = load_adapter(adapter_dir)
    spectra = {} if spectra is None else spectra
    out = {}
    with open_checkpoint(base) as b, open_checkpoint(ft) as f:
        for name, m in adapter.modules.items():
            key = f"{name}.weight"
            delta = f.get(key).float() - b.get(key).float()  # (out, in)
            approx = m.scaling * m.lora_B.float() @ m.lora_A.float()  # (out, r) @ (r, in)
            s = spectra[name] if name in spectra else spectra.setdefault(name, torch.linalg.svdvals(delta))
            r = m.lora_A.shape[0]
            best = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
            out[name] = (math.sqrt(squared_norm(delta - approx) / squared_norm(delta)), best)
    return out


def with_full_config(src: Path, dst: Path, layers: int) -> Path:
    """The synthetic checkpoint (linked, not copied) under the full config.json mergekit needs: it
    builds the model's tensor list from the config, where loratool reads the files' headers."""
    import json

    fresh(dst).mkdir(parents=True)
    for f in src.glob("*.safetensors*"):
        (dst / f.name).symlink_to(f)
    shapes = dict(synth.SHAPES_1B, layers=layers)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False,
              "hidden_size": shapes["hidden"], "intermediate_size": shapes["intermediate"],
              "num_hidden_layers": layers, "num_attention_heads": shapes["hidden"] // 64,
              "num_key_value_heads": shapes["kv_dim"] // 64, "vocab_size": shapes["vocab"], "torch_dtype": "bfloat16"}  # fmt: skip
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def output_kl(workdir: Path, rank: int, mergekit: str, steps: int = 300) -> dict[str, float]:
    """KL(fine-tune || base + adapter) on held-out text, per extractor, at ``rank``, on a tiny trained pair."""
    from bench_quant_keep import Judge, tiny_pair
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, ft, _ = tiny_pair(workdir, steps)
    judge = Judge(ft)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)  # noqa: E731
    ref = judge.logprobs(load(ft).state_dict())
    out = {"base": judge.kl(ref, judge.logprobs(load(base).state_dict()))}
    for name in ("loratool", "exact", "mergekit"):
        adapter = fresh(workdir / f"kl-{name}")
        if name == "mergekit":
            subprocess.run([mergekit, "--model", str(ft), "--base-model", str(base), "--out-path", str(adapter),
                            "--max-rank", str(rank), "--no-embed-lora"], check=True, capture_output=True)  # fmt: skip
        else:
            # mergekit's --no-embed-lora: embeddings, the head and the norms stored whole (its modules_to_save)
            same = ["--exclude", "embed_tokens|lm_head", "--keep-full", "norm|embed_tokens|lm_head"]
            svd = ["--svd", "exact"] if name == "exact" else []
            subprocess.run([sys.executable, "-m", "loratool", "extract", str(base), str(ft), "-r", str(rank), "-o",
                            str(adapter), "--device", "cpu", "-q", *same, *svd], check=True, capture_output=True)  # fmt: skip
        merged = PeftModel.from_pretrained(load(base), adapter).merge_and_unload()
        out[name] = judge.kl(ref, judge.logprobs(merged.state_dict()))
    return out


def run(workdir: Path, layers: int, rank: int, mergekit: str) -> dict[str, Any]:
    kl = output_kl(workdir, rank, mergekit)
    pair = ensure_pair(workdir, layers)
    base = with_full_config(pair / "base", workdir / "mk-base", layers)
    ft = with_full_config(pair / "ft", workdir / "mk-ft", layers)
    ours, theirs = fresh(workdir / "lt-adapter"), fresh(workdir / "mk-adapter")
    read_floor(base, ft)  # both tools read the pair from the page cache
    home = fresh(workdir / "mk-digest-home")  # nothing kept: the first run hashes both inputs, the later ones not
    env = dict(os.environ, LORATOOL_HOME=str(home), LORATOOL_DIGEST_CACHE="1")
    lt_runs = [timed([sys.executable, "-m", "loratool", "extract", str(base), str(ft), "-r", str(rank),
                      "-o", str(ours), "--device", "cpu", "-q", "--force"], env) for _ in range(3)]  # fmt: skip
    lt_s, lt_mib = min(t for t, _ in lt_runs), max(m for _, m in lt_runs)  # a few seconds each: best of 3
    read_floor(base, ft)
    mk_s, mk_mib = timed([mergekit, "--model", str(ft), "--base-model", str(base), "--out-path", str(theirs),
                          "--max-rank", str(rank), "--no-embed-lora"])  # fmt: skip
    spectra: dict[str, torch.Tensor] = {}
    e_lt, e_mk = module_errors(ours, base, ft, spectra), module_errors(theirs, base, ft, spectra)
    common = sorted(set(e_lt) & set(e_mk))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "layers": layers, "rank": rank, "modules": len(common), "only_loratool": len(set(e_lt) - set(e_mk)),
        "only_mergekit": len(set(e_mk) - set(e_lt)),
        "loratool_s": lt_s, "loratool_runs": [t for t, _ in lt_runs], "mergekit_s": mk_s, "loratool_mib": lt_mib, "mergekit_mib": mk_mib,
        "err_loratool": mean([e_lt[m][0] for m in common]), "err_mergekit": mean([e_mk[m][0] for m in common]),
        "err_best": mean([e_lt[m][1] for m in common]),
        "worst_excess_loratool": max(e_lt[m][0] / e_lt[m][1] for m in common),
        "worst_excess_mergekit": max(e_mk[m][0] / e_mk[m][1] for m in common), "kl": kl,
    }  # fmt: skip


def report(r: dict[str, Any]) -> str:
    return "\n".join([
        f"extract rank {r['rank']} from a synthetic Llama-1B-shaped pair ({r['layers']} layers, bf16), whole processes, CPU",
        f"  loratool extract           {r['loratool_s']:7.1f} s   peak private memory {r['loratool_mib']:6.0f} MiB"
        f"   (best of 3 runs: {', '.join(f'{t:.1f}' for t in r.get('loratool_runs', [r['loratool_s']]))}; "
        "the first hashes both inputs, the later ones keep their digests)",
        f"  mergekit-extract-lora      {r['mergekit_s']:7.1f} s   peak private memory {r['mergekit_mib']:6.0f} MiB",
        f"  mergekit / loratool        {r['mergekit_s'] / r['loratool_s']:7.1f}x time, "
        f"{r['mergekit_mib'] / r['loratool_mib']:.1f}x memory",
        f"  mean relative error over {r['modules']} modules: loratool {r['err_loratool']:.4f}, mergekit "
        f"{r['err_mergekit']:.4f}, best rank-{r['rank']} {r['err_best']:.4f}",
        f"  worst error / best, per module: loratool {r['worst_excess_loratool']:.4f}, mergekit "
        f"{r['worst_excess_mergekit']:.4f}",
        f"  modules only one of them wrote: loratool {r['only_loratool']}, mergekit {r['only_mergekit']}",
        f"  at the output (tiny trained Llama, rank {r['rank']}, PEFT), KL(fine-tune || base + adapter): "
        f"base alone {r['kl']['base']:.4f}",
        f"    loratool {r['kl']['loratool']:.4f}, mergekit {r['kl']['mergekit']:.4f}, exact SVD "
        f"{r['kl']['exact']:.4f}",
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--layers", type=int, default=16)  # the Llama-1B shape; 4 runs quicker (mergekit takes minutes)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mergekit", default=os.environ.get("LORATOOL_MERGEKIT") or shutil.which("mergekit-extract-lora"))
    args = ap.parse_args()
    if not args.mergekit:
        sys.exit("mergekit-extract-lora not found: give --mergekit PATH")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine())
    print(report(run(args.workdir, args.layers, args.rank, args.mergekit)))


if __name__ == "__main__":
    main()
