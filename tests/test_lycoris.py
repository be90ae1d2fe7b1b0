"""LyCORIS LoHa and LoKr -> LoRA (``convert FILE --to peft -r R --base MODEL``), checked against
LyCORIS itself: the delta its modules add in their forward, and the model's output with its
network applied."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_deltas, tiny_model

from loratool.cli import cli
from loratool.errors import LoraToolError
from loratool.formats.lycoris import lokr_delta
from loratool.ops.convert import convert

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.WARNING)

# (algo, create_lycoris arguments): LoHa; LoKr with both halves whole (scale 1: LyCORIS ignores
# alpha); with w2 factored (scale alpha / w2's rank); with w1 factored (alpha / w1's rank)
VARIANTS = {
    "loha": ("loha", {"linear_dim": 2, "linear_alpha": 1}),
    "lokr-whole": ("lokr", {"linear_dim": 4, "linear_alpha": 2, "factor": 4}),
    "lokr-w2-factored": ("lokr", {"linear_dim": 2, "linear_alpha": 3, "factor": 4, "decompose_both": True}),
    "lokr-w1-factored": ("lokr", {"linear_dim": 2, "linear_alpha": 3, "factor": 8, "decompose_both": True}),
}


def lycoris_pair(tmp_path: Path, variant: str):
    """A tiny Llama saved as the base, and a LyCORIS network on it with random factors, saved by
    LyCORIS; returns (base dir, file, the model with the network applied, {module path: delta})."""
    from lycoris import create_lycoris

    algo, kwargs = VARIANTS[variant]
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    net = create_lycoris(model, 1.0, algo=algo, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    net.save_weights(str(tmp_path / "lyco.safetensors"), torch.float32, None)
    paths = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    deltas = {}
    for m in net.loras:
        path = next(p for p in paths if "lycoris_" + p.replace(".", "_") == m.lora_name)
        # the delta LyCORIS's forward adds (get_weight * scalar). Its get_diff_weight, in 4.1.3,
        # multiplies in the scale a second time, and the forward is what the model runs
        deltas[path] = (m.get_weight(m.shape) * m.scalar).detach().double()
    return tmp_path / "base", tmp_path / "lyco.safetensors", model, deltas


def through_peft(base: Path, adapter: Path) -> tuple[dict[str, torch.Tensor], object]:
    """PEFT's deltas with ``adapter`` loaded onto ``base``, and the model."""
    import transformers as tf
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    return peft_deltas(pm), pm


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_at_full_rank_peft_gives_lycoris_own_deltas_and_output(tmp_path: Path, variant: str) -> None:
    base, file, lyco_model, want = lycoris_pair(tmp_path, variant)
    result = convert(file, to="peft", rank=64, base=base, output=tmp_path / "out")
    assert result.source_format == "lycoris" and result.truncation is not None
    assert set(result.truncation) == {"lycoris_" + p.replace(".", "_") for p in want}
    assert max(result.truncation.values()) < 1e-5
    got, pm = through_peft(base, tmp_path / "out")
    assert set(got) == set(want)
    for path, delta in want.items():
        assert delta.abs().max() > 1e-3, path  # the oracle is not trivially zero
        torch.testing.assert_close(got[path], delta, rtol=1e-5, atol=1e-5, msg=path)
    ids = torch.tensor([[1, 5, 9, 17, 33, 64, 2, 7]])
    with torch.no_grad():
        expected = lyco_model(input_ids=ids).logits
        torch.testing.assert_close(pm(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        with pm.disable_adapter():
            assert (pm(input_ids=ids).logits - expected).abs().max() > 1e-2  # the network changes the answer


@pytest.mark.parametrize("variant", ["loha", "lokr-w2-factored"])
def test_below_full_rank_each_module_is_the_best_approximation_and_its_error_is_reported(
    tmp_path: Path, variant: str
) -> None:  # fmt: skip
    base, file, _, want = lycoris_pair(tmp_path, variant)
    result = convert(file, to="peft", rank=3, base=base, output=tmp_path / "out")
    got, _ = through_peft(base, tmp_path / "out")
    assert result.ranks == [3] and result.truncation is not None
    for path, delta in want.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # float64: Eckart-Young's best rank 3
        best = u[:, :3] * s[:3] @ vh[:3]
        torch.testing.assert_close(got[path], best, rtol=1e-4, atol=1e-5, msg=path)
        error = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
        reported = result.truncation["lycoris_" + path.replace(".", "_")]
        assert reported == pytest.approx(error, rel=1e-3, abs=1e-6), path


def test_the_cli_reports_the_truncation_and_json_holds_it(tmp_path: Path) -> None:
    base, file, _, _ = lycoris_pair(tmp_path, "loha")
    args = ["convert", str(file), "--to", "peft", "-r", "2", "--base", str(base), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "LoHa/LoKr module(s) truncated: relative error mean" in result.output
    payload = json.loads(CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "j"), "--json"]).stdout)
    assert payload["source_format"] == "lycoris" and len(payload["truncation"]) == 15


def test_lokr_delta_is_the_kronecker_product() -> None:
    w1, w2 = torch.randn(2, 3), torch.randn(4, 5)
    out = lokr_delta(w1, w2, 0.5)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[4 * i : 4 * i + 4, 5 * j : 5 * j + 5], 0.5 * w1[i, j] * w2)


