"""FP8 bases: merge, unmerge and extract against dequantization written here from each format's
definition (real weight = q * scale of its block, row or tensor; scale = amax / FP8 max)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import adapter_deltas, load_model, peft_adapter, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.math.linalg import unit_of_rounding
from loratool.metadata.provenance import decode
from loratool.ops.extract import extract
from loratool.ops.merge import merge, unmerge

E4M3 = torch.float8_e4m3fn
BLOCK = (24, 24)  # llama-tiny's 32 and 64 do not divide by 24: ragged last tiles
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference_dequant(q: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """q * scale, element by element, with each element's scale looked up by index."""
    w = q.double()
    if scheme == "tensor":
        return w * float(scale.reshape(-1)[0])
    if scheme == "channel":
        return w * scale.double().reshape(-1, 1)
    rows = torch.arange(q.shape[0]) // BLOCK[0]
    cols = torch.arange(q.shape[1]) // BLOCK[1]
    return w * scale.double()[rows][:, cols]


def reference_quant(w: torch.Tensor, scheme: str, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: scale = amax / max, q = round(w / scale), written block by block with loops."""
    top = torch.finfo(dtype).max
    w = w.double()
    if scheme == "tensor":
        groups = [((slice(None), slice(None)), (0, 0))]
        scale = torch.zeros(1, 1, dtype=torch.float64)
    elif scheme == "channel":
        groups = [((slice(i, i + 1), slice(None)), (i, 0)) for i in range(w.shape[0])]
        scale = torch.zeros(w.shape[0], 1, dtype=torch.float64)
    else:
        nb = (math.ceil(w.shape[0] / BLOCK[0]), math.ceil(w.shape[1] / BLOCK[1]))
        groups = [((slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1])), (i, j))
                  for i in range(nb[0]) for j in range(nb[1])]  # fmt: skip
        scale = torch.zeros(nb, dtype=torch.float64)
    q = torch.zeros(w.shape, dtype=dtype)
    for where, at in groups:
        amax = float(w[where].abs().max())
        s = amax / top if amax > 0 else 1.0
        scale[at] = s
        q[where] = (w[where] / s).clamp(-top, top).float().to(dtype)
    return q, scale.float()


def quant_config(scheme: str) -> dict:
    if scheme == "block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                          "strategy": scheme, "symmetric": True}}},
    }  # fmt: skip


def scale_name(scheme: str) -> str:
    return "weight_scale_inv" if scheme == "block" else "weight_scale"


def fp8_checkpoint(src: Path, dst: Path, scheme: str) -> None:
    """``src`` (a float32 model directory) with its projections quantized as the format says."""
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in PROJ:
            q, s = reference_quant(t, scheme)
            out[name] = q
            out[name[: -len("weight")] + scale_name(scheme)] = s
            if scheme != "block":
                out[name[: -len("weight")] + "input_scale"] = torch.tensor([0.0123])
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quant_config(scheme)
    (dst / "config.json").write_text(json.dumps(config))


def dequantized_state(path: Path, scheme: str) -> dict[str, torch.Tensor]:
    ts = load_file(str(path / "model.safetensors"))
    out = {}
    for name, t in ts.items():
        if t.dtype == E4M3:
            out[name] = reference_dequant(t, ts[name[: -len("weight")] + scale_name(scheme)], scheme)
        elif not name.endswith(("_scale", "_scale_inv")):
            out[name] = t.double()
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A float32 tiny Llama and an adapter on every projection (random B, so the delta is real)."""
    root = tmp_path_factory.mktemp("fp8")
    tiny_model("llama").save_pretrained(root / "base")
    pm = peft_adapter(load_model("llama", root / "base"), list(PROJ), r=4, alpha=8, seed=3)
    pm.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def fp8_spacing(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """The distance between the FP8 values around each |x| (of x in scaled units), from the grid of
    all 256 codes: the next code up minus the code at or below."""
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    grid = grid[grid.isfinite() & (grid >= 0)].unique().sort().values
    i = (torch.searchsorted(grid, x.abs().double(), right=True) - 1).clamp(0, len(grid) - 2)
    return grid[i + 1] - grid[i]


def scaled_units(t: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """Each element's scale, as reference_dequant looks it up."""
    return reference_dequant(torch.ones(t.shape), scale, scheme)


@pytest.mark.parametrize("scheme", ["block", "channel", "tensor"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "subspace"])
def test_merge_requantizes_to_the_same_layout(tmp_path: Path, plain, scheme: str, rounding: str) -> None:
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", scheme)
    res = merge(tmp_path / "fp8", [adapter], output=tmp_path / "merged", rounding=rounding, show_progress=False)
    src, out = (
        load_file(str(tmp_path / "fp8" / "model.safetensors")),
        load_file(str(tmp_path / "merged" / "model.safetensors")),
    )
    assert sorted(out) == sorted(src)  # the same tensors (their order in the file is the writer's: unchanged first)
    assert all(out[k].dtype == src[k].dtype and out[k].shape == src[k].shape for k in src)  # layout kept
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"] == quant_config(scheme)
    for k in src:
        if k.endswith("input_scale") or not k.endswith(("weight", "_scale", "_scale_inv")):
            assert torch.equal(out[k], src[k]), k  # activation scales and the rest pass through
    before, after = dequantized_state(tmp_path / "fp8", scheme), dequantized_state(tmp_path / "merged", scheme)
    inner = sq = 0.0
    for name, delta in adapter_deltas(adapter).items():
        target = before[name] + delta  # what the merged weight should be, exactly
        ours = float((after[name] - target).norm())
        if rounding == "nearest":
            ideal = reference_dequant(*reference_quant(target.float(), scheme), scheme)
            assert ours <= float((ideal - target).norm()) * (1 + 1e-6) + 1e-12, name  # as good as requantizing exactly
        elif rounding == "stochastic":  # each element on one of the two FP8 values around it (in the new scales)
            out8 = load_file(str(tmp_path / "merged" / "model.safetensors"))
            unit = scaled_units(after[name], out8[name[: -len("weight")] + scale_name(scheme)], scheme)
            assert ((after[name] - target).abs() <= fp8_spacing(target / unit) * unit * (1 + 1e-6)).all(), name
        else:  # the error stays out of the adapter's input span
            lora_a = load_file(str(adapter / "adapter_model.safetensors"))[
                "base_model.model." + name.replace(".weight", ".lora_A.weight")
            ]
            assert span_share(after[name] - target, lora_a) < 0.25, name
        assert ours < float(delta.norm()), name  # and the delta is carried, not erased
        inner += float(((after[name] - before[name]) * delta).sum())
        sq += float(delta.square().sum())
    q = res.quantization
    assert q is not None and q["method"] == quant_config(scheme)["quant_method"] and q["schemes"] == [scheme]
    assert q["rounding"]["rule"] == rounding and len(q["tensors"]) == len(adapter_deltas(adapter))
    assert q["kept"] == pytest.approx(inner / sq, abs=1e-4)  # <W_written - W_base, delta> / ||delta||^2, from files
    assert not res.warnings


@pytest.mark.parametrize("scheme", ["block", "channel"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_unmerge_of_merge_is_within_two_fp8_rounding_units(tmp_path: Path, plain, scheme: str, rounding: str) -> None:
    """Nearest and stochastic rounding put each element within one step of its target, so a round
    trip lands within two units of the original."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", scheme)
    merge(tmp_path / "fp8", [adapter], output=tmp_path / "merged", rounding=rounding, show_progress=False)
    res = unmerge(tmp_path / "merged", [adapter], output=tmp_path / "back", check=tmp_path / "fp8", rounding=rounding,
                  show_progress=False)  # fmt: skip
    assert res.check is not None and res.check.max_rounding_units <= 2.0 + 1e-9
    assert res.check.elements > 0 and res.check.relative_diff < 0.05


def test_a_nan_code_in_the_fp8_check_base_is_refused_by_name(tmp_path: Path, plain) -> None:
    """The FP8 path of unmerge --check reads the NaN from its own sums, as the bf16 one does."""
    import shutil

    from loratool.errors import NonFiniteError

    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    merge(tmp_path / "fp8", [adapter], output=tmp_path / "merged", rounding="nearest", show_progress=False)
    shutil.copytree(tmp_path / "fp8", tmp_path / "ref")
    f = next((tmp_path / "ref").glob("*.safetensors"))
    ts = load_file(str(f))
    key = next(k for k in adapter_deltas(adapter) if ts[k].dtype == torch.float8_e4m3fn)  # a weight it merges into
    codes = ts[key].view(torch.uint8).clone()
    codes.view(-1)[0] = 0x7F  # e4m3fn's NaN
    ts[key] = codes.view(torch.float8_e4m3fn)
    save_file(ts, str(f))
    with pytest.raises(NonFiniteError, match="--check BASE holds NaN or Inf"):
        unmerge(tmp_path / "merged", [adapter], output=tmp_path / "back", check=tmp_path / "ref", rounding="nearest",
                show_progress=False)  # fmt: skip
    assert not (tmp_path / "back").exists()


def span_share(error: torch.Tensor, lora_A: torch.Tensor) -> float:
    """||error projected on the span of lora_A's rows|| / ||error||."""
    basis, _ = torch.linalg.qr(lora_A.double().T)  # (in, r)
    return float((error.double() @ basis).norm() / error.double().norm().clamp_min(1e-300))


def test_a_subspace_round_trip_keeps_its_error_out_of_the_adapters_inputs(tmp_path: Path, plain) -> None:
    """The subspace rule moves each element's error along its row (an element may land several steps
    away), so that what is left lies outside the span of the adapter's lora_A: the round trip's error
    projects onto it far less than nearest rounding's, whose error is the adapter's own direction."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    shares = {}
    for rule in ("subspace", "nearest"):
        merge(tmp_path / "fp8", [adapter], output=tmp_path / f"m-{rule}", rounding=rule, show_progress=False)
        res = unmerge(tmp_path / f"m-{rule}", [adapter], output=tmp_path / f"u-{rule}", rounding=rule,
                      check=tmp_path / "fp8", show_progress=False)  # fmt: skip
        assert res.check is not None and res.check.relative_diff < 0.05
        before, after = dequantized_state(tmp_path / "fp8", "block"), dequantized_state(tmp_path / f"u-{rule}", "block")
        shares[rule] = max(
            span_share(after[k] - before[k], ad["base_model.model." + k.replace(".weight", ".lora_A.weight")])
            for k in adapter_deltas(adapter)
        )
    assert shares["subspace"] < 0.2 < shares["nearest"], shares


def test_dtype_writes_a_dequantized_checkpoint(tmp_path: Path, plain) -> None:
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    merge(tmp_path / "fp8", [adapter], output=tmp_path / "deq", dtype="bfloat16", show_progress=False)
    out = load_file(str(tmp_path / "deq" / "model.safetensors"))
    assert not any(k.endswith(("_scale", "_scale_inv")) for k in out)
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    before = dequantized_state(tmp_path / "fp8", "block")
    for name, delta in adapter_deltas(adapter).items():
        target = before[name] + delta  # rounded once to bfloat16: within one unit of rounding
        assert ((out[name].double() - target).abs() <= unit_of_rounding(target.abs(), torch.bfloat16)).all(), name
    model = load_model("llama", tmp_path / "deq", torch.bfloat16)  # loads in transformers as a plain model
    assert model is not None


def test_a_delta_below_fp8_resolution_is_erased_by_nearest_rounding_and_reported(tmp_path: Path, plain) -> None:
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    res = merge(tmp_path / "fp8", [(adapter, 1e-3)], output=tmp_path / "merged", rounding="nearest",
                show_progress=False)  # fmt: skip
    assert res.quantization is not None and res.quantization["kept"] < 0.2
    assert any("carry only" in w and "--rounding subspace" in w for w in res.warnings), res.warnings


def test_stochastic_rounding_keeps_a_delta_below_fp8_resolution(tmp_path: Path, plain) -> None:
    """The same small delta, stochastically rounded: the written weights carry it (kept near 1,
    within the noise of one draw per element) and nothing is warned."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    res = merge(tmp_path / "fp8", [(adapter, 1e-3)], output=tmp_path / "merged", rounding="stochastic",
                show_progress=False)  # fmt: skip
    q = res.quantization
    assert q is not None and q["rounding"] == {"rule": "stochastic", "seed": 0, "damping": None}
    assert abs(q["kept"] - 1) < 0.2 and q["noise"] > 1  # unbiased, at the price of noise
    assert not res.warnings


def test_the_default_subspace_rule_keeps_a_small_delta_with_less_noise(tmp_path: Path, plain) -> None:
    """At 1% of the adapter: nearest rounding loses a third of it, the subspace rule (the default)
    keeps nearly all, with less noise than stochastic rounding's."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    q = {}
    for rule in ("subspace", "stochastic", "nearest"):
        res = merge(tmp_path / "fp8", [(adapter, 0.01)], output=tmp_path / rule,
                    **({} if rule == "subspace" else {"rounding": rule}), show_progress=False)  # fmt: skip
        q[rule] = res.quantization
    assert q["subspace"]["rounding"] == {"rule": "subspace", "seed": None, "damping": 0.01}
    assert q["subspace"]["kept"] > 0.9 and q["nearest"]["kept"] < 0.8
    assert q["subspace"]["noise"] < q["stochastic"]["noise"]


def test_min_kept_refuses_a_merge_that_loses_the_adapter_and_writes_nothing(tmp_path: Path, plain, cli) -> None:
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    small = f"{adapter}:0.01"
    r = cli("merge", tmp_path / "fp8", small, "-o", tmp_path / "out", "--rounding", "nearest", "--min-kept", "0.8")
    assert r.exit_code == 1 and not (tmp_path / "out").exists(), r.stderr
    assert "below --min-kept 0.8; nothing was written" in r.stderr and "model.layers." in r.stderr, r.stderr
    assert "--rounding subspace" in r.stderr and "--dtype bfloat16" in r.stderr and "Traceback" not in r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name not in ("fp8",)]  # no temporary left beside it
    r = cli("merge", tmp_path / "fp8", small, "-o", tmp_path / "out", "--min-kept", "0.8", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["quantization"]["kept"] >= 0.8


def test_seed_decides_the_bytes_and_the_output_records_the_rule(tmp_path: Path, plain) -> None:
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        merge(tmp_path / "fp8", [(adapter, 0.01)], output=tmp_path / name, rounding="stochastic", seed=seed,
              show_progress=False)  # fmt: skip
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8))
    assert not torch.equal(a[key].view(torch.uint8), c[key].view(torch.uint8))
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        record = decode(f.metadata())
    assert record is not None and record["parameters"]["rounding"] == {"rule": "stochastic", "seed": 1, "damping": None}


def power_of_two_scales(path: Path) -> None:
    """The checkpoint's scales rounded to powers of two (its codes kept): every dequantized weight is
    then exactly a bfloat16 (4 significant bits times 2^k), as with MXFP4's E8M0 scales."""
    ts = load_file(str(path / "model.safetensors"))
    for k, v in ts.items():
        if k.endswith("_scale_inv"):
            ts[k] = torch.exp2(v.log2().round())
    save_file(ts, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "subspace"])
def test_a_dequantized_output_is_rounded_by_the_rule_and_reports_kept(tmp_path: Path, plain, rounding: str) -> None:
    """--dtype bfloat16 from a base whose values are bfloat16s: the merged weights are rounded to
    bfloat16 by the rule; a delta under half a bfloat16 step is erased by nearest rounding (it
    writes the base back) and carried by stochastic rounding."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    power_of_two_scales(tmp_path / "fp8")
    res = merge(tmp_path / "fp8", [(adapter, 2e-4)], output=tmp_path / "deq", dtype="bfloat16", rounding=rounding,
                show_progress=False)  # fmt: skip
    q = res.quantization
    assert q is not None and q["dequantized"] and q["rounding"]["rule"] == rounding
    out, before = load_file(str(tmp_path / "deq" / "model.safetensors")), dequantized_state(tmp_path / "fp8", "block")
    inner = sq = 0.0
    for name, delta in adapter_deltas(adapter, 2e-4).items():
        inner += float(((out[name].double() - before[name]) * delta).sum())
        sq += float(delta.square().sum())
    assert q["kept"] == pytest.approx(inner / sq, abs=2e-3)
    if rounding == "nearest":
        assert q["kept"] < 0.5 and any("output dtype" in w for w in res.warnings)
    elif rounding == "stochastic":
        assert abs(q["kept"] - 1) < 0.15 and not res.warnings
    else:  # onto bfloat16's grid the subspace rule has no compiled kernel: said, not hidden
        assert q["kept"] > 0.5 and any("ran as torch passes" in w for w in res.warnings), res.warnings


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_a_dequantized_output_has_the_same_bytes_with_and_without_the_kernels(
    tmp_path: Path, plain, monkeypatch, rounding: str, dtype: str
) -> None:
    """--dtype bfloat16 (float16) from an FP8 base rounds by the compiled kernels where they are built (the
    rows split across the cores): the bytes of the torch passes, the kept figure to its printed digits."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    runs = {}
    for native in ("1", "0"):
        monkeypatch.setenv("LORATOOL_NATIVE", native)
        runs[native] = merge(tmp_path / "fp8", [adapter], output=tmp_path / native, dtype=dtype,
                             rounding=rounding, show_progress=False).quantization  # fmt: skip
    fast, slow = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("1", "0"))
    assert fast.keys() == slow.keys() and all(torch.equal(fast[k], slow[k]) for k in fast)
    assert runs["1"]["kept"] == pytest.approx(runs["0"]["kept"], rel=1e-6)


def test_unmerge_says_what_it_took_out(tmp_path: Path, plain) -> None:
    """After a stochastic merge of a small delta, a stochastic unmerge takes it out in expectation
    (kept near 1 of the negated delta); a nearest one leaves most of it in."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    merge(tmp_path / "fp8", [(adapter, 1e-3)], output=tmp_path / "merged", rounding="stochastic", show_progress=False)
    kept = {}
    for rule in ("stochastic", "nearest"):
        res = unmerge(tmp_path / "merged", [(adapter, 1e-3)], output=tmp_path / rule, rounding=rule, seed=9,
                      check=tmp_path / "fp8", show_progress=False)  # fmt: skip
        assert res.quantization is not None and res.check is not None and res.check.max_rounding_units <= 2 + 1e-9
        kept[rule] = res.quantization["kept"]
    assert abs(kept["stochastic"] - 1) < 0.2 and kept["nearest"] < 0.5


def test_a_dequantized_weight_beyond_float16_is_refused_even_where_no_adapter_touches_it(tmp_path: Path, plain) -> None:
    """--dtype float16: an FP8 weight whose dequantized values pass 65504 is refused, naming it, rather
    than written as Inf (the adapter here adapts q_proj only; the weight is a k_proj)."""
    from loratool.errors import NonFiniteError

    base, _ = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    ts = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    big = "model.layers.0.self_attn.k_proj.weight"
    ts[big + "_scale_inv"] = ts[big + "_scale_inv"] * 1e7  # its largest values about 6e5
    save_file(ts, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    peft_adapter(load_model("llama", base), ["q_proj"], r=2, alpha=4, seed=1).save_pretrained(tmp_path / "q-only")
    with pytest.raises(NonFiniteError, match="does not fit float16") as e:
        merge(tmp_path / "fp8", [tmp_path / "q-only"], output=tmp_path / "out", dtype="float16", show_progress=False)
    assert big in str(e.value) and not (tmp_path / "out").exists()


def test_a_delta_too_large_to_measure_what_was_kept_is_refused(tmp_path: Path, plain, cli) -> None:
    """At a scale of 1e30 the merged deltas' squares pass float32's range in the kept sums: the merge
    reported kept nan (and --json failed on the Inf), writing the checkpoint; now it writes nothing."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    r = cli("merge", tmp_path / "fp8", f"{adapter}:1e30", "-o", tmp_path / "out", "--min-kept", "0", "--json")
    assert r.exit_code == 1 and "too large to measure what the rounding kept" in r.stderr, r.stderr
    assert "ADAPTER:SCALE" in r.stderr and ".weight" in r.stderr and not (tmp_path / "out").exists()


def test_the_subspace_rule_without_the_kernels_gives_their_bytes_and_says_it_is_slow(
    tmp_path: Path, plain, monkeypatch
) -> None:
    from loratool.quant import native

    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    built = native.fp8_kernels() is not None
    fast = merge(tmp_path / "fp8", [(adapter, 0.01)], output=tmp_path / "fast", show_progress=False)
    assert not built or not any("ran as torch passes" in w for w in fast.warnings)
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    slow = merge(tmp_path / "fp8", [(adapter, 0.01)], output=tmp_path / "slow", show_progress=False)
    assert any("ran as torch passes" in w for w in slow.warnings)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("fast", "slow"))
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == E4M3 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == E4M3 else b[k]) for k in a)  # fmt: skip


