"""`loratool combine`/`resize` against dense oracles and PEFT's add_weighted_adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import load_model, logits, peft_adapter, tiny_model
from safetensors.torch import load_file

from loratool.formats import load_adapter
from loratool.ops.combine import combine, resize

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def dense(path: Path) -> dict[str, torch.Tensor]:
    """Each module's delta (float64, in its weight's layout), independently of loratool's reader: the
    tensors through safetensors, rank and scaling through PEFT's own config and pattern rules."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    cfg = LoraConfig.from_pretrained(str(path))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        for a_suffix, b_suffix, transposed in (
            (".lora_A.weight", ".lora_B.weight", cfg.fan_in_fan_out),
            (".lora_embedding_A", ".lora_embedding_B", True),
        ):
            if not key.endswith(a_suffix):
                continue
            mod = key.removeprefix("base_model.model.").removesuffix(a_suffix)
            b = tensors[key.removesuffix(a_suffix) + b_suffix]  # (out, r)
            r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), mod), cfg.r)
            alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), mod), cfg.lora_alpha)
            assert a.shape[0] == r == b.shape[1], f"{mod}: PEFT would build rank {r}, the file holds {a.shape[0]}"
            scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
            d = scaling * (b.double() @ a.double())  # (out, r) @ (r, in)
            out[mod] = d.T if transposed else d
    return out


