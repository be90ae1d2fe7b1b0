"""`validate --runtime vllm|llama.cpp|mlx|peft`: each runtime's rules, each problem with a fix that works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratool.adapter import Adapter, LoraModule
from loratool.formats import load_adapter, save_adapter
from loratool.ops.convert import convert
from loratool.ops.validate import validate


def adapter(path: Path, *, ranks=(4, 4), alphas=(8.0, 8.0), **extra) -> Path:
    g = torch.Generator().manual_seed(0)
    a = Adapter()
    for i, (r, alpha) in enumerate(zip(ranks, alphas)):
        a.modules[f"model.layers.{i}.self_attn.q_proj"] = LoraModule(
            torch.randn(r, 32, generator=g), torch.randn(32, r, generator=g), alpha
        )
    for key, value in extra.items():
        if key == "whole":
            a.whole = value
        elif key == "bias":
            for m in a.modules.values():
                m.bias = torch.randn(32, generator=g)
        else:
            a.config[key] = value
    save_adapter(a, path)
    return path


def problems(report, runtime: str) -> dict[str, str]:
    prefix = f"runtime/{runtime}/"
    return {p.path.removeprefix(prefix): p.message for p in report.problems if p.path.startswith(prefix)}


def vllm_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Deltas as vLLM releases that read only r and lora_alpha apply them: one scaling for all."""
    config = json.loads((path / "adapter_config.json").read_text())
    one = config["lora_alpha"] / config["r"]
    a = load_adapter(path)
    return {p: one * m.lora_B.double() @ m.lora_A.double() for p, m in a.modules.items()}


def test_mixed_scalings_are_a_vllm_problem_that_portable_fixes(tmp_path: Path) -> None:
    src = adapter(tmp_path / "mixed", ranks=(4, 8), alphas=(8.0, 8.0))
    report = validate(src, runtimes=["vllm"])
    found = problems(report, "vllm")
    assert not report.valid and "lora_alpha" in found and "--portable" in found["lora_alpha"]

    convert(src, to="peft", portable=True, output=tmp_path / "portable")
    assert validate(tmp_path / "portable", runtimes=["vllm"]).valid
    exact = {p: m.scaling * m.lora_B.double() @ m.lora_A.double() for p, m in load_adapter(src).modules.items()}
    served = vllm_deltas(tmp_path / "portable")
    for p in exact:
        torch.testing.assert_close(served[p], exact[p], rtol=1e-6, atol=1e-9)
    # without the fix, vLLM's one scaling gets one module wrong
    naive = vllm_deltas(src)
    assert any(not torch.allclose(naive[p], exact[p]) for p in exact)


