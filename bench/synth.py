"""Synthesize Llama-shaped checkpoint pairs for benchmarks (streamed: memory stays small).

The fine-tune differs from the base on every projection by a delta with a slowly decaying
spectrum, like real full fine-tunes: 256 directions with singular values s_i ~ i^-0.6 plus a
full-rank noise floor (so no rank captures everything and exact-vs-randomized matters).

    python bench/synth.py OUT --layers 16 --hidden 2048 --intermediate 8192   # ~1.1B parameters
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from shards import parse_size, write_checkpoint

from loratool.io.checkpoint import dtype_name
from loratool.io.writer import TensorSpec

SHAPES_1B = dict(hidden=2048, intermediate=8192, layers=16, kv_dim=512, vocab=32000)
SHAPES_7B = dict(hidden=4096, intermediate=11008, layers=32, kv_dim=4096, vocab=32000)


def llama_specs(
    hidden: int, intermediate: int, layers: int, kv_dim: int, vocab: int
) -> list[tuple[str, tuple[int, ...]]]:
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv_dim, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv_dim, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, intermediate)),
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def slow_delta(shape: tuple[int, int], g: torch.Generator, directions: int = 256, floor: float = 0.02) -> torch.Tensor:
    """A delta whose top singular values fall like i^-0.6, over a full-rank noise floor."""
    out, inp = shape
    k = min(directions, out, inp)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.6
    u = torch.randn(out, k, generator=g) / math.sqrt(out)
    v = torch.randn(k, inp, generator=g) / math.sqrt(inp)
    delta = (u * s) @ v  # (out, k) @ (k, in) -> (out, in)
    delta += floor * s[-1] * torch.randn(out, inp, generator=g) / math.sqrt(max(out, inp))
    return delta


def tensors(specs, seed: int, finetune: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for i, (name, shape) in enumerate(specs):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        w = torch.randn(shape, generator=g) * 0.02 if len(shape) >= 2 else torch.ones(shape)
        if finetune and len(shape) >= 2 and "embed" not in name and "lm_head" not in name:
            gd = torch.Generator().manual_seed(7 * 100_003 + i)
            # 3-D experts (E, out, in): one such delta per expert
            delta = (
                slow_delta(shape, gd)
                if len(shape) == 2
                else torch.stack([slow_delta(shape[1:], gd) for _ in range(shape[0])])
            )
            w += delta * (0.02 * w.norm() / delta.norm())  # a 2% change, as full fine-tunes make
        yield name, w.to(torch.bfloat16)


def write(directory: Path, specs, *, finetune: bool, max_shard: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    layout = [TensorSpec(n, s, dtype_name(torch.bfloat16)) for n, s in specs]
    write_checkpoint(directory, tensors(specs, 0, finetune), layout, max_shard_bytes=max_shard)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                       "tie_word_embeddings": False}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=["1b", "7b"], default="1b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--max-shard-size", default="1GB")
    args = ap.parse_args()
    shapes = dict(SHAPES_1B if args.preset == "1b" else SHAPES_7B)
    if args.layers:
        shapes["layers"] = args.layers
    specs = llama_specs(**shapes)
    n = sum(math.prod(s) for _, s in specs)
    print(f"{n / 1e9:.2f}B parameters per checkpoint -> {args.out}")
    write(args.out / "base", specs, finetune=False, max_shard=parse_size(args.max_shard_size))
    write(args.out / "ft", specs, finetune=True, max_shard=parse_size(args.max_shard_size))


if __name__ == "__main__":
    main()