def test_the_unmerge_summary_says_what_it_restores(tmp_path: Path, plain, cli) -> None:
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    assert cli("merge", tmp_path / "fp8", adapter, "-o", tmp_path / "merged").exit_code == 0
    r = cli("unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "back", "-q")
    assert r.exit_code == 0, r.stderr
    assert "subspace rounding: kept" in r.stdout and "not on its bytes; --check BASE measures how far" in r.stdout


def test_a_merge_at_scale_zero_reports_no_kept_and_valid_json(tmp_path: Path, plain, cli) -> None:
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    r = cli("merge", tmp_path / "fp8", f"{adapter}:0", "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    assert "NaN" not in r.stdout and json.loads(r.stdout)["quantization"]["kept"] is None


def test_min_kept_on_a_plain_base_says_it_does_not_apply(tmp_path: Path, plain) -> None:
    base, adapter = plain
    res = merge(base, [adapter], output=tmp_path / "out", min_kept=0.9, show_progress=False)
    assert res.quantization is None and any("--min-kept applies to quantized bases" in w for w in res.warnings)


SCALE = "model.layers.0.self_attn.q_proj.weight_scale_inv"


def spoil_scale(path: Path, how: str) -> None:
    """One scale tensor of an FP8 checkpoint made wrong in one way."""
    ts = load_file(str(path / "model.safetensors"))
    s = ts[SCALE]
    ts[SCALE] = {
        "int32": lambda: (s * 1e4).to(torch.int32),
        "float8": lambda: s.to(E4M3),
        "shape": lambda: s[:, :1].contiguous(),
        "nan": lambda: s.clone().index_fill_(1, torch.tensor([1]), float("nan")),
        "negative": lambda: -s,
    }[how]()
    save_file(ts, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("how", "says"),
    [("int32", "is I32; FP8 scales are float32"), ("float8", "is F8_E4M3; FP8 scales are float32"),
     ("shape", "which fits no FP8 scheme"), ("nan", "the FP8 scale holds nan at [0, 1]"),
     ("negative", "scales are finite and positive")],
)  # fmt: skip
def test_a_bad_scale_is_refused_naming_it(tmp_path: Path, plain, cli, how: str, says: str) -> None:
    """Scales must be floating, of the expected shape, finite and not negative: else merge and
    extract exit 1 naming the tensor, and write nothing (an int32 scale used to zero whole blocks)."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    spoil_scale(tmp_path / "fp8", how)
    for args in (["merge", tmp_path / "fp8", adapter], ["extract", tmp_path / "fp8", base, "-r", "2"]):
        r = cli(*args, "-o", tmp_path / "out")
        assert r.exit_code == 1 and says in r.stderr and "Traceback" not in r.stderr, (args[0], r.stderr)
        assert SCALE in r.stderr and not (tmp_path / "out").exists()
        assert "loratool bug" not in r.stderr and "unquantized checkpoint" not in r.stderr


def test_a_weight_not_stored_as_fp8_beside_its_scale_is_refused(tmp_path: Path, plain, cli) -> None:
    """A scale beside a weight stored in bfloat16: read as stored, the scale was dropped unread (merge,
    extract and the dequantized output all went on without a word); now each refuses it by name."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    ts = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    weight = SCALE.removesuffix("_scale_inv")
    ts[weight] = ts[weight].to(torch.bfloat16)
    save_file(ts, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    for args in (["merge", tmp_path / "fp8", adapter], ["merge", tmp_path / "fp8", adapter, "--dtype", "bfloat16"],
                 ["extract", tmp_path / "fp8", base, "-r", "2"]):  # fmt: skip
        r = cli(*args, "-o", tmp_path / "out")
        assert r.exit_code == 1 and f"'{weight}' is BF16, not FP8, but its scale '{SCALE}'" in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["both", "base"])
def test_extract_from_fp8_equals_extract_from_its_dequantized_copy(tmp_path: Path, plain, which: str) -> None:
    base, _ = plain
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "ft")
    fp8_checkpoint(base, tmp_path / "base8", "block")
    ft = tmp_path / "ft"
    if which == "both":
        fp8_checkpoint(tmp_path / "ft", tmp_path / "ft8", "block")
        ft = tmp_path / "ft8"
    for name, scheme_path in (("base8", tmp_path / "base8"), ("ft8", tmp_path / "ft8")):
        if not scheme_path.exists():
            continue
        (tmp_path / f"{name}-deq").mkdir()
        deq = {k: v.float() for k, v in dequantized_state(scheme_path, "block").items()}
        save_file(deq, str(tmp_path / f"{name}-deq" / "model.safetensors"))
        (tmp_path / f"{name}-deq" / "config.json").write_text((base / "config.json").read_text())
    ft_deq = tmp_path / "ft8-deq" if which == "both" else tmp_path / "ft"
    kw = dict(rank=4, dtype="float32", show_progress=False, seed=0)
    extract(tmp_path / "base8", ft, output=tmp_path / "a", **kw)
    extract(tmp_path / "base8-deq", ft_deq, output=tmp_path / "b", **kw)
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_extract_decodes_an_fp8_base_into_buffers_of_the_pool(tmp_path: Path, plain, monkeypatch) -> None:
    """Extraction reads only the difference, so an FP8 base's weights are decoded into reused buffers (a
    fresh tensor a weight costs a page fault each 4 KiB); the adapter is the one extracted without."""
    from loratool.stream import deltas

    base, _ = plain
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "ft")
    fp8_checkpoint(base, tmp_path / "base8", "block")
    kw = dict(rank=4, dtype="float32", show_progress=False, seed=0)
    extract(tmp_path / "base8", tmp_path / "ft", output=tmp_path / "pooled", **kw)
    decoded: list[bool] = []
    real = deltas.dequantize_fp8
    monkeypatch.setattr(
        deltas, "dequantize_fp8", lambda *a, out=None: decoded.append(out is not None) or real(*a, out=out)
    )
    extract(tmp_path / "base8", tmp_path / "ft", output=tmp_path / "again", **kw)
    assert decoded and all(decoded)
    monkeypatch.setattr(deltas, "dequantize_fp8", lambda *a, out=None: real(*a))  # fresh tensors, as before
    extract(tmp_path / "base8", tmp_path / "ft", output=tmp_path / "fresh", **kw)
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("pooled", "fresh"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_extract_factors_of_an_fp8_finetune_default_to_bfloat16(tmp_path: Path, plain) -> None:
    base, _ = plain
    (tmp_path / "ft").mkdir()
    g = torch.Generator().manual_seed(5)
    ts = load_file(str(base / "model.safetensors"))  # a fine-tune that changed the projections only
    ft = {k: t + 0.01 * torch.randn(t.shape, generator=g) if k.rsplit(".", 2)[-2] in PROJ else t for k, t in ts.items()}
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"))
    (tmp_path / "ft" / "config.json").write_text((base / "config.json").read_text())
    fp8_checkpoint(tmp_path / "ft", tmp_path / "ft8", "block")
    extract(base, tmp_path / "ft8", output=tmp_path / "a", rank=2, show_progress=False)
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


@pytest.mark.parametrize(
    ("extra", "method"),
    [
        ({"model.layers.0.self_attn.q_proj.qweight": torch.zeros(4, 8, dtype=torch.int32),
          "model.layers.0.self_attn.q_proj.qzeros": torch.zeros(1, 8, dtype=torch.int32),
          "model.layers.0.self_attn.q_proj.scales": torch.ones(1, 32, dtype=torch.float16)}, "gptq/awq"),
        ({"model.layers.0.mlp.down_proj.weight.absmax": torch.ones(4),
          "model.layers.0.mlp.down_proj.weight.quant_map": torch.ones(16)}, "bitsandbytes"),
    ],
)  # fmt: skip
def test_other_quantizations_are_refused_before_anything_is_written(tmp_path: Path, plain, cli, extra, method) -> None:
    base, adapter = plain
    (tmp_path / "q").mkdir()
    ts = {**load_file(str(base / "model.safetensors")), **extra}
    save_file(ts, str(tmp_path / "q" / "model.safetensors"))
    (tmp_path / "q" / "config.json").write_text((base / "config.json").read_text())
    for args in (
        ["merge", tmp_path / "q", adapter],
        ["unmerge", tmp_path / "q", adapter],
        ["extract", base, tmp_path / "q"],
    ):
        r = cli(*args, "-o", tmp_path / "out")
        assert r.exit_code == 1 and f"the checkpoint is quantized: {method}" in r.stderr, r.stderr
        assert "quantize the result" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_a_damaged_activation_scale_is_refused_where_the_output_would_carry_it(
    tmp_path: Path, plain, cli, bad: float
) -> None:
    """A merge in the FP8 layout writes ``input_scale`` as read: NaN, Inf or a negative one would reach
    the runtime, so the merge refuses it by name and writes nothing; a dequantized output drops it."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "channel")
    ts = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    key = "model.layers.0.self_attn.k_proj.input_scale"
    ts[key] = torch.tensor([bad])
    save_file(ts, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    for args in ([], ["--dtype", "bfloat16"]):
        r = cli("merge", tmp_path / "fp8", adapter, "-o", tmp_path / "out", *args)
        if not args:
            assert r.exit_code == 1 and key in r.stderr and "activation scale" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
        else:
            assert r.exit_code == 0 and key not in load_file(str(tmp_path / "out" / "model.safetensors")), r.stderr


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_a_nan_code_in_the_fp8_base_is_an_error_naming_the_weight(tmp_path: Path, plain, cli, code: int) -> None:
    """e4m3fn's NaN codes decode to finite numbers in the fast path: merge must still see them."""
    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "fp8", "block")
    ts = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    ts[key].view(torch.uint8)[3, 5] = code
    save_file(ts, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    r = cli("merge", tmp_path / "fp8", adapter, "-o", tmp_path / "out")
    assert r.exit_code == 1 and key in r.stderr and "NaN" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scales_first", [True, False])
def test_weight_and_scale_in_different_shards(tmp_path: Path, plain, scales_first: bool, monkeypatch) -> None:
    """The pair is computed when its first member comes up, whichever shard holds it; the result is
    the same as from one file, and no FP8 weight is read twice."""
    from collections import Counter

    from loratool.io.checkpoint import Checkpoint

    base, adapter = plain
    fp8_checkpoint(base, tmp_path / "one", "block")
    merge(tmp_path / "one", [adapter], output=tmp_path / "m1", show_progress=False)
    ts = load_file(str(tmp_path / "one" / "model.safetensors"))
    scales = {k: v for k, v in ts.items() if k.endswith("_scale_inv")}
    rest = {k: v for k, v in ts.items() if k not in scales}
    first, second = (scales, rest) if scales_first else (rest, scales)
    (tmp_path / "two").mkdir()
    save_file(first, str(tmp_path / "two" / "model-00001-of-00002.safetensors"))
    save_file(second, str(tmp_path / "two" / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first} | {
        k: "model-00002-of-00002.safetensors" for k in second
    }
    (tmp_path / "two" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "two" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    reads: Counter[str] = Counter()
    real_get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, key: reads.update([key]) or real_get(self, key))
    merge(tmp_path / "two", [adapter], output=tmp_path / "m2", show_progress=False)
    fp8_weights = [k for k, v in ts.items() if v.dtype == E4M3]
    assert fp8_weights and all(reads[k] == 1 for k in fp8_weights), reads
    one = load_file(str(tmp_path / "m1" / "model.safetensors"))
    two = {**load_file(str(tmp_path / "m2" / "model-00001-of-00002.safetensors")),
           **load_file(str(tmp_path / "m2" / "model-00002-of-00002.safetensors"))}  # fmt: skip
    assert set(one) == set(two)
    for k in one:
        assert torch.equal(one[k].view(torch.uint8) if one[k].dtype == E4M3 else one[k],
                           two[k].view(torch.uint8) if two[k].dtype == E4M3 else two[k]), k  # fmt: skip


def test_bulk_fp8_conversion_is_exact_for_every_code() -> None:
    """The merge's float8 -> float32 conversion (float16 bit patterns) against torch's own, all 256
    codes of both formats, NaN codes included."""
    from loratool.quant.fp8 import fp8_to_float32_into

    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        q = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)
        out = fp8_to_float32_into(q, torch.empty(16, 16), torch.empty(16, 16, dtype=torch.int16))
        ref = q.to(torch.float32)
        assert bool(((out == ref) | (out.isnan() & ref.isnan())).all()), dtype


@pytest.mark.parametrize(("name", "scheme"), [("llama-fp8-block", "block"), ("llama-fp8-channel", "channel")])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_the_shipped_fp8_fixtures_are_the_format_and_merge_like_peft(tmp_path: Path, fixtures: Path, cli, name: str,
                                                                      scheme: str, rounding: str) -> None:  # fmt: skip
    """fixtures/llama-fp8-*: llama-base quantized by each format's definition (checked here); the
    shipped PEFT adapter merged into them carries PEFT's own delta, as well as requantizing allows:
    nearest, as close as requantizing the exact result; stochastic, each element on one of the two
    FP8 values around it, and the reported kept is <W_written - W_base, PEFT's delta> / ||delta||^2."""
    from peft import PeftModel

    base = load_file(str(fixtures / "llama-base" / "model.safetensors"))
    stored = load_file(str(fixtures / name / "model.safetensors"))
    for key, t in base.items():
        if t.dim() == 2 and key.rsplit(".", 2)[-2] in PROJ:
            q, s = reference_quant(t, scheme)
            assert torch.equal(stored[key].view(torch.uint8), q.view(torch.uint8)), key
            assert torch.equal(stored[key[: -len("weight")] + scale_name(scheme)], s.reshape(-1, s.shape[-1])), key
    assert json.loads((fixtures / name / "config.json").read_text())["quantization_config"] == quant_config(scheme)
    r = cli("merge", fixtures / name, fixtures / "llama-peft-adapter", "-o", tmp_path / "merged", "--json",
            "--rounding", rounding)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)["quantization"]
    assert report["schemes"] == [scheme] and report["rounding"]["rule"] == rounding
    peft_model = PeftModel.from_pretrained(
        load_model("llama", fixtures / "llama-base"), fixtures / "llama-peft-adapter"
    )
    deltas = {
        n.removeprefix("base_model.model.") + ".weight": layer.get_delta_weight("default").double()
        for n, layer in peft_model.named_modules()
        if hasattr(layer, "lora_A") and "default" in layer.lora_A
    }
    before, after = dequantized_state(fixtures / name, scheme), dequantized_state(tmp_path / "merged", scheme)
    out8 = load_file(str(tmp_path / "merged" / "model.safetensors"))
    inner = sq = 0.0
    for key, delta in deltas.items():
        target = before[key] + delta
        if rounding == "nearest":
            ideal = reference_dequant(*reference_quant(target.float(), scheme), scheme)
            assert float((after[key] - target).norm()) <= float((ideal - target).norm()) * (1 + 1e-6) + 1e-12, key
        else:
            unit = scaled_units(after[key], out8[key[: -len("weight")] + scale_name(scheme)], scheme)
            assert ((after[key] - target).abs() <= fp8_spacing(target / unit) * unit * (1 + 1e-6)).all(), key
        inner += float(((after[key] - before[key]) * delta).sum())
        sq += float(delta.square().sum())
    assert report["kept"] == pytest.approx(inner / sq, abs=1e-3)


