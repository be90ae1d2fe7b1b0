"""`loratool convert` and the mlx-lm format: every delta survives, PEFT loads what it writes, and
mlx-lm's layout is read as mlx-lm defines it (mlx_lm/tuner/lora.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import load_model, logits
from safetensors.torch import load_file, save_file

from loratool.adapter import Adapter, LoraModule
from loratool.errors import LoraToolError
from loratool.formats import load_adapter, save_adapter
from loratool.math.linalg import lora_delta
from loratool.ops.convert import convert
from loratool.validation import validate_adapter

ROOT = Path(__file__).resolve().parent.parent


def uniform_adapter(path: Path, *, r: int = 4, alpha: float = 8.0, seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter()

    def module() -> LoraModule:
        return LoraModule(torch.randn(r, 32, generator=g), torch.randn(32, r, generator=g), alpha)

    adapter.modules = {f"model.layers.{i}.self_attn.{p}": module() for i in range(2) for p in ("q_proj", "o_proj")}
    save_adapter(adapter, path)
    return load_adapter(path)


def load_adapter_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each module's delta, scaled, in the base weight's stored layout (float64)."""
    adapter = load_adapter(path)
    return {
        p: lora_delta(m.lora_A.double(), m.lora_B.double(), m.scaling, m.kind).double()
        for p, m in adapter.modules.items()
    }


def assert_same_deltas(a: Path, b: Path, **tol: float) -> None:
    da, db = load_adapter_deltas(a), load_adapter_deltas(b)
    assert da.keys() == db.keys()
    for k in da:
        torch.testing.assert_close(da[k], db[k], **tol, msg=k)


def test_uniform_adapter_round_trips_through_mlx_bit_for_bit(tmp_path: Path) -> None:
    original = uniform_adapter(tmp_path / "peft")
    convert(tmp_path / "peft", to="mlx", output=tmp_path / "mlx")
    convert(tmp_path / "mlx", to="peft", output=tmp_path / "back")
    back = load_adapter(tmp_path / "back")
    for p, m in original.modules.items():
        assert torch.equal(back.modules[p].lora_A, m.lora_A) and torch.equal(back.modules[p].lora_B, m.lora_B)
        assert back.modules[p].scaling == m.scaling
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": sorted(original.modules)}
    assert config["fine_tune_type"] == "lora"


def test_mixed_ranks_and_scalings_reach_mlx_with_the_same_deltas(tmp_path: Path, fixtures: Path) -> None:
    res = convert(fixtures / "llama-peft-adapter", to="mlx", output=tmp_path / "mlx")
    assert res.ranks == [4] and res.parameters > res.parameters_before  # rank 2 padded to 4
    assert any("padded" in w for w in res.warnings)
    assert validate_adapter(tmp_path / "mlx").valid
    assert_same_deltas(fixtures / "llama-peft-adapter", tmp_path / "mlx", rtol=1e-6, atol=1e-7)


def test_mlx_layout_is_read_as_mlx_lm_applies_it(tmp_path: Path) -> None:
    """W (out, in) += scale * (lora_a @ lora_b).T, lora_a (in, r), lora_b (r, out); embeddings
    (num, dim) += scale * lora_a @ lora_b (mlx_lm/tuner/lora.py: LoRALinear.fuse, LoRAEmbedding.fuse)."""
    g = torch.Generator().manual_seed(0)
    lin_a, lin_b = torch.randn(32, 8, generator=g), torch.randn(8, 48, generator=g)
    emb_a, emb_b = torch.randn(128, 8, generator=g), torch.randn(8, 32, generator=g)
    (tmp_path / "a").mkdir()
    save_file({"model.layers.0.mlp.up_proj.lora_a": lin_a, "model.layers.0.mlp.up_proj.lora_b": lin_b,
               "model.embed_tokens.lora_a": emb_a, "model.embed_tokens.lora_b": emb_b},
              str(tmp_path / "a" / "adapters.safetensors"))  # fmt: skip
    params = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": ["mlp.up_proj", "model.embed_tokens"]}
    config = {"fine_tune_type": "lora", "num_layers": 16, "model": "mlx-community/x", "lora_parameters": params}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    assert validate_adapter(tmp_path / "a").valid
    deltas = load_adapter_deltas(tmp_path / "a")  # in the base weight's stored layout
    torch.testing.assert_close(deltas["model.layers.0.mlp.up_proj"], 20.0 * (lin_a @ lin_b).T.double())
    torch.testing.assert_close(deltas["model.embed_tokens"], 20.0 * (emb_a @ emb_b).double())
    adapter = load_adapter(tmp_path / "a")
    assert adapter.format == "mlx" and adapter.base_model_name_or_path == "mlx-community/x"
    convert(tmp_path / "a", to="peft", output=tmp_path / "peft")
    assert_same_deltas(tmp_path / "a", tmp_path / "peft")