@pytest.fixture
def sources(tmp_path: Path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    specs = [
        dict(r=4, alpha=8, seed=1),
        dict(r=2, alpha=3, seed=2, use_rslora=True, rank_pattern={"down_proj": 3}),
        dict(r=6, alpha=6, seed=3, targets=["q_proj", "up_proj"]),
    ]
    paths = []
    for i, spec in enumerate(specs):
        targets = spec.pop("targets", TARGETS)
        pm = peft_adapter(load_model("llama", base), targets, **spec)
        pm.save_pretrained(tmp_path / f"s{i}")
        paths.append(tmp_path / f"s{i}")
    return base, paths


WEIGHTS = [1.0, -0.5, 0.7]


def weighted_sum(paths: list[Path]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for p, w in zip(paths, WEIGHTS):
        for mod, d in dense(p).items():
            total[mod] = total.get(mod, 0) + w * d
    return total


def test_cat_is_the_exact_weighted_sum(tmp_path: Path, sources) -> None:
    _, paths = sources
    res = combine(list(zip(paths, WEIGHTS)), output=tmp_path / "cat", method="cat", show_progress=False)
    got, expected = dense(tmp_path / "cat"), weighted_sum(paths)
    assert set(got) == set(expected)  # the union of modules
    for mod in expected:
        assert torch.allclose(got[mod], expected[mod], rtol=1e-5, atol=1e-7), mod
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"]  # scaling 1 everywhere
    assert all(cfg["alpha_pattern"][k] == v for k, v in cfg["rank_pattern"].items())
    q = load_file(str(tmp_path / "cat" / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ]
    assert q.shape[0] == 4 + 2 + 6
    assert all(r.relative_error == 0.0 for r in res.report)


def test_cat_output_loads_in_peft_with_the_dense_sums_outputs(tmp_path: Path, sources) -> None:
    from peft import PeftModel

    base, paths = sources
    combine(list(zip(paths, WEIGHTS)), output=tmp_path / "cat", show_progress=False)
    model = PeftModel.from_pretrained(load_model("llama", base), tmp_path / "cat").eval()
    reference = load_model("llama", base)
    sd = reference.state_dict()
    for mod, d in weighted_sum(paths).items():
        sd[mod + ".weight"] = (sd[mod + ".weight"].double() + d).float()
    reference.load_state_dict(sd)
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_svd_reaches_the_optimal_error(tmp_path: Path, sources, rank: int) -> None:
    _, paths = sources
    res = combine(list(zip(paths, WEIGHTS)), output=tmp_path / "svd", method="svd", rank=rank, show_progress=False)
    got, expected = dense(tmp_path / "svd"), weighted_sum(paths)
    for r in res.report:
        target = expected[r.module]
        s = torch.linalg.svdvals(target)  # float64: the optimum at this rank (Eckart-Young)
        best = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        actual = float((got[r.module] - target).norm() / target.norm())
        assert r.rank == min(rank, int(torch.linalg.matrix_rank(target.float())))  # never above the mix's rank
        assert actual == pytest.approx(best, rel=1e-5, abs=1e-6), r.module
        assert r.relative_error == pytest.approx(best, rel=1e-5, abs=1e-6), r.module


def test_svd_does_not_depend_on_the_core_count(tmp_path: Path, sources, monkeypatch: pytest.MonkeyPatch) -> None:
    """Modules are decomposed one per core, each call single-threaded: the same bytes on any machine."""
    from loratool import host as runtime

    _, paths = sources
    outputs = []
    for cores in (1, 3):
        monkeypatch.setattr(runtime, "available_cores", lambda cores=cores: cores)
        out = tmp_path / f"svd-{cores}"
        combine(list(zip(paths, WEIGHTS)), output=out, method="svd", rank=3, show_progress=False)
        outputs.append(load_file(str(out / "adapter_model.safetensors")))
    assert outputs[0].keys() == outputs[1].keys()
    for k in outputs[0]:
        assert torch.equal(outputs[0][k], outputs[1][k]), k


def test_svd_matches_peft_add_weighted_adapter(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    pm = peft_adapter(load_model("llama", base), ["q_proj", "v_proj"], r=4, alpha=8, seed=1)
    pm.save_pretrained(tmp_path / "a")
    pm2 = peft_adapter(load_model("llama", base), ["q_proj", "v_proj"], r=4, alpha=4, seed=2)
    pm2.save_pretrained(tmp_path / "b")
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model("llama", base), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.8, 0.3], "mix", combination_type="svd", svd_rank=3)
    combine(
        [(tmp_path / "a", 0.8), (tmp_path / "b", 0.3)],
        output=tmp_path / "ours",
        method="svd",
        rank=3,
        show_progress=False,
    )
    ours = dense(tmp_path / "ours")
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A") and "mix" in layer.lora_A:
            mod = name.removeprefix("base_model.model.")
            peft_delta = layer.get_delta_weight("mix").double()
            assert torch.allclose(ours[mod], peft_delta, rtol=1e-4, atol=1e-6), mod


def test_linear_matches_peft_and_reports_its_error(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    for i, name in enumerate("ab"):
        peft_adapter(load_model("llama", base), ["q_proj", "v_proj"], r=4, alpha=8, seed=i).save_pretrained(
            tmp_path / name
        )
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model("llama", base), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.6, -0.4], "mix", combination_type="linear")
    res = combine(
        [(tmp_path / "a", 0.6), (tmp_path / "b", -0.4)], output=tmp_path / "ours", method="linear", show_progress=False
    )
    ours = dense(tmp_path / "ours")
    exact = {k: 0.6 * v for k, v in dense(tmp_path / "a").items()}
    for k, v in dense(tmp_path / "b").items():
        exact[k] = exact[k] - 0.4 * v
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A") and "mix" in layer.lora_A:
            mod = name.removeprefix("base_model.model.")
            assert torch.allclose(ours[mod], layer.get_delta_weight("mix").double(), rtol=1e-5, atol=1e-7)
    for r in res.report:  # the reported error is the real distance from the exact mix
        real = float((ours[r.module] - exact[r.module]).norm() / exact[r.module].norm())
        assert r.relative_error == pytest.approx(real, rel=1e-6) and r.relative_error > 0.01
    assert any("approximate" in w for w in res.warnings)


def test_resize_to_the_same_rank_is_lossless(tmp_path: Path, fixtures: Path) -> None:
    res = resize(fixtures / "llama-peft-adapter", output=tmp_path / "r", rank=4, show_progress=False)
    got, expected = dense(tmp_path / "r"), dense(fixtures / "llama-peft-adapter")
    for mod in expected:
        assert torch.allclose(got[mod], expected[mod], rtol=1e-5, atol=1e-7), mod
    assert max(r.relative_error for r in res.report) < 1e-6


def test_a_sum_that_cancels_is_written_as_zeros_and_said(tmp_path: Path, fixtures: Path) -> None:
    """A - A is zero: --method svd factored float32's rounding noise (factors of 3e-4, a "relative error"
    of 0.24 of noise against noise); it now writes zeros, reports them exact and warns. A sum that does not
    cancel (A - A/2) is combined as before, without the warning; DARE, which combines randomly thinned
    sources and not their sum, is left to its own definition."""
    adapter = fixtures / "llama-peft-adapter"
    res = combine([(adapter, 1.0), (adapter, -1.0)], output=tmp_path / "svd", method="svd", show_progress=False)
    assert all(float(d.abs().max()) == 0.0 for d in dense(tmp_path / "svd").values())
    assert all(r.relative_error == 0.0 and r.rank == 1 for r in res.report)
    assert any("sources cancel" in w and "written as zeros" in w for w in res.warnings), res.warnings
    res = combine([(adapter, 1.0), (adapter, -1.0)], output=tmp_path / "dare", method="dare_linear", density=0.5,
                  show_progress=False)  # fmt: skip
    assert not any("cancel" in w for w in res.warnings)
    assert any(float(d.abs().max()) > 0.0 for d in dense(tmp_path / "dare").values())  # two different masks
    res = combine([(adapter, 1.0), (adapter, -0.5)], output=tmp_path / "half", method="svd", show_progress=False)
    source, half = dense(adapter), dense(tmp_path / "half")
    assert not any("cancel" in w for w in res.warnings)
    for mod, delta in half.items():
        torch.testing.assert_close(delta, 0.5 * source[mod], rtol=1e-4, atol=1e-6, msg=mod)


def test_resize_by_energy(tmp_path: Path, fixtures: Path) -> None:
    res = resize(fixtures / "llama-peft-adapter", output=tmp_path / "r", energy=0.8, show_progress=False)
    assert all(r.energy_kept >= 0.8 - 1e-9 for r in res.report)
    assert any(r.rank < 4 for r in res.report)


def test_kohya_output_and_base_naming(tmp_path: Path, fixtures: Path, cli) -> None:
    r = cli("combine", fixtures / "llama-peft-adapter", f"{fixtures / 'llama-kohya.safetensors'}:-1", "--base",
            fixtures / "llama-base", "--format", "kohya", "-o", tmp_path / "mix.safetensors", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    a = load_adapter(tmp_path / "mix.safetensors")
    assert "model.layers.0.self_attn.k_proj" in a.modules and "model.layers.0.self_attn.q_proj" in a.modules


def test_refusals(tmp_path: Path, sources, cli) -> None:
    _, paths = sources
    # different module sets are named as such, with the module (#31 item 13: they were blamed on ranks)
    r = cli("combine", *paths, "--method", "linear", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "needs the same modules" in r.stderr
    assert cli("resize", paths[0], "-r", "1", "-o", tmp_path / "r1").exit_code == 0  # the same modules, rank 1
    r = cli("combine", paths[0], tmp_path / "r1", "--method", "linear", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "needs equal ranks; this module's differ" in r.stderr
    from loratool.formats import load_adapter, save_adapter

    fewer = load_adapter(paths[0])
    dropped = sorted(fewer.modules)[0]
    del fewer.modules[dropped]
    save_adapter(fewer, tmp_path / "fewer")
    r = cli("combine", paths[0], tmp_path / "fewer", "--method", "ties", "--density", "0.5", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "needs the same modules" in r.stderr and dropped in r.stderr
    r = cli("combine", *paths, "-r", 4, "-o", tmp_path / "x")
    assert r.exit_code == 2 and "apply to --method svd" in r.stderr  # a usage error
    base = tmp_path / "base"
    peft_adapter(load_model("llama", base), ["q_proj"], use_dora=True).save_pretrained(tmp_path / "dora")
    r = cli("combine", paths[0], tmp_path / "dora", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "DoRA adapters (use_dora) cannot be combined" in r.stderr
    assert not (tmp_path / "x").exists()


def test_kohya_names_are_mapped_or_refused_never_written_for_peft_to_skip(tmp_path: Path, fixtures: Path, cli) -> None:
    """#31 item 4: without --base, combine kept kohya names in a PEFT adapter; PEFT applied 6 of its 10
    modules, loratool merge all 10, and validate --base called it valid."""
    from helpers import load_model, logits
    from peft import PeftModel

    from loratool.formats import load_adapter, save_adapter

    kohya, peft_dir = fixtures / "llama-kohya.safetensors", fixtures / "llama-peft-adapter"
    res = cli("combine", kohya, peft_dir, "-o", tmp_path / "mix")
    assert res.exit_code == 1 and "--base CHECKPOINT" in res.stderr and "match nothing" in res.stderr
    assert not (tmp_path / "mix").exists()
    assert cli("combine", kohya, peft_dir, "-o", tmp_path / "mix.safetensors", "--format", "kohya").exit_code == 0
    res = cli("combine", kohya, peft_dir, "-o", tmp_path / "mix", "--base", fixtures / "llama-base")
    assert res.exit_code == 0, res.stderr
    assert cli("merge", fixtures / "llama-base", tmp_path / "mix", "-o", tmp_path / "merged").exit_code == 0
    peft_logits = logits(PeftModel.from_pretrained(load_model("llama", fixtures / "llama-base"), str(tmp_path / "mix")))
    torch.testing.assert_close(peft_logits, logits(load_model("llama", tmp_path / "merged")), rtol=1e-4, atol=1e-4)
    # validate --base matches a PEFT adapter's module paths as PEFT does: exactly
    bad = load_adapter(kohya)
    bad.format = "peft"
    save_adapter(bad, tmp_path / "kohya-named")
    res = cli("validate", tmp_path / "kohya-named", "--base", fixtures / "llama-base")
    assert res.exit_code == 1 and "lora_model_layers_0_mlp_gate_proj" in res.output


@pytest.mark.parametrize(("scale", "dtype", "says"), [
    ("1e308", "float32", "float32's range"),  # float32 itself overflows
    ("1e14", "float16", "float16's range (+-65504)"),  # only the float16 cast does: float32 would write it
])  # fmt: skip
def test_an_output_that_overflows_is_refused_naming_the_tensor(tmp_path: Path, fixtures: Path, cli, scale: str,
                                                               dtype: str, says: str) -> None:  # fmt: skip
    """A finite scale can still take the written factors past their dtype's range: an adapter of Inf
    (which validate rejects) is not written; the tensor is named and nothing is left behind."""
    adapter = fixtures / "llama-peft-adapter"
    r = cli("combine", f"{adapter}:{scale}", adapter, "-o", tmp_path / "x", "--dtype", dtype)
    assert r.exit_code == 1 and says in r.stderr and ".lora_" in r.stderr, r.stderr
    assert "ADAPTER:SCALE" in r.stderr and ("--dtype float32" in r.stderr) == (dtype == "float16")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []
    assert cli("combine", f"{adapter}:1e14", adapter, "-o", tmp_path / "y").exit_code == 0  # float32 holds 1e14's


def test_save_adapter_refuses_factors_its_dtype_cannot_hold(tmp_path: Path, fixtures: Path) -> None:
    from loratool.errors import NonFiniteError
    from loratool.formats import save_adapter

    a = load_adapter(fixtures / "llama-peft-adapter")
    name, m = sorted(a.modules.items())[0]
    m.lora_B = m.lora_B * 0 + 1e5  # finite in float32, past float16's largest
    for fmt, out in (("peft", tmp_path / "p"), ("kohya", tmp_path / "k.safetensors"), ("mlx", tmp_path / "m")):
        with pytest.raises(NonFiniteError, match="float16's range") as e:
            save_adapter(a, out, format=fmt, dtype=torch.float16)  # type: ignore[arg-type]
        assert not out.exists(), fmt
    assert "lora_B" in str(e.value) or "lora_b" in str(e.value)
    save_adapter(a, tmp_path / "f32", dtype=torch.float32)
    assert load_adapter(tmp_path / "f32").modules[name].lora_B.max() == 1e5


def test_an_svd_form_whose_combined_delta_passes_float32_is_refused_by_module(tmp_path: Path, fixtures: Path,
                                                                             cli) -> None:  # fmt: skip
    """The _svd forms combine dense deltas: weights that take them past float32's range (1e37 x ~500
    here) gave linalg.svd an Inf to fail on ("This is a loratool bug"); now the module is named."""
    from loratool.formats import save_adapter

    a = load_adapter(fixtures / "llama-peft-adapter")
    for m in a.modules.values():
        m.lora_B = m.lora_B * 1e4
    save_adapter(a, tmp_path / "big")
    big = tmp_path / "big"
    r = cli("combine", f"{big}:1e37", f"{big}:1e37", "--method", "ties_svd", "--density", "1", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "passes float32's range" in r.stderr and "model.layers." in r.stderr, r.stderr
    assert "ADAPTER:WEIGHT" in r.stderr and not (tmp_path / "x").exists()