def test_the_shipped_gptq_fixture_merges_dequantized_only(tmp_path: Path, fixtures: Path, cli) -> None:
    for args in (
        ["merge", fixtures / "llama-gptq-like", fixtures / "llama-peft-adapter"],
        ["unmerge", fixtures / "llama-gptq-like", fixtures / "llama-peft-adapter"],
    ):
        r = cli(*args, "-o", tmp_path / "out")
        assert r.exit_code == 1 and "calibration data" in r.stderr and "--dtype bfloat16" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    r = cli("merge", fixtures / "llama-gptq-like", fixtures / "llama-peft-adapter", "-o", tmp_path / "out",
            "--dtype", "bfloat16")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    # its codes and zero points are 0 and its scales 1: every packed weight reads (0 - (0 + 1)) * 1 = -1
    assert float(out["model.layers.0.mlp.up_proj.weight"].float().mean()) == pytest.approx(-1, abs=0.05)
    assert not any(k.endswith("qweight") for k in out)


@pytest.mark.parametrize(("name", "method"), [("llama-bnb-like", "bitsandbytes")])
def test_the_shipped_refusal_fixtures_are_refused(tmp_path: Path, fixtures: Path, cli, name: str, method: str) -> None:
    for args in (
        ["merge", fixtures / name, fixtures / "llama-peft-adapter"],
        ["unmerge", fixtures / name, fixtures / "llama-peft-adapter"],
        ["extract", fixtures / "llama-base", fixtures / name],
    ):
        r = cli(*args, "-o", tmp_path / "out")
        assert r.exit_code == 1 and f"the checkpoint is quantized: {method}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_a_bias_kept_whole_from_an_fp8_finetune_keeps_its_weight_dequantized(tmp_path: Path) -> None:
    """--keep-full on a Qwen2 attention bias keeps its module whole, weight included; from an FP8
    fine-tune that weight is stored dequantized (as every whole tensor of it), not as FP8 codes without
    their scales. PEFT on the float base then gives the dequantized fine-tune's logits."""
    import transformers as tf
    from peft import PeftModel

    config = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(config).eval().save_pretrained(tmp_path / "base")
    ft = tf.Qwen2ForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        ft.model.layers[0].self_attn.q_proj.bias.add_(0.1)
    ft.save_pretrained(tmp_path / "ft")
    fp8_checkpoint(tmp_path / "ft", tmp_path / "ft8", "block")
    # the float base, but with the fine-tune's FP8 rounding of its projections: the pair then differs by the bias only
    ts = load_file(str(tmp_path / "base" / "model.safetensors"))
    rounded = dequantized_state(tmp_path / "ft8", "block")
    ts.update({k: v.float() for k, v in rounded.items() if k.endswith("_proj.weight")})
    save_file(ts, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    result = extract(tmp_path / "base", tmp_path / "ft8", output=tmp_path / "a", keep_full="bias", show_progress=False)
    key = "model.layers.0.self_attn.q_proj.weight"
    whole = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))["base_model.model." + key]
    assert whole.is_floating_point() and whole.element_size() >= 2, whole.dtype
    torch.testing.assert_close(whole.float(), ts[key], rtol=0, atol=0)
    assert key in result.kept_whole
    model = PeftModel.from_pretrained(tf.Qwen2ForCausalLM.from_pretrained(tmp_path / "base").eval(), tmp_path / "a")
    want = tf.Qwen2ForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        want.model.layers[0].self_attn.q_proj.bias.add_(0.1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