def test_mlx_dora_magnitude_round_trips(tmp_path: Path) -> None:
    adapter = uniform_adapter(tmp_path / "peft")
    for m in adapter.modules.values():
        m.magnitude = torch.rand(m.out_features) + 0.5
    save_adapter(adapter, tmp_path / "dora")
    convert(tmp_path / "dora", to="mlx", output=tmp_path / "mlx")
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    back = load_adapter(tmp_path / "mlx")
    for p, m in adapter.modules.items():
        assert torch.equal(back.modules[p].magnitude, m.magnitude)


def test_kohya_keeps_dora_magnitudes_in_lycoris_layout(tmp_path: Path) -> None:
    """The kohya writer dropped DoRA magnitudes silently (a plain LoRA came out); it writes them as
    LyCORIS's output-row dora_scale (out, 1), which ComfyUI reads by its length, and reads them back;
    a dora_scale over input columns (LyCORIS's wd_on_out=False), which PEFT's DoRA is not, is refused."""
    adapter = uniform_adapter(tmp_path / "peft")
    for m in adapter.modules.values():
        m.magnitude = torch.rand(m.out_features) + 0.5
    save_adapter(adapter, tmp_path / "dora")
    convert(tmp_path / "dora", to="kohya", output=tmp_path / "k.safetensors")
    stored = load_file(str(tmp_path / "k.safetensors"))
    assert stored["lora_model_layers_0_self_attn_q_proj.dora_scale"].shape == (32, 1)
    back = load_adapter(tmp_path / "k.safetensors")
    for p, m in adapter.modules.items():
        assert torch.equal(back.modules[p].magnitude, m.magnitude)
    stored["lora_model_layers_0_self_attn_q_proj.dora_scale"] = torch.rand(1, 32) + 0.5
    save_file(stored, str(tmp_path / "columns.safetensors"))
    with pytest.raises(LoraToolError, match=r"dora_scale \[1, 32\] does not rescale the 32 output rows"):
        load_adapter(tmp_path / "columns.safetensors")


def test_invalid_mlx_files_are_named(tmp_path: Path) -> None:
    uniform_adapter(tmp_path / "peft")
    convert(tmp_path / "peft", to="mlx", output=tmp_path / "mlx")
    config_path = tmp_path / "mlx" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_parameters"]["rank"] = 8
    config["lora_parameters"]["keys"] = ["self_attn.q_proj"]
    config_path.write_text(json.dumps(config))
    report = validate_adapter(tmp_path / "mlx", check_values=False)
    messages = [str(p) for p in report.problems]
    assert any("disagrees with lora_parameters.rank 8" in m for m in messages)
    assert any("o_proj" in m and "keys does not select" in m for m in messages)
    assert not any("q_proj" in m and "keys" in m for m in messages)  # relative keys select inside blocks
    config["fine_tune_type"] = "full"
    config_path.write_text(json.dumps(config))
    with pytest.raises(LoraToolError, match="full fine-tune"):
        load_adapter(tmp_path / "mlx")