@pytest.mark.parametrize(("extra", "where"), [
    ({"whole": {"lm_head.weight": torch.zeros(128, 32)}}, "modules_to_save"),
    ({"bias": True}, "lora_bias"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
])  # fmt: skip
def test_what_vllm_refuses_is_named(tmp_path: Path, extra: dict, where: str) -> None:
    report = validate(adapter(tmp_path / "a", **extra), runtimes=["vllm"])
    assert where in problems(report, "vllm"), report.problems


def test_vllm_rank_limits(tmp_path: Path) -> None:
    report = validate(adapter(tmp_path / "r24", ranks=(24, 24), alphas=(24.0, 24.0)), runtimes=["vllm"])
    assert report.valid and any("--max-lora-rank 32" in str(w) for w in report.warnings)
    report = validate(adapter(tmp_path / "r600", ranks=(600, 600), alphas=(8.0, 8.0)), runtimes=["vllm"])
    assert "r" in problems(report, "vllm")


def test_llama_cpp_needs_a_supported_base(tmp_path: Path, fixtures: Path) -> None:
    pytest.importorskip("gguf")
    src = adapter(tmp_path / "a")
    assert "base" in problems(validate(src, runtimes=["llama.cpp"]), "llama.cpp")
    ok = validate(src, base=fixtures / "llama-base", runtimes=["llama.cpp"])
    assert ok.valid and any("--to gguf" in str(w) for w in ok.warnings)
    gpt2 = validate(src, base=fixtures / "gpt2-base", runtimes=["llama.cpp"])
    assert "architectures" in problems(gpt2, "llama.cpp")["base"]


def test_mlx_and_peft_rules(tmp_path: Path) -> None:
    whole = adapter(tmp_path / "whole", whole={"lm_head.weight": torch.zeros(128, 32)})
    assert "lm_head.weight" in problems(validate(whole, runtimes=["mlx"]), "mlx")
    plain = validate(adapter(tmp_path / "plain"), runtimes=["mlx", "peft"])
    assert plain.valid and any("--to mlx" in str(w) for w in plain.warnings)
    convert(tmp_path / "plain", to="mlx", output=tmp_path / "mlx")
    as_peft = problems(validate(tmp_path / "mlx", runtimes=["peft"]), "peft")
    assert "--to peft" in as_peft["format"]
    convert(tmp_path / "plain", to="kohya", output=tmp_path / "k.safetensors")
    assert "--base MODEL" in problems(validate(tmp_path / "k.safetensors", runtimes=["peft"]), "peft")["format"]


def test_cli_runtime_exit_codes_and_json(tmp_path: Path, cli) -> None:
    src = adapter(tmp_path / "mixed", ranks=(4, 8))
    res = cli("validate", src, "--runtime", "vllm", "--runtime", "mlx", "--json")
    assert res.exit_code == 1
    payload = json.loads(res.stdout)
    assert any(p["path"] == "runtime/vllm/lora_alpha" for p in payload["problems"])
    assert cli("validate", src, "--runtime", "mlx").exit_code == 0


def test_portable_on_every_command_that_writes_peft(tmp_path: Path, fixtures: Path, cli) -> None:
    """--portable leaves one r and lora_alpha (no patterns) that every module's delta agrees with.

    extract, combine and resize already write scaling 1 for every module, mixed ranks and all, so
    vLLM's one scaling is right for them; --portable drops the patterns too (PEFT needs them for
    mixed ranks unless lower ranks are padded), so that runtimes reading r and lora_alpha alone agree.
    """
    base, ft = fixtures / "llama-base", fixtures / "llama-ft"
    assert cli("extract", base, ft, "--energy", "0.9", "-r", "8", "-o", tmp_path / "ex0", "--quiet").exit_code == 0
    assert len({m.rank for m in load_adapter(tmp_path / "ex0").modules.values()}) > 1
    src = adapter(tmp_path / "mixed", ranks=(4, 8), alphas=(8.0, 8.0))  # scalings 2 and 1
    assert not validate(src, runtimes=["vllm"]).valid
    cases = [
        ("ex", tmp_path / "ex0", ("extract", base, ft, "--energy", "0.9", "-r", "8", "-o", tmp_path / "ex")),
        ("co", src, ("combine", src, "-o", tmp_path / "co")),
        ("re", src, ("resize", src, "-r", "8", "-o", tmp_path / "re")),
    ]
    for name, reference, args in cases:
        assert cli(*args, "--portable", "--quiet").exit_code == 0
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["lora_alpha"] == config["r"] and not config["rank_pattern"] and not config["alpha_pattern"]
        assert validate(tmp_path / name, runtimes=["vllm"]).valid
        exact = {
            p: m.scaling * m.lora_B.double() @ m.lora_A.double() for p, m in load_adapter(reference).modules.items()
        }
        served = vllm_deltas(tmp_path / name)
        for p in exact:
            torch.testing.assert_close(served[p], exact[p], rtol=1e-4, atol=1e-6, msg=f"{name} {p}")
    res = cli("resize", src, "-r", "4", "--format", "kohya", "--portable", "-o", tmp_path / "k.safetensors")
    assert res.exit_code == 1 and "--portable is for PEFT output" in res.output


def _mlx_by_hand(path: Path, layers: list[int], *, num_layers: int, keys: list[str] | None) -> Path:
    """An mlx-lm adapter directory as mlx-lm's lora command writes one: relative keys, num_layers."""
    import json

    from safetensors.torch import save_file

    path.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in layers:
        tensors[f"model.layers.{i}.self_attn.q_proj.lora_a"] = torch.randn(32, 2, generator=g)
        tensors[f"model.layers.{i}.self_attn.q_proj.lora_b"] = torch.randn(2, 32, generator=g)
    save_file(tensors, str(path / "adapters.safetensors"))
    params = {"rank": 2, "scale": 2.0, "dropout": 0.0, **({"keys": keys} if keys is not None else {})}
    (path / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": num_layers,
                                                          "lora_parameters": params}))  # fmt: skip
    return path


