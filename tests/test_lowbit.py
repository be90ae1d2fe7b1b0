"""Packed low-bit bases (MXFP4, NVFP4, INT4/INT8 pack-quantized): read, merged, unmerged and
extracted from, against the producers' own code as oracles: compressed-tensors' compressors make
and read the NVFP4 and INT checkpoints, transformers' gpt-oss dequantizer reads MXFP4, and PEFT
merges into the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import adapter_deltas, load_model, peft_adapter, tiny_model
from safetensors.torch import load_file, save_file

from loratool.adapter import Adapter, LoraModule
from loratool.formats import save_adapter
from loratool.io.checkpoint import open_checkpoint
from loratool.io.logical import model_view
from loratool.ops.extract import extract
from loratool.ops.merge import merge, unmerge
from loratool.stream.deltas import read_weight

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMATS = ("int4-sym", "int4-asym", "int8-sym", "nvfp4-compressed", "nvfp4-modelopt")


def producer_scheme(fmt: str) -> QuantizationScheme:
    if fmt.startswith("nvfp4"):
        args = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                                scale_dtype=torch.float8_e4m3fn)  # fmt: skip
    else:
        bits = 8 if fmt.startswith("int8") else 4
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=fmt.endswith("-sym"), strategy="group",
                                group_size=16)  # fmt: skip
    return QuantizationScheme(targets=["Linear"], weights=args)


def producer_compress(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """compressed-tensors' own quantizer and compressor (its observer's qparams, as llm-compressor's)."""
    scheme = producer_scheme(fmt)
    groups = w.float().view(w.shape[0], -1, 16)
    if fmt.startswith("nvfp4"):
        gs = generate_gparam(w.float().amin(), w.float().amax())
        scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights, global_scale=gs)
        sd = {"weight": w, "weight_scale": scale, "weight_global_scale": gs}
        return NVFP4PackedCompressor.compress(sd, scheme)
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    sd = {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zp}
    return PackedQuantizationCompressor.compress(sd, scheme)


def producer_decompress(parts: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    scheme = producer_scheme(fmt)
    if fmt == "nvfp4-modelopt":  # compressed-tensors' converter from ModelOpt: rename and invert
        parts = {"weight_packed": parts["weight"], "weight_scale": parts["weight_scale"],
                 "weight_global_scale": 1 / parts["weight_scale_2"]}  # fmt: skip
    if fmt.startswith("nvfp4"):  # decompressed in bfloat16 by the producer
        return NVFP4PackedCompressor.decompress(parts, scheme)["weight"].float()
    parts = {**parts, "weight_scale": parts["weight_scale"].float()}  # (q - zero) * scale, exactly in float32
    return PackedQuantizationCompressor.decompress(parts, scheme)["weight"].float()


def quant_config(fmt: str) -> dict:
    if fmt == "nvfp4-modelopt":
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
    weights = producer_scheme(fmt).weights.model_dump(mode="json")
    return {"quant_method": "compressed-tensors", "quantization_status": "compressed", "ignore": ["lm_head"],
            "format": "nvfp4-pack-quantized" if fmt.startswith("nvfp4") else "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}  # fmt: skip


def make_quantized(src: Path, dst: Path, fmt: str, *, hf_quant_config: bool = False) -> None:
    """``src`` (a tiny Llama) with every projection compressed by the producer, as its exporter lays it out."""
    dst.mkdir(parents=True)
    out = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJ):
            out[name] = t.to(torch.bfloat16)
            continue
        parts = producer_compress(t.to(torch.bfloat16), fmt)
        if fmt == "nvfp4-modelopt":
            parts = {"weight": parts["weight_packed"], "weight_scale": parts["weight_scale"],
                     "weight_scale_2": (1 / parts["weight_global_scale"]).float(),
                     "input_scale": torch.tensor([0.5])}  # fmt: skip
        out.update({f"{module}.{k}": v.contiguous() for k, v in parts.items()})
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if hf_quant_config:
        modelopt = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16}}
        (dst / "hf_quant_config.json").write_text(json.dumps(modelopt))
    else:
        config["quantization_config"] = quant_config(fmt)
    (dst / "config.json").write_text(json.dumps(config))


def dequantized(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Every weight of a quantized tiny Llama as the producer's decompressor reads it (float32)."""
    ts = load_file(str(path / "model.safetensors"))
    out = {}
    for name, t in ts.items():
        module, _, leaf = name.rpartition(".")
        if module.rsplit(".", 1)[-1] not in PROJ:
            out[name] = t.float()
        elif leaf in ("weight_packed", "weight") and t.dtype in (torch.uint8, torch.int32):
            parts = {k.rpartition(".")[2]: v for k, v in ts.items() if k.rpartition(".")[0] == module}
            out[module + ".weight"] = producer_decompress(parts, fmt)
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lowbit")
    tiny_model("llama").save_pretrained(root / "base")
    pm = peft_adapter(load_model("llama", root / "base"), list(PROJ), r=4, alpha=8, seed=3)
    pm.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture(scope="module", params=FORMATS)
def quantized(request, plain, tmp_path_factory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp(request.param) / "q"
    make_quantized(plain[0], path, request.param)
    return request.param, path


def test_the_model_view_dequantizes_as_the_producer_does(quantized) -> None:
    fmt, path = quantized
    want = dequantized(path, fmt)
    with open_checkpoint(path) as ck:
        view = model_view(ck)
        assert sorted(view.keys()) == sorted(want)  # scales and packed parts folded into their weight
        for key, value in want.items():
            got = view.get(key).float()
            assert tuple(view.info(key).shape) == tuple(value.shape), key
            if fmt.startswith("nvfp4"):  # the producer decompresses in bfloat16; loratool in float32
                torch.testing.assert_close(got.to(torch.bfloat16).float(), value, rtol=2**-7, atol=1e-6, msg=key)
            else:
                assert torch.equal(got, value), key


def test_inspect_names_each_packed_weight_and_its_scheme(quantized, cli) -> None:
    fmt, path = quantized
    q = json.loads(cli("inspect", path, "--json").stdout)["quantization"]
    assert q["supported"] and len(q["packed_weights"]) == 2 * len(PROJ)
    row = next(w for w in q["packed_weights"] if w["tensor"] == "model.layers.0.mlp.down_proj.weight")
    assert row["shape"] == [32, 64]
    bits = "int8" if fmt.startswith("int8") else "int4" if fmt.startswith("int") else "nvfp4"
    assert row["scheme"].startswith(bits) and "groups of 16" in row["scheme"]
    text = cli("inspect", path).stdout
    assert "packed weights" in text and "model.layers.0.mlp.down_proj.weight [32, 64]" in text


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "subspace"])
def test_an_in_place_merge_keeps_the_layout_and_lands_within_a_grid_step(tmp_path: Path, plain, quantized,
                                                                         rounding: str) -> None:  # fmt: skip
    fmt, path = quantized
    _, adapter = plain
    r = merge(path, [adapter], output=tmp_path / "m", rounding=rounding, min_kept=0.0, show_progress=False)
    before, after = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "m" / "model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in after.items()} == {k: (v.shape, v.dtype) for k, v in before.items()}
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == json.loads((path / "config.json").read_text())
    base, merged, deltas = dequantized(path, fmt), dequantized(tmp_path / "m", fmt), adapter_deltas(adapter)
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    for key, delta in deltas.items():
        want = base[key] + delta.float()
        err = merged[key] - want
        if rounding != "subspace":
            # every element lies within a step of the grid it was written on (the coarsest FP4 step is a third of
            # its group's range; an INT step a 15th or a 255th): a loose bound that a lost or misplaced term breaks
            assert err.abs().max() <= (want.abs().max() / (2 if "nvfp4" in fmt else 7)), (key, float(err.abs().max()))
        else:  # elements may move several steps, but the error stays out of what the adapter reads
            lora_a = factors["base_model.model." + key.replace(".weight", ".lora_A.weight")].float()
            basis = torch.linalg.qr(lora_a.T).Q  # (in, r)
            share = float((err @ basis).norm() / err.norm())
            assert share < 0.3, (key, share)
    q = r.quantization
    assert q is not None and not q["dequantized"] and q["rounding"]["rule"] == rounding
    assert len(q["tensors"]) == len(deltas) and q["grid"] == ("8-bit" if fmt.startswith("int8") else "4-bit")
    # kept, as reported, is what the written weights carry: <W' - W, delta> / |delta|^2 over all weights
    num = sum(float(((merged[k].double() - base[k].double()) * d.double()).sum()) for k, d in deltas.items())
    den = sum(float(d.double().square().sum()) for d in deltas.values())
    assert q["kept"] == pytest.approx(num / den, rel=2e-3, abs=2e-3)


