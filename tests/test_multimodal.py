"""Vision-language checkpoints, whose tensor names transformers renames on load (#33 item 1):
until loratool maps those names, every command that would write or match names refuses them by
name, rather than write an adapter that PEFT loads as a no-op (what extract did)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import file_digest, peft_adapter

from loratool.cli import cli

tf = pytest.importorskip("transformers")


def tiny_qwen2_vl():  # type: ignore[no-untyped-def]
    rope = {"type": "mrope", "mrope_section": [1, 1, 2]}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, rope_scaling=rope)  # fmt: skip
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, in_channels=3)  # fmt: skip
    torch.manual_seed(0)
    config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, bos_token_id=1, eos_token_id=2)
    return tf.Qwen2VLForConditionalGeneration(config).eval()


@pytest.fixture
def vlm(tmp_path: Path) -> tuple[Path, object]:
    model = tiny_qwen2_vl()
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base", model


def test_the_names_on_disk_are_not_the_module_paths(vlm) -> None:
    """The premise, checked on the installed transformers: if it ever saves the live names, the
    refusals below should give way to plain handling."""
    from safetensors import safe_open

    base, model = vlm
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        on_disk = {k.removesuffix(".weight") for k in f.keys()}
    paths = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "model.language_model.layers.0.self_attn.q_proj" in paths and not paths <= on_disk


def test_extract_refuses_rather_than_write_an_adapter_peft_loads_as_nothing(tmp_path: Path, vlm) -> None:
    from safetensors.torch import load_file, save_file

    base, _ = vlm
    shutil.copytree(base, tmp_path / "ft")
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"] += 0.1 * torch.ones(32, 1) @ torch.ones(1, 32)
    save_file(tensors, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(cli, ["extract", str(base), str(tmp_path / "ft"), "-r", "2", "-o", str(tmp_path / "a")])
    assert result.exit_code == 1, result.output
    assert "Qwen2VLForConditionalGeneration is a vision-language" in result.output and "no-op" in result.output
    assert not (tmp_path / "a").exists()


def test_merge_and_validate_say_why_a_peft_adapter_does_not_match(tmp_path: Path, vlm) -> None:
    base, model = vlm
    peft_adapter(model, ["q_proj", "qkv"], r=2, alpha=4).save_pretrained(tmp_path / "adapter")
    before = file_digest(base)
    validate = CliRunner().invoke(cli, ["validate", str(tmp_path / "adapter"), "--base", str(base)])
    assert validate.exit_code == 1 and "vision-language" in validate.output, validate.output
    merge = CliRunner().invoke(cli, ["merge", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "m")])
    assert merge.exit_code == 1 and "vision-language" in merge.output and "Traceback" not in merge.output
    assert not (tmp_path / "m").exists() and file_digest(base) == before
    unmerge = CliRunner().invoke(cli, ["unmerge", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "u")])
    assert unmerge.exit_code == 1 and "vision-language" in unmerge.output
    assert "Unmerge from a text-only" in unmerge.output
    assert not (tmp_path / "u").exists() and file_digest(base) == before
