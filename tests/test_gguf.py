"""`loratool convert --to gguf`: llama.cpp LoRA adapters, read back with the gguf package's reader
and checked against PEFT's own deltas, applied the way llama.cpp applies them (alpha / r per
tensor, with r each tensor's own rank; q/k rows permuted for Llama's RoPE as llama.cpp's converter
permutes the base)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import file_digest, peft_adapter, peft_deltas

from loratool.cli import cli
from loratool.errors import LoraToolError
from loratool.ops.convert import convert

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parent.parent
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# llama.cpp's names for a transformers module leaf (llama.cpp's src/llama-arch.cpp), written out here
# independently of the gguf package's table
LEAF_NAMES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "qkv_proj": "attn_qkv",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "gate_up_proj": "ffn_up",
}  # fmt: skip


def llama_cpp_name(module: str) -> str:
    if module.endswith("embed_tokens"):
        return "token_embd.weight"
    if module == "lm_head":
        return "output.weight"
    parts = module.split(".")
    return f"blk.{parts[2]}.{LEAF_NAMES[parts[-1]]}.weight"


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute, from convert_hf_to_gguf: per head, the two rotary halves interleaved."""
    out = w.shape[0]
    return w.reshape(heads, 2, out // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny(family: str):
    import transformers as tf

    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    config = {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=8),
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=8),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=8),
        "phi3": lambda: tf.Phi3Config(**{**common, "num_key_value_heads": 4}, pad_token_id=0),
    }[family]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def reader_fields(path: Path) -> dict[str, object]:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def reader_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(data.copy()).double()
    return out