def test_a_dequantized_output_equals_peft_merging_into_the_dequantized_base(tmp_path: Path, plain, quantized) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    fmt, path = quantized
    _, adapter = plain
    r = merge(path, [adapter], output=tmp_path / "m", dtype="float32", show_progress=False)
    assert r.quantization is not None and r.quantization["dequantized"]
    out = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not any("scale" in k or "packed" in k for k in out)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m")  # transformers loads it as a plain checkpoint
    # PEFT's merge into the dequantized weights (float32; the dequantization is held to the producer's above)
    base = LlamaForCausalLM(model.config)
    with open_checkpoint(path) as ck:
        view = model_view(ck)
        base.load_state_dict({k: view.get(k).float() for k in view.keys()}, strict=False)
    oracle = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    for key in adapter_deltas(adapter):
        torch.testing.assert_close(out[key], oracle[key], rtol=0, atol=1e-5 * float(oracle[key].abs().max()), msg=key)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_a_dequantized_output_is_rounded_in_strips_as_whole(tmp_path: Path, plain, monkeypatch, rounding: str) -> None:
    """`merge --dtype bfloat16` from a packed base rounds each weight by the compiled kernels (rows split
    across the cores), else by torch passes a strip of rows at a time (their temporaries reused; whole
    weights' cost a gpt-oss layer most of a minute in fresh pages): strips of a few rows give the bytes and
    kept sums of one strip a weight (each draw a function of its element's place), and the kernels both."""
    from loratool.ops.merge import stream as merge_stream

    base, adapter = plain
    make_quantized(base, tmp_path / "q", "int4-sym")
    runs = {}
    for name, native, block in (("kernels", "1", None), ("whole", "0", None), ("strips", "0", 100)):
        monkeypatch.setenv("LORATOOL_NATIVE", native)
        if block is not None:  # strips of one to three rows of the tiny weights
            monkeypatch.setattr(merge_stream, "BLOCK_ELEMENTS", block)
        runs[name] = merge(tmp_path / "q", [adapter], output=tmp_path / name, dtype="bfloat16", rounding=rounding,
                           show_progress=False)  # fmt: skip
    one, *others = (load_file(str(tmp_path / name / "model.safetensors")) for name in runs)
    for other in others:
        assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)
    assert runs["strips"].quantization["kept"] == pytest.approx(runs["whole"].quantization["kept"], rel=1e-9)
    assert runs["kernels"].quantization["kept"] == pytest.approx(runs["whole"].quantization["kept"], rel=1e-6)


def test_a_transposed_weight_is_copied_as_held_in_tiles_on_every_core() -> None:
    from loratool.quant.layout import PackedScheme, PackedWeight
    from loratool.quant.packed import logical_into

    w = PackedWeight("e", (2, 700, 300), {"codes": "e_blocks", "scale": "e_scales"}, PackedScheme("mxfp4", 32),
                     transposed=True)  # fmt: skip
    stored = torch.randn(300, 700)  # rows split into spans across the cores, columns into several tiles
    out = torch.empty(700, 300)
    assert logical_into(w, stored, out) is out and torch.equal(out, stored.T)


def test_unmerge_round_trips_within_the_rounding(tmp_path: Path, plain, quantized) -> None:
    fmt, path = quantized
    _, adapter = plain
    merge(path, [adapter], output=tmp_path / "m", min_kept=0.0, show_progress=False)
    r = unmerge(tmp_path / "m", [adapter], output=tmp_path / "u", check=path, min_kept=0.0, show_progress=False)
    extra = sum(v.numel() for k, v in load_file(str(path / "model.safetensors")).items() if k.endswith("input_scale"))
    assert r.check is not None and r.check.elements == sum(v.numel() for v in dequantized(path, fmt).values()) + extra
    # each way rounds once, on grids whose scales moved with the weight: a few steps at most
    assert 0 < r.check.max_rounding_units <= 4, r.check


def test_a_4bit_merge_that_loses_the_adapter_exits_1_and_writes_nothing(tmp_path: Path, plain, cli) -> None:
    base, adapter = plain
    make_quantized(base, tmp_path / "q", "nvfp4-compressed")
    res = cli("merge", tmp_path / "q", f"{adapter}:0.002", "-o", tmp_path / "m", "--rounding", "nearest")
    assert res.exit_code == 1 and not (tmp_path / "m").exists()
    assert "below --min-kept 0.8" in res.stderr and "--dtype bfloat16" in res.stderr
    assert "serving the adapter unmerged" in res.stderr and "model.layers." in res.stderr  # names the weights
    assert "--rounding stochastic (the default)" in res.stderr  # into a 4-bit base (subspace is FP8's default)
    ok = cli("merge", tmp_path / "q", f"{adapter}:0.002", "-o", tmp_path / "m", "--rounding", "nearest",
             "--min-kept", "0")  # fmt: skip
    assert ok.exit_code == 0 and "carry only" in ok.stderr  # written, with the warning


def test_a_4bit_merge_noisier_than_its_adapter_is_refused_by_default(tmp_path: Path, plain, cli) -> None:
    """At 3% of its size the adapter is kept (0.98) but rounding adds noise 1.5 times its norm: by
    default nothing is written; --max-noise (or --min-kept 0) lets it through; at full size it passes."""
    base, adapter = plain
    make_quantized(base, tmp_path / "q", "int4-sym")
    res = cli("merge", tmp_path / "q", f"{adapter}:0.03", "-o", tmp_path / "m")
    assert res.exit_code == 1 and "above --max-noise 1" in res.stderr and not (tmp_path / "m").exists()
    assert "--requantize fp8" in res.stderr and "--dtype bfloat16" in res.stderr
    ok = cli("merge", tmp_path / "q", f"{adapter}:0.03", "-o", tmp_path / "m", "--max-noise", "2", "--json")
    assert ok.exit_code == 0 and 1 < json.loads(ok.stdout)["quantization"]["noise"] <= 2
    assert json.loads(ok.stdout)["quantization"]["rounding"]["rule"] == "stochastic"  # the default into 4-bit grids
    assert cli("merge", tmp_path / "q", adapter, "-o", tmp_path / "full").exit_code == 0


@pytest.mark.parametrize("fmt", ["nvfp4-compressed", "int4-asym"])
def test_the_rules_keep_a_small_adapter_that_nearest_rounding_erases(tmp_path: Path, plain, fmt: str) -> None:
    """An adapter at 2% of its trained size: nearest rounding writes most of the base back (its
    scales are the producer's, so the base sits on the grid); the other rules keep it."""
    base, adapter = plain
    make_quantized(base, tmp_path / "q", fmt)
    kept = {}
    for rule in ("nearest", "stochastic", "subspace"):
        r = merge(tmp_path / "q", [(adapter, 0.02)], output=tmp_path / rule, rounding=rule, min_kept=0.0,
                  show_progress=False)  # fmt: skip
        kept[rule] = r.quantization["kept"]
    assert kept["nearest"] < 0.5 and kept["stochastic"] > 0.85 and kept["subspace"] > 0.85, kept


