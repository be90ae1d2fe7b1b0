"""Merges into 4-bit bases: what they keep of the adapter at the model's output, per format and
rounding rule, and how long they take against a plain copy.

Effect kept. bench_quant_keep's tiny Llama pair (trained here on two generated Markov "languages")
gives a rank-16 adapter (extracted, exact SVD), scaled to several sizes ||delta|| / ||W|| and
merged in place into 4-bit copies of the base's projections: NVFP4 (compressed-tensors layout) and
INT4 (pack-quantized, symmetric, groups of 128). A tiny gpt-oss pair, trained the same way, gives
an adapter on its 3-D experts for an MXFP4 copy (gpt-oss's ``_blocks``/``_scales``). The bases are
quantized by loratool's quantizers, which follow the producers' conventions (tests/test_lowbit.py
holds their dequantization to compressed-tensors' and transformers' own). Each merged checkpoint
is read back dequantized and run through transformers on held-out text of the fine-tune's
language, against the unrounded merge ``dequant(base) + delta``:

    effect kept = 1 - KL(ref, merged) / KL(ref, base)

beside the weight-level ``kept`` loratool reports, for nearest, stochastic (mean of 3 seeds) and
subspace rounding.

Speed. A Llama-1B-shaped bf16 checkpoint (``--layers`` layers) with its projections as INT4 and as
NVFP4; loratool merge of a rank-16 adapter by each rule, against ``cp -r`` + ``sync`` of the same
files (three copies a repeat: their time swings twofold with the page cache), best of ``--repeats``; nearest and stochastic also as a second merge into the same base,
whose sha256 for the provenance record loratool then keeps from the first (loratool.metadata.digests);
and the same merge with the compiled 4-bit pass replaced by a copy of the base's codes (``no pass``):
what the reads, writes and interpreter cost apart from the pass.

    python bench/bench_fp4.py --workdir /tmp/loratool-bench [--layers 4] [--skip-speed] [--skip-keep]
        [--rules nearest,stochastic,subspace] [--formats int4,nvfp4,mxfp4] [--extract] [--dequantize]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from bench_extract import ensure_pair
from bench_merge import TARGETS, make_adapter
from bench_quant_keep import SEEDS, Judge, adapter_deltas, language, tiny_pair, train
from common import fresh, keep_digests, machine, measure
from safetensors.torch import load_file, save_file
from shards import write_checkpoint

import loratool
from loratool.io.checkpoint import open_checkpoint
from loratool.io.logical import model_view
from loratool.io.writer import TensorSpec
from loratool.quant import packed
from loratool.quant.layout import PackedScheme, PackedWeight

SIZES = (0.28, 0.028, 0.0085)  # ||delta|| / ||W|| over the adapted weights
RULES = ("nearest", "stochastic", "subspace")
GROUP = 128  # INT4 groups
FORMATS = {
    "nvfp4": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                           "group_size": 16, "symmetric": True}}}},
    "int4": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": GROUP,
                                           "symmetric": True}}}},
}  # fmt: skip


# -- quantizing a base -------------------------------------------------------------------------------
def stored_parts(name: str, fmt: str, rows: int, cols: int) -> tuple[PackedWeight, dict[str, torch.Tensor], list[TensorSpec]]:  # fmt: skip
    """The packed weight, empty tensors of its parts (dtypes and shapes), and their specs."""
    stem = name.removesuffix("weight")
    if fmt == "nvfp4":
        like = {"codes": torch.empty(rows, cols // 2, dtype=torch.uint8),
                "scale": torch.empty(rows, cols // 16, dtype=torch.float8_e4m3fn), "global": torch.empty(1)}  # fmt: skip
        names = {
            "codes": stem + "weight_packed",
            "scale": stem + "weight_scale",
            "global": stem + "weight_global_scale",
        }
        scheme = PackedScheme("nvfp4", 16, divide=True)
    elif fmt == "int4":
        like = {"codes": torch.empty(rows, cols // 8, dtype=torch.int32),
                "scale": torch.empty(rows, -(-cols // GROUP), dtype=torch.bfloat16),
                "shape": torch.tensor([rows, cols])}  # fmt: skip
        names = {"codes": stem + "weight_packed", "scale": stem + "weight_scale", "shape": stem + "weight_shape"}
        scheme = PackedScheme("int", GROUP, 4, True)
    else:  # mxfp4: one expert's (out, in); the caller stacks them
        like = {"codes": torch.empty(rows, cols // 32, 16, dtype=torch.uint8),
                "scale": torch.empty(rows, cols // 32, dtype=torch.uint8)}  # fmt: skip
        names = {"codes": name + "_blocks", "scale": name + "_scales"}
        scheme = PackedScheme("mxfp4", 32)
    w = PackedWeight(name, (rows, cols), names, scheme)
    codes_dt = {torch.uint8: "U8", torch.int32: "I32", torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16",
                torch.float32: "F32", torch.int64: "I64"}  # fmt: skip
    specs = [TensorSpec(names[r], tuple(t.shape), codes_dt[t.dtype]) for r, t in like.items()]
    return w, like, specs


def quantize(w: PackedWeight, like: dict[str, torch.Tensor], values: torch.Tensor) -> dict[str, torch.Tensor]:
    """``values`` (float32, (rows, cols)) in ``w``'s format, by the format's quantizer, nearest."""
    return packed.requantize(w, values.float(), like, keep_scales=False).parts


def quantized_llama(src: Path, out: Path, fmt: str) -> Path:
    """``src`` with every projection in ``fmt`` (streamed tensor by tensor), as compressed-tensors lays it out."""
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open_checkpoint(src) as ck:
        specs, plan = [], {}
        for info in ck.infos():
            if info.name.removesuffix(".weight").rsplit(".", 1)[-1] in TARGETS:
                w, like, parts = stored_parts(info.name, fmt, *info.shape)
                plan[info.name] = (w, like)
                specs += parts
            else:
                specs.append(TensorSpec(info.name, info.shape, info.dtype))

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for info in ck.infos():
                if info.name in plan:
                    w, like = plan[info.name]
                    parts = quantize(w, like, ck.get(info.name))
                    yield from ((w.parts[r], parts[r]) for r in like)
                else:
                    yield info.name, ck.get(info.name)

        write_checkpoint(out, tensors(), specs, max_shard_bytes=800 * 10**6)
        config = ck.config()
    config["quantization_config"] = FORMATS[fmt]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def dequantized_state(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        view = model_view(ck)
        return {k: view.get(k).float() for k in view.keys()}


# -- effect kept ----------------------------------------------------------------------------------
def gpt_oss_pair(workdir: Path, steps: int) -> tuple[Path, Path]:
    """A tiny gpt-oss (4 experts, 2 layers) trained on language A, then B: float32."""
    import transformers as tf

    base_dir, ft_dir = workdir / f"fp4-gptoss-base-s{steps}", workdir / f"fp4-gptoss-ft-s{steps}"
    if not (ft_dir / "config.json").exists():
        torch.manual_seed(0)
        config = tf.GptOssConfig(hidden_size=128, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 vocab_size=256, max_position_embeddings=64, layer_types=["full_attention"] * 2,
                                 tie_word_embeddings=False)  # fmt: skip
        model = tf.GptOssForCausalLM(config)
        train(model, language(1), steps, 3e-3, seed=1)
        model.save_pretrained(base_dir)
        train(model, language(2), steps // 2, 1e-3, seed=2)
        model.save_pretrained(ft_dir)
    return base_dir, ft_dir


def mxfp4_gpt_oss(base: Path, out: Path) -> Path:
    """``base`` with its experts in MXFP4 (gpt-oss's layout: (E, out, in / 32, 16) blocks)."""
    fresh(out).mkdir(parents=True)
    tensors = {}
    for name, t in load_file(str(base / "model.safetensors")).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored = t.float().transpose(1, 2)  # (E, out, in)
            w, like, _ = stored_parts(name, "mxfp4", *stored.shape[1:])
            parts = [quantize(w, like, stored[e]) for e in range(stored.shape[0])]
            tensors[name + "_blocks"] = torch.stack([p["codes"] for p in parts])
            tensors[name + "_scales"] = torch.stack([p["scale"] for p in parts])
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def expert_deltas(adapter: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The delta a target_parameters adapter adds to each 3-D experts parameter (E, in, out), by PEFT."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(adapter.parent / "gptoss-config")).eval()
    model.load_state_dict(state)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    return {k: merged[k].float() - state[k] for k in state if not torch.equal(merged[k].float(), state[k])}


def keep_rows(judge: Judge, quantized: Path, adapter: Path, deltas: dict[str, torch.Tensor], natural: float,
              workdir: Path) -> list[dict[str, Any]]:  # fmt: skip
    base_state = dequantized_state(quantized)
    lp_base = judge.logprobs(base_state)
    rows = []
    for size in SIZES:
        scale = size / natural
        ref_state = {k: v + scale * deltas[k] if k in deltas else v for k, v in base_state.items()}
        lp_ref = judge.logprobs(ref_state)
        row: dict[str, Any] = {"size": size, "kl_base": judge.kl(lp_ref, lp_base)}
        for rule in RULES:
            effects, kepts, noises = [], [], []
            for seed in SEEDS if rule == "stochastic" else (0,):
                out = fresh(workdir / "fp4-merged")
                res = loratool.merge(quantized, [(str(adapter), scale)], output=out, rounding=rule, seed=seed,
                                     min_kept=0.0, show_progress=False)  # fmt: skip
                q = res.quantization
                assert q is not None
                kepts.append(q["kept"])
                noises.append(q["noise"])
                effects.append(1 - judge.kl(lp_ref, judge.logprobs(dequantized_state(out))) / row["kl_base"])
            row[rule] = {"effect_kept": sum(effects) / len(effects), "kept": sum(kepts) / len(kepts),
                         "noise": sum(noises) / len(noises)}  # fmt: skip
        rows.append(row)
    return rows


def natural_size(deltas: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(d.square().sum()) for d in deltas.values()) /
                     sum(float(state[k].square().sum()) for k in deltas))  # fmt: skip


def run_keep(workdir: Path, steps: int, rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": steps, "rank": rank, "formats": {}}
    base, ft, losses = tiny_pair(workdir, steps, 4)
    out["losses"] = losses
    adapter = workdir / "fp4-llama-adapter"
    loratool.extract(base, ft, output=adapter, rank=rank, include=r"\.(" + "|".join(TARGETS) + r")$", svd="exact",
                     force=True, show_progress=False)  # fmt: skip
    deltas = adapter_deltas(adapter)
    judge = Judge(base)
    for fmt in ("nvfp4", "int4"):
        quantized = quantized_llama(base, fresh(workdir / f"fp4-llama-{fmt}"), fmt)
        natural = natural_size(deltas, dequantized_state(quantized))
        out["formats"][fmt] = {
            "natural": natural,
            "rows": keep_rows(judge, quantized, adapter, deltas, natural, workdir),
        }
    base, ft = gpt_oss_pair(workdir, steps)
    adapter = workdir / "fp4-gptoss-adapter"
    loratool.extract(base, ft, output=adapter, rank=rank, include=r"experts\.(gate_up_proj|down_proj)$", svd="exact",
                     force=True, show_progress=False)  # fmt: skip
    quantized = mxfp4_gpt_oss(base, workdir / "fp4-gptoss-mxfp4")
    state = dequantized_state(quantized)
    fresh(workdir / "gptoss-config").mkdir()
    shutil.copy(base / "config.json", workdir / "gptoss-config" / "config.json")
    deltas = expert_deltas(adapter, state)
    natural = natural_size(deltas, state)
    out["formats"]["mxfp4 (gpt-oss experts)"] = {
        "natural": natural, "rows": keep_rows(Judge(base), quantized, adapter, deltas, natural, workdir)}  # fmt: skip
    fresh(workdir / "fp4-merged")
    return out


# -- speed ----------------------------------------------------------------------------------------
COPIES = 3  # copies a repeat: a buffered copy's time swings twofold with the page cache (the quickest is the baseline)


def merge_without_pass(*args: Any, **kwargs: Any) -> Any:
    """``loratool.merge`` with the compiled 4-bit pass replaced by a copy of the base's codes: the same
    reads, writes and interpreter work, none of the pass's arithmetic. What a merge in place costs
    apart from the pass (run through ``measure("bench_fp4:merge_without_pass", ...)``; nearest or
    stochastic, which the pass serves)."""
    from loratool.quant import packed
    from loratool.quant.rounding import Kept

    def copied(w: PackedWeight, like: packed.Parts, terms: packed.LowRank, *, key: int | None, row0: int = 0,
               codes_into: torch.Tensor | None = None) -> packed.Requantized:  # fmt: skip
        codes = codes_into.copy_(like["codes"]) if codes_into is not None else like["codes"].clone()
        return packed.Requantized({**like, "codes": codes}, Kept(1.0, 0.0, 0.0))

    class Begun:  # packed.Started's face (a merge in place begins each piece's pass ahead of its turn)
        def __init__(self, result: packed.Requantized) -> None:
            self.result = result

        def finish(self) -> packed.Requantized:
            return self.result

        def cancel(self) -> None:
            pass

    def begun(w: PackedWeight, like: packed.Parts, terms: packed.LowRank, *, key: int | None,
              codes_into: torch.Tensor) -> Begun:  # fmt: skip
        return Begun(copied(w, like, terms, key=key, codes_into=codes_into))

    packed.requantize_native = copied  # type: ignore[assignment]
    packed.start_native = begun  # type: ignore[assignment]
    return loratool.merge(*args, **kwargs)


def copy_and_sync(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t


def gpt_oss_20b_layer(workdir: Path, rank: int) -> tuple[Path, Path]:
    """One gpt-oss-20b-shaped layer (32 experts, hidden and expert width 2880; a small vocabulary) with its
    experts in MXFP4, and a rank-``rank`` PEFT adapter on both experts parameters (target_parameters),
    its lora_B random: the checkpoint and the adapter, made once."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    root = workdir / "gpt-oss-20b-l1"
    base, adapter = root / "mxfp4", root / f"adapter-r{rank}"
    if not (adapter / "adapter_config.json").exists() or not (root / "bf16" / "config.json").exists():
        torch.manual_seed(0)
        config = tf.GptOssConfig(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                                 num_hidden_layers=1, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                                 vocab_size=1024, layer_types=["full_attention"], tie_word_embeddings=False)  # fmt: skip
        model = tf.GptOssForCausalLM(config).to(torch.bfloat16).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "experts" in name and p.dim() == 3:
                    p.normal_(0, 0.02)
        model.save_pretrained(root / "bf16")  # (kept: extraction's baseline, --extract)
        mxfp4_gpt_oss(root / "bf16", base)
        targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        pm = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=targets)
        )
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(adapter)
    return base, adapter


def gpt_oss_20b_finetune(workdir: Path, rank: int) -> tuple[Path, Path, Path]:
    """:func:`gpt_oss_20b_layer`'s MXFP4 base, its bf16 original, and a fine-tune of the original: each
    expert changed by a random rank-8 product (about 0.1% of its norm), the rest as it was."""
    base, _ = gpt_oss_20b_layer(workdir, rank)
    original, ft = base.parent / "bf16", base.parent / "ft"
    if not (ft / "config.json").exists():
        g = torch.Generator().manual_seed(5)
        tensors = load_file(str(original / "model.safetensors"))
        for name, t in tensors.items():
            if t.dim() == 3:
                e, a, b = t.shape
                change = torch.randn(e, a, 8, generator=g) @ torch.randn(e, 8, b, generator=g) * 1e-3
                tensors[name] = (t.float() + change).to(t.dtype)
        fresh(ft).mkdir(parents=True)
        save_file(tensors, str(ft / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(original / "config.json", ft / "config.json")
    return base, original, ft


def run_extract(workdir: Path, rank: int, repeats: int) -> dict[str, Any]:
    """extract -r ``rank`` from the gpt-oss-20b-shaped layer's fine-tune: from its MXFP4 base and from
    its bf16 original, alternated, digests kept, best of ``repeats``."""
    base, original, ft = gpt_oss_20b_finetune(workdir, rank)
    home = keep_digests(fresh(workdir / "digest-home"), base, original, ft)
    runs: dict[str, list[float]] = {"mxfp4": [], "bf16": []}
    for _ in range(repeats):
        for name, b in (("mxfp4", base), ("bf16", original)):
            m = measure("extract", _digests=home, base=str(b), finetuned=str(ft), rank=rank,
                        output=str(fresh(workdir / "extract-fp4")), show_progress=False)  # fmt: skip
            runs[name].append(m["seconds"])
    fresh(workdir / "extract-fp4")
    return {"rank": rank, "runs": runs, "mxfp4_s": min(runs["mxfp4"]), "bf16_s": min(runs["bf16"])}


def run_dequantize(workdir: Path, rank: int, repeats: int) -> dict[str, Any]:
    """merge --dtype bfloat16 of the rank-``rank`` experts adapter into the gpt-oss-20b-shaped layer: from
    its MXFP4 base (stochastic, the default for a dequantized output, and nearest), against the same merge
    into its bf16 original; alternated, digests kept, best of ``repeats``."""
    base, adapter = gpt_oss_20b_layer(workdir, rank)
    original = base.parent / "bf16"
    home = keep_digests(fresh(workdir / "digest-home"), base, original, adapter)
    cases = {"mxfp4 stochastic": (base, "stochastic"), "mxfp4 nearest": (base, "nearest"), "bf16": (original, None)}
    runs: dict[str, list[float]] = {name: [] for name in cases}
    peak: dict[str, float] = {}
    for _ in range(repeats):
        for name, (b, rule) in cases.items():
            m = measure("merge", _args=[str(b), [str(adapter)]], _digests=home, dtype="bfloat16", rounding=rule,
                        output=str(fresh(workdir / "merged-fp4")), show_progress=False)  # fmt: skip
            runs[name].append(m["seconds"])
            peak[name] = max(peak.get(name, 0.0), m["peak_anon_mib"])
    fresh(workdir / "merged-fp4")
    best = {name: min(r) for name, r in runs.items()}
    return {"rank": rank, "runs": runs, "best": best, "peak_mib": peak}


def run_speed(workdir: Path, layers: int, rank: int, repeats: int, rules: tuple[str, ...] = RULES,
              formats: tuple[str, ...] = ("int4", "nvfp4")) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"layers": layers, "rank": rank, "formats": {}}
    for fmt in formats:
        if fmt == "mxfp4":
            base, adapter = gpt_oss_20b_layer(workdir, rank)
        else:
            pair = ensure_pair(workdir, layers)
            adapter = make_adapter(pair / "base", workdir / f"adapter-l{layers}", rank)
            base = quantized_llama(pair / "base", workdir / f"1b-l{layers}-{fmt}", fmt)
        home = keep_digests(fresh(workdir / "digest-home"), base, adapter)
        copies, times, warm = [], {r: [] for r in rules}, {r: [] for r in rules if r != "subspace"}
        kept, peak, floor = {}, {}, []
        subprocess.run(["sync"], check=True)  # the inputs just written: not the first copy's to flush
        for _ in range(repeats):  # alternated, best of each: this machine's I/O drifts from run to run
            for _ in range(COPIES):
                copies.append(copy_and_sync(base, fresh(workdir / "copy")))
            fresh(workdir / "copy")
            floor.append(measure("bench_fp4:merge_without_pass", _args=[str(base), [str(adapter)]], _digests=home,
                                 output=str(fresh(workdir / "merged-fp4")), rounding="nearest", min_kept=0.0,
                                 show_progress=False)["seconds"])  # fmt: skip
            for rule in rules:
                m = measure("merge", _args=[str(base), [str(adapter)]], output=str(fresh(workdir / "merged-fp4")),
                            rounding=rule, min_kept=0.0, show_progress=False)  # fmt: skip
                times[rule].append(m["seconds"])
                kept[rule] = m["result"]["quantization"]["kept"]
                peak[rule] = max(peak.get(rule, 0), m["peak_anon_mib"])
                if rule in warm:  # a second merge into the same base: its digest kept
                    warm[rule].append(measure("merge", _args=[str(base), [str(adapter)]], _digests=home,
                                              output=str(fresh(workdir / "merged-fp4")), rounding=rule, min_kept=0.0,
                                              show_progress=False)["seconds"])  # fmt: skip
        fresh(workdir / "merged-fp4")
        out["formats"][fmt] = {
            "gib": sum(f.stat().st_size for f in base.iterdir()) / 2**30, "copy_s": min(copies), "copy_runs": copies,
            "without_pass_s": min(floor), "without_pass_runs": floor,
            "rules": {r: {"s": min(times[r]), "runs": times[r], "vs_copy": min(times[r]) / min(copies),
                          "kept": kept[r], "peak_mib": peak[r], "kept_digests_s": min(warm[r]) if r in warm else None}
                      for r in rules},
        }  # fmt: skip
    return out


def report(r: dict[str, Any]) -> str:
    lines = [f"machine: {r['machine']}"]
    if "keep" in r:
        k = r["keep"]
        lines += [
            "",
            f"effect kept at the output (1 - KL(ref, merged) / KL(ref, base); held-out text), rank-{k['rank']} adapters "
            f"extracted from tiny pairs trained here ({k['steps']} + {k['steps'] // 2} steps); stochastic: mean of "
            f"{len(SEEDS)} seeds; kept and noise: loratool's weight-level figures (a 4-bit merge in place is refused "
            "by default below kept 0.8 or above noise 1)",
            f"{'format':>24} {'||d||/||W||':>11} {'KL(ref,base)':>12} | {'nearest: effect':>15} {'kept':>6} "
            f"{'noise':>6} | {'stochastic: effect':>18} {'kept':>6} {'noise':>6} | {'subspace: effect':>16} {'kept':>6} "
            f"{'noise':>6}",
        ]
        for fmt, f in k["formats"].items():
            for row in f["rows"]:
                cells = [f"{fmt:>24} {row['size']:>11.2%} {row['kl_base']:>12.3e}"]
                for rule, width in (("nearest", 15), ("stochastic", 18), ("subspace", 16)):
                    c = row[rule]
                    cells.append(f"{c['effect_kept']:>{width}.3f} {c['kept']:>6.3f} {c['noise']:>6.2f}")
                lines.append(" | ".join(cells))
            lines.append(f"{'':>24} (the adapter's own size: {f['natural']:.2%})")
    if "speed" in r:
        s = r["speed"]
        lines += ["", f"merge a rank-{s['rank']} adapter into a Llama-1B-shaped checkpoint ({s['layers']} layers), "
                      "projections 4-bit (mxfp4: one gpt-oss-20b-shaped layer, its 32 experts' two parameters); "
                      "against cp -r + sync of the same files (best of each)"]  # fmt: skip
        for fmt, f in s["formats"].items():
            lines.append(f"  {fmt}: {f['gib']:.2f} GiB, copy {f['copy_s']:.1f} s")
            if "without_pass_s" in f:
                lines.append(f"    {'no pass':<10} {f['without_pass_s']:6.1f} s = {f['without_pass_s'] / f['copy_s']:5.2f}x the "
                             "copy  (digests kept; the 4-bit pass replaced by a copy of the base's codes: the rest)")  # fmt: skip
            for rule, c in f["rules"].items():
                runs = ", ".join(f"{x:.1f}" for x in c["runs"])
                lines.append(f"    {rule:<10} {c['s']:6.1f} s = {c['vs_copy']:5.2f}x the copy  (runs {runs}; kept "
                             f"{c['kept']:.3f}; peak private memory {c['peak_mib']:.0f} MiB)")  # fmt: skip
                if c.get("kept_digests_s") is not None:
                    lines.append(f"      digests kept {c['kept_digests_s']:6.1f} s = {c['kept_digests_s'] / f['copy_s']:5.2f}x the "
                                 "copy  (a second merge into the same base: not hashed again)")  # fmt: skip
    if "extract" in r:
        x = r["extract"]
        lines += ["", f"extract -r {x['rank']} from a fine-tune of one gpt-oss-20b-shaped layer (its 64 expert matrices "
                      "changed), digests kept, alternated (best of each)",
                  f"  from its MXFP4 base        {x['mxfp4_s']:6.1f} s  (runs {', '.join(f'{t:.1f}' for t in x['runs']['mxfp4'])})",
                  f"  from its bf16 original     {x['bf16_s']:6.1f} s  (runs {', '.join(f'{t:.1f}' for t in x['runs']['bf16'])})",
                  f"  MXFP4 / bf16              {x['mxfp4_s'] / x['bf16_s']:6.2f}x"]  # fmt: skip
    if "dequantize" in r:
        d = r["dequantize"]
        lines += ["", f"merge --dtype bfloat16 of a rank-{d['rank']} adapter on the experts of one gpt-oss-20b-shaped "
                      "layer, digests kept, alternated (best of each)"]  # fmt: skip
        for name, t in d["best"].items():
            runs = ", ".join(f"{x:.1f}" for x in d["runs"][name])
            lines.append(f"  {'from its ' + name:<28} {t:6.1f} s = {t / d['best']['bf16']:5.2f}x the bf16 original's  "
                         f"(runs {runs}; peak private memory {d['peak_mib'][name]:.0f} MiB)")  # fmt: skip
    return "\n".join(lines)


def run(workdir: Path, layers: int = 4, rank: int = 16, device: str = "cpu", *, steps: int = 300,
        repeats: int = 2, keep: bool = True, speed: bool = True, rules: tuple[str, ...] = RULES,
        formats: tuple[str, ...] = ("int4", "nvfp4"), extract: bool = False,
        dequantize: bool = False) -> dict[str, Any]:  # fmt: skip
    """The figures (run_all's signature; the merges run on the CPU)."""
    result: dict[str, Any] = {"machine": machine()}
    if keep:
        result["keep"] = run_keep(workdir, steps, rank)
    if speed:
        result["speed"] = run_speed(workdir, layers, rank, repeats, rules, formats)
    if extract:
        result["extract"] = run_extract(workdir, rank, repeats)
    if dequantize:
        result["dequantize"] = run_dequantize(workdir, rank, repeats)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-keep", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument(
        "--rules", default=",".join(RULES), help="The rounding rules the speed part times (comma-separated)."
    )
    ap.add_argument(
        "--formats",
        default="int4,nvfp4",
        help="The speed part's bases (comma-separated): int4 and "
        "nvfp4 (--layers Llama-1B-shaped layers), mxfp4 (one gpt-oss-20b-shaped layer; made once, 0.5 GB)",
    )
    ap.add_argument(
        "--extract",
        action="store_true",
        help="Also time extract from a fine-tune of the gpt-oss-20b-shaped "
        "layer, from its MXFP4 base against its bf16 original (made once, 3.7 GB)",
    )
    ap.add_argument(
        "--dequantize",
        action="store_true",
        help="Also time merge --dtype bfloat16 into the gpt-oss-20b-shaped layer, from its MXFP4 base against its "
        "bf16 original",
    )
    ap.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(args.workdir, args.layers, args.rank, steps=args.steps, repeats=args.repeats,
                 keep=not args.skip_keep, speed=not args.skip_speed, rules=tuple(args.rules.split(",")),
                 formats=tuple(args.formats.split(",")), extract=args.extract,
                 dequantize=args.dequantize)  # fmt: skip
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
else:  # imported by bench/measure.py for merge_without_pass, before its timing starts: this module's imports
    # (transformers among them) out of the collector's way, as the command's are (a full collection timed with
    # the merge made the `no pass` line as slow as the merges at 4 layers)
    gc.collect()
    gc.freeze()
