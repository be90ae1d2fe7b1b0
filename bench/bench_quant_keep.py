"""What a merge into an FP8 base keeps of the adapter, at the model's output, per rounding rule.

A tiny Llama is trained here on text from one generated language (a random Markov chain), then
fine-tuned on another; loratool extracts a rank-16 adapter from the pair (a truncation of a really
trained delta), which is scaled to several sizes ||delta|| / ||W|| and merged into an FP8 e4m3
block-scaled copy of the base with each rounding rule. Each merged checkpoint is dequantized here
(q * scale, written from the format) and run through transformers on held-out text of the
fine-tune's language, against the unrounded merge ``dequant(base) + delta``:

    effect kept = 1 - KL(ref, merged) / KL(ref, base)

(1: the merged model behaves as the unrounded merge; 0: as the base without the adapter), printed
beside the weight-level ``kept`` that loratool reports, for each rounding rule: nearest (the
quantizers' own), stochastic (the mean over three seeds) and subspace (loratool's default).

    python bench/bench_quant_keep.py [--workdir /tmp/loratool-bench] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import loratool

VOCAB, SEQ, BATCH = 256, 64, 32
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZES = (0.28, 0.028, 0.0085, 0.0028)  # ||delta|| / ||W|| over the adapted weights
SEEDS = (0, 1, 2)


def language(seed: int, vocab: int = VOCAB) -> torch.Tensor:
    """A random Markov chain over the vocabulary, peaked enough to be learnable: (V, V) transitions."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(vocab, vocab, generator=g) * 2.5, dim=1)


def sample(chain: torch.Tensor, n: int, g: torch.Generator, seq: int = SEQ) -> torch.Tensor:
    """``n`` sequences of ``seq`` tokens from ``chain``, each from a uniformly drawn first token."""
    out = torch.empty(n, seq, dtype=torch.long)
    out[:, 0] = torch.randint(0, chain.shape[0], (n,), generator=g)
    for t in range(1, seq):
        out[:, t] = torch.multinomial(chain[out[:, t - 1]], 1, generator=g).squeeze(1)
    return out