def test_the_subspace_rule_into_4bit_says_it_was_slow_only_where_torch_ran_it(tmp_path: Path, plain,
                                                                             monkeypatch) -> None:  # fmt: skip
    """On the CPU the compiled loop rounds a 4-bit layout by the subspace rule (no warning, the same
    bytes as the torch passes); without the kernels the merge says it ran as torch passes, and why."""
    from loratool.quant import native

    base, adapter = plain
    make_quantized(base, tmp_path / "q", "int4-asym")
    fast = merge(tmp_path / "q", [(adapter, 0.02)], output=tmp_path / "fast", rounding="subspace", min_kept=0.0,
                 device="cpu", show_progress=False)  # fmt: skip
    if native.fp8_kernels() is not None:
        assert not any("ran as torch passes" in w for w in fast.warnings), fast.warnings
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    slow = merge(tmp_path / "q", [(adapter, 0.02)], output=tmp_path / "slow", rounding="subspace", min_kept=0.0,
                 device="cpu", show_progress=False)  # fmt: skip
    assert any("ran as torch passes" in w and "LORATOOL_NATIVE=0" in w for w in slow.warnings), slow.warnings
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("fast", "slow"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["int4-asym", "nvfp4-modelopt"])
def test_extract_from_a_quantized_base_equals_extract_from_its_dequantized_copy(tmp_path: Path, plain, cli,
                                                                                 fmt) -> None:  # fmt: skip
    base, adapter = plain
    make_quantized(base, tmp_path / "q", fmt)
    merge(tmp_path / "q", [adapter], output=tmp_path / "ft", dtype="bfloat16", show_progress=False)
    (tmp_path / "deq").mkdir()
    with open_checkpoint(tmp_path / "q") as ck:
        view = model_view(ck)
        save_file({k: view.get(k).contiguous() for k in view.keys()}, str(tmp_path / "deq" / "model.safetensors"))
    (tmp_path / "deq" / "config.json").write_text((base / "config.json").read_text())
    from loratool.quant import packed

    into: list[bool] = []  # each packed weight's decoding in the extraction: into a buffer of the pool?
    dequantize = packed.dequantize

    def counted(w, parts, out=None):  # type: ignore[no-untyped-def]
        into.append(out is not None)
        return dequantize(w, parts, out)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packed, "dequantize", counted)
        a = extract(tmp_path / "q", tmp_path / "ft", output=tmp_path / "a1", rank=4, show_progress=False)
    assert into == [True] * len(PROJ) * 2  # (extract reads only the delta: the base's buffer goes back at once)
    b = extract(tmp_path / "deq", tmp_path / "ft", output=tmp_path / "a2", rank=4, show_progress=False)
    assert [m.module for m in a.report] == [m.module for m in b.report] and len(a.report) == len(PROJ) * 2
    one, two = load_file(str(tmp_path / "a1" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "a2" / "adapter_model.safetensors"))  # fmt: skip
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    for pair in ((tmp_path / "q", tmp_path / "ft"), (tmp_path / "deq", tmp_path / "ft")):  # analyze reads it alike
        res = cli("analyze", *pair, "--json")
        assert res.exit_code == 0, res.stderr
        spectra = json.loads(res.stdout)["modules"]
        assert len(spectra) == len(PROJ) * 2
        if pair[0].name == "q":
            first = spectra
    assert [m["energy"] for m in first] == [m["energy"] for m in spectra]


