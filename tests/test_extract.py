"""`loratool extract` against its oracles: the planted delta, exact SVD, and PEFT's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import file_digest, load_model, logits, tiny_model
from safetensors.torch import save_file

from loratool.errors import LoraToolError
from loratool.formats import load_adapter
from loratool.math.linalg import lora_delta
from loratool.metadata.provenance import decode
from loratool.ops.extract import extract


def planted_pair(tmp_path: Path, rank: int = 4, dtype=torch.float32, noise: float = 0.0):
    g = torch.Generator().manual_seed(0)
    base = {
        "a.weight": torch.randn(48, 32, generator=g),
        "b.weight": torch.randn(40, 64, generator=g),
        "norm.weight": torch.ones(32),
    }
    deltas = {k: torch.randn(v.shape[0], rank, generator=g) @ torch.randn(rank, v.shape[1], generator=g) * 0.1
              for k, v in base.items() if v.dim() == 2}  # fmt: skip
    ft = {k: v + deltas.get(k, 0) + noise * torch.randn(v.shape, generator=g) for k, v in base.items()}
    (tmp_path / "base").mkdir()
    (tmp_path / "ft").mkdir()
    save_file({k: v.to(dtype) for k, v in base.items()}, str(tmp_path / "base/model.safetensors"))
    save_file({k: v.to(dtype) for k, v in ft.items()}, str(tmp_path / "ft/model.safetensors"))
    return tmp_path / "base", tmp_path / "ft", deltas


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_exact_low_rank_delta_is_recovered(tmp_path: Path, svd: str) -> None:
    base, ft, deltas = planted_pair(tmp_path)
    res = extract(base, ft, output=tmp_path / "out", rank=4, svd=svd, show_progress=False)
    adapter = load_adapter(tmp_path / "out")
    for key, delta in deltas.items():
        m = adapter.modules[key.removesuffix(".weight")]
        got = lora_delta(m.lora_A, m.lora_B, m.scaling, m.kind)
        assert m.rank == 4 and m.scaling == 1.0
        assert float((got - delta).norm() / delta.norm()) < 1e-5
    for r in res.report:  # energy_kept comes from the float32 spectrum and norm, each a few ulps off
        assert r.relative_error < 1e-5 and 1 - 1e-5 < r.energy_kept <= 1, (r.module, r.relative_error, r.energy_kept)
    assert [d.key for d in res.dropped] == []  # norm.weight did not change


def test_report_matches_exact_svd_and_is_stored_in_the_header(tmp_path: Path) -> None:
    base, ft, _ = planted_pair(tmp_path, rank=12, noise=0.01)
    res = extract(base, ft, output=tmp_path / "out", rank=3, svd="exact", show_progress=False)
    for r in res.report:
        from safetensors import safe_open

        with safe_open(str(ft / "model.safetensors"), "pt") as f, safe_open(str(base / "model.safetensors"), "pt") as b:
            delta = f.get_tensor(r.module + ".weight") - b.get_tensor(r.module + ".weight")
        s = torch.linalg.svdvals(delta.double())
        assert r.energy_kept == pytest.approx(float(s[:3].square().sum() / s.square().sum()), rel=1e-5)
        assert r.relative_error == pytest.approx(float(s[3:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-4)
    record = decode(load_adapter(tmp_path / "out").metadata)
    assert record["operation"] == "extract" and len(record["report"]) == 2
    assert {i["path"] for i in record["inputs"]} == {str(base / "model.safetensors"), str(ft / "model.safetensors")}
    assert all(len(i["sha256"]) == 64 and i["sha256"] != "0" * 64 for i in record["inputs"])


def finetune(kind: str, tmp_path: Path, rank: int = 3):
    """Save a tiny base and a fine-tune differing by exact rank-``rank`` deltas on every 2-D weight."""
    base = tiny_model(kind, seed=0)
    base.save_pretrained(tmp_path / "base")
    ft = tiny_model(kind, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.dim() == 2:
                p += 0.05 * torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g)
            elif "norm" in name or ".ln_" in name:
                p += 0.05 * torch.randn(p.shape, generator=g)
    ft.save_pretrained(tmp_path / "ft")
    return ft


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_loading_the_adapter_reproduces_the_finetune(tmp_path: Path, kind: str, cli) -> None:
    from peft import PeftModel

    ft = finetune(kind, tmp_path)
    keep = "norm" if kind == "llama" else r"ln_f"
    r = cli("extract", tmp_path / "base", tmp_path / "ft", "-r", 3, "-o", tmp_path / "adapter",
            "--keep-full", keep, "--json", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["summary"]["max_relative_error"] < 1e-5
    kinds = {m["module"]: m["kind"] for m in out["modules"]}
    if kind == "gpt2":
        assert kinds["transformer.h.0.attn.c_attn"] == "conv1d" and kinds["transformer.wte"] == "embedding"
        # GPT-2's layer norms live in each block too: those are not matched by --keep-full here
        assert any(d["key"].endswith("ln_1.weight") for d in out["dropped"])
    else:
        assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "linear"
        assert out["dropped"] == []
    model = PeftModel.from_pretrained(load_model(kind, tmp_path / "base"), tmp_path / "adapter").eval()
    expected = logits(ft if kind == "llama" else _without_block_norm_changes(kind, tmp_path, ft))
    assert torch.allclose(logits(model), expected, atol=1e-4), (logits(model) - expected).abs().max()


@pytest.mark.parametrize("changed", [["transformer.h.1.ln_1.bias"], ["transformer.h.0.attn.c_proj.bias"],
                                     ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"]],
                         ids=["a norm's bias", "a bias alone", "a LoRA layer's bias"])  # fmt: skip
def test_a_module_kept_whole_is_kept_with_all_its_parameters(tmp_path: Path, cli, changed: list[str]) -> None:
    """--keep-full on a bias: PEFT's modules_to_save loads every parameter of the module, so a bias kept
    alone failed to load (KeyError ...weight), and a LoRA layer whose bias was kept was both adapted and
    saved whole, which PEFT does not do. The module is now stored whole, without LoRA, and PEFT gives
    the fine-tune's logits (a randomized sweep of 90 such pairs found the failures)."""
    from peft import PeftModel

    tiny_model("gpt2").save_pretrained(tmp_path / "base")
    ft = tiny_model("gpt2")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if name in changed:
                p += 0.05 * torch.randn(p.shape, generator=g)
    ft.save_pretrained(tmp_path / "ft")
    r = cli("extract", tmp_path / "base", tmp_path / "ft", "-r", 64, "--keep-full", ".*", "-o", tmp_path / "a",
            "--json", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    module = changed[0].rsplit(".", 1)[0]
    adapter = load_adapter(tmp_path / "a")
    assert {module + ".weight", module + ".bias"} <= set(adapter.whole) and module not in adapter.modules
    model = PeftModel.from_pretrained(load_model("gpt2", tmp_path / "base"), tmp_path / "a").eval()
    assert torch.allclose(logits(model), logits(ft), atol=1e-5)


def test_keep_full_of_a_tensor_of_no_module_is_dropped_by_name(tmp_path: Path, cli) -> None:
    """A top-level tensor (a name without a dot) belongs to no module PEFT could keep whole: --keep-full
    matching it ended in a traceback while writing; it is now reported as dropped, with the reason."""
    base, ft, _ = planted_pair(tmp_path)
    from safetensors.torch import load_file

    for side, bump in ((base, 0.0), (ft, 1.0)):
        tensors = load_file(str(side / "model.safetensors"))
        tensors["scale"] = torch.full((4,), 2.0 + bump)
        save_file(tensors, str(side / "model.safetensors"))
    r = cli("extract", base, ft, "-r", 4, "--keep-full", "scale|norm", "-o", tmp_path / "a", "--json", "-q")
    assert r.exit_code == 0, r.stderr
    dropped = {d["key"]: d["reason"] for d in json.loads(r.stdout)["dropped"]}
    assert "no module" in dropped["scale"]
    assert "scale" not in load_adapter(tmp_path / "a").whole


def test_sketch_settings_out_of_range_are_refused(tmp_path: Path, cli) -> None:
    """--n-iter runs two passes over every weight per iteration: a mistyped 4000 would run for hours;
    past 32 it is refused before anything is read (the analysis too), as is a negative oversampling."""
    base, ft, _ = planted_pair(tmp_path)
    for args, what in ((["--n-iter", 33], "--n-iter must be from 0 to 32"), (["--oversample", -1], "--oversample")):
        for command in (["extract", base, ft, "-r", 2, "-o", tmp_path / "a"], ["analyze", base, ft, "--json"]):
            r = cli(*command, *args)
            assert r.exit_code != 0 and what.split(" must")[0] in r.output, (command, args, r.output)
    with pytest.raises(LoraToolError, match="--n-iter must be from 0 to 32"):
        extract(base, ft, output=tmp_path / "b", rank=2, n_iter=33, show_progress=False)
    with pytest.raises(LoraToolError, match="--oversample must be 0 or more"):
        extract(base, ft, output=tmp_path / "b", rank=2, oversample=-1, show_progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    extract(base, ft, output=tmp_path / "b", rank=2, n_iter=32, show_progress=False)  # the bound itself runs


def _without_block_norm_changes(kind: str, tmp_path: Path, ft):
    """The fine-tune with only what the adapter holds: dropped 1-D changes reverted to the base."""
    base = load_model(kind, tmp_path / "base")
    sd = ft.state_dict()
    for k, v in base.state_dict().items():
        if v.dim() == 1 and "ln_f" not in k:
            sd[k] = v
    model = tiny_model(kind)
    model.load_state_dict(sd)
    return model


def test_energy_and_budget_rules(tmp_path: Path) -> None:
    base, ft, _ = planted_pair(tmp_path, rank=10, noise=0.001)
    res = extract(base, ft, output=tmp_path / "e", energy=0.9, rank=20, svd="exact", show_progress=False)
    for r in res.report:
        assert r.energy_kept >= 0.9
    # the budget is honoured, counted in A and B parameters
    res = extract(base, ft, output=tmp_path / "b", budget=800, rank=20, svd="exact", show_progress=False)
    adapter = load_adapter(tmp_path / "b")
    assert 0 < adapter.num_params <= 800
    assert sum(r.rank * sum(r.shape) for r in res.report) == adapter.num_params


def test_include_exclude_and_kohya_output(tmp_path: Path) -> None:
    base, ft, deltas = planted_pair(tmp_path)
    res = extract(
        base, ft, output=tmp_path / "k.safetensors", rank=4, exclude="^b$", format="kohya", show_progress=False
    )
    assert [r.module for r in res.report] == ["a"]
    assert [d.key for d in res.dropped] == ["b.weight"]
    a = load_adapter(tmp_path / "k.safetensors")
    assert list(a.modules) == ["a"] and a.format == "kohya"


def test_rank_larger_than_matrix_is_clamped_with_a_warning(tmp_path: Path) -> None:
    base, ft, _ = planted_pair(tmp_path)
    res = extract(base, ft, output=tmp_path / "o", rank=100, show_progress=False)
    assert {r.module: r.rank for r in res.report} == {"a": 32, "b": 40}
    assert any("clamped" in w for w in res.warnings)


def test_bf16_checkpoints_give_bf16_factors(tmp_path: Path) -> None:
    base, ft, _ = planted_pair(tmp_path, dtype=torch.bfloat16)
    extract(base, ft, output=tmp_path / "o", rank=4, show_progress=False)
    a = load_adapter(tmp_path / "o")
    assert all(m.lora_A.dtype == torch.bfloat16 for m in a.modules.values())


# -- refusals --------------------------------------------------------------------------------------
def _rewrite(path: Path, **changes) -> None:
    from safetensors.torch import load_file

    f = path / "model.safetensors"
    ts = load_file(str(f))
    for k, v in changes.items():
        if v is None:
            del ts[k.replace("__", ".")]
        else:
            ts[k.replace("__", ".")] = v
    save_file(ts, str(f))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"a__weight": torch.zeros(48, 33)},
            "tensor 'a.weight': base and fine-tune shapes differ (expected [48, 32], got [48, 33])",
        ),
        ({"a__weight": None}, "tensor 'a.weight': the fine-tune lacks this tensor"),
        ({"b__weight": torch.full((40, 64), float("nan"))}, "tensor 'b.weight': the fine-tune holds NaN or Inf"),
        # finite values whose squared norm overflows float32: the report's NaN error failed to serialize
        ({"b__weight": torch.full((40, 64), 1e30)}, "tensor 'b.weight': the norm of the difference of base and"),
        # each row's squared norm within float32, their sum not (the norm is summed in float64)
        ({"b__weight": torch.full((40, 64), 1e18)}, "tensor 'b.weight': the norm of the difference of base and"),
    ],
    ids=["shape", "missing", "nan", "norm overflows", "the rows' sum overflows"],
)
def test_bad_pairs_exit_1_and_write_nothing(tmp_path: Path, cli, change, message) -> None:
    base, ft, _ = planted_pair(tmp_path)
    _rewrite(ft, **change)
    before = file_digest(tmp_path)
    r = cli("extract", base, ft, "-o", tmp_path / "out", "-q")
    assert r.exit_code == 1
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    assert file_digest(tmp_path) == before