def train(model: LlamaForCausalLM, chain: torch.Tensor, steps: int, lr: float, seed: int, *, batch: int = BATCH,
          seq: int = SEQ) -> float:  # fmt: skip
    """``steps`` AdamW steps of next-token loss on batches sampled from ``chain``; the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        tokens = sample(chain, batch, g, seq)
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def tiny_pair(workdir: Path, steps: int, layers: int = 4) -> tuple[Path, Path, dict[str, float]]:
    """base/ (trained on language A) and ft/ (then on language B), float32, saved by transformers."""
    base_dir, ft_dir = workdir / f"keep-base-l{layers}-s{steps}", workdir / f"keep-ft-l{layers}-s{steps}"
    losses: dict[str, float] = {}
    if not (ft_dir / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                             tie_word_embeddings=False)  # fmt: skip
        model = LlamaForCausalLM(config)
        losses["base"] = train(model, language(1), steps, 3e-3, seed=1)
        model.save_pretrained(base_dir, safe_serialization=True)
        losses["ft"] = train(model, language(2), steps // 2, 1e-3, seed=2)
        model.save_pretrained(ft_dir, safe_serialization=True)
        (workdir / f"keep-losses-l{layers}-s{steps}.json").write_text(json.dumps(losses))
    losses = json.loads((workdir / f"keep-losses-l{layers}-s{steps}.json").read_text())
    return base_dir, ft_dir, losses


def quantize_block(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 by the format's definition: per block, scale = amax / 448, q = nearest(w / scale)."""
    o, i = w.shape
    nb_o, nb_i = -(-o // block), -(-i // block)
    padded = torch.nn.functional.pad(w.abs(), (0, nb_i * block - i, 0, nb_o * block - o))
    amax = padded.view(nb_o, block, nb_i, block).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:o, :i]
    return (w / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def dequantized(path: Path, block: int) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with every FP8 weight as q * the scale of its block (float32)."""
    ts = load_file(str(path / "model.safetensors"))
    out = {}
    for name, t in ts.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = ts[name + "_scale_inv"]
            full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[: t.shape[0], : t.shape[1]]
            out[name] = t.float() * full
        else:
            out[name] = t.float()
    return out


def fp8_base(base: Path, workdir: Path, block: int) -> Path:
    out = workdir / f"keep-base-fp8-{block}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    tensors = {}
    for name, t in load_file(str(base / "model.safetensors")).items():
        if name.rsplit(".", 2)[-2] in PROJ and t.dim() == 2:
            tensors[name], tensors[name + "_scale_inv"] = quantize_block(t.float(), block)
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


def adapter_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    ts = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    out = {}
    for key, a in ts.items():
        if key.endswith(".lora_A.weight"):
            b = ts[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            out[name] = cfg["lora_alpha"] / cfg["r"] * (b.float() @ a.float())  # (out, r) @ (r, in)
    return out


class Judge:
    """KL of models given by state dicts against a reference, on held-out text of the fine-tune's
    language; any causal LM transformers builds from ``config_dir``'s config.json."""

    def __init__(self, config_dir: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).eval()
        self.tokens = sample(language(2), 64, torch.Generator().manual_seed(99))

    @torch.no_grad()
    def logprobs(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.load_state_dict(state, strict=True)
        return torch.log_softmax(self.model(input_ids=self.tokens).logits.float(), dim=-1)

    @staticmethod
    def kl(ref: torch.Tensor, other: torch.Tensor) -> float:
        return float((ref.exp() * (ref - other)).sum(-1).mean())


def run(workdir: Path, layers: int = 4, rank: int = 16, device: str = "cpu", steps: int = 300) -> dict[str, Any]:
    """The figures (run_all's signature: ``device`` is the merges'; the model runs on the CPU)."""
    base, ft, losses = tiny_pair(workdir, steps, layers)
    adapter = workdir / "keep-adapter"
    loratool.extract(base, ft, output=adapter, rank=rank, include=r"\.(" + "|".join(PROJ) + r")$", svd="exact",
                     force=True, show_progress=False)  # fmt: skip
    deltas = adapter_deltas(adapter)
    weights = {k: v for k, v in load_file(str(base / "model.safetensors")).items() if k in deltas}
    natural = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()) /
                        sum(float(w.float().square().sum()) for w in weights.values()))  # fmt: skip
    judge = Judge(base)
    rows = []
    for block in (32, 128):
        fp8 = fp8_base(base, workdir, block)
        base_state = dequantized(fp8, block)
        lp_base = judge.logprobs(base_state)
        for size in SIZES:
            scale = size / natural
            ref_state = {k: v + scale * deltas[k] if k in deltas else v for k, v in base_state.items()}
            lp_ref = judge.logprobs(ref_state)
            kl_base = judge.kl(lp_ref, lp_base)
            row: dict[str, Any] = {"block": block, "size": size, "kl_base": kl_base}
            for rule, seeds in (("nearest", (0,)), ("stochastic", SEEDS), ("subspace", (0,))):
                effects, kepts = [], []
                for seed in seeds:
                    out = workdir / "keep-merged"
                    res = loratool.merge(fp8, [(str(adapter), scale)], output=out, rounding=rule, seed=seed,
                                         device=device, force=True, show_progress=False)  # fmt: skip
                    q = res.quantization
                    assert q is not None
                    kepts.append(q["kept"])
                    effects.append(1 - judge.kl(lp_ref, judge.logprobs(dequantized(out, block))) / kl_base)
                row[rule] = {"effect_kept": sum(effects) / len(effects), "effects": effects,
                             "kept": sum(kepts) / len(kepts), "noise": q["noise"]}  # fmt: skip
            rows.append(row)
    shutil.rmtree(workdir / "keep-merged", ignore_errors=True)
    return {"natural_size": natural, "losses": losses, "rows": rows, "steps": steps, "rank": rank, "layers": layers}


def report(r: dict[str, Any]) -> str:
    lines = [
        f"a rank-{r['rank']} adapter extracted from a tiny Llama fine-tune ({r['layers']} layers, hidden 256, trained in "
        f"this script: {r['steps']} + {r['steps'] // 2} steps, final losses {r['losses']['base']:.2f} and "
        f"{r['losses']['ft']:.2f}; its own size ||delta|| / ||W|| = {r['natural_size']:.1%}), scaled,",
        "merged into FP8 e4m3 block-scaled copies of the base; effect kept = 1 - KL(ref, merged) / KL(ref, base) on",
        "held-out text of the fine-tune's language (ref: dequant(base) + delta, unrounded); stochastic: mean of "
        f"{len(SEEDS)} seeds",
        "",
        f"{'block':>5} {'||d||/||W||':>11} {'KL(ref,base)':>12} | {'nearest: effect':>15} {'kept':>5} {'noise':>5} | "
        f"{'stochastic: effect':>18} {'kept':>5} {'noise':>5} | {'subspace: effect':>16} {'kept':>5} {'noise':>5}",
    ]
    for row in r["rows"]:
        cells = [f"{row['block']:>5} {row['size']:>11.2%} {row['kl_base']:>12.3e}"]
        for rule, width in (("nearest", 15), ("stochastic", 18), ("subspace", 16)):
            c = row[rule]
            cells.append(f"{c['effect_kept']:>{width}.3f} {c['kept']:>5.3f} {c['noise']:>5.3f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(args.workdir, args.layers, args.rank, args.device, args.steps)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
