"""GGUF LoRA: loratool's converter against llama.cpp's own (convert_lora_to_gguf.py), by what llama.cpp
would add to each weight.

Three PEFT adapters on a tiny Llama (transformers' LlamaConfig, PEFT with random A and B), one plain
(one rank, one alpha), one with per-module ranks and alphas (rank_pattern, alpha_pattern: what
``extract --energy`` writes), one rsLoRA (scaling alpha / sqrt(r)), go through both converters. Each
GGUF file is read with the ``gguf`` package, and every module's delta is formed as llama.cpp's loader
forms it: ``adapter.lora.alpha / r * B @ A``, r the rank of that tensor's A. The relative error
against PEFT's own delta (``scaling * B @ A``, rows of q/k permuted as both converters permute them)
is what each file makes llama.cpp add wrongly.

    LORATOOL_LLAMA_CPP_LORA=/path/to/llama.cpp/convert_lora_to_gguf.py python bench/bench_gguf.py

(llama-cpp-python's source package holds llama.cpp: ``pip download --no-deps --no-binary :all:
llama-cpp-python``; its ``gguf-py`` folder is put on PYTHONPATH for the script.)
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from common import fresh, machine

from loratool.math.linalg import squared_norm

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
HEADS, KV_HEADS = 8, 4


def make_base(path: Path) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=256, max_position_embeddings=128,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return model


ADAPTERS: dict[str, dict[str, Any]] = {
    "plain (r 16, alpha 24)": {"r": 16, "lora_alpha": 24},
    "mixed ranks and alphas": {"r": 16, "lora_alpha": 24, "rank_pattern": {"q_proj": 4, "down_proj": 8},
                               "alpha_pattern": {"v_proj": 12, "down_proj": 40}},
    "rsLoRA (r 16, alpha 24)": {"r": 16, "lora_alpha": 24, "use_rslora": True},
}  # fmt: skip


def make_adapter(model: Any, path: Path, spec: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """A PEFT adapter with random factors; returns each module's delta as PEFT applies it."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(target_modules=list(GGUF_NAMES), init_lora_weights=False, **spec)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            path_in_model = name.removeprefix("base_model.model.")
            deltas[path_in_model] = (module.scaling["default"] * b @ a).detach().float()  # (out, r) @ (r, in)
    peft_model.save_pretrained(path)
    return deltas


def permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's reordering of q/k rows for its RoPE (convert_hf_to_gguf.py: LlamaModel.permute)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def llama_cpp_deltas(gguf_file: Path) -> dict[str, torch.Tensor]:
    """Each weight's delta as llama.cpp's loader applies it: alpha / r * B @ A (GGUF's own names)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    out = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            stem = name.removesuffix(".lora_a")
            b = tensors[stem + ".lora_b"]
            r = a.shape[0]
            out[stem] = (alpha / r if alpha else 1.0) * b @ a  # (out, r) @ (r, in)
    return out


def gguf_name(module: str) -> tuple[str, int | None]:
    layer = int(module.split(".layers.")[1].split(".")[0])
    proj = module.rsplit(".", 1)[-1]
    heads = HEADS if proj == "q_proj" else KV_HEADS if proj == "k_proj" else None
    return f"blk.{layer}.{GGUF_NAMES[proj]}.weight", heads


def errors(peft: dict[str, torch.Tensor], gguf_file: Path) -> list[float]:
    got = llama_cpp_deltas(gguf_file)
    out = []
    for module, want in peft.items():
        name, heads = gguf_name(module)
        want = permute(want, heads) if heads else want
        out.append(math.sqrt(squared_norm(got[name] - want) / squared_norm(want)))
    return out


def run(workdir: Path, script: Path) -> dict[str, Any]:
    base = fresh(workdir / "base")
    model = make_base(base)
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    rows = []
    for n, (label, spec) in enumerate(ADAPTERS.items()):
        adapter = fresh(workdir / f"adapter-{n}")
        peft = make_adapter(model, adapter, spec, seed=n)
        ours, theirs = fresh(workdir / f"loratool-{n}.gguf"), fresh(workdir / f"llama-cpp-{n}.gguf")
        subprocess.run([sys.executable, "-m", "loratool", "convert", str(adapter), "--to", "gguf", "--base", str(base),
                        "-o", str(ours), "-q"], check=True, capture_output=True)  # fmt: skip
        subprocess.run([sys.executable, str(script), str(adapter), "--base", str(base), "--outtype", "f32",
                        "--outfile", str(theirs)], check=True, capture_output=True, env=env)  # fmt: skip
        rows.append({"adapter": label, "modules": len(peft), "loratool": errors(peft, ours),
                     "llama.cpp": errors(peft, theirs)})  # fmt: skip
    return {"rows": rows}


def report(r: dict[str, Any]) -> str:
    lines = ["relative error of the delta llama.cpp would add, ||alpha/r * B @ A - PEFT's delta||_F / ||PEFT's delta||_F,",
             "per module (7 projections x 2 layers of a tiny Llama, hidden 256): the worst, and how many are off by more than 1e-3",
             f"  {'adapter':26} {'loratool convert --to gguf':>28}   {'llama.cpp convert_lora_to_gguf.py':>34}"]  # fmt: skip
    for row in r["rows"]:
        cells = []
        for tool in ("loratool", "llama.cpp"):
            e = sorted(row[tool])
            off = sum(x > 1e-3 for x in e)
            cells.append(f"worst {e[-1]:.1e}, {off:2d} of {len(e)} off")
        lines.append(f"  {row['adapter']:26} {cells[0]:>28}   {cells[1]:>34}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench/gguf"))
    ap.add_argument("--llama-cpp-lora", type=Path, default=os.environ.get("LORATOOL_LLAMA_CPP_LORA"),
                    help="llama.cpp's convert_lora_to_gguf.py (default: $LORATOOL_LLAMA_CPP_LORA)")  # fmt: skip
    args = ap.parse_args()
    if args.llama_cpp_lora is None:
        sys.exit("give llama.cpp's convert_lora_to_gguf.py: --llama-cpp-lora PATH or LORATOOL_LLAMA_CPP_LORA")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine())
    print(report(run(args.workdir, args.llama_cpp_lora)))


if __name__ == "__main__":
    main()