@pytest.mark.parametrize(("halves", "alpha", "scale"), [
    ("both-factored", 6.0, 3.0),  # the first factored half's rank (w1's: 2), as LyCORIS's rank_scale
    ("both-whole", 7.0, 1.0),  # LyCORIS ignores alpha when no half is factored
    ("w2-factored-no-alpha", None, 1.0),  # alpha absent: alpha = r
])  # fmt: skip
def test_lokr_scale_rules_on_hand_written_files(tmp_path: Path, halves: str, alpha: float | None,
                                                scale: float) -> None:  # fmt: skip
    from safetensors.torch import save_file

    tiny_model("llama").save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    w1a, w1b, w2a, w2b = (torch.randn(shape, generator=g) for shape in ((4, 2), (2, 4), (8, 3), (3, 8)))
    q = "lycoris_model_layers_0_self_attn_q_proj"
    t = {"both-factored": {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b},
         "both-whole": {"lokr_w1": w1a @ w1b, "lokr_w2": w2a @ w2b},
         "w2-factored-no-alpha": {"lokr_w1": w1a @ w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b}}[halves]  # fmt: skip
    tensors = {f"{q}.{k}": v for k, v in t.items()}
    if alpha is not None:
        tensors[q + ".alpha"] = torch.tensor(alpha)
    save_file(tensors, str(tmp_path / "lokr.safetensors"))
    convert(tmp_path / "lokr.safetensors", to="peft", rank=32, base=tmp_path / "base", output=tmp_path / "out")
    got, _ = through_peft(tmp_path / "base", tmp_path / "out")
    want = scale * torch.kron(w1a @ w1b, w2a @ w2b).double()  # written out here, not with loratool's lokr_delta
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj"], want, rtol=1e-5, atol=1e-5)


def tamper(file: Path, out: Path, change) -> Path:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(out))
    return out


@pytest.mark.parametrize(("case", "match"), [
    ("no-rank", "Give the rank with -r"),
    ("tucker", "a Tucker-decomposed LoHa"),
    ("conv", "a convolution (4-D factors)"),
    ("dora", "DoRA-weighted"),
    ("half-missing", "has no hada_w2_b"),
    ("shapes", "do not fit together"),
    ("nan", "NaN or Inf"),
    ("unknown", "unexpected tensor"),
    ("wrong-base", "does not fit the base"),
])  # fmt: skip
def test_what_cannot_be_formed_is_refused_by_name(tmp_path: Path, case: str, match: str) -> None:
    base, file, _, _ = lycoris_pair(tmp_path, "loha")
    q = "lycoris_model_layers_0_self_attn_q_proj"

    def change(t: dict) -> None:
        if case == "tucker":
            t[q + ".hada_t1"] = torch.ones(2, 2)
        elif case == "conv":
            t[q + ".hada_w1_a"] = t[q + ".hada_w1_a"][:, :, None, None]
        elif case == "dora":
            t[q + ".dora_scale"] = torch.ones(32, 1)
        elif case == "half-missing":
            del t[q + ".hada_w2_b"]
        elif case == "shapes":
            t[q + ".hada_w2_b"] = torch.ones(3, 32)
        elif case == "nan":
            t[q + ".hada_w1_a"][0, 0] = float("nan")
        elif case == "unknown":
            t[q + ".oft_blocks"] = torch.ones(2)
        elif case == "wrong-base":  # consistent factors, 24 rows where the base's q_proj has 32
            t[q + ".hada_w1_a"], t[q + ".hada_w2_a"] = torch.ones(24, 2), torch.ones(24, 2)

    src = file if case == "no-rank" else tamper(file, tmp_path / "bad.safetensors", change)
    args = ["convert", str(src), "--to", "peft", "--base", str(base), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args + ([] if case == "no-rank" else ["-r", "4"]))
    assert result.exit_code == 1, result.output
    assert match in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_rank_is_only_for_lycoris_input(tmp_path: Path, fixtures: Path) -> None:
    with pytest.raises(LoraToolError, match="loratool resize"):
        convert(fixtures / "llama-peft-adapter", to="mlx", rank=4, output=tmp_path / "out")


def test_other_commands_point_a_lycoris_file_to_convert(tmp_path: Path) -> None:
    base, file, _, _ = lycoris_pair(tmp_path, "lokr-whole")
    for args in (["validate", str(file)], ["inspect", str(file)], ["merge", str(base), str(file), "-o",
                                                                    str(tmp_path / "m")]):  # fmt: skip
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        assert "loratool convert FILE --to peft -r RANK" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


def test_kohya_output_without_a_base_keeps_lycoris_prefixes(tmp_path: Path) -> None:
    """kohya and LyCORIS loaders (ComfyUI, sd-scripts) find modules by prefix: a prefix is kept, not
    prefixed again."""
    from safetensors import safe_open

    base, file, _, want = lycoris_pair(tmp_path, "loha")
    convert(file, to="kohya", rank=4, output=tmp_path / "k.safetensors")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in f.keys()}
    assert prefixes == {"lycoris_" + p.replace(".", "_") for p in want}