def llama_cpp_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each adapted tensor's delta as llama.cpp computes it, in the base's (out, in) / (num, dim) layout."""
    alpha = float(reader_fields(path)["adapter.lora.alpha"])
    ts = reader_tensors(path)
    out = {}
    for name in {k.rsplit(".", 1)[0] for k in ts}:
        a, b = ts[name + ".lora_a"], ts[name + ".lora_b"]
        scale = alpha / b.shape[1]  # llama.cpp: rank = lora_b->ne[0], numpy's last dimension
        out[name] = scale * (a @ b.T if name == "token_embd.weight" else b @ a)
    return out


def save_pair(tmp_path: Path, family: str, targets: list[str], **config) -> tuple[Path, Path, object]:
    model = tiny(family)
    model.save_pretrained(tmp_path / "base")
    pm = peft_adapter(model, targets, **config)
    pm.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    return tmp_path / "base", tmp_path / "adapter", pm


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"])
def test_every_tensor_gets_peft_delta_as_llama_cpp_applies_it(tmp_path: Path, family: str) -> None:
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else ATTN
    base, adapter, pm = save_pair(
        tmp_path, family, targets, r=4, alpha=8, rank_pattern={"o_proj": 8, "down_proj": 2}, alpha_pattern={"v_proj": 3}
    )
    result = convert(adapter, to="gguf", base=base, output=tmp_path / "a.gguf")
    expected_arch = {"mistral": "llama"}.get(family, family)
    fields = reader_fields(tmp_path / "a.gguf")
    assert fields["general.architecture"] == expected_arch and result.gguf and result.gguf["arch"] == expected_arch
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    got = llama_cpp_deltas(tmp_path / "a.gguf")
    want = peft_deltas(pm)
    assert set(got) == {llama_cpp_name(m) for m in want}
    config = json.loads((base / "config.json").read_text())
    for module, delta in want.items():
        leaf = module.split(".")[-1]
        if family in ("llama", "mistral") and leaf in ("q_proj", "k_proj"):
            heads = config["num_attention_heads"] if leaf == "q_proj" else config["num_key_value_heads"]
            delta = permute_rows(delta, heads)
        torch.testing.assert_close(got[llama_cpp_name(module)], delta, rtol=1e-5, atol=1e-6, msg=module)


def test_rslora_and_embeddings_scale_right_and_uniform_b_stays_as_it_was(tmp_path: Path) -> None:
    base, adapter, pm = save_pair(tmp_path, "llama", ["q_proj", "v_proj", "embed_tokens", "lm_head"], r=4, alpha=8,
                                  use_rslora=True, rank_pattern={"v_proj": 2})  # fmt: skip
    convert(adapter, to="gguf", base=base, output=tmp_path / "a.gguf")
    got = llama_cpp_deltas(tmp_path / "a.gguf")
    for module, delta in peft_deltas(pm).items():
        if module.endswith("q_proj"):
            delta = permute_rows(delta, 4)
        torch.testing.assert_close(got[llama_cpp_name(module)], delta, rtol=1e-5, atol=1e-6, msg=module)

    plain, plain_adapter, _ = save_pair(tmp_path / "plain", "llama", ["v_proj"], r=4, alpha=8)
    result = convert(plain_adapter, to="gguf", base=plain, output=tmp_path / "plain.gguf")
    assert result.gguf and result.gguf["folded"] == [] and result.gguf["alpha"] == 8.0
    from safetensors.torch import load_file

    stored = load_file(str(plain_adapter / "adapter_model.safetensors"))
    b = stored["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert torch.equal(reader_tensors(tmp_path / "plain.gguf")["blk.0.attn_v.weight.lora_b"].float(), b)


@pytest.mark.parametrize(("outtype", "types", "tol"), [
    ("f16", {"F16"}, 1e-3), ("bf16", {"BF16"}, 1e-2), ("q8_0", {"Q8_0", "F16"}, 2e-2),
])  # fmt: skip
def test_outtypes_are_the_ones_llama_cpp_reads(tmp_path: Path, outtype: str, types: set[str], tol: float) -> None:
    base, adapter, _ = save_pair(tmp_path, "llama", ["q_proj", "down_proj"], r=4, alpha=8)
    convert(adapter, to="gguf", base=base, output=tmp_path / "f32.gguf")
    convert(adapter, to="gguf", base=base, output=tmp_path / "q.gguf", outtype=outtype)  # type: ignore[arg-type]
    tensors = gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors
    assert {t.tensor_type.name for t in tensors} == types
    if outtype == "q8_0":  # rows of 32 quantize; lora_b rows of r=4 cannot, and fall back to F16 as in llama.cpp
        assert {t.name.endswith("lora_a") for t in tensors if t.tensor_type.name == "Q8_0"} == {True}
    exact, rounded = llama_cpp_deltas(tmp_path / "f32.gguf"), llama_cpp_deltas(tmp_path / "q.gguf")
    for k in exact:
        assert (rounded[k] - exact[k]).norm() <= tol * exact[k].norm(), k


def test_whole_tensors_equal_to_the_base_are_left_out_and_changed_ones_refused(tmp_path: Path) -> None:
    model = tiny("llama")
    model.save_pretrained(tmp_path / "base")
    pm = peft_adapter(model, ["q_proj", "embed_tokens"])
    pm.save_pretrained(tmp_path / "adapter")  # PEFT stores the embedding whole as well ("save_embedding_layers")
    result = convert(tmp_path / "adapter", to="gguf", base=tmp_path / "base", output=tmp_path / "a.gguf")
    assert any("equal to the base" in w for w in result.warnings)

    changed = peft_adapter(tiny("llama"), ["q_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        changed.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    changed.save_pretrained(tmp_path / "saved")
    with pytest.raises(LoraToolError, match="whole tensors"):
        convert(tmp_path / "saved", to="gguf", base=tmp_path / "base", output=tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()


@pytest.mark.parametrize(("case", "match"), [
    ("dora", "DoRA"),
    ("tied", "ties lm_head"),
    ("gpt2", "architectures"),
    ("other-base", "does not fit"),
    ("no-base", "needs the base"),
])  # fmt: skip
def test_what_llama_cpp_cannot_take_is_refused_before_writing(tmp_path: Path, case: str, match: str) -> None:
    from helpers import tiny_model

    base = tmp_path / "base"
    if case == "gpt2":
        model = tiny_model("gpt2")
        targets = ["c_attn"]
    elif case == "tied":
        import transformers as tf

        torch.manual_seed(0)
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=128, tie_word_embeddings=True)  # fmt: skip
        model = tf.LlamaForCausalLM(config)
        targets = ["q_proj", "lm_head"]
    else:
        model = tiny("llama")
        targets = ["q_proj"]
    model.save_pretrained(base)
    peft_adapter(model, targets, use_dora=case == "dora").save_pretrained(
        tmp_path / "adapter", save_embedding_layers=False
    )
    if case == "other-base":  # a wider Llama: every name matches, no shape does
        import transformers as tf

        base = tmp_path / "other"
        tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, vocab_size=128)).save_pretrained(base)  # fmt: skip
    before = file_digest(tmp_path / "adapter")
    runner = CliRunner()
    args = ["convert", str(tmp_path / "adapter"), "--to", "gguf", "-o", str(tmp_path / "a.gguf")]
    result = runner.invoke(cli, args + ([] if case == "no-base" else ["--base", str(base)]))
    assert result.exit_code == 1, result.output
    assert match in result.output and "Traceback" not in result.output
    assert not (tmp_path / "a.gguf").exists() and file_digest(tmp_path / "adapter") == before


def test_cli_json_and_no_overwrite_without_force(tmp_path: Path) -> None:
    base, adapter, _ = save_pair(tmp_path, "qwen2", ["q_proj", "v_proj"], r=4, alpha=8, rank_pattern={"v_proj": 2})
    args = ["convert", str(adapter), "--to", "gguf", "--base", str(base), "-o", str(tmp_path / "a.gguf"), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["format"] == "gguf" and payload["gguf"]["arch"] == "qwen2" and payload["ranks"] == [2, 4]
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--force" in again.output
    assert CliRunner().invoke(cli, [*args, "--force"]).exit_code == 0


LLAMA_CPP_PYTHON = os.environ.get("LORATOOL_LLAMA_CPP_PYTHON")
LLAMA_CPP_CONVERT = os.environ.get("LORATOOL_LLAMA_CPP_CONVERT")


@pytest.mark.skipif(
    not (LLAMA_CPP_PYTHON and LLAMA_CPP_CONVERT),
    reason="opt-in: LORATOOL_LLAMA_CPP_PYTHON=python with llama-cpp-python, torch, transformers, sentencepiece; "
    "LORATOOL_LLAMA_CPP_CONVERT=llama.cpp's convert_hf_to_gguf.py",
)
def test_llama_cpp_runs_the_converted_adapter_as_peft_does(tmp_path: Path) -> None:
    """The runtime itself: llama.cpp loads the base (converted by its own script) with loratool's
    adapter and gives PEFT's logits; an adapter with mixed ranks and alphas, q/k targeted."""
    assert LLAMA_CPP_PYTHON and LLAMA_CPP_CONVERT
    base, adapter, pm = save_pair(tmp_path, "llama", ATTN + ["embed_tokens", "lm_head"], r=4, alpha=8,
                                  rank_pattern={"q_proj": 8, "down_proj": 2}, alpha_pattern={"v_proj": 3})  # fmt: skip
    script = ROOT / "tests" / "runtimes" / "llama_cpp_logits.py"
    ids = [1, 5, 9, 17, 33, 64, 2, 7]
    subprocess.run([LLAMA_CPP_PYTHON, str(script), "tokenizer", str(base)], check=True)
    subprocess.run([LLAMA_CPP_PYTHON, LLAMA_CPP_CONVERT, str(base), "--outtype", "f32",
                    "--outfile", str(tmp_path / "base.gguf")], check=True)  # fmt: skip
    convert(adapter, to="gguf", base=base, output=tmp_path / "a.gguf")
    out = tmp_path / "logits.json"
    subprocess.run([LLAMA_CPP_PYTHON, str(script), "logits", str(tmp_path / "base.gguf"), str(tmp_path / "a.gguf"),
                    str(out), json.dumps(ids)], check=True)  # fmt: skip
    got = json.loads(out.read_text())
    with torch.no_grad():
        expected = pm(input_ids=torch.tensor([ids])).logits[0]
        with pm.disable_adapter():
            plain = pm(input_ids=torch.tensor([ids])).logits[0]
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the answer
    torch.testing.assert_close(torch.tensor(got["base"]), plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(got["adapted"]), expected, rtol=1e-4, atol=1e-4)


def test_an_embedding_lora_on_a_tied_base_is_refused(tmp_path: Path) -> None:
    """A tied model's output layer is, in llama.cpp, the token embedding, whose LoRA it looks up by name:
    it applies the embedding's LoRA to the output too, where the factors do not fit, and aborts
    (GGML_ASSERT in build_lora_mm, seen with llama-cpp-python 0.3.36 on the file loratool wrote)."""
    import transformers as tf

    config = tiny("llama").config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    model = tf.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    peft_adapter(model, ["q_proj", "embed_tokens"]).save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    with pytest.raises(LoraToolError, match="llama.cpp applies the embedding's LoRA to the output layer too"):
        convert(tmp_path / "adapter", to="gguf", base=tmp_path / "base", output=tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_gemma3_embedding_lora_is_refused(tmp_path: Path) -> None:
    """llama.cpp's converter cuts Gemma 3's embedding to the tokenizer's size: an embedding LoRA would not fit."""
    base, adapter, _ = save_pair(tmp_path, "gemma3", ["q_proj", "embed_tokens"], r=4, alpha=8)
    with pytest.raises(LoraToolError, match="cuts this embedding"):
        convert(adapter, to="gguf", base=base, output=tmp_path / "a.gguf")


# --- reading GGUF back: convert adapter.gguf --to peft --base MODEL ------------------------------


def deltas_through_peft(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The deltas PEFT itself applies when it loads ``adapter`` onto ``base``."""
    import transformers as tf
    from peft import PeftModel

    return peft_deltas(PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter))


def unpermuted(deltas: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """llama.cpp's deltas (by its names) in the base's row order, by module path: the oracle built
    from the GGUF's tensors alone, with the test's own permutation."""
    out = {}
    for module, delta in deltas.items():
        leaf = module.split(".")[-1]
        if leaf in ("q_proj", "k_proj"):
            heads = config["num_attention_heads"] if leaf == "q_proj" else config["num_key_value_heads"]
            delta = permute_rows(delta, heads)  # a bijection; compare in llama.cpp's order instead
        out[module] = delta
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_loratools_gguf_reads_back_to_the_deltas_it_was_written_from(tmp_path: Path, family: str) -> None:
    """Round trip through GGUF, checked by PEFT loading the result: mixed ranks and alphas (folded
    into B on the way out), q/k permuted for Llama, the embedding's transposed lora_a."""
    targets = ["qkv_proj", "o_proj", "down_proj"] if family == "phi3" else ATTN + ["embed_tokens", "lm_head"]
    base, adapter, pm = save_pair(tmp_path, family, targets, r=4, alpha=8, rank_pattern={"o_proj": 8, "down_proj": 2},
                                  alpha_pattern={"o_proj": 3})  # fmt: skip
    convert(adapter, to="gguf", base=base, output=tmp_path / "a.gguf")
    result = convert(tmp_path / "a.gguf", to="peft", base=base, output=tmp_path / "back")
    assert result.source_format == "gguf" and result.format == "peft" and result.ranks == [2, 4, 8]
    got, want = deltas_through_peft(base, tmp_path / "back"), peft_deltas(pm)
    assert set(got) == set(want)
    for module, delta in want.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-6, atol=1e-7, msg=module)


def test_a_q8_0_gguf_reads_back_dequantized(tmp_path: Path) -> None:
    base, adapter, pm = save_pair(tmp_path, "llama", ["q_proj", "k_proj", "down_proj"], r=4, alpha=8)
    convert(adapter, to="gguf", base=base, output=tmp_path / "a.gguf", outtype="q8_0")
    convert(tmp_path / "a.gguf", to="peft", base=base, output=tmp_path / "back")
    config = json.loads((base / "config.json").read_text())
    got = deltas_through_peft(base, tmp_path / "back")
    for module, delta in unpermuted(got, config).items():  # what llama.cpp computes from the rounded factors
        torch.testing.assert_close(delta, llama_cpp_deltas(tmp_path / "a.gguf")[llama_cpp_name(module)],
                                   rtol=1e-5, atol=1e-6, msg=module)  # fmt: skip
    for module, delta in peft_deltas(pm).items():  # and near the original
        assert (got[module] - delta).abs().max() <= 2e-2 * delta.abs().max(), module


@pytest.mark.parametrize("name", ["llama-peft-adapter-llama-cpp.gguf", "llama-peft-adapter-llama-cpp-q8_0.gguf"])
def test_llama_cpps_own_converter_output_reads_back(tmp_path: Path, fixtures: Path, name: str) -> None:
    """fixtures/ holds llama-peft-adapter as llama.cpp's convert_lora_to_gguf.py wrote it (f32 and
    q8_0). Read back, it gives what llama.cpp computes from it; that is PEFT's adapter wherever
    llama.cpp's converter kept it. The converter writes one lora_alpha and ignores alpha_pattern:
    down_proj (alpha 4 in the pattern, 8 in the file) comes back twice as strong, as llama.cpp runs it."""
    base = fixtures / "llama-base"
    out = tmp_path / "back"
    args = ["convert", str(fixtures / name), "--to", "peft", "--base", str(base), "-o", str(out), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source_format"] == "gguf"
    got = deltas_through_peft(base, out)
    config = json.loads((base / "config.json").read_text())
    llama_cpp = llama_cpp_deltas(fixtures / name)
    peft = deltas_through_peft(base, fixtures / "llama-peft-adapter")
    assert set(got) == set(peft) and len(got) == 6
    tol = {"rtol": 1e-5, "atol": 1e-6} if "q8_0" not in name else {"rtol": 2e-2, "atol": 2e-3}
    for module, delta in unpermuted(got, config).items():
        torch.testing.assert_close(delta, llama_cpp[llama_cpp_name(module)], rtol=1e-5, atol=1e-6, msg=module)
        factor = 2.0 if module.endswith("down_proj") else 1.0
        torch.testing.assert_close(got[module], factor * peft[module], **tol, msg=module)


def write_gguf_file(path: Path, arch: str = "llama", kind: str = "adapter", tensors: dict | None = None,
                    alpha: float = 8.0) -> Path:  # fmt: skip
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    if kind == "adapter":
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    else:
        writer.add_type(gguf.GGUFType.MODEL)
    for name, t in (tensors or {}).items():
        writer.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def pair(rows: int, cols: int, r: int = 2, fill: float = 0.1) -> dict:
    import numpy as np

    return {"lora_a": np.full((r, cols), fill), "lora_b": np.full((rows, r), fill)}


@pytest.mark.parametrize(("case", "match"), [
    ("no-base", "needs the base checkpoint"),
    ("truncated", "not a readable GGUF file"),
    ("model", "not a llama.cpp LoRA adapter"),
    ("other-arch", "for llama.cpp's 'qwen2' models; the base is 'llama'"),
    ("half-pair", "blk.0.attn_v.weight has no lora_b"),
    ("unknown-tensor", "neither a lora_a nor a lora_b"),
    ("no-such-module", "blk.7.attn_v.weight: the base has no module"),
    ("wrong-shape", "does not fit the base"),
    ("nan", "NaN or Inf"),
    ("nan-alpha", "adapter.lora.alpha is nan"),
])  # fmt: skip
def test_a_gguf_that_cannot_be_read_back_is_refused_by_name(tmp_path: Path, fixtures: Path, case: str,
                                                            match: str) -> None:  # fmt: skip
    good = fixtures / "llama-peft-adapter-llama-cpp.gguf"
    v = {f"blk.0.attn_v.weight.{k}": t for k, t in pair(16, 32).items()}
    src = {
        "no-base": lambda: good,
        "truncated": lambda: tmp_path.joinpath("t.gguf").write_bytes(good.read_bytes()[:3000]) and tmp_path / "t.gguf",
        "model": lambda: write_gguf_file(tmp_path / "m.gguf", kind="model", tensors={"token_embd.weight": [[0.0]]}),
        "other-arch": lambda: write_gguf_file(tmp_path / "q.gguf", arch="qwen2", tensors=v),
        "half-pair": lambda: write_gguf_file(tmp_path / "h.gguf", tensors={"blk.0.attn_v.weight.lora_a": [[0.0]]}),
        "unknown-tensor": lambda: write_gguf_file(tmp_path / "u.gguf", tensors={"rope_freqs.weight": [0.0]}),
        "no-such-module": lambda: write_gguf_file(tmp_path / "n.gguf", tensors={
            k.replace("blk.0", "blk.7"): t for k, t in v.items()}),
        "wrong-shape": lambda: write_gguf_file(tmp_path / "w.gguf", tensors={
            f"blk.0.attn_v.weight.{k}": t for k, t in pair(24, 32).items()}),
        "nan": lambda: write_gguf_file(tmp_path / "x.gguf", tensors={**v, "blk.0.attn_v.weight.lora_a":
                                                                     pair(16, 32, fill=float("nan"))["lora_a"]}),
        "nan-alpha": lambda: write_gguf_file(tmp_path / "a.gguf", tensors=v, alpha=float("nan")),
    }[case]()  # fmt: skip
    args = ["convert", str(src), "--to", "peft", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args + ([] if case == "no-base" else ["--base", str(fixtures / "llama-base")]))
    assert result.exit_code == 1, result.output
    assert match in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_norm_tensors_are_left_out_as_llama_cpp_leaves_them_and_alpha_0_means_scaling_1(
    tmp_path: Path, fixtures: Path
) -> None:  # fmt: skip
    import numpy as np

    v = {f"blk.0.attn_v.weight.{k}": t for k, t in pair(16, 32, r=2, fill=0.5).items()}
    src = write_gguf_file(tmp_path / "a.gguf", tensors={**v, "blk.0.attn_norm.weight": np.ones(32)}, alpha=0.0)
    result = convert(src, to="peft", base=fixtures / "llama-base", output=tmp_path / "out")
    assert any("left out 1 norm tensor(s) (blk.0.attn_norm.weight)" in w for w in result.warnings)
    got = deltas_through_peft(fixtures / "llama-base", tmp_path / "out")
    assert list(got) == ["model.layers.0.self_attn.v_proj"]
    torch.testing.assert_close(got["model.layers.0.self_attn.v_proj"], torch.full((16, 32), 0.5, dtype=torch.double))


def test_other_commands_point_a_gguf_adapter_to_convert(tmp_path: Path, fixtures: Path) -> None:
    gguf_file = fixtures / "llama-peft-adapter-llama-cpp.gguf"
    for args in (["inspect", str(gguf_file)], ["merge", str(fixtures / "llama-base"), str(gguf_file), "-o",
                                                 str(tmp_path / "m")]):  # fmt: skip
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "loratool convert" in result.output and "--base MODEL" in result.output
        assert "Traceback" not in result.output


def test_the_name_table_covers_the_layers_in_use_not_the_configs_count(fixtures: Path, monkeypatch) -> None:
    """llama.cpp's name table is built for the layers the adapter (or, read back, the base) numbers, at
    most the config's count: a num_hidden_layers of 10^30 built a table of that many layers until the
    memory ran out."""
    import gguf

    from loratool.formats import load_adapter
    from loratool.runtimes.gguf import plan_gguf

    asked: list[int] = []
    build = gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda arch, n: asked.append(n) or build(arch, min(n, 64)))
    adapter = load_adapter(fixtures / "llama-peft-adapter")  # layers 0 and 1
    config = json.loads((fixtures / "llama-base" / "config.json").read_text())
    plan = plan_gguf(adapter, {**config, "num_hidden_layers": 10**30})
    assert asked == [2] and len(plan.names) == len(adapter.modules)
    assert plan_gguf(adapter, {**config, "num_hidden_layers": 1}).problems  # layer 1 is past the config's count
    assert asked[-1] == 1


def test_factors_past_the_outtypes_range_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base, adapter, _ = save_pair(tmp_path, "llama", ["q_proj"], r=4, alpha=8)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
    tensors[key] = torch.full_like(tensors[key], 1e5)  # finite in float32, past float16's 65504
    save_file(tensors, str(path), metadata={"format": "pt"})
    for outtype in ("f16", "q8_0"):  # Q8_0 keeps rows that do not fill its blocks (B's rows of r=4) in float16
        r = CliRunner().invoke(cli, ["convert", str(adapter), "--to", "gguf", "--base", str(base), "--outtype",
                                     outtype, "-o", str(tmp_path / "a.gguf")])  # fmt: skip
        assert r.exit_code == 1 and "blk.0.attn_q.weight.lora_b" in r.output and "--outtype f32" in r.output, r.output
        assert not (tmp_path / "a.gguf").exists() and not list(tmp_path.glob("*.gguf*"))
    convert(adapter, to="gguf", base=base, output=tmp_path / "a.gguf")  # f32 holds them
    assert float(reader_tensors(tmp_path / "a.gguf")["blk.0.attn_q.weight.lora_b"].max()) == 1e5