def test_identical_checkpoints_exit_1(tmp_path: Path, cli) -> None:
    base, _, _ = planted_pair(tmp_path)
    r = cli("extract", base, base / "model.safetensors", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "does not differ from the base" in r.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path: Path, cli) -> None:
    base, ft, _ = planted_pair(tmp_path)
    (tmp_path / "out").mkdir()
    r = cli("extract", base, ft, "-o", tmp_path / "out")
    assert r.exit_code == 1 and "--force" in r.stderr
    assert cli("extract", base, ft, "-o", tmp_path / "out", "--force", "-q").exit_code == 0
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_shipped_fixtures_extract(fixtures: Path, tmp_path: Path) -> None:
    res = extract(fixtures / "llama-base", fixtures / "llama-ft", output=tmp_path / "o", rank=4, show_progress=False)
    errs = {r.module: r.relative_error for r in res.report}
    assert max(e for m, e in errs.items() if "layers.1.mlp.down_proj" not in m) < 1e-5
    assert 1e-4 < errs["model.layers.1.mlp.down_proj"] < 1e-1  # the full-rank noise is what is left
    assert [d.key for d in res.dropped] == ["model.norm.weight"]


def test_the_background_reader_never_changes_results(tmp_path: Path, fixtures: Path) -> None:
    from safetensors.torch import load_file

    for depth in (0, 2):
        extract(fixtures / "llama-base", fixtures / "llama-ft", output=tmp_path / f"d{depth}", rank=4,
                prefetch_depth=depth, show_progress=False)  # fmt: skip
    a = load_file(str(tmp_path / "d0" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "d2" / "adapter_model.safetensors"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_seed_past_torchs_range_extracts(tmp_path: Path, fixtures: Path, cli) -> None:
    """--seed takes any whole number: 10^23 made torch's manual_seed overflow, reported as a loratool bug."""
    r = cli("extract", fixtures / "llama-base", fixtures / "llama-ft", "-r", "2", "--seed", str(10**23), "-o",
            tmp_path / "a", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_floats_on_one_side_and_integers_on_the_other_are_refused(tmp_path: Path, fixtures: Path, cli) -> None:
    """A tensor stored as integers (or booleans) on one side and as floats on the other is refused by name:
    its difference means nothing (extract had taken int8 values as a fine-tune and factored the change)."""
    import shutil

    from helpers import edit_tensors

    key = "model.layers.0.self_attn.q_proj.weight"
    for side, dtype in (("finetuned", torch.int8), ("base", torch.bool)):
        changed = tmp_path / f"{side}-{dtype}"
        shutil.copytree(fixtures / "llama-ft" if side == "finetuned" else fixtures / "llama-base", changed)
        index = changed / "model.safetensors.index.json"  # the fine-tune is sharded
        file = changed / (json.loads(index.read_text())["weight_map"][key] if index.exists() else "model.safetensors")
        edit_tensors(file, lambda ts, dtype=dtype: ts.update({key: ts[key].to(dtype)}))
        pair = (fixtures / "llama-base", changed) if side == "finetuned" else (changed, fixtures / "llama-ft")
        for command in (("extract", *pair, "-r", "2", "-o", tmp_path / "out"), ("analyze", *pair, "--json")):
            res = cli(*command)
            assert res.exit_code == 1 and key in res.stderr and "not floating" not in res.stderr, res.stderr
            assert "integer" in res.stderr or "boolean" in res.stderr
            assert not (tmp_path / "out").exists()