def test_portable_peft_is_right_for_runtimes_reading_only_r_and_alpha(tmp_path: Path, fixtures: Path) -> None:
    res = convert(fixtures / "llama-peft-adapter", to="peft", output=tmp_path / "port", portable=True)
    config = json.loads((tmp_path / "port" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4 and not config["rank_pattern"] and not config["alpha_pattern"]
    assert res.portable and res.ranks == [4]
    # vLLM's rule: one scaling lora_alpha / r for every module, from the config alone
    adapter = load_adapter(tmp_path / "port")
    expected = load_adapter_deltas(fixtures / "llama-peft-adapter")
    for p, m in adapter.modules.items():
        vllm = config["lora_alpha"] / config["r"] * (m.lora_B.double() @ m.lora_A.double())
        torch.testing.assert_close(vllm, expected[p], rtol=1e-6, atol=1e-7)
    # and PEFT itself gives the original adapter's outputs
    from peft import PeftModel

    outs = [logits(PeftModel.from_pretrained(load_model("llama", fixtures / "llama-base"), str(p)).eval())
            for p in (fixtures / "llama-peft-adapter", tmp_path / "port")]  # fmt: skip
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_kohya_names_resolve_against_a_base(tmp_path: Path, fixtures: Path) -> None:
    with pytest.raises(LoraToolError, match="(?i)pass the base checkpoint as --base"):
        convert(fixtures / "llama-kohya.safetensors", to="mlx", output=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    convert(fixtures / "llama-kohya.safetensors", to="peft", output=tmp_path / "peft", base=fixtures / "llama-base")
    adapter = load_adapter(tmp_path / "peft")
    assert sorted(adapter.modules)[0] == "model.layers.0.mlp.gate_proj"
    kohya = load_adapter_deltas(fixtures / "llama-kohya.safetensors")
    for name, delta in load_adapter_deltas(tmp_path / "peft").items():
        torch.testing.assert_close(delta, kohya["lora_" + name.replace(".", "_")])


def test_what_mlx_cannot_hold_is_refused(tmp_path: Path, fixtures: Path, cli) -> None:
    adapter = uniform_adapter(tmp_path / "peft")
    adapter.whole = {"lm_head.weight": torch.zeros(128, 32)}
    save_adapter(adapter, tmp_path / "whole")
    res = cli("convert", tmp_path / "whole", "--to", "mlx", "-o", tmp_path / "out")
    assert res.exit_code == 1 and "whole tensors" in res.output and not (tmp_path / "out").exists()
    res = cli("convert", tmp_path / "peft", "--to", "kohya", "--portable", "-o", tmp_path / "k.safetensors")
    assert res.exit_code == 1 and "--portable is for PEFT output" in res.output
    res = cli("convert", tmp_path / "peft", "--to", "mlx", "--outtype", "q8_0", "-o", tmp_path / "x")
    assert res.exit_code == 1 and "--outtype is for GGUF" in res.output


def test_convert_json_and_force(tmp_path: Path, cli) -> None:
    uniform_adapter(tmp_path / "peft")
    res = cli("convert", tmp_path / "peft", "--to", "kohya", "-o", tmp_path / "k.safetensors", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["format"] == "kohya"
    again = cli("convert", tmp_path / "peft", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert again.exit_code == 1 and "--force" in again.output
    assert_same_deltas(tmp_path / "peft", tmp_path / "k.safetensors")


MLX_PYTHON = os.environ.get("LORATOOL_MLX_PYTHON")


@pytest.mark.skipif(not MLX_PYTHON, reason="opt-in: LORATOOL_MLX_PYTHON=python with mlx[cpu] and mlx-lm")
def test_mlx_lm_runs_the_converted_adapter_as_peft_does(tmp_path: Path, fixtures: Path) -> None:
    """The runtime itself: mlx-lm loads loratool's output and gives PEFT's logits."""
    convert(fixtures / "llama-peft-adapter", to="mlx", output=tmp_path / "mlx")
    ids = [[1, 5, 9, 17, 33, 64, 2, 7]]
    script = ROOT / "tests" / "runtimes" / "mlx_logits.py"
    out = tmp_path / "logits.json"
    subprocess.run([MLX_PYTHON, str(script), str(fixtures / "llama-base"), str(tmp_path / "mlx"), str(out),
                    json.dumps(ids)], check=True)  # fmt: skip
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        load_model("llama", fixtures / "llama-base"), str(fixtures / "llama-peft-adapter")
    )
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.tensor(ids)).logits
    torch.testing.assert_close(torch.tensor(json.loads(out.read_text())), expected, rtol=1e-5, atol=1e-5)


def test_dora_on_an_embedding_is_refused_for_mlx(tmp_path: Path, cli) -> None:
    """mlx-lm's DoRA embedding has a magnitude per token, PEFT's one per embedding dimension: the file
    loratool wrote made mlx-lm refuse to load it ("adapter shape (32,) does not match model parameter
    shape (128,)"), after validate and convert had passed it."""
    import transformers as tf
    from helpers import llama_config, peft_adapter

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(llama_config()).eval()
    model.save_pretrained(tmp_path / "base")
    pm = peft_adapter(model, ["q_proj", "embed_tokens"], use_dora=True)
    pm.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    r = cli("convert", tmp_path / "a", "--to", "mlx", "-o", tmp_path / "mlx")
    assert r.exit_code == 1 and "DoRA on an embedding" in r.stderr and not (tmp_path / "mlx").exists()
    checked = cli("validate", tmp_path / "a", "--runtime", "mlx")
    assert checked.exit_code == 1 and "DoRA on an embedding" in checked.output