def test_mlx_adapts_only_the_last_num_layers_blocks_and_the_keys(tmp_path: Path, cli, fixtures: Path) -> None:
    """#31 item 14: relative keys, num_layers 2 and tensors for 4 blocks was called valid; mlx-lm's loader
    refuses the tensors it made no LoRA layer for ('not an adapter parameter in the model')."""
    base = fixtures / "llama-base"  # 2 blocks
    src = _mlx_by_hand(tmp_path / "both", [0, 1], num_layers=1, keys=["self_attn.q_proj"])
    res = cli("validate", src, "--runtime", "mlx", "--base", base, "--json")
    assert res.exit_code == 1 and "model.layers.0.self_attn.q_proj" in res.stdout and "from block 1" in res.stdout
    res = cli("validate", src, "--runtime", "mlx", "--json")  # without the base: more blocks than num_layers
    assert res.exit_code == 1 and "tensors in 2" in res.stdout
    fine = _mlx_by_hand(tmp_path / "last", [1], num_layers=1, keys=["self_attn.q_proj"])
    assert cli("validate", fine, "--runtime", "mlx", "--base", base).exit_code == 0
    other = _mlx_by_hand(tmp_path / "keys", [1], num_layers=-1, keys=["self_attn.v_proj"])
    res = cli("validate", other, "--runtime", "mlx", "--json")
    assert res.exit_code == 1 and "keys does not select this module" in res.stdout
    assert cli("validate", _mlx_by_hand(tmp_path / "all", [0, 1], num_layers=-1, keys=None), "--runtime",
               "mlx").exit_code == 0  # fmt: skip


def test_whole_copies_of_the_base_are_left_out_for_llama_cpp_and_mlx(tmp_path: Path, cli, fixtures: Path) -> None:
    """#31 item 14: validate called an adapter whose only whole tensors repeat the base's invalid for
    llama.cpp and mlx, while convert --to gguf drops them; convert --to mlx now drops them too."""
    from safetensors.torch import load_file

    base = fixtures / "llama-base"
    a = load_adapter(fixtures / "llama-peft-adapter")
    a.whole = {"model.embed_tokens.weight": load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"]}
    save_adapter(a, tmp_path / "copy")
    for runtime in ("mlx", "llama.cpp"):
        res = cli("validate", tmp_path / "copy", "--runtime", runtime, "--base", base, "--json")
        assert res.exit_code == 0 and "equal to the base's" in res.stdout, (runtime, res.stdout)
    res = cli("convert", tmp_path / "copy", "--to", "mlx", "--base", base, "-o", tmp_path / "mlx", "--json")
    assert res.exit_code == 0 and "left out 1 whole tensor" in res.stdout
    assert not load_adapter(tmp_path / "mlx").whole
    res = cli("convert", tmp_path / "copy", "--to", "mlx", "-o", tmp_path / "mlx2")
    assert res.exit_code == 1 and "convert --base" in res.stderr  # without the base nothing can be compared
    a.whole = {k: t + 1 for k, t in a.whole.items()}  # a real change stays a problem
    save_adapter(a, tmp_path / "changed")
    assert cli("validate", tmp_path / "changed", "--runtime", "mlx", "--base", base).exit_code == 1


def test_vllm_rules_on_a_kohya_file_say_what_to_do(cli, fixtures: Path) -> None:
    """#33: validate --runtime vllm on any kohya file, the shipped one included, was a 'loratool bug'."""
    res = cli("validate", fixtures / "llama-kohya.safetensors", "--runtime", "vllm")
    assert res.exit_code == 1 and "loratool bug" not in res.output + res.stderr and "convert" in res.output