def test_extract_from_a_quantized_base_beside_a_cold_fine_tune(tmp_path: Path, plain, monkeypatch) -> None:
    """A plain side mostly not in the page cache is read with O_DIRECT (the quantized side, decoded from
    its parts, is not). Each packed weight was then looked up by its model name in the stored files (a
    KeyError: 'a loratool bug'), a quantized base's or a quantized fine-tune's; now it is read as on a warm
    pair, and the adapter is the same bit for bit."""
    from loratool.io import directread
    from loratool.ops import extract as extract_op
    from loratool.stream import deltas

    base, adapter = plain
    make_quantized(base, tmp_path / "q", "int4-sym")
    merge(tmp_path / "q", [adapter], output=tmp_path / "ft", dtype="bfloat16", show_progress=False)
    warm = extract(tmp_path / "q", tmp_path / "ft", output=tmp_path / "warm", rank=4, show_progress=False)
    reader = directread.DirectReader(buffers=1)
    try:
        if not reader.usable(tmp_path / "ft" / "model.safetensors"):
            pytest.skip("this file system refuses O_DIRECT")
    finally:
        reader.close()
    monkeypatch.setattr(extract_op, "resident_share", lambda paths: 0.0)  # as on a cold pair
    monkeypatch.setattr("loratool.metadata.provenance.kept_sha256", lambda f: "0" * 64)  # (digests kept)
    asked: list[str] = []
    difference = deltas.DeltaReader._direct_difference

    def spy(self, key):  # type: ignore[no-untyped-def]
        asked.append(key)
        return difference(self, key)

    monkeypatch.setattr(deltas.DeltaReader, "_direct_difference", spy)
    cold = extract(tmp_path / "q", tmp_path / "ft", output=tmp_path / "cold", rank=4, show_progress=False)
    assert any(k.endswith("q_proj.weight") for k in asked)  # the direct path was asked for the packed weights
    assert [r.relative_error for r in cold.report] == [r.relative_error for r in warm.report]
    one, two = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("warm", "cold"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # the other way round: a quantized fine-tune beside a cold plain base (its weights read direct, the packed not)
    asked.clear()
    cold = extract(base, tmp_path / "q", output=tmp_path / "cold2", rank=4, show_progress=False)
    monkeypatch.undo()
    warm = extract(base, tmp_path / "q", output=tmp_path / "warm2", rank=4, show_progress=False)
    assert any(k.endswith("q_proj.weight") for k in asked)
    one, two = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("warm2", "cold2"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_a_group_wider_than_a_row_is_the_row(tmp_path: Path) -> None:
    """A pack-quantized config whose group_size exceeds a row (one scale a row) reads and merges as
    group_size = the row's length, to the byte (a group size of 10^30 sized the kernels' buffers by
    it and ended as a loratool bug)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    rows = w.float().view(8, 1, 64)
    scale, zp = calculate_qparams(rows.amin(-1), rows.amax(-1), args)
    parts = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zp},
        QuantizationScheme(targets=["Linear"], weights=args),
    )
    adapter = Adapter()
    adapter.modules["layer"] = LoraModule(torch.randn(2, 64, generator=g), torch.randn(8, 2, generator=g) * 0.1, 2.0)
    save_adapter(adapter, tmp_path / "adapter")
    merged = []
    for size in (64, 10**30):
        base = tmp_path / f"base-{size}"
        base.mkdir()
        save_file({f"layer.{k}": v.contiguous() for k, v in parts.items()}, str(base / "model.safetensors"))
        group = {"targets": ["Linear"], "weights": {**args.model_dump(mode="json"), "group_size": size}}
        config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": group}}
        (base / "config.json").write_text(json.dumps({"quantization_config": config}))
        merge(base, [tmp_path / "adapter"], output=tmp_path / f"m-{size}", rounding="nearest", min_kept=0.0,
              show_progress=False)  # fmt: skip
        merged.append(load_file(str(tmp_path / f"m-{size}" / "model.safetensors")))
    assert merged[0].keys() == merged[1].keys() == {f"layer.{k}" for k in parts}
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])
    assert not torch.equal(merged[0]["layer.weight_packed"], parts["weight_packed"])  # the adapter moved codes


def test_a_packed_weight_without_its_scale_is_refused_naming_it(tmp_path: Path, plain, cli) -> None:
    base, adapter = plain
    make_quantized(base, tmp_path / "q", "nvfp4-compressed")
    file = tmp_path / "q" / "model.safetensors"
    ts = load_file(str(file))
    del ts["model.layers.1.self_attn.v_proj.weight_global_scale"]
    save_file(ts, str(file))
    res = cli("merge", tmp_path / "q", adapter, "-o", tmp_path / "m")
    assert res.exit_code == 1 and "malformed" in res.stderr
    assert "model.layers.1.self_attn.v_proj.weight_global_scale" in res.stderr and not (tmp_path / "m").exists()


def _flip_e4m3(t: torch.Tensor) -> torch.Tensor:
    return (t.view(torch.uint8) | 0x80).view(t.dtype)  # every scale negative (the zero ones -0)


@pytest.mark.parametrize(
    ("fmt", "part", "damage", "says"),
    [
        ("int4-sym", "weight_scale", lambda t: (-t.float()).to(t.dtype), "scale holds -"),
        ("int4-asym", "weight_scale", lambda t: t.float().index_fill(1, torch.tensor([1]), float("inf")).to(t.dtype),
         "scale holds inf"),
        ("nvfp4-compressed", "weight_scale", _flip_e4m3, "scale holds -"),
        ("nvfp4-compressed", "weight_global_scale", lambda t: torch.full_like(t, float("inf")), "tensor scale is inf"),
        ("nvfp4-modelopt", "weight_scale_2", torch.zeros_like, "tensor scale is 0.0"),
        ("nvfp4-modelopt", "weight_scale_2", lambda t: -t, "tensor scale is -"),
    ],
)  # fmt: skip
def test_a_damaged_scale_is_refused_naming_it(tmp_path: Path, plain, cli, fmt, part, damage, says) -> None:
    """A scale no producer writes, under which the weight would still decode (its groups' signs flipped,
    or the whole weight zeros), is refused by name by merge in place and dequantized, and by extract
    (they all merged and extracted from it before); nothing is written."""
    base, adapter = plain
    make_quantized(base, tmp_path / "q", fmt)
    file, key = tmp_path / "q" / "model.safetensors", f"model.layers.1.mlp.down_proj.{part}"
    ts = load_file(str(file))
    ts[key] = damage(ts[key]).contiguous()
    save_file(ts, str(file), metadata={"format": "pt"})
    out = tmp_path / "out"
    for args in (("merge", tmp_path / "q", adapter, "--min-kept", "0"), ("merge", tmp_path / "q", adapter, "--dtype",
                 "bfloat16"), ("extract", tmp_path / "q", base, "-r", "2")):  # fmt: skip
        res = cli(*args, "-o", out)
        assert res.exit_code == 1 and key in res.stderr and says in res.stderr, (args[0], res.stderr)
        assert "damaged" in res.stderr and not out.exists()


def _weights_spec(edit):
    return lambda c: edit(c["quantization_config"]["config_groups"]["group_0"]["weights"])


def _retype(part: str, dtype: torch.dtype):
    return lambda ts: ts.update({k: v.to(dtype) for k, v in ts.items() if k.endswith("." + part)})


@pytest.mark.parametrize(
    ("fmt", "edit_config", "edit_tensors", "says"),
    [
        # a float zero point was read by its bytes: every asymmetric weight decoded wrong
        ("int4-asym", None, _retype("weight_zero_point", torch.float32), "are F32"),
        # read as symmetric, its zero points were dropped: the dequantized model was wrong and kept them as tensors
        ("int4-asym", _weights_spec(lambda w: w.update(symmetric=True)), None, "says symmetric"),
        ("int4-sym", None, _retype("weight_shape", torch.float32), "whole numbers"),
        # NVFP4's layout is fixed by its definition: a config saying otherwise was read as NVFP4 regardless
        ("nvfp4-compressed", _weights_spec(lambda w: w.update(group_size=32)), None, "group_size = 32"),
        ("nvfp4-compressed", _weights_spec(lambda w: w.update(num_bits=8)), None, "num_bits = 8"),
        ("nvfp4-compressed", _weights_spec(lambda w: w.update(type="int")), None, 'type = "int"'),
        ("nvfp4-compressed", _weights_spec(lambda w: w.update(strategy="channel")), None, 'strategy = "channel"'),
        ("nvfp4-compressed", _weights_spec(lambda w: w.update(symmetric=False)), None, "symmetric = false"),
        ("nvfp4-modelopt", lambda c: c["quantization_config"].update(group_size=32), None, "group_size = 32"),
        # the plain tensor was listed, the packed one read
        ("int4-sym", None, lambda ts: ts.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(64, 32)}),
         "'model.layers.1.mlp.up_proj.weight' is stored twice"),
    ],
    ids=["float-zero-points", "symmetric-with-zero-points", "float-shape", "nvfp4-group-32", "nvfp4-8-bit",
         "nvfp4-int", "nvfp4-per-channel", "nvfp4-asymmetric", "modelopt-group-32", "stored-twice"],
)  # fmt: skip
def test_a_part_or_config_that_contradicts_the_layout_is_refused(tmp_path: Path, plain, cli, fmt, edit_config,
                                                                  edit_tensors, says) -> None:  # fmt: skip
    """Where a checkpoint's config and its tensors disagree on how the weights are stored, or a part is
    stored in a dtype its format does not use, every command refuses it by name (each of these was read
    without a word before, by guess); nothing is written."""
    base, adapter = plain
    make_quantized(base, tmp_path / "q", fmt)
    if edit_config is not None:
        config = json.loads((tmp_path / "q" / "config.json").read_text())
        edit_config(config)
        (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    if edit_tensors is not None:
        ts = load_file(str(tmp_path / "q" / "model.safetensors"))
        edit_tensors(ts)
        save_file(ts, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    for args in (("merge", tmp_path / "q", adapter, "--min-kept", "0"), ("merge", tmp_path / "q", adapter, "--dtype",
                 "bfloat16"), ("extract", tmp_path / "q", base, "-r", "2")):  # fmt: skip
        res = cli(*args, "-o", out)
        assert res.exit_code == 1 and "malformed" in res.stderr and says in res.stderr, (args[0], res.stderr)
        assert not out.exists()
    shown = json.loads(cli("inspect", tmp_path / "q", "--json").stdout)["quantization"]
    assert not shown["supported"] and says in shown["why_unsupported"]


def test_an_nvfp4_config_that_says_strategy_group_is_read_as_nvfp4(tmp_path: Path, plain) -> None:
    """W4A16 NVFP4 configs are seen with strategy "group" (TensorRT-LLM reads them so), beside compressed-tensors'
    "tensor_group": the same layout, read the same, not refused as a contradiction."""
    base, adapter = plain
    make_quantized(base, tmp_path / "q", "nvfp4-compressed")
    merge(tmp_path / "q", [adapter], output=tmp_path / "a", dtype="bfloat16", show_progress=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "group"
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    merge(tmp_path / "q", [adapter], output=tmp_path / "b", dtype="bfloat16", show_progress=False)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_parts_and_packings_gptq_does_not_use_are_refused(tmp_path: Path, plain) -> None:
    from loratool.errors import UnsupportedCheckpointError

    base, _ = plain
    g = torch.Generator().manual_seed(5)
    cases = (("qzeros", torch.float32), ("scales", torch.int32), ("g_idx", torch.float32), (None, None))
    for part, dtype in cases:
        ts = {}
        for name, t in load_file(str(base / "model.safetensors")).items():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJ:
                parts = gptq_and_awq(t, 16, "gptq", g)[0]
                if part is not None:
                    parts[part] = parts[part].to(dtype)
                ts.update({f"{module}.{k}": v.contiguous() for k, v in parts.items()})
            else:
                ts[name] = t
        q = tmp_path / (part or "sound")
        q.mkdir()
        save_file(ts, str(q / "model.safetensors"))
        config = json.loads((base / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True}
        (q / "config.json").write_text(json.dumps(config))
        if part is None:  # sound parts: read, then refused once the config says another packing of the same names
            with open_checkpoint(q) as ck:
                assert model_view(ck).get("model.layers.0.mlp.down_proj.weight").dtype == torch.float32
            config["quantization_config"]["checkpoint_format"] = "marlin"
            (q / "config.json").write_text(json.dumps(config))
            with (
                open_checkpoint(q) as ck,
                pytest.raises(UnsupportedCheckpointError, match="checkpoint_format='marlin'"),
            ):
                model_view(ck)
            continue
        with open_checkpoint(q) as ck, pytest.raises(UnsupportedCheckpointError, match=f"down_proj.{part}'") as e:
            model_view(ck)
        assert "GPTQ checkpoint is malformed" in str(e.value)


def test_scale_bytes_are_checked_as_their_formats_define_them() -> None:
    """E8M0's 0xFF is NaN; E4M3's 0x7F and 0xFF are NaN, and above 0x80 negative; a zero scale (0x00, and
    E4M3's -0, 0x80) stands for a group of zeros and passes; so does an MXFP4 byte 0xFE (2^127)."""
    from loratool.errors import NonFiniteError
    from loratool.quant.layout import PackedScheme, PackedWeight
    from loratool.quant.packed import check_scales

    def weight(fmt: str) -> PackedWeight:
        names = {"codes": "w.codes", "scale": "w.scale"} | ({"global": "w.global"} if fmt == "nvfp4" else {})
        return PackedWeight("w", (4, 64), names, PackedScheme(fmt, {"mxfp4": 32, "nvfp4": 16}[fmt], 4))

    def scales(fmt: str, byte: int) -> dict[str, torch.Tensor]:
        b = torch.full((4, 64 // weight(fmt).scheme.group), 0x38, dtype=torch.uint8)  # 1.0 in E4M3, 2^-71 in E8M0
        b[2, 1] = byte
        scale = b if fmt == "mxfp4" else b.view(torch.float8_e4m3fn)
        parts = {"codes": torch.zeros(4, 32, dtype=torch.uint8), "scale": scale}
        return parts | ({"global": torch.tensor([1.0])} if fmt == "nvfp4" else {})

    for fmt, byte in (("mxfp4", 0x00), ("mxfp4", 0xFE), ("nvfp4", 0x00), ("nvfp4", 0x80), ("nvfp4", 0x7E)):
        check_scales(weight(fmt), scales(fmt, byte))
    for fmt, byte, says in (("mxfp4", 0xFF, "0xFF, NaN"), ("nvfp4", 0x7F, "nan"), ("nvfp4", 0xFF, "nan"),
                            ("nvfp4", 0x81, "-0.001953125"), ("nvfp4", 0xB8, "-1.0")):  # fmt: skip
        with pytest.raises(NonFiniteError, match=says) as e:
            check_scales(weight(fmt), scales(fmt, byte))
        assert "[2, 1]" in str(e.value) and "w.scale" in str(e.value)
    with pytest.raises(NonFiniteError, match="tensor scale is nan") as e:
        check_scales(weight("nvfp4"), scales("nvfp4", 0x38) | {"global": torch.tensor([float("nan")])})
    assert "w.global" in str(e.value)


def test_modelopt_is_read_from_hf_quant_config_alone(tmp_path: Path, plain) -> None:
    base, adapter = plain
    make_quantized(base, tmp_path / "q", "nvfp4-modelopt", hf_quant_config=True)
    r = merge(tmp_path / "q", [adapter], output=tmp_path / "m", dtype="bfloat16", show_progress=False)
    assert r.quantization["method"] == "modelopt (NVFP4)" and not (tmp_path / "m" / "hf_quant_config.json").exists()
    merge(tmp_path / "q", [adapter], output=tmp_path / "m2", min_kept=0.0, show_progress=False)
    assert (tmp_path / "m2" / "hf_quant_config.json").exists()
    assert load_file(str(tmp_path / "m2" / "model.safetensors"))["model.layers.0.self_attn.q_proj.input_scale"] == 0.5


# -- gpt-oss MXFP4 experts -----------------------------------------------------------------------------
def mxfp4_reference_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of ``w`` (..., in) by the OCP definition, written independently of loratool:
    scale 2^ceil(log2(amax / 6)) per 32, each value the nearest E2M1 magnitude (searched), low nibble first."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    *lead, n = w.shape
    x = w.float().reshape(*lead, n // 32, 32)
    amax = x.abs().amax(-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.full_like(amax, -127)).clamp(-127, 127)
    y = x / torch.exp2(exp)[..., None]
    idx = (y.abs()[..., None] - grid).abs().argmin(-1)  # nearest magnitude (ties: the smaller: rarely hit)
    codes = (idx | ((y < 0).long() << 3)).to(torch.uint8).reshape(*lead, n // 32, 16, 2)
    return codes[..., 0] | (codes[..., 1] << 4), (exp + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_experts_merge_and_extract_as_transformers_reads_them(tmp_path: Path, cli, monkeypatch) -> None:
    import transformers as tf
    from peft import LoraConfig, get_peft_model
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    config = tf.GptOssConfig(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                             head_dim=16, layer_types=["full_attention"])  # fmt: skip
    model = tf.GptOssForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "bf")
    ts = load_file(str(tmp_path / "bf" / "model.safetensors"))
    q = {}
    for name, t in ts.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            q[name + "_blocks"], q[name + "_scales"] = mxfp4_reference_quantize(t.transpose(1, 2))  # (E, out, in)
        else:
            q[name] = t
    (tmp_path / "q").mkdir()
    save_file(q, str(tmp_path / "q" / "model.safetensors"))
    cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    oracle = {n[: -len("_blocks")]: convert_moe_packed_tensors(q[n], q[n[: -len("_blocks")] + "_scales"],
                                                                dtype=torch.float32)
              for n in q if n.endswith("_blocks")}  # fmt: skip
    with open_checkpoint(tmp_path / "q") as ck:
        view = model_view(ck)
        for key, value in oracle.items():
            assert torch.equal(view.get(key), value), key
            assert torch.equal(view.get_rows(key, 1, 3), value[1:3]), key

    pm = get_peft_model(tf.GptOssForCausalLM(config).eval(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "adapter")
    # PEFT's merge into the dequantized experts is the oracle
    base = tf.GptOssForCausalLM(config).eval()
    base.load_state_dict({**{k: v for k, v in q.items() if not k.endswith(("_blocks", "_scales"))}, **oracle})
    from peft import PeftModel

    want = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload().state_dict()

    res = cli("merge", tmp_path / "q", tmp_path / "adapter", "-o", tmp_path / "deq", "--dtype", "float32", "--json")
    assert res.exit_code == 0, res.stderr
    got = load_file(str(tmp_path / "deq" / "model.safetensors"))
    for key in oracle:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    assert "gate_up_proj_blocks" not in " ".join(got)

    res = cli("merge", tmp_path / "q", tmp_path / "adapter", "-o", tmp_path / "in", "--json", "--min-kept", "0",
              "--rounding", "nearest")  # within half a step: the bound below  # fmt: skip
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)["quantization"]
    assert report["method"] == "mxfp4" and len(report["tensors"]) == 2 * 4  # two parameters x four experts
    written = load_file(str(tmp_path / "in" / "model.safetensors"))
    assert {k: v.dtype for k, v in written.items()} == {k: v.dtype for k, v in q.items()}
    for key in oracle:
        merged = convert_moe_packed_tensors(written[key + "_blocks"], written[key + "_scales"], dtype=torch.float32)
        err = (merged - want[key]).abs().amax(dim=(1, 2))  # per expert, against a step of its largest value
        assert bool((err <= want[key].abs().amax(dim=(1, 2)) / 3).all()), (key, err)
    # the kernels write each expert's codes in its place in the weight's one buffer: the torch passes' bytes
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    res = cli("merge", tmp_path / "q", tmp_path / "adapter", "-o", tmp_path / "torch", "--min-kept", "0",
              "--rounding", "nearest")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    passes = load_file(str(tmp_path / "torch" / "model.safetensors"))
    assert all(torch.equal(passes[k], written[k]) for k in written)
    monkeypatch.delenv("LORATOOL_NATIVE")
    # the look-ahead thread prepares the next expert, and the one after it while the next is begun on the
    # kernel threads (never a whole weight's experts at once), and changes no byte
    from loratool.ops.merge import stream as merge_stream

    ahead = merge_stream.Stream._prepare_after
    waiting: list[int] = []

    def counted(self, w, expert):  # type: ignore[no-untyped-def]
        ahead(self, w, expert)
        waiting.append(len(self._prepared) + len(self._started))  # pieces prepared or begun ahead

    monkeypatch.setattr(merge_stream.Stream, "_prepare_after", counted)
    res = cli("merge", tmp_path / "q", tmp_path / "adapter", "-o", tmp_path / "in2", "--min-kept", "0", "--rounding",
              "nearest")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert len(waiting) >= 2 * 4 and max(waiting) == 2 and waiting[-1] == 0  # the last piece has none after it
    again = load_file(str(tmp_path / "in2" / "model.safetensors"))
    assert all(torch.equal(again[k], written[k]) for k in written)
    # each experts weight's codes went to the writer before they were computed, and were written an expert
    # at a time, each once computed (the writer slowed, so that it waits on the computation or runs behind it)
    import time

    from loratool.errors import UnsupportedCheckpointError
    from loratool.io.writer import CheckpointWriter
    from loratool.stream.pipeline import BackgroundWriter

    events: list[tuple[str, str, int]] = []
    requantized, write_pieces = merge_stream.Stream._packed_requantized, CheckpointWriter.write_pieces

    def computed(self, w, expert, *into):  # type: ignore[no-untyped-def]
        out = requantized(self, w, expert, *into)
        events.append(("computed", w.name, expert))
        return out

    def pieces(self, name, parts):  # type: ignore[no-untyped-def]
        def each():  # type: ignore[no-untyped-def]
            for i, part in enumerate(parts):
                events.append(("written", name, i))
                time.sleep(0.01)
                yield part

        write_pieces(self, name, each())

    def handed(self, name, tensor, *args, pieces=None, **kwargs):  # type: ignore[no-untyped-def]
        if pieces is not None:
            events.append(("handed", name, -1))
        hand(self, name, tensor, *args, pieces=pieces, **kwargs)

    hand = BackgroundWriter.write
    monkeypatch.setattr(merge_stream.Stream, "_packed_requantized", computed)
    monkeypatch.setattr(CheckpointWriter, "write_pieces", pieces)
    monkeypatch.setattr(BackgroundWriter, "write", handed)
    res = cli("merge", tmp_path / "q", tmp_path / "adapter", "-o", tmp_path / "in4", "--min-kept", "0", "--rounding",
              "nearest")  # fmt: skip
    assert res.exit_code == 0, res.stderr
    again = load_file(str(tmp_path / "in4" / "model.safetensors"))
    assert all(torch.equal(again[k], written[k]) for k in written)
    for key in oracle:
        order = [(what, i) for what, name, i in events if name in (key, key + "_blocks")]
        assert order[0] == ("handed", -1) and [i for what, i in order if what == "written"] == [0, 1, 2, 3], order
        assert all(order.index(("computed", i)) < order.index(("written", i)) for i in range(4)), order
    events.clear()  # written dequantized, likewise (the first expert computed before the tensor is handed over)
    res = cli("merge", tmp_path / "q", tmp_path / "adapter", "-o", tmp_path / "deq2", "--dtype", "float32")
    assert res.exit_code == 0, res.stderr
    assert [(what, name) for what, name, _ in events if what == "handed"] == [("handed", k) for k in oracle]
    again = load_file(str(tmp_path / "deq2" / "model.safetensors"))
    assert again.keys() == got.keys() and all(torch.equal(again[k], got[k]) for k in got)

    # a computation that stops halfway through a weight's experts does not leave the writer waiting for
    # the rest: the error is the merge's, and nothing is written
    def failing(self, w, expert, *into):  # type: ignore[no-untyped-def]
        if expert == 2:
            raise UnsupportedCheckpointError("made up for the test", key=w.name)
        return requantized(self, w, expert, *into)

    monkeypatch.setattr(merge_stream.Stream, "_packed_requantized", failing)
    with pytest.raises(UnsupportedCheckpointError, match="made up"):
        merge(tmp_path / "q", [tmp_path / "adapter"], output=tmp_path / "in5", min_kept=0.0, show_progress=False)
    assert not (tmp_path / "in5").exists()
    monkeypatch.setattr(merge_stream.Stream, "_packed_requantized", requantized)
    monkeypatch.setattr(CheckpointWriter, "write_pieces", write_pieces)
    monkeypatch.setattr(BackgroundWriter, "write", hand)
    # one packed weight alone (an adapter on down_proj's experts only): its experts are still prepared ahead
    one = get_peft_model(tf.GptOssForCausalLM(config).eval(), LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.experts.down_proj"]))  # fmt: skip
    with torch.no_grad():
        for name, p in one.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    one.save_pretrained(tmp_path / "one")
    waiting.clear()
    res = cli("merge", tmp_path / "q", tmp_path / "one", "-o", tmp_path / "in3", "--min-kept", "0")
    assert res.exit_code == 0, res.stderr
    assert max(waiting) == 2 and waiting[-1] == 0, waiting  # four experts, two at most ahead

    # extract from the MXFP4 base and the bf16 merge: the experts' delta comes back as target_parameters
    from loratool.quant import packed

    decoded: list[bool] = []  # each packed expert's decoding: into a reused buffer?
    dequantize = packed.dequantize

    def counted(w, parts, out=None):  # type: ignore[no-untyped-def]
        if w.experts is not None:
            decoded.append(out is not None)
        return dequantize(w, parts, out)

    monkeypatch.setattr(packed, "dequantize", counted)
    a = extract(tmp_path / "q", tmp_path / "deq", output=tmp_path / "ex", rank=4, show_progress=False)
    monkeypatch.undo()
    assert {m.module for m in a.report} >= {"model.layers.0.mlp.experts.gate_up_proj.0"}
    ex_cfg = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert sorted(ex_cfg["target_parameters"]) == ["model.layers.0.mlp.experts.down_proj",
                                                   "model.layers.0.mlp.experts.gate_up_proj"]  # fmt: skip
    # each expert decoded twice (the norm's pass, then the factoring), into a buffer of the pool; the
    # adapter is the one the base's dequantized copy gives
    assert decoded == [True] * (2 * 2 * 4), decoded
    (tmp_path / "qdeq").mkdir()
    save_file({k: v for k, v in q.items() if not k.endswith(("_blocks", "_scales"))} | oracle,
              str(tmp_path / "qdeq" / "model.safetensors"))  # fmt: skip
    (tmp_path / "qdeq" / "config.json").write_text((tmp_path / "bf" / "config.json").read_text())
    extract(tmp_path / "qdeq", tmp_path / "deq", output=tmp_path / "ex2", rank=4, show_progress=False)
    got, want = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ex", "ex2"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# -- GPTQ and AWQ: read for extract and --dtype, refused in place -------------------------------------
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words of unsigned ``values`` (..., n), 32 / bits a word, the first in the lowest bits."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, per)
    word = sum(v[..., j] << (bits * j) for j in range(per))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def gptq_and_awq(w: torch.Tensor, group: int, method: str, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Random 4-bit codes, zeros and scales for ``w``'s shape in GPTQ's (v1, with a shuffled g_idx as
    desc_act leaves it) or AWQ GEMM's packing, from the formats' definitions; and their float32 values."""
    out_f, in_f = w.shape
    groups = in_f // group
    q = torch.randint(0, 16, (out_f, in_f), generator=g)
    # v1 GPTQ stores each zero less one, so a zero of 0 wraps to 15 and reads back as 16 (AutoGPTQ's kernels too)
    z = torch.randint(1 if method == "gptq" else 0, 16, (out_f, groups), generator=g)
    s = (torch.rand(out_f, groups, generator=g) * 0.01 + 0.001).half()
    if method == "gptq":
        g_idx = torch.randperm(in_f, generator=g) // group
        values = (q - z[:, g_idx]) * s.float()[:, g_idx]
        qweight = pack_words(q.T.reshape(in_f // 8, 8, out_f).transpose(1, 2), 4)[..., 0]  # inputs 8k.. in word k
        parts = {"qweight": qweight, "qzeros": pack_words((z - 1).T, 4), "scales": s.T, "g_idx": g_idx.int()}
        return parts, values
    values = (q - z.repeat_interleave(group, 1)) * s.float().repeat_interleave(group, 1)
    order = torch.tensor(AWQ_ORDER)
    shuffle = lambda t: t.reshape(t.shape[0], -1, 8)[:, :, order].reshape(t.shape[0], -1)  # noqa: E731
    return {"qweight": pack_words(shuffle(q.T), 4), "qzeros": pack_words(shuffle(z.T), 4),
            "scales": s.T.contiguous()}, values  # fmt: skip


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_are_read_for_extract_and_dtype_and_refused_in_place(tmp_path: Path, plain, cli,
                                                                           method: str) -> None:  # fmt: skip
    base, adapter = plain
    g = torch.Generator().manual_seed(5)
    ts, want = {}, {}
    for name, t in load_file(str(base / "model.safetensors")).items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJ:
            parts, want[name] = gptq_and_awq(t, 16, method, g)
            ts.update({f"{module}.{k}": v.contiguous() for k, v in parts.items()})
        else:
            ts[name] = t
    (tmp_path / "q").mkdir()
    save_file(ts, str(tmp_path / "q" / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True,
                                      "sym": False, "checkpoint_format": "gptq"} if method == "gptq" else
                                     {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True,
                                      "version": "gemm"})  # fmt: skip
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    if method == "awq":  # compressed-tensors' own AutoAWQ converter, then its decompressor, agree with the definition
        from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

        stem = "model.layers.0.mlp.up_proj."
        converted = AutoAWQConverter(group_size=16).process({k: v for k, v in ts.items() if k.startswith(stem)})
        parts = {k.removeprefix(stem): v for k, v in converted.items()}
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=False, strategy="group", group_size=16))  # fmt: skip
        parts["weight_scale"] = parts["weight_scale"].float()
        theirs = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        assert torch.equal(theirs, want[stem + "weight"])
    with open_checkpoint(tmp_path / "q") as ck:
        view = model_view(ck)
        for key, value in want.items():
            assert torch.equal(view.get(key), value), key
    shown = json.loads(cli("inspect", tmp_path / "q", "--json").stdout)["quantization"]
    assert shown["supported"] and shown["packed_weights"][0]["scheme"].endswith("read only)")

    res = cli("merge", tmp_path / "q", adapter, "-o", tmp_path / "m")
    assert res.exit_code == 1 and "calibration data" in res.stderr and "--dtype bfloat16" in res.stderr
    assert not (tmp_path / "m").exists()
    r = merge(tmp_path / "q", [adapter], output=tmp_path / "m", dtype="float32", show_progress=False)
    out, deltas = load_file(str(tmp_path / "m" / "model.safetensors")), adapter_deltas(adapter)
    for key, value in want.items():
        torch.testing.assert_close(out[key], value + deltas[key].float(), rtol=0, atol=1e-6, msg=key)
    assert r.quantization["method"] == method and "qweight" not in " ".join(out)
    a = extract(tmp_path / "q", tmp_path / "m", output=tmp_path / "a", rank=4, show_progress=False)
    assert len(a.report) == len(want) and max(m.relative_error for m in a.report) < 1e-4


# -- merge --requantize fp8: the touched weights as FP8 blocks, a mixed config transformers loads -----
def test_requantize_fp8_writes_a_mixed_checkpoint_that_transformers_loads(tmp_path: Path, cli) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    # 128 wide: the FP8 block scheme quantizes activations in groups of 128, as real models' widths allow
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                         tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "base")
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    peft_adapter(load_model("llama", base), list(PROJ), r=4, alpha=8, seed=3).save_pretrained(adapter)
    make_quantized(base, tmp_path / "q", "nvfp4-compressed")
    (tmp_path / "one").mkdir()  # an adapter on the attention alone: the MLPs stay NVFP4
    ts = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in ts.items() if "self_attn" in k}, str(tmp_path / "one" / "adapter_model.safetensors"))
    (tmp_path / "one" / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    res = cli("merge", tmp_path / "q", tmp_path / "one", "-o", tmp_path / "m", "--requantize", "fp8", "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)["quantization"]
    assert len(report["requantized_fp8"]) == 8 and report["kept"] > 0.97  # FP8 keeps what a 4-bit grid cannot
    assert report["rounding"]["rule"] == "subspace"  # FP8's default, in its compiled kernels
    out = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.0.self_attn.q_proj.weight_scale"].shape == (1, 1)  # 128x128 blocks of a 128x128 weight
    assert (
        "model.layers.0.self_attn.q_proj.weight_packed" not in out and "model.layers.0.mlp.up_proj.weight_packed" in out
    )
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and "model.layers.1.self_attn.v_proj" in qc["config_groups"][
        "loratool_fp8_block"]["targets"]  # fmt: skip

    # loratool reads its own output back (both layouts), and transformers reads the same weights
    with open_checkpoint(tmp_path / "m") as ck:
        view, fp8_layout = model_view(ck), ck.fp8_layout()
        assert fp8_layout is not None and len(fp8_layout.weights) == 8
        want = {k: read_weight(view, fp8_layout, k, torch.device("cpu")).float() for k in view.keys()
                if k not in fp8_layout.companions}  # fmt: skip
        assert json.loads(cli("inspect", tmp_path / "m", "--json").stdout)["quantization"]["supported"]
    deltas, before = adapter_deltas(adapter), dequantized(tmp_path / "q", "nvfp4-compressed")
    for key in [k for k in deltas if "self_attn" in k]:
        fp8 = want[key]  # dequantized by loratool's FP8 reader: q * block scale
        torch.testing.assert_close(fp8, before[key] + deltas[key].float(), rtol=0, atol=float(fp8.abs().max()) / 16)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    state = model.state_dict()
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn  # kept compressed by transformers, dequantized per forward
    got = q.float() * state["model.layers.0.self_attn.q_proj.weight_scale"].float()
    # the same codes; the scales as transformers holds them in a bfloat16 model (rounded from loratool's float32)
    torch.testing.assert_close(got, want["model.layers.0.self_attn.q_proj.weight"], rtol=2**-8, atol=0)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    dense = LlamaForCausalLM(model.config).to(torch.float32).eval()
    dense.load_state_dict(want, strict=False)
    with torch.no_grad():
        a, b = model(ids).logits.float(), dense(ids).logits.float()
    assert float((a - b).norm() / b.norm()) < 0.05  # bf16 compute and FP8 activations: close, not equal

    # and back out: the mixed checkpoint unmerges (its FP8 weights by the FP8 path, checked against the base)
    res = cli("unmerge", tmp_path / "m", tmp_path / "one", "-o", tmp_path / "u", "--check", tmp_path / "q", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["check"]["relative_diff"] < 0.05  # FP8 round trip of NVFP4 values, twice rounded


@pytest.mark.parametrize("edit", [{"num_bits": 4}, {"type": "int"}], ids=["4-bit", "int"])
def test_fp8_weights_no_config_group_describes_are_refused(tmp_path: Path, plain, cli, edit: dict) -> None:
    """A mixed checkpoint (merge --requantize fp8's) whose FP8 group no longer says FP8: its float8 weights
    were read as plain numbers, their scales dropped (merge wrote them back so, without a word); now every
    command refuses them by name."""
    base, adapter = plain
    make_quantized(base, tmp_path / "q", "nvfp4-compressed")
    assert cli("merge", tmp_path / "q", adapter, "-o", tmp_path / "m", "--requantize", "fp8").exit_code == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    fp8_groups = [
        g for g in config["quantization_config"]["config_groups"].values() if g["format"] == "float-quantized"
    ]
    assert fp8_groups
    for group in fp8_groups:
        group["weights"].update(edit)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    for args in (("merge", tmp_path / "m", adapter, "--min-kept", "0"), ("merge", tmp_path / "m", adapter, "--dtype",
                 "bfloat16"), ("extract", tmp_path / "m", base, "-r", "2")):  # fmt: skip
        res = cli(*args, "-o", tmp_path / "out")
        assert res.exit_code == 1 and "no config group describes FP8 weights" in res.stderr, (args[0], res.stderr)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("fmt", "says"), [("nvfp4-modelopt", "compressed-tensors base"), ("plain", "has none")])
def test_requantize_fp8_is_refused_where_no_loader_would_read_it(tmp_path: Path, plain, cli, fmt, says) -> None:
    base, adapter = plain
    if fmt != "plain":
        make_quantized(base, tmp_path / "q", fmt)
    res = cli("merge", base if fmt == "plain" else tmp_path / "q", adapter, "-o", tmp_path / "m", "--requantize", "fp8")
    assert res.exit_code == 1 and says in res.stderr and not (tmp_path / "m").exists()
    res = cli("merge", base, adapter, "-o", tmp_path / "m", "--requantize", "fp8", "--dtype", "bfloat16")
    assert res.exit_code == 2 and "exclude each other" in res.stderr


def test_a_tiny_delta_leaves_a_4bit_grid_as_it_was(tmp_path: Path, plain) -> None:
    """Scales move only where the merged values leave their grid: a delta far below a step, rounded to
    nearest, writes the base's values back and every scale as it was (NVFP4 codes of -0 may come back +0)."""
    base, adapter = plain
    for fmt in ("int4-asym", "nvfp4-compressed"):
        make_quantized(base, tmp_path / fmt, fmt)
        merge(tmp_path / fmt, [(adapter, 1e-6)], output=tmp_path / f"{fmt}-m", rounding="nearest", min_kept=0.0,
              show_progress=False)  # fmt: skip
        a, b = (load_file(str(tmp_path / f / "model.safetensors")) for f in (fmt, f"{fmt}-m"))
        assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("weight_packed")), fmt
        one, two = dequantized(tmp_path / fmt, fmt), dequantized(tmp_path / f"{fmt}-m", fmt)
        assert all(torch.equal(one[k], two[k]) for k in one), fmt


def test_validate_and_registry_match_adapters_to_a_packed_base_by_model_names(tmp_path: Path, plain, cli) -> None:
    base, adapter = plain
    make_quantized(base, tmp_path / "q", "int4-asym")
    res = cli("validate", adapter, "--base", tmp_path / "q")
    assert res.exit_code == 0, res.output
    assert cli("registry", "add", adapter, "--name", "bot").exit_code == 0
    fits = json.loads(cli("registry", "ls", "--base", tmp_path / "q", "--json").stdout)["entries"]
    assert [e["name"] for e in fits] == ["bot"]
    # a base whose down_proj has another shape: neither calls the adapter fitting
    ts = load_file(str(tmp_path / "q" / "model.safetensors"))
    for k in [k for k in ts if "layers.0.mlp.down_proj" in k]:
        ts[k] = torch.cat([ts[k], ts[k]])  # twice the rows
    save_file(ts, str(tmp_path / "q" / "model.safetensors"))
    assert cli("validate", adapter, "--base", tmp_path / "q").exit_code == 1
    assert json.loads(cli("registry", "ls", "--base", tmp_path / "q", "--json").stdout)["entries"] == []


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("cols", [64, 40, 256])
def test_int32_packing_is_compressed_tensors(bits: int, cols: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from loratool.quant import intpack

    g = torch.Generator().manual_seed(bits * cols)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, cols), generator=g, dtype=torch.int8)
    ref = pack_to_int32(q, bits)
    assert torch.equal(intpack.pack_int32(q.int(), bits), ref)
    assert torch.equal(intpack.unpack_int32(ref, bits, cols), q.int())
    assert torch.equal(intpack.pack_int32(q.T.contiguous().int(), bits).T, pack_to_int32(q, bits, packed_dim=0))


@pytest.mark.parametrize("fmt", ["int4-asym", "int8-sym", "nvfp4-modelopt"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "subspace"])
def test_strips_of_rows_give_the_whole_weights_bytes(
    tmp_path: Path, plain, monkeypatch, fmt: str, rounding: str
) -> None:
    """A merge in strips of rows writes the whole weight's bytes, and so do the torch passes alone
    (LORATOOL_NATIVE=0: the subspace rule's column loop then takes each weight whole)."""
    from loratool.quant import packed

    base, adapter = plain
    make_quantized(base, tmp_path / "q", fmt)
    merge(tmp_path / "q", [adapter], output=tmp_path / "whole", rounding=rounding, min_kept=0.0, show_progress=False)
    monkeypatch.setattr(packed, "strip_rows", lambda w, elements=0: 32)  # two strips of the 64-row weights
    r = merge(tmp_path / "q", [adapter], output=tmp_path / "strips", rounding=rounding, min_kept=0.0,
              show_progress=False)  # fmt: skip
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    merge(tmp_path / "q", [adapter], output=tmp_path / "torch", rounding=rounding, min_kept=0.0, show_progress=False)
    one, two, three = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "strips", "torch"))
    assert all(torch.equal(one[k], two[k]) and torch.equal(one[k], three[k]) for k in one)
    assert r.quantization["kept"] is not None


def test_the_look_ahead_thread_changes_no_byte(tmp_path: Path, plain, quantized, monkeypatch) -> None:
    """A merge in place prepares the next packed weight's inputs on a second thread while the kernels
    requantize this one (ops/merge/stream.py, _prepare_after): the same files and report as a merge
    that prepares each weight when it comes to it."""
    import threading

    from loratool.ops.merge import stream as merge_stream

    fmt, path = quantized
    _, adapter = plain
    where: list[str] = []
    inputs = merge_stream.Stream._packed_inputs

    def recorded(self, w, expert):  # type: ignore[no-untyped-def]
        where.append(threading.current_thread().name)
        return inputs(self, w, expert)

    monkeypatch.setattr(merge_stream.Stream, "_packed_inputs", recorded)
    ahead = merge(path, [adapter], output=tmp_path / "ahead", rounding="stochastic", min_kept=0.0, show_progress=False)
    assert sum(name.startswith("loratool-ahead") for name in where) == len(where) - 1  # all but the first weight
    monkeypatch.setattr(merge_stream.Stream, "_prepare_after", lambda self, w, expert: None)
    where.clear()
    inline = merge(path, [adapter], output=tmp_path / "inline", rounding="stochastic", min_kept=0.0,
                   show_progress=False)  # fmt: skip
    assert where and not any(name.startswith("loratool-ahead") for name in where)
    assert ahead.quantization == inline.quantization
    for f in (tmp_path / "ahead").iterdir():
        other = tmp_path / "inline" / f.name
        if f.suffix != ".safetensors":
            assert f.read_bytes() == other.read_bytes(), f.name
            continue
        got, want = load_file(str(f)), load_file(str(other))  # the headers differ in their creation times only
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f.name


def test_an_error_met_ahead_is_raised_at_its_weight(tmp_path: Path, plain, monkeypatch) -> None:
    """An error raised while a weight's inputs are prepared ahead of its turn (here, one made up for the
    third packed weight) stops the merge when that weight comes, as the same error, and nothing is
    written."""
    import threading

    from loratool.errors import UnsupportedCheckpointError
    from loratool.ops.merge import stream as merge_stream

    base, adapter = plain
    make_quantized(base, tmp_path / "q", "int4-sym")
    seen: list[tuple[str, str]] = []
    factors = merge_stream.Stream._stored_factors

    def failing(self, w, expert):  # type: ignore[no-untyped-def]
        seen.append((w.name, threading.current_thread().name))
        if len(seen) == 3:
            raise UnsupportedCheckpointError("made up for the test", key=w.name)
        return factors(self, w, expert)

    monkeypatch.setattr(merge_stream.Stream, "_stored_factors", failing)
    with pytest.raises(UnsupportedCheckpointError, match="made up") as e:
        merge(tmp_path / "q", [adapter], output=tmp_path / "m", min_kept=0.0, show_progress=False)
    third, thread = seen[2]
    assert third in str(e.value) and thread.startswith("loratool-ahead")
    assert not (tmp_path / "m").exists()


def test_pieces_begun_ahead_that_need_a_new_tensor_scale_go_to_torch(tmp_path: Path, plain, monkeypatch) -> None:
    """An NVFP4 merge whose delta outgrows the tensor scales: each piece's pass, begun on the kernel threads
    while the one before is computed, answers that its scales no longer serve, and the torch passes then
    requantize it into the same buffer (NVFP4's new tensor scale): every byte as without the kernels."""
    from loratool.quant import packed

    base, adapter = plain
    make_quantized(base, tmp_path / "q", "nvfp4-compressed")
    answers: list[str] = []
    finish = packed.Started.finish

    def finished(self):  # type: ignore[no-untyped-def]
        try:
            return finish(self)
        except packed.NeedsFreshScales:
            answers.append("fresh")
            raise

    monkeypatch.setattr(packed.Started, "finish", finished)
    big = (adapter, 300.0)  # past what the tensor scales serve
    merge(tmp_path / "q", [big], output=tmp_path / "kernels", min_kept=0.0, show_progress=False)
    assert len(answers) == len(PROJ) * 2  # every weight's pass (each but the first begun ahead) said so
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    merge(tmp_path / "q", [big], output=tmp_path / "torch", min_kept=0.0, show_progress=False)
    got, want = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("kernels", "torch"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    changed = [k for k in want if k.endswith("weight_global_scale")]
    q = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert changed and all(not torch.equal(got[k], q[k]) for k in changed)


@pytest.mark.parametrize("fmt", ["int4-sym", "int4-asym"])
def test_pooled_codes_go_back_to_the_pool_only_once_written(tmp_path: Path, plain, monkeypatch, fmt: str) -> None:
    """The kernels write each 2-D weight's codes into a pooled buffer that the writer hands back once it
    has written them (ops/merge/stream.py; each next weight's is taken while the one before is computed,
    as its requantization begins then): with the writer slowed, so that results queue behind it (a
    buffer handed back early would be reused by the next weight of its shape while still queued),
    every buffer goes back after its write and every byte is the torch passes' (LORATOOL_NATIVE=0)."""
    import time

    from loratool.io.writer import CheckpointWriter
    from loratool.quant import packed
    from loratool.stream.pipeline import BufferPool

    base, adapter = plain
    make_quantized(base, tmp_path / "q", fmt)
    into: list[int] = []
    written: set[int] = set()
    back: list[tuple[int, bool]] = []  # (buffer, whether it had been written by then)
    native, write, give = packed.start_native, CheckpointWriter.write, BufferPool.give

    def recorded(*args, codes_into=None, **kwargs):  # type: ignore[no-untyped-def]
        if codes_into is not None:
            into.append(codes_into.data_ptr())
        return native(*args, codes_into=codes_into, **kwargs)

    def slow(self, name, tensor):  # type: ignore[no-untyped-def]
        time.sleep(0.01)
        write(self, name, tensor)
        written.add(tensor.data_ptr())

    def given(self, t):  # type: ignore[no-untyped-def]
        back.append((t.data_ptr(), t.data_ptr() in written))
        give(self, t)

    monkeypatch.setattr(packed, "start_native", recorded)
    monkeypatch.setattr(CheckpointWriter, "write", slow)
    monkeypatch.setattr(BufferPool, "give", given)
    merge(tmp_path / "q", [adapter], output=tmp_path / "pooled", rounding="stochastic", min_kept=0.0,
          show_progress=False)  # fmt: skip
    assert len(into) == len(PROJ) * 2  # every weight's codes written into a pooled buffer
    returned = [ok for ptr, ok in back if ptr in into]
    assert len(returned) == len(into) and all(returned)  # each handed back, and only after its write
    monkeypatch.setenv("LORATOOL_NATIVE", "0")
    merge(tmp_path / "q", [adapter], output=tmp_path / "torch", rounding="stochastic", min_kept=0.0,
          show_progress=False)  # fmt: skip
    got, want = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("pooled", "torch"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
