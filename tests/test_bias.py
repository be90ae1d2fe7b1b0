"""`extract --bias`: a fine-tune that changed the biases of adapted linear layers (Qwen2's q, k, v)
gives an adapter with PEFT's lora_bias, which PEFT loads and merges as loratool does."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import logits

from loratool.formats import load_adapter
from loratool.ops.extract import extract
from loratool.ops.merge import merge


def qwen2_pair(tmp_path: Path):
    import transformers as tf

    config = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                            tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "base")
    ft = tf.Qwen2ForCausalLM.from_pretrained(tmp_path / "base").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in ft.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.add_(0.02 * torch.randn(proj.weight.shape, generator=g))
                proj.bias.add_(0.1 * torch.randn(proj.bias.shape, generator=g))
    ft.save_pretrained(tmp_path / "ft")
    return ft


def test_bias_deltas_become_lora_bias_that_peft_merges(tmp_path: Path, cli) -> None:
    import transformers as tf
    from peft import PeftModel

    ft = qwen2_pair(tmp_path)
    without = extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / "plain", rank=32, show_progress=False)
    assert sum(d.key.endswith(".bias") for d in without.dropped) == 6  # dropped, as before, without --bias
    res = cli(
        "extract", tmp_path / "base", tmp_path / "ft", "-r", "32", "--bias", "-o", tmp_path / "adapter", "--quiet"
    )
    assert res.exit_code == 0, res.output
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.config["lora_bias"] is True
    assert all(m.bias is not None for p, m in adapter.modules.items() if p.endswith(("q_proj", "k_proj", "v_proj")))

    base = tf.Qwen2ForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        adapted = logits(peft_model)
    oracle = peft_model.merge_and_unload().state_dict()
    merge(tmp_path / "base", [tmp_path / "adapter"], output=tmp_path / "merged", show_progress=False)
    ours = tf.Qwen2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6, msg=key)
    # rank 32 holds these 32-wide deltas exactly: with the biases, the adapter is the fine-tune
    torch.testing.assert_close(adapted, logits(ft), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(ours), logits(ft), rtol=1e-4, atol=1e-4)
