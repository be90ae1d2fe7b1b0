"""Mixture-of-experts adapters and PEFT features loratool does not read yet: a clear refusal,
never a silent misreading (PEFT's target_parameters adapter holds E experts in one factor pair)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratool.adapter import Adapter, LoraModule
from loratool.errors import LoraToolError
from loratool.formats import save_adapter
from loratool.ops.validate import validate


def gpt_oss(tmp_path: Path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                             head_dim=8, layer_types=["full_attention"])  # fmt: skip
    model = tf.GptOssForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "base")
    return model


def test_target_parameters_adapters_are_refused_by_name(tmp_path: Path, cli) -> None:
    from peft import LoraConfig, get_peft_model

    model = gpt_oss(tmp_path)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    report = validate(tmp_path / "adapter")
    assert not report.valid and any(p.path == "$.target_parameters" for p in report.problems)
    for args in (
        ("inspect", tmp_path / "adapter"),
        ("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m"),
    ):
        res = cli(*args)
        assert res.exit_code == 1 and "target_parameters" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("field", ["alora_invocation_tokens", "layer_replication"])
def test_features_peft_does_not_merge_are_refused(tmp_path: Path, fixtures: Path, field: str) -> None:
    from loratool.ops.merge import merge

    g = torch.Generator().manual_seed(0)
    module = LoraModule(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 4.0)
    a = Adapter(modules={"model.layers.0.self_attn.q_proj": module})
    save_adapter(a, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = [1, 2] if field == "alora_invocation_tokens" else [[0, 2]]
    config_path.write_text(json.dumps(config))
    with pytest.raises(LoraToolError, match=field):
        merge(fixtures / "llama-base", [tmp_path / "adapter"], output=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_per_expert_weights_extract_and_merge_back_to_the_fine_tune(tmp_path: Path, cli) -> None:
    """Qwen3-MoE checkpoints store each expert's gate/up/down as its own 2-D weight (transformers
    fuses them in memory only); with the router they are plain modules to every command. At full
    rank the merged adapter gives the fine-tune back (PEFT cannot load per-expert modules on
    transformers 5's fused experts, so the oracle is the fine-tune itself)."""
    import transformers as tf
    from helpers import logits

    config = tf.Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                               num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=128, head_dim=8, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    tf.Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "base")
    ft = tf.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "base").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in ft.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj, layer.mlp.gate.weight):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(tmp_path / "ft")
    res = cli(
        "extract", tmp_path / "base", tmp_path / "ft", "-r", "32", "-o", tmp_path / "adapter", "--quiet", "--json"
    )
    assert res.exit_code == 0, res.output
    modules = {m["module"] for m in json.loads(res.stdout)["modules"]}
    assert "model.layers.1.mlp.experts.3.down_proj" in modules and "model.layers.0.mlp.gate" in modules
    inspected = json.loads(cli("inspect", tmp_path / "adapter", "--json").stdout)
    assert len(inspected["modules"]) == 2 * (4 * 3 + 1)  # experts x (gate, up, down) + router, per layer
    assert cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged", "--quiet").exit_code == 0
    merged = tf.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), logits(ft), rtol=1e-4, atol=1e-4)
