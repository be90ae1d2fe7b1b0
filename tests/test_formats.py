"""PEFT and kohya adapter files: PEFT interop both ways, and kohya <-> PEFT conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import logits, peft_adapter, tiny_model

from loratool.adapter import Adapter, LoraModule
from loratool.formats import load_adapter, save_adapter
from loratool.math.linalg import lora_delta

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc", "wte"]}


def dense_deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {p: lora_delta(m.lora_A, m.lora_B, m.scaling, m.kind) for p, m in adapter.modules.items()}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_reads_adapter_written_by_peft(tmp_path: Path, kind: str, use_rslora: bool) -> None:
    pm = peft_adapter(tiny_model(kind), TARGETS[kind], r=4, alpha=6, use_rslora=use_rslora,
                      rank_pattern={"h.1.attn.c_attn" if kind == "gpt2" else "layers.1.self_attn.q_proj": 2},
                      alpha_pattern={"c_fc" if kind == "gpt2" else "down_proj": 3})  # fmt: skip
    pm.save_pretrained(tmp_path / "a")
    ours = load_adapter(tmp_path / "a")
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert set(ours.modules) == set(peft_layers)
    for path, m in ours.modules.items():
        layer = peft_layers[path]
        assert m.rank == layer.r["default"]
        assert m.scaling == pytest.approx(layer.scaling["default"], rel=1e-12)
        assert torch.allclose(
            lora_delta(m.lora_A, m.lora_B, m.scaling, m.kind), layer.get_delta_weight("default"), atol=1e-7
        )
    if kind == "gpt2":
        assert ours.modules["transformer.h.0.attn.c_attn"].kind == "conv1d"
        assert ours.modules["transformer.wte"].kind == "embedding"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_our_adapter_loads_in_peft_with_same_outputs(tmp_path: Path, kind: str, dtype: torch.dtype) -> None:
    from peft import PeftModel

    # Build factors in PEFT, read them, write them back with loratool, load in PEFT again.
    built = peft_adapter(tiny_model(kind), TARGETS[kind], r=4, alpha=8, rank_pattern={"down_proj": 2, "c_fc": 2})
    built.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft")
    adapter.config = {"peft_type": "LORA"}  # forget PEFT's config: ours must be rebuilt from the factors
    save_adapter(adapter, tmp_path / "ours", dtype=dtype)
    expected = logits(built.to(dtype) if dtype != torch.float32 else built)
    loaded = PeftModel.from_pretrained(tiny_model(kind).to(dtype), tmp_path / "ours").eval()
    got = logits(loaded)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(got, expected, atol=tol), (got - expected).abs().max()


def test_kohya_roundtrip_preserves_every_delta(tmp_path: Path, fixtures: Path) -> None:
    peft_in = load_adapter(fixtures / "llama-peft-adapter")
    save_adapter(peft_in, tmp_path / "k.safetensors", format="kohya")
    back = load_adapter(tmp_path / "k.safetensors")
    assert back.format == "kohya"
    expected, got = dense_deltas(peft_in), dense_deltas(back)
    assert set(got) == set(expected)
    for p in expected:
        assert back.modules[p].kind == peft_in.modules[p].kind
        assert torch.allclose(got[p], expected[p], rtol=1e-6, atol=1e-8), p
    # and back to PEFT again
    save_adapter(back, tmp_path / "p")
    again = dense_deltas(load_adapter(tmp_path / "p"))
    for p in expected:
        assert torch.allclose(again[p], expected[p], rtol=1e-6, atol=1e-8), p


def test_foreign_kohya_file_reads_alpha_scaling(fixtures: Path) -> None:
    a = load_adapter(fixtures / "llama-kohya.safetensors")
    assert len(a.modules) == 4
    m = a.modules["lora_model_layers_0_self_attn_k_proj"]
    assert m.rank == 4 and m.alpha == 2.0 and m.scaling == 0.5


def test_rslora_folds_into_kohya_alpha(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    m = LoraModule(torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), alpha=8, use_rslora=True)
    save_adapter(Adapter(modules={"x.y": m}), tmp_path / "k.safetensors", format="kohya")
    back = load_adapter(tmp_path / "k.safetensors").modules["x.y"]
    assert back.scaling == pytest.approx(m.scaling) == pytest.approx(8 / 2)


def test_a_lora_bias_is_never_dropped_into_kohya(tmp_path: Path, fixtures: Path, cli) -> None:
    """sd-scripts' lora_up has no bias: convert --to kohya wrote a PEFT lora_bias adapter without its
    biases (a GPT-2 model's logits then moved by 0.59), exit 0. Refused by name; extract --bias
    --format kohya is refused before any work."""
    g = torch.Generator().manual_seed(0)
    m = LoraModule(torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), alpha=4, bias=torch.ones(6))
    save_adapter(Adapter(modules={"x.y": m, "x.z": LoraModule(m.lora_A, m.lora_B, alpha=4)}), tmp_path / "a")
    r = cli("convert", tmp_path / "a", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert r.exit_code == 1 and "no place for lora_B's bias (lora_bias: x.y)" in r.stderr, r.stderr
    assert not (tmp_path / "k.safetensors").exists()
    pair = [fixtures / "llama-base", fixtures / "llama-ft"]
    r = cli("extract", *pair, "--bias", "--format", "kohya", "-o", tmp_path / "e.safetensors")
    assert r.exit_code == 1 and "what --bias (lora_B's bias) stores" in r.stderr, r.stderr
    assert not (tmp_path / "e.safetensors").exists()


def test_peft_directory_with_adapter_name_and_no_prefix(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    save_file({"model.q.lora_A.default.weight": torch.ones(2, 3), "model.q.lora_B.default.weight": torch.ones(5, 2)},
              str(d / "adapter_model.safetensors"))  # fmt: skip
    a = load_adapter(d)
    assert list(a.modules) == ["model.q"] and a.modules["model.q"].scaling == 2.0


def test_not_a_lora_adapter(tmp_path: Path, cli, fixtures: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    r = cli("merge", fixtures / "llama-base", tmp_path / "cfg", "-o", tmp_path / "o")
    assert r.exit_code == 1
    assert "peft_type is 'IA3'; loratool handles LoRA adapters only" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("variant", ["kasa", "bdlora", "monteclora", "velora", "mica"])
def test_peft_lora_variants_merge_as_peft_serves_them_or_are_refused_by_name(tmp_path: Path, variant: str) -> None:
    """PEFT 0.21's LoRA variants. VeLoRA (a training-only projection saved beside the factors) and
    MiCA (an initialization) serve as plain LoRA: they merge to PEFT's logits (they were refused, as
    an adapter for another model and as an invalid init_lora_weights). KaSA, BD-LoRA and MonteCLoRA
    do not hold their delta as B @ A: refused by name, by validate too."""
    import transformers as tf
    from click.testing import CliRunner
    from helpers import llama_config, logits
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig

    from loratool.cli import cli

    extra = {
        "kasa": {"kasa_config": KasaConfig()},
        "bdlora": {
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2)
        },  # fmt: skip
        "monteclora": {"monteclora_config": MontecloraConfig()},
        "velora": {"velora_config": VeloraConfig()},
        "mica": {"init_lora_weights": "mica"},
    }[variant]
    torch.manual_seed(0)
    tf.LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "base")
    load = lambda: tf.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()  # noqa: E731
    pm = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], **extra))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    pm.eval().save_pretrained(tmp_path / "a")
    merged = CliRunner().invoke(cli, ["merge", str(tmp_path / "base"), str(tmp_path / "a"), "-o", str(tmp_path / "m")])
    checked = CliRunner().invoke(cli, ["validate", str(tmp_path / "a")])
    if variant in ("velora", "mica"):
        assert merged.exit_code == 0 and checked.exit_code == 0, merged.output + checked.output
        with torch.no_grad():
            want = logits(pm)
        torch.testing.assert_close(logits(tf.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()), want,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        return
    field = {"kasa": "kasa_config", "bdlora": "use_bdlora", "monteclora": "monteclora_config"}[variant]
    assert merged.exit_code == 1 and f"{field} is set" in merged.output and "another model" not in merged.output
    assert checked.exit_code == 1 and field in checked.output
    assert not (tmp_path / "m").exists()
