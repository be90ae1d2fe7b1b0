"""`convert --fuse/--split`: adapters move between split (Llama) and fused (Phi-3) checkpoints.

The oracle is PEFT on both model classes: a tiny Llama and the Phi-3 model holding the very same
weights fused (q, k, v stacked into qkv_proj; gate, up into gate_up_proj) give the same logits, so
an adapter fused or split right gives the same logits on the other model too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import peft_adapter

from loratool.errors import LoraToolError
from loratool.formats import load_adapter
from loratool.ops.convert import convert

COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5,
)  # fmt: skip
FUSE = [("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))]
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def llama_and_phi3(tmp_path: Path):
    import transformers as tf

    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)).eval()
    phi3 = tf.Phi3ForCausalLM(tf.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    sd = llama.state_dict()
    fused = {}
    for k, v in sd.items():
        if ".q_proj." in k:
            fused[k.replace("q_proj", "qkv_proj")] = torch.cat(
                [sd[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            )
        elif ".gate_proj." in k:
            fused[k.replace("gate_proj", "gate_up_proj")] = torch.cat([v, sd[k.replace("gate_proj", "up_proj")]])
        elif not any(f".{p}." in k for p in ("k_proj", "v_proj", "up_proj")):
            fused[k] = v
    phi3.load_state_dict(fused)
    llama.save_pretrained(tmp_path / "llama")
    phi3.save_pretrained(tmp_path / "phi3")
    with torch.no_grad():
        assert torch.equal(llama(IDS).logits, phi3(IDS).logits)  # the premise: one model, two layouts
    return llama, phi3


def peft_logits(model_dir: Path, cls: str, adapter: Path) -> torch.Tensor:
    import transformers as tf
    from peft import PeftModel

    model = getattr(tf, cls).from_pretrained(model_dir).eval()
    with torch.no_grad():
        return PeftModel.from_pretrained(model, str(adapter)).eval()(IDS).logits


def test_llama_adapter_fused_gives_phi3_the_same_logits(tmp_path: Path) -> None:
    llama, _ = llama_and_phi3(tmp_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft_adapter(
        llama, targets, r=4, alpha=8, rank_pattern={"k_proj": 2, "up_proj": 6}, alpha_pattern={"v_proj": 3}
    )
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = pm(IDS).logits
    convert(tmp_path / "adapter", to="peft", fuse=FUSE, base=tmp_path / "phi3", output=tmp_path / "fused")
    fused = load_adapter(tmp_path / "fused")
    assert sorted({p.rsplit(".", 1)[1] for p in fused.modules}) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert fused.modules["model.layers.0.self_attn.qkv_proj"].rank == 4 + 2 + 4
    torch.testing.assert_close(peft_logits(tmp_path / "phi3", "Phi3ForCausalLM", tmp_path / "fused"), expected,
                               rtol=1e-5, atol=1e-5)  # fmt: skip

    # and split again with the Llama checkpoint's sizes: the same logits on Llama
    convert(tmp_path / "fused", to="peft", split=FUSE, base=tmp_path / "llama", output=tmp_path / "split")
    torch.testing.assert_close(peft_logits(tmp_path / "llama", "LlamaForCausalLM", tmp_path / "split"), expected,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_phi3_adapter_split_gives_llama_the_same_logits(tmp_path: Path) -> None:
    _, phi3 = llama_and_phi3(tmp_path)
    pm = peft_adapter(phi3, ["qkv_proj", "gate_up_proj", "o_proj"], r=4, alpha=8, use_rslora=True)
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = pm(IDS).logits
    convert(tmp_path / "adapter", to="peft", split=FUSE, base=tmp_path / "llama", output=tmp_path / "split")
    got = peft_logits(tmp_path / "llama", "LlamaForCausalLM", tmp_path / "split")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fuse_and_split_refusals(tmp_path: Path) -> None:
    llama, _ = llama_and_phi3(tmp_path)
    peft_adapter(llama, ["q_proj", "v_proj"]).save_pretrained(tmp_path / "qv")
    with pytest.raises(LoraToolError, match="k_proj is not"):
        convert(tmp_path / "qv", to="peft", fuse=FUSE[:1], output=tmp_path / "out")
    with pytest.raises(LoraToolError, match="no module named qkv_proj"):
        convert(tmp_path / "qv", to="peft", split=FUSE[:1], base=tmp_path / "llama", output=tmp_path / "out")
    with pytest.raises(LoraToolError, match="--split needs the base"):
        convert(tmp_path / "qv", to="peft", split=FUSE[:1], output=tmp_path / "out")
    peft_adapter(llama, ["q_proj", "k_proj", "v_proj"]).save_pretrained(tmp_path / "qkv")
    with pytest.raises(LoraToolError, match="does not fit"):  # fused modules against a split base
        convert(tmp_path / "qkv", to="peft", fuse=FUSE[:1], base=tmp_path / "llama", output=tmp_path / "out")
    # one part in two fusions, or one fused name twice: refused before any work (a part consumed by the first
    # fusion was reported missing by the second, as if the adapter did not adapt it)
    for twice in ([("qk", ("q_proj", "k_proj")), ("qv", ("q_proj", "v_proj"))],
                  [("a", ("q_proj", "k_proj")), ("a", ("v_proj", "o_proj"))]):  # fmt: skip
        with pytest.raises(LoraToolError, match=r"--fuse names (q_proj|a) more than once"):
            convert(tmp_path / "qkv", to="peft", fuse=twice, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_parses_fusions(tmp_path: Path, cli) -> None:
    llama, _ = llama_and_phi3(tmp_path)
    peft_adapter(llama, ["q_proj", "k_proj", "v_proj"]).save_pretrained(tmp_path / "qkv")
    res = cli("convert", tmp_path / "qkv", "--to", "peft", "--fuse", "qkv_proj=q_proj,k_proj,v_proj",
              "-o", tmp_path / "out", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    bad = cli("convert", tmp_path / "qkv", "--to", "peft", "--fuse", "qkv_proj=q_proj", "-o", tmp_path / "x")
    assert bad.exit_code == 2 and "two or more" in bad.output


def test_split_onto_a_part_the_adapter_adapts_too_keeps_both_deltas(tmp_path: Path) -> None:
    """#31 item 3: the split q_proj used to replace the adapter's own q_proj (its delta lost, exit 0)."""
    from safetensors import safe_open

    from loratool.adapter import Adapter, LoraModule
    from loratool.formats import save_adapter
    from loratool.math.linalg import lora_delta

    llama_and_phi3(tmp_path)
    with safe_open(str(tmp_path / "llama" / "model.safetensors"), "pt") as f:
        q, k, v = (
            f.get_slice(f"model.layers.0.self_attn.{p}.weight").get_shape() for p in ("q_proj", "k_proj", "v_proj")
        )
    g = torch.Generator().manual_seed(0)
    fused = LoraModule(lora_A=torch.randn(4, q[1], generator=g), lora_B=torch.randn(q[0] + k[0] + v[0], 4, generator=g),
                       alpha=8.0)  # fmt: skip
    own = LoraModule(lora_A=torch.randn(2, q[1], generator=g), lora_B=torch.randn(q[0], 2, generator=g), alpha=6.0)
    adapter = Adapter(modules={"model.layers.0.self_attn.qkv_proj": fused, "model.layers.0.self_attn.q_proj": own})
    save_adapter(adapter, tmp_path / "both")
    convert(tmp_path / "both", to="peft", split=FUSE[:1], base=tmp_path / "llama", output=tmp_path / "split")
    out = load_adapter(tmp_path / "split").modules
    got = lora_delta(out["model.layers.0.self_attn.q_proj"].lora_A, out["model.layers.0.self_attn.q_proj"].lora_B,
                     out["model.layers.0.self_attn.q_proj"].scaling, "linear")  # fmt: skip
    want = (lora_delta(own.lora_A, own.lora_B, own.scaling, "linear")
            + lora_delta(fused.lora_A, fused.lora_B, fused.scaling, "linear")[: q[0]])  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert out["model.layers.0.self_attn.q_proj"].rank == 6
