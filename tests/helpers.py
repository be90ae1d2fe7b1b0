"""Tiny models and adapters for tests (no network, seconds to build)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)


def tiny_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config()) if kind == "llama" else GPT2LMHeadModel(gpt2_config())
    return model.to(dtype).eval()


def load_model(kind: str, path: Path, dtype: torch.dtype = torch.float32):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cls = LlamaForCausalLM if kind == "llama" else GPT2LMHeadModel
    return cls.from_pretrained(path, dtype=dtype).eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def file_digest(path: Path) -> str:
    """sha256 over every file under ``path`` (names and bytes), to prove inputs are untouched."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def peft_adapter(model, targets, *, r=4, alpha=8, seed=0, **config):
    """A PEFT model whose lora_B are random (PEFT starts them at zero)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # the factors PEFT starts at zero
                p.copy_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return pm.eval()


def edit_tensors(file: Path, edit) -> None:
    """Rewrite a safetensors file after ``edit(tensors)`` changed its dict, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata=metadata)


def load_adapter_deltas(path: Path) -> dict[str, torch.Tensor]:
    """B @ A (float64) per module of a PEFT adapter directory, read with safetensors alone."""
    from safetensors.torch import load_file

    ts = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, a in ts.items():
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_suffix):
                module = key[: -len(a_suffix)]
                out[module] = ts[module + b_suffix].double() @ a.double()  # (out, r) @ (r, in)
    return out


def adapter_deltas(adapter: Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """scale * lora_alpha / r * B @ A (float64) of each module of a PEFT adapter directory without
    rank or alpha patterns, by the base weight's name (``<module>.weight``)."""
    import json

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern"), "one scaling for every module only"
    factor = scale * cfg["lora_alpha"] / cfg["r"]
    return {
        module.removeprefix("base_model.model.") + ".weight": factor * delta
        for module, delta in load_adapter_deltas(adapter).items()
    }


def peft_deltas(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """PEFT's own delta (float64) of each LoRA module of ``model`` holding ``adapter_name``, by module path."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): layer.get_delta_weight(adapter_name).double()
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A
    }


# main_in_a_process's ``then`` that says whether torch imported its symbolic shapes (sympy: 0.3 s or more), which
# operations on a lazy read's meta tensors (a strided clone, a concatenation) set off
SYMBOLIC_SHAPES = "print('symbolic shapes:', 'torch.fx.experimental.symbolic_shapes' in sys.modules)"


def main_in_a_process(*argvs: list[str], then: str = "print('torch imported:', 'torch' in sys.modules)") -> str:
    """loratool's entry point (``loratool.cli.main``) on each command line in turn, in one fresh
    interpreter, each required to exit 0, then the statement ``then``: that interpreter's stdout."""
    code = (
        "import sys; from loratool.cli import main\n"
        f"for argv in {[[str(a) for a in argv] for argv in argvs]!r}:\n"
        "    sys.argv = ['loratool', *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (argv, e.code)\n"
        f"{then}\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout
