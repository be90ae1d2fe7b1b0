"""Grown vocabularies: a fine-tune that added tokens has more embedding rows than its base. extract
stores those tensors whole (PEFT's modules_to_save), merge writes them and config.json's
vocab_size; PEFT, on a base resized as PEFT users resize it, is the oracle."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import llama_config, logits

from loratool.formats import load_adapter
from loratool.ops.extract import extract
from loratool.ops.merge import merge, unmerge
from loratool.ops.validate import validate

GROWN = 136  # from 128


def base_and_grown_ft(tmp_path: Path, *, tied: bool):
    import transformers as tf

    config = llama_config()
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    ft = tf.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    ft.resize_token_embeddings(GROWN)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ft.model.embed_tokens.weight.add_(0.01 * torch.randn(ft.model.embed_tokens.weight.shape, generator=g))
        if not tied:
            ft.lm_head.weight.add_(0.01 * torch.randn(ft.lm_head.weight.shape, generator=g))
        for layer in ft.model.layers:
            layer.self_attn.q_proj.weight.add_(0.01 * torch.randn(32, 32, generator=g))
    ft.save_pretrained(tmp_path / "ft")
    return ft


def test_added_tokens_are_stored_whole_and_merge_like_peft(tmp_path: Path) -> None:
    import transformers as tf
    from peft import PeftModel

    ft = base_and_grown_ft(tmp_path, tied=False)
    result = extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / "adapter", rank=32, show_progress=False)
    assert result.grown == {"model.embed_tokens.weight": GROWN, "lm_head.weight": GROWN}
    adapter = load_adapter(tmp_path / "adapter")
    assert set(adapter.whole) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == [
        "lm_head", "model.embed_tokens"]  # fmt: skip
    report = validate(tmp_path / "adapter", base=tmp_path / "base")
    assert report.valid and any("grows from 128 to 136" in str(w) for w in report.warnings)

    merged = merge(tmp_path / "base", [tmp_path / "adapter"], output=tmp_path / "merged", show_progress=False)
    assert any("vocabulary grew" in w for w in merged.warnings)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == GROWN

    base = tf.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    base.resize_token_embeddings(GROWN)  # what a PEFT user does before loading such an adapter
    oracle = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    ours = tf.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6, msg=key)
    # rank 32 holds the 32 x 32 q_proj deltas exactly: the merged model is the fine-tune
    torch.testing.assert_close(logits(ours), logits(ft), rtol=1e-4, atol=1e-4)


def test_a_tied_vocabulary_is_one_tensor(tmp_path: Path) -> None:
    import transformers as tf
    from safetensors import safe_open

    base_and_grown_ft(tmp_path, tied=True)
    result = extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / "adapter", rank=32, show_progress=False)
    assert list(result.grown) == ["model.embed_tokens.weight"]
    merge(tmp_path / "base", [tmp_path / "adapter"], output=tmp_path / "merged", show_progress=False)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as b:  # fmt: skip
        assert ("lm_head.weight" in f.keys()) == ("lm_head.weight" in b.keys())  # written where the base stores it
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [GROWN, 32]
    ft = tf.LlamaForCausalLM.from_pretrained(tmp_path / "ft").eval()
    ours = tf.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(ours), logits(ft), rtol=1e-4, atol=1e-4)


def test_trainable_tokens_merge_as_peft_replaces_rows(tmp_path: Path, cli) -> None:
    """PEFT's trainable_token_indices: the adapter holds the new rows; merging copies them in
    (PEFT's index_copy), in a tied output layer too; unmerge and combine refuse (no originals,
    not linear)."""
    import transformers as tf
    from helpers import peft_adapter
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    for tied in (False, True):
        root = tmp_path / f"tied{tied}"
        config = llama_config()
        config.tie_word_embeddings = tied
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(config).eval()
        model.save_pretrained(root / "base")
        pm = get_peft_model(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7]))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name or "trainable_tokens_delta" in name:
                    p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(root / "adapter")
        assert validate(root / "adapter").valid
        res = cli("merge", root / "base", root / "adapter", "-o", root / "merged", "--quiet")
        assert res.exit_code == 0, res.output
        oracle = pm.merge_and_unload().state_dict()
        merged = load_file(str(root / "merged" / "model.safetensors"))
        for key, value in merged.items():
            torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6, msg=key)
        ours = tf.LlamaForCausalLM.from_pretrained(root / "merged").eval()
        base = tf.LlamaForCausalLM.from_pretrained(root / "base").eval()
        assert not torch.equal(ours.model.embed_tokens.weight[5], base.model.embed_tokens.weight[5])
        if tied:
            assert torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)
    res = cli("unmerge", root / "merged", root / "adapter", "-o", root / "back")
    assert res.exit_code == 1 and "original" in res.output
    config_path = root / "adapter" / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for indices, says in (([1, 5, -1], "distinct token ids"), ([1, 5, 5], "distinct token ids"), ([], "non-empty"),
                          ([1, 5, 999], "do not fit")):  # fmt: skip
        config_path.write_text(json.dumps({**good, "trainable_token_indices": indices}))
        res = cli("merge", root / "base", root / "adapter", "-o", root / "bad", "--quiet")
        assert res.exit_code == 1 and says in res.output, res.output  # our message, so not a traceback
        assert not (root / "bad").exists()
    config_path.write_text(json.dumps(good))
    peft_adapter(tf.LlamaForCausalLM(llama_config()), ["q_proj"]).save_pretrained(tmp_path / "plain")
    res = cli("combine", root / "adapter", tmp_path / "plain", "-o", tmp_path / "mix")
    assert res.exit_code == 1 and "trainable tokens" in res.output


def test_a_lora_on_a_tied_output_layer_is_refused_by_name(tmp_path: Path, cli) -> None:
    """A PEFT LoRA on lm_head of a model that ties it to embed_tokens (Llama 3.2 1B and 3B, Gemma): the
    base holds one matrix, so the head's delta would change the input embedding too (PEFT's merge
    does, and warns). It was refused as 'an adapter for another model'; it is named, with the fix."""
    import transformers as tf
    from helpers import peft_adapter

    config = llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "base")
    model = tf.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_adapter(model, ["q_proj", "lm_head"], seed=1).save_pretrained(tmp_path / "adapter")
    r = cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert "a LoRA on 'lm_head', which this base ties to its input embedding 'model.embed_tokens.weight'" in r.stderr
    assert "untie the base first" in r.stderr
    assert not (tmp_path / "out").exists()
    report = validate(tmp_path / "adapter", base=tmp_path / "base")
    assert any(p.path == "base/lm_head" and "ties lm_head to its input embedding" in p.message for p in report.problems)


def _tied_base(tmp_path: Path):
    import transformers as tf

    config = llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "base")
    return lambda: tf.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()


def _trained_peft(model, targets: list[str], **cfg):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


def test_ensure_weight_tying_merges_as_the_adapter_behaves(tmp_path: Path) -> None:
    """PEFT's ensure_weight_tying trains a tied model's embedding and head as one: the head's LoRA is the
    embedding's, transposed. The faithful merge adds that delta once to the one matrix; the merged
    model then gives the unmerged PEFT model's logits (PEFT 0.21's merge_and_unload did not: it was
    about 2 off here). validate counts the tied partner as targeted, as PEFT does."""
    import transformers as tf
    from peft import PeftModel

    load = _tied_base(tmp_path)
    for targets in (["q_proj", "embed_tokens"], ["q_proj", "lm_head"]):
        name = "-".join(targets)
        pm = _trained_peft(load(), targets, ensure_weight_tying=True)
        pm.save_pretrained(tmp_path / name)
        assert validate(tmp_path / name, base=tmp_path / "base").valid
        result = merge(tmp_path / "base", [tmp_path / name], output=tmp_path / f"m-{name}", show_progress=False)
        assert not any("is tied to" in w for w in result.warnings)
        served = PeftModel.from_pretrained(load(), str(tmp_path / name)).eval()
        ours = tf.LlamaForCausalLM.from_pretrained(tmp_path / f"m-{name}").eval()
        torch.testing.assert_close(logits(ours), logits(served), rtol=1e-4, atol=1e-5, msg=name)
        back = unmerge(tmp_path / f"m-{name}", [tmp_path / name], output=tmp_path / f"u-{name}",
                       check=tmp_path / "base", show_progress=False)  # fmt: skip
        assert back.check is not None and back.check.max_rounding_units <= 1.0, name


def test_an_embedding_lora_on_a_tied_model_merges_as_peft_and_says_what_it_changes(tmp_path: Path) -> None:
    import transformers as tf
    from peft import PeftModel

    load = _tied_base(tmp_path)
    _trained_peft(load(), ["q_proj", "embed_tokens"]).save_pretrained(tmp_path / "adapter")
    result = merge(tmp_path / "base", [tmp_path / "adapter"], output=tmp_path / "merged", show_progress=False)
    assert any("model.embed_tokens is tied to lm_head in this base" in w for w in result.warnings), result.warnings
    oracle = PeftModel.from_pretrained(load(), str(tmp_path / "adapter")).merge_and_unload()
    ours = tf.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(ours), logits(oracle), rtol=1e-4, atol=1e-5)


def test_a_trained_tied_head_in_modules_to_save_is_refused_by_name(tmp_path: Path, cli) -> None:
    """modules_to_save lm_head on a tied model: the trained head would have to replace the one matrix,
    the input embedding with it; it was refused as 'an adapter for another model'."""
    load = _tied_base(tmp_path)
    _trained_peft(load(), ["q_proj"], modules_to_save=["lm_head"]).save_pretrained(tmp_path / "adapter")
    r = cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert "replaces 'lm_head' whole (modules_to_save), which this base ties to its input embedding" in r.stderr
    assert not (tmp_path / "out").exists()


MLX_PYTHON = os.environ.get("LORATOOL_MLX_PYTHON")


@pytest.mark.parametrize("ensure", [True, False], ids=["ensure_weight_tying", "plain"])
@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_tied_adapters_go_to_mlx_as_mlx_lm_serves_them(tmp_path: Path, cli, ensure: bool, target: str) -> None:
    """mlx-lm's model of a tied base has no output layer of its own: the head is the embedding's
    as_linear, LoRA included. An ensure_weight_tying adapter (PEFT applies the embedding's LoRA to both
    uses) is written as its embedding's LoRA alone; its head copy was written, which mlx-lm refuses
    ("not an adapter parameter"), and its saved head refused the conversion. A LoRA on the head alone,
    or on the embedding alone (served in mlx-lm: 15 logits off PEFT's), is refused by name."""
    load = _tied_base(tmp_path)
    _trained_peft(load(), ["q_proj", target], **({"ensure_weight_tying": True} if ensure else {})).save_pretrained(
        tmp_path / "adapter"
    )
    r = cli("convert", tmp_path / "adapter", "--to", "mlx", "--base", tmp_path / "base", "-o", tmp_path / "mlx")
    checked = cli("validate", tmp_path / "adapter", "--base", tmp_path / "base", "--runtime", "mlx")
    assert checked.exit_code == r.exit_code, checked.output  # validate says what convert does
    if not ensure:
        assert r.exit_code == 1 and "Traceback" not in r.stderr, r.output
        assert ("no layer to go to" if target == "lm_head" else "mlx-lm would serve another model") in r.stderr
        assert not (tmp_path / "mlx").exists()
        return
    assert r.exit_code == 0, r.output
    assert "left out lm_head's LoRA, the embedding's transposed" in r.stderr
    written = load_adapter(tmp_path / "mlx")
    assert "lm_head" not in written.modules and "model.embed_tokens" in written.modules and not written.whole
    if MLX_PYTHON:  # the runtime itself: PEFT's served logits
        from peft import PeftModel

        ids = [[1, 5, 9, 17, 33, 64, 2, 7]]
        subprocess.run([MLX_PYTHON, str(Path(__file__).parent / "runtimes" / "mlx_logits.py"), str(tmp_path / "base"),
                        str(tmp_path / "mlx"), str(tmp_path / "l.json"), json.dumps(ids)], check=True)  # fmt: skip
        with torch.no_grad():
            want = PeftModel.from_pretrained(load(), str(tmp_path / "adapter")).eval()(torch.tensor(ids)).logits
        torch.testing.assert_close(torch.tensor(json.loads((tmp_path / "l.json").read_text())), want,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_an_embedding_lora_to_mlx_without_a_base_says_what_mlx_lm_does(tmp_path: Path, cli) -> None:
    load = _tied_base(tmp_path)
    _trained_peft(load(), ["q_proj", "embed_tokens"]).save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    r = cli("convert", tmp_path / "adapter", "--to", "mlx", "-o", tmp_path / "mlx")
    assert r.exit_code == 0, r.output
    assert "to the output layer too where the base ties them" in r.stderr and "give --base" in r.stderr


def test_combined_tied_adapters_stay_tied(tmp_path: Path, cli) -> None:
    """Two ensure_weight_tying adapters combined by SVD: each module is truncated apart, so the head's
    LoRA came out the embedding's transposed only up to rounding, and merge refused it as a LoRA of its
    own on the tied head. It is set to the combined embedding's, transposed: at full rank the merge
    equals merging both sources."""
    import transformers as tf

    load = _tied_base(tmp_path)
    for k, targets in enumerate((["q_proj", "embed_tokens"], ["v_proj", "lm_head"])):
        pm = _trained_peft(load(), targets, ensure_weight_tying=True)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.mul_(1 + k)
        pm.save_pretrained(tmp_path / f"a{k}")
    sources = [tmp_path / "a0", tmp_path / "a1"]
    assert cli("combine", *sources, "--method", "svd", "-r", "8", "-o", tmp_path / "c").exit_code == 0
    combined = load_adapter(tmp_path / "c")
    assert torch.equal(combined.modules["lm_head"].lora_A, combined.modules["model.embed_tokens"].lora_B.T)
    r = cli("merge", tmp_path / "base", tmp_path / "c", "-o", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert cli("merge", tmp_path / "base", *sources, "-o", tmp_path / "both").exit_code == 0
    ours, both = (tf.LlamaForCausalLM.from_pretrained(tmp_path / n).eval() for n in ("m", "both"))
    torch.testing.assert_close(logits(ours), logits(both), rtol=1e-4, atol=1e-4)


def test_a_saved_tied_head_passes_validate_as_convert_takes_it(tmp_path: Path, cli) -> None:
    """PEFT saves a tied model's embedding and head whole when asked to (save_embedding_layers), with
    LoRA elsewhere: convert --to mlx --base leaves both out as the base's; validate read the lazily
    loaded head's values to compare them ('aten::equal ... Meta tensors', as a loratool bug)."""
    load = _tied_base(tmp_path)
    _trained_peft(load(), ["up_proj"]).save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    assert "lm_head.weight" in load_adapter(tmp_path / "adapter").whole
    checked = cli("validate", tmp_path / "adapter", "--base", tmp_path / "base", "--runtime", "mlx")
    assert checked.exit_code == 0 and "Traceback" not in checked.output and "bug" not in checked.output, checked.output
    r = cli("convert", tmp_path / "adapter", "--to", "mlx", "--base", tmp_path / "base", "-o", tmp_path / "mlx")
    assert r.exit_code == 0, r.output


def _untied_copy(load, folder: Path) -> None:
    import transformers as tf

    model = load()
    model.config.tie_word_embeddings = False
    untied = tf.LlamaForCausalLM(model.config).eval()
    untied.load_state_dict({**load().state_dict(), "lm_head.weight": load().model.embed_tokens.weight.clone()})
    untied.save_pretrained(folder)


def test_an_ensure_weight_tying_adapter_on_an_untied_base_is_refused(tmp_path: Path, cli) -> None:
    """PEFT adds the tied partner only for a base that ties it: on an untied copy of the base it loads
    the embedding's factors and drops the head's, while merge applied both and convert --to mlx kept
    one or the other by the base. Refused by name by all three."""
    pytest.importorskip("gguf")
    load = _tied_base(tmp_path)
    _untied_copy(load, tmp_path / "untied")
    _trained_peft(load(), ["q_proj", "embed_tokens"], ensure_weight_tying=True).save_pretrained(tmp_path / "adapter")
    convert = ["convert", tmp_path / "adapter", "--base", tmp_path / "untied", "--to"]
    merge = ["merge", tmp_path / "untied", tmp_path / "adapter", "-o", tmp_path / "out"]
    for args in (merge, [*convert, "mlx", "-o", tmp_path / "out"], [*convert, "gguf", "-o", tmp_path / "out.gguf"]):
        r = cli(*args)
        assert r.exit_code == 1 and "ensure_weight_tying" in r.stderr and "does not tie them" in r.stderr, r.output
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()
    checked = cli("validate", tmp_path / "adapter", "--base", tmp_path / "untied")
    assert checked.exit_code == 1 and "does not tie them" in checked.output
    assert cli("validate", tmp_path / "adapter", "--base", tmp_path / "base").exit_code == 0


def test_an_extracted_tied_head_converts_whole_for_an_untied_base(tmp_path: Path, cli) -> None:
    """extract gives a tied head the embedding's LoRA, transposed, and names it a target: on an untied
    copy of the base PEFT loads both, and so does mlx-lm, which then has an output layer of its own."""
    import transformers as tf

    load = _tied_base(tmp_path)
    _untied_copy(load, tmp_path / "untied")
    ft = load()
    with torch.no_grad():
        ft.model.embed_tokens.weight.add_(0.05 * torch.randn(128, 2) @ torch.randn(2, 32))
    ft.save_pretrained(tmp_path / "ft")
    assert cli("extract", tmp_path / "base", tmp_path / "ft", "-r", "2", "-o", tmp_path / "adapter").exit_code == 0
    assert "lm_head" in load_adapter(tmp_path / "adapter").modules
    r = cli("convert", tmp_path / "adapter", "--to", "mlx", "--base", tmp_path / "untied", "-o", tmp_path / "mlx")
    assert r.exit_code == 0, r.output
    assert "lm_head" in load_adapter(tmp_path / "mlx").modules
    if MLX_PYTHON:
        from peft import PeftModel

        ids = [[1, 5, 9, 17, 33, 64, 2, 7]]
        subprocess.run([MLX_PYTHON, str(Path(__file__).parent / "runtimes" / "mlx_logits.py"), str(tmp_path / "untied"),
                        str(tmp_path / "mlx"), str(tmp_path / "l.json"), json.dumps(ids)], check=True)  # fmt: skip
        base = tf.LlamaForCausalLM.from_pretrained(tmp_path / "untied").eval()
        with torch.no_grad():
            want = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(torch.tensor(ids)).logits
            assert (want - ft(torch.tensor(ids)).logits).abs().max() < 1e-4  # PEFT on the untied copy: the fine-tune
        torch.testing.assert_close(torch.tensor(json.loads((tmp_path / "l.json").read_text())), want,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_an_mlx_embedding_lora_converts_to_peft_as_mlx_lm_serves_it(tmp_path: Path, cli) -> None:
    """mlx-lm's head of a tied model is the embedding's as_linear, LoRA included; PEFT applies a LoRA to
    the module it names only. Back from mlx-lm, the adapter of an ensure_weight_tying one gave PEFT the
    embedding's delta without the head's (1.85 logits off); with --base the head gets its copy, and PEFT
    serves the original adapter's logits (without --base, a warning)."""
    from peft import PeftModel

    load = _tied_base(tmp_path)
    _trained_peft(load(), ["q_proj", "embed_tokens"], ensure_weight_tying=True).save_pretrained(tmp_path / "adapter")
    r = cli("convert", tmp_path / "adapter", "--to", "mlx", "--base", tmp_path / "base", "-o", tmp_path / "mlx")
    assert r.exit_code == 0, r.output
    unknown = cli("convert", tmp_path / "mlx", "--to", "peft", "-o", tmp_path / "guess")
    assert unknown.exit_code == 0 and "give --base" in unknown.stderr
    r = cli("convert", tmp_path / "mlx", "--to", "peft", "--base", tmp_path / "base", "-o", tmp_path / "back")
    assert r.exit_code == 0, r.output
    with torch.no_grad():
        want = logits(PeftModel.from_pretrained(load(), str(tmp_path / "adapter")).eval())
        served = logits(PeftModel.from_pretrained(load(), str(tmp_path / "back")).eval())
    torch.testing.assert_close(served, want, rtol=1e-4, atol=1e-5)
    assert cli("merge", tmp_path / "base", tmp_path / "back", "-o", tmp_path / "m").exit_code == 0
    import transformers as tf

    torch.testing.assert_close(logits(tf.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()), want,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    direct = merge(tmp_path / "base", [tmp_path / "mlx"], output=tmp_path / "m2", show_progress=False)
    assert not any("is tied to" in w for w in direct.warnings)  # merged, it serves as mlx-lm serves it
    torch.testing.assert_close(logits(tf.LlamaForCausalLM.from_pretrained(tmp_path / "m2").eval()), want,
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_a_fine_tune_that_untied_its_head_is_named(tmp_path: Path, cli) -> None:
    """A tied base and a fine-tune that stores a head of its own: refused as 'not one architecture';
    now named, with the fix, which works: extracted against an untied copy of the base, PEFT gives the
    fine-tune's logits."""
    import transformers as tf
    from peft import PeftModel

    load = _tied_base(tmp_path)
    _untied_copy(load, tmp_path / "untied")
    ft = tf.LlamaForCausalLM.from_pretrained(tmp_path / "untied").eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ft.lm_head.weight.add_(0.05 * torch.randn(128, 2, generator=g) @ torch.randn(2, 32, generator=g))
        ft.model.embed_tokens.weight.add_(0.05 * torch.randn(128, 2, generator=g) @ torch.randn(2, 32, generator=g))
    ft.save_pretrained(tmp_path / "ft")
    r = cli("extract", tmp_path / "base", tmp_path / "ft", "-r", "2", "-o", tmp_path / "a")
    assert r.exit_code == 1 and "its training untied the two" in r.stderr and not (tmp_path / "a").exists()
    assert cli("extract", tmp_path / "untied", tmp_path / "ft", "-r", "2", "-o", tmp_path / "a").exit_code == 0
    base = tf.LlamaForCausalLM.from_pretrained(tmp_path / "untied").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()), logits(ft),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_an_ensure_weight_tying_adapter_that_grew_the_vocabulary_merges_as_it_behaves(tmp_path: Path) -> None:
    """Added tokens: PEFT saves the grown embedding whole and the tied head as its copy; the head's copy
    was taken for a trained head (its rows no longer the base's) and refused."""
    import transformers as tf

    load = _tied_base(tmp_path)
    model = load()
    model.resize_token_embeddings(GROWN, mean_resizing=False)
    pm = _trained_peft(model, ["q_proj", "embed_tokens"], ensure_weight_tying=True)
    pm.save_pretrained(tmp_path / "adapter")
    assert load_adapter(tmp_path / "adapter").whole["lm_head.weight"].shape[0] == GROWN
    merge(tmp_path / "base", [tmp_path / "adapter"], output=tmp_path / "m", show_progress=False)
    ours = tf.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([[1, 5, 130, 17, 33, 135, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, pm.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
