"""Bad input, faults and races: nothing destroyed, nothing silently wrong, no litter.

Every case of the bad-input suite asserts the exit code, the message's key phrase, that nothing
appeared at -o, that the inputs are byte-for-byte unchanged, and that no temporary file is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from helpers import edit_tensors, file_digest
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def litter(root: Path) -> list[Path]:
    """Temporary files and folders any loratool run may leave."""
    return [p for p in root.rglob(".*") if ".loratool-" in p.name]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Private copies of the shipped fixtures (so a broken test cannot damage them)."""
    for name in ("llama-base", "llama-ft", "llama-peft-adapter", "gpt2-base"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    shutil.copy(FIXTURES / "llama-kohya.safetensors", tmp_path / "kohya.safetensors")
    return tmp_path


def _config(adapter: Path, **changes: object) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _index(ckpt: Path, **remap: str) -> None:
    path = ckpt / "model.safetensors.index.json"
    data = json.loads(path.read_text())
    data["weight_map"].update(remap)
    path.write_text(json.dumps(data))


# -- the suite: (prepare the work folder, arguments, exit code, phrase) -------------------------------------
Case = tuple[Callable[[Path], None], Callable[[Path], list[object]], int, str]


def _nothing(w: Path) -> None:
    pass


def _truncate(w: Path) -> None:
    f = w / "llama-base" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])


def _corrupt_header(w: Path) -> None:
    f = w / "llama-base" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at!"
    f.write_bytes(bytes(data))


def _pickle_base(w: Path) -> None:
    st = w / "llama-base" / "model.safetensors"
    torch.save(load_file(str(st)), w / "llama-base" / "pytorch_model.bin")
    st.unlink()


def _outside_shard(w: Path) -> None:
    ft = w / "llama-ft"
    shutil.move(ft / "model-00002-of-00002.safetensors", w / "stolen.safetensors")
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    _index(ft, **{k: "../stolen.safetensors" for k, v in index["weight_map"].items() if v.startswith("model-00002")})


def _absolute_shard(w: Path) -> None:
    ft = w / "llama-ft"
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    target = str(ft / "model-00002-of-00002.safetensors")
    _index(ft, **{k: target for k, v in index["weight_map"].items() if v.startswith("model-00002")})


def _fp8_base(w: Path) -> None:
    f = w / "llama-base" / "model.safetensors"
    ts = load_file(str(f))
    key = "model.layers.0.self_attn.q_proj.weight"
    ts[key] = ts[key].to(torch.float8_e4m3fn)
    ts[key.replace(".weight", ".weight_scale_inv")] = torch.ones(1, 1)
    save_file(ts, str(f))


def _quant_config(w: Path) -> None:
    cfg = json.loads((w / "llama-base" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (w / "llama-base" / "config.json").write_text(json.dumps(cfg))


def _fp8_block_size(size: list[object]):
    def make(w: Path) -> None:  # the shipped block-scaled FP8 fixture, its config's block size spoiled
        shutil.copytree(FIXTURES / "llama-fp8-block", w / "fp8")
        cfg = json.loads((w / "fp8" / "config.json").read_text())
        cfg["quantization_config"]["weight_block_size"] = size
        (w / "fp8" / "config.json").write_text(json.dumps(cfg))

    return make


def _kohya_alpha_vector(w: Path) -> None:
    def widen(ts: dict) -> None:
        key = next(k for k in ts if k.endswith(".alpha"))
        ts[key] = torch.tensor([1.0, 2.0])

    edit_tensors(w / KOHYA, widen)


def _nan_factor(w: Path) -> None:
    edit_tensors(w / "llama-peft-adapter" / ADAPTER_WEIGHTS, lambda ts: ts[Q_A].__setitem__((0, 0), float("nan")))


def _rank_zero(w: Path) -> None:
    def empty(ts: dict) -> None:
        b = Q_A.replace("lora_A", "lora_B")
        ts[Q_A], ts[b] = ts[Q_A][:0].clone(), ts[b][:, :0].clone()

    edit_tensors(w / ADAPTER / ADAPTER_WEIGHTS, empty)


def _kohya_without_alpha(w: Path) -> None:
    f = w / "kohya.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        meta = dict(h.metadata())
    ts = load_file(str(f))
    first_alpha = next(k for k in ts if k.endswith(".alpha"))
    del ts[first_alpha]
    meta["ss_network_alpha"] = "1"
    save_file(ts, str(f), metadata=meta)


def _dangling_link(w: Path) -> None:
    (w / "out").symlink_to(w / "nowhere")


def _link_to_base(w: Path) -> None:
    (w / "out").symlink_to(w / "llama-base")


def _file_as_folder(w: Path) -> None:
    (w / "afile").write_text("x")


def _base_quant(qc: object):
    def make(w: Path) -> None:  # the base's config.json with this quantization_config (its tensors unquantized)
        cfg = json.loads((w / "llama-base" / "config.json").read_text())
        cfg["quantization_config"] = qc
        (w / "llama-base" / "config.json").write_text(json.dumps(cfg))

    return make


def _register(adapter: Path, name: str) -> None:
    from loratool.registry.ops import register

    register(adapter, name=name)


def _base_config(w: Path, **changes: object) -> None:
    path = w / "llama-base" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _ct_groups(groups: object) -> Callable[[Path], None]:
    return _base_quant({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": groups})


def _diffusers_file(w: Path) -> None:  # a diffusers LoRA file whose UNet LoraConfig gives lora_alpha as text
    factors = {"unet.down.lora_A.weight": torch.ones(2, 8), "unet.down.lora_B.weight": torch.ones(8, 2)}
    meta = {"unet.peft_type": "LORA", "unet.r": 2, "unet.lora_alpha": "x"}
    save_file(factors, str(w / "diffusers.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})


BASE, FT, ADAPTER, KOHYA = "llama-base", "llama-ft", "llama-peft-adapter", "kohya.safetensors"

CASES: dict[str, Case] = {
    # 1. --force never destroys an input
    "unmerge -o its --check base": (_nothing, lambda w: ["unmerge", w / FT, w / ADAPTER, "--check", w / BASE,
                                                          "-o", w / BASE, "--force"], 1, "would replace the input"),
    "-o the parent of an option's path": (lambda w: shutil.copytree(w / BASE, w / "sub" / BASE),
                                          lambda w: ["unmerge", w / FT, w / ADAPTER, "--check", w / "sub" / BASE,
                                                     "-o", w / "sub", "--force"], 1, "would replace the input"),
    "-o the parent of the inputs": (_nothing, lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w, "--force"], 1,
                                    "would replace the input"),
    "-o inside an input folder": (_nothing, lambda w: ["extract", w / BASE, w / FT, "-r", "2", "-o",
                                                       w / BASE / "adapter"], 1, "lies inside the input"),
    "-o a kohya --base": (_nothing, lambda w: ["combine", w / KOHYA, "--base", w / BASE, "-o", w / BASE, "--force"], 1,
                          "would replace the input"),
    "-o a link to an input": (_link_to_base, lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out", "--force"], 1,
                              "would replace the input"),
    "-o a dangling link": (_dangling_link, lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                           "the output exists"),
    # 2. non-finite numbers
    "scale nan": (_nothing, lambda w: ["merge", w / BASE, f"{w / ADAPTER}:nan", "-o", w / "out"], 2,
                  "give a finite number"),
    "NaN factor, combine cat": (_nan_factor, lambda w: ["combine", w / ADAPTER, w / ADAPTER, "-o", w / "out"], 1,
                                "self_attn.q_proj.lora_A': holds NaN or Inf"),
    "NaN factor, combine svd": (_nan_factor, lambda w: ["combine", w / ADAPTER, "--method", "svd", "-r", "2", "-o",
                                                        w / "out"], 1, "holds NaN or Inf"),
    "NaN factor, resize": (_nan_factor, lambda w: ["resize", w / ADAPTER, "-r", "2", "-o", w / "out"], 1,
                           "holds NaN or Inf"),
    # 5. the environment
    "-o under /proc": (_nothing, lambda w: ["merge", w / BASE, w / ADAPTER, "-o", "/proc/loratool-out"], 1,
                       "cannot write in /proc"),
    "-o under a file": (_file_as_folder, lambda w: ["extract", w / BASE, w / FT, "-o", w / "afile" / "out"], 1,
                        "is a file, so no folder can be made there"),
    "Hub unreachable, pull": (_nothing, lambda w: ["pull", "me/adapter", "--endpoint", "http://127.0.0.1:9", "-o",
                                                   w / "out"], 1, "cannot reach the Hub (ConnectError"),
    "Hub unreachable, push": (_nothing, lambda w: ["push", w / ADAPTER, "me/adapter", "--endpoint",
                                                   "http://127.0.0.1:9"], 1, "cannot reach the Hub"),
    "malformed endpoint": (_nothing, lambda w: ["pull", "me/adapter", "--endpoint", "localhost:8080", "-o",
                                                w / "out"], 1, "is not an http(s) URL"),
    "invalid repo id": (_nothing, lambda w: ["pull", "me//bad id", "--endpoint", "http://127.0.0.1:9", "-o", w / "out"],
                        1, "is not a valid repo id"),
    # 6. merge refuses what validate rejects
    "config r disagrees": (lambda w: _config(w / ADAPTER, r=8), lambda w: ["merge", w / BASE, w / ADAPTER, "-o",
                                                                           w / "out"], 1, "disagrees with the config"),
    "config r = 0": (lambda w: _config(w / ADAPTER, r=0), lambda w: ["unmerge", w / BASE, w / ADAPTER, "-o", w / "out"],
                     1, "$.r"),
    "target_modules select nothing": (lambda w: _config(w / ADAPTER, target_modules=["o_proj"]),
                                      lambda w: ["combine", w / ADAPTER, "-o", w / "out"], 1,
                                      "target_modules does not select this module"),
    "kohya alpha missing, header disagrees": (_kohya_without_alpha, lambda w: ["resize", w / KOHYA, "-r", "2", "-o",
                                                                               w / "out.safetensors"], 1,
                                              "ss_network_alpha is 1"),
    # 7. index files pointing outside the checkpoint
    "shard ../": (_outside_shard, lambda w: ["extract", w / BASE, w / FT, "-o", w / "out"], 1,
                  "lies outside the checkpoint's folder"),
    "shard absolute": (_absolute_shard, lambda w: ["inspect", w / FT], 1, "lies outside the checkpoint's folder"),
    # 7b. numbers and layouts no tool writes (#31 item 10: they were reported as loratool bugs)
    "fp8 block size zero": (_fp8_block_size([0, 24]), lambda w: ["merge", w / "fp8", w / ADAPTER, "-o", w / "out"], 1,
                            "a block is two positive whole numbers"),
    "fp8 block size text": (_fp8_block_size(["a", 24]), lambda w: ["merge", w / "fp8", w / ADAPTER, "-o", w / "out"],
                            1, "a block is two positive whole numbers"),
    "alpha 1e300": (lambda w: _config(w / ADAPTER, lora_alpha=1e300),
                    lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1, "float32, where the arithmetic"),
    "kohya alpha vector": (_kohya_alpha_vector, lambda w: ["merge", w / BASE, w / KOHYA, "-o", w / "out"], 1,
                           "a kohya module's alpha is one number"),
    # 7b'. adapters no command can apply (a division by zero and a StopIteration reported as bugs; an empty
    # adapter merged as a silent copy of the base; use_dora without magnitudes merged as plain LoRA)
    "rank 0 factors, merge": (_rank_zero, lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                              "self_attn.q_proj': the module has rank 0"),
    "rank 0 factors, inspect": (_rank_zero, lambda w: ["inspect", w / ADAPTER], 1, "the module has rank 0"),
    "rank 0 factors, validate": (_rank_zero, lambda w: ["validate", w / ADAPTER], 1, "has rank 0"),
    "empty adapter, merge": (lambda w: save_file({}, str(w / ADAPTER / ADAPTER_WEIGHTS)),
                             lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                             "the adapter holds no LoRA factors and no tensors"),
    "empty adapter, resize": (lambda w: save_file({}, str(w / ADAPTER / ADAPTER_WEIGHTS)),
                              lambda w: ["resize", w / ADAPTER, "-r", "2", "-o", w / "out"], 1,
                              "the adapter holds no LoRA factors and no tensors"),
    "empty adapter, validate": (lambda w: save_file({}, str(w / ADAPTER / ADAPTER_WEIGHTS)),
                                lambda w: ["validate", w / ADAPTER], 1, "holds no tensors"),
    "use_dora without magnitudes, merge": (lambda w: _config(w / ADAPTER, use_dora=True),
                                           lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                                           "this module has no lora_magnitude_vector"),
    "use_dora without magnitudes, validate": (lambda w: _config(w / ADAPTER, use_dora=True),
                                              lambda w: ["validate", w / ADAPTER], 1,
                                              "use_dora is true but the module has no lora_magnitude_vector"),
    # 7c. arguments swapped (#31 item 16: 'no adapter_config.json', 'the fine-tune lacks this tensor')
    "merge ADAPTER BASE": (lambda w: None, lambda w: ["merge", w / ADAPTER, w / BASE, "-o", w / "out"], 1,
                           "this is an adapter, where the checkpoint goes"),
    "extract ADAPTER FT": (lambda w: None, lambda w: ["extract", w / ADAPTER, w / FT, "-o", w / "out"], 1,
                           "this is an adapter, where the base checkpoint goes"),
    "extract BASE ADAPTER": (lambda w: None, lambda w: ["extract", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                             "this is an adapter, where the fine-tuned checkpoint goes"),
    # 7d. a GGUF --base with a config.json loratool cannot read (#31 items 10 and 13)
    "gguf base config a list": (lambda w: (w / BASE / "config.json").write_text("[1, 2]"),
                                lambda w: ["convert", w / ADAPTER, "--to", "gguf", "--base", w / BASE, "-o",
                                           w / "out.gguf"], 1, "config.json holds a JSON list, not an object"),
    "model_type a list, merge": (lambda w: _base_config(w, model_type=["llama"]),
                                 lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                                 "config.json's model_type is [\"llama\"], not a name"),
    "architectures a number, validate --base": (lambda w: _base_config(w, architectures=1),
                                                lambda w: ["validate", w / ADAPTER, "--base", w / BASE], 1,
                                                "config.json's architectures is 1, not a list of class names"),
    "gguf base num_attention_heads 0": (lambda w: _base_config(w, num_attention_heads=0),
                                        lambda w: ["convert", w / ADAPTER, "--to", "gguf", "--base", w / BASE, "-o",
                                                   w / "out.gguf"], 1, "gives num_attention_heads = 0"),
    "gguf base num_hidden_layers text": (lambda w: _base_config(w, num_hidden_layers="2"),
                                         lambda w: ["convert", w / ADAPTER, "--to", "gguf", "--base", w / BASE, "-o",
                                                    w / "out.gguf"], 1, "gives num_hidden_layers = \"2\""),
    "gguf base without config": (lambda w: (w / BASE / "config.json").unlink(),
                                 lambda w: ["convert", w / ADAPTER, "--to", "gguf", "--base", w / BASE, "-o",
                                            w / "out.gguf"], 1, "names no architecture"),
    # 7e. config fields of the wrong JSON type, read before validation looked (a sweep of every field of the
    # fixtures' configs through every command found these reported as loratool bugs)
    "lora_alpha text, inspect": (lambda w: _config(w / ADAPTER, lora_alpha="x"), lambda w: ["inspect", w / ADAPTER],
                                 1, "lora_alpha must be a number"),
    "alpha_pattern a number, merge": (lambda w: _config(w / ADAPTER, alpha_pattern=5),
                                      lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                                      "alpha_pattern must map module patterns to numbers"),
    "rank_pattern a number, validate": (lambda w: _config(w / ADAPTER, rank_pattern=5),
                                        lambda w: ["validate", w / ADAPTER], 1, "rank_pattern must map"),
    "rank_pattern a list, resize": (lambda w: _config(w / ADAPTER, rank_pattern=[1, "a"]),
                                     lambda w: ["resize", w / ADAPTER, "-r", "1", "-o", w / "out"], 1,
                                     "rank_pattern must map"),
    "target_parameters true, convert": (lambda w: _config(w / ADAPTER, target_parameters=True),
                                        lambda w: ["convert", w / ADAPTER, "--to", "kohya", "-o",
                                                   w / "out.safetensors"], 1, "target_parameters must be a list"),
    "target_parameters true, validate": (lambda w: _config(w / ADAPTER, target_parameters=True),
                                         lambda w: ["validate", w / ADAPTER], 1, "target_parameters must be a list"),
    "quantization_config text, inspect": (_base_quant("x"), lambda w: ["inspect", w / BASE], 1,
                                          "config.json's quantization_config is a JSON str, not an object"),
    "config_groups a list, extract": (_ct_groups([1]), lambda w: ["extract", w / BASE, w / FT, "-o", w / "out"], 1,
                                      "its config_groups is a JSON list, not an object"),
    "config group weights text, merge": (_ct_groups({"g": {"weights": "x"}}),
                                         lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                                         "the weights of config group 'g' are a JSON str"),
    "config group num_bits text, validate --base": (_ct_groups({"g": {"weights": {"num_bits": "4"}}}),
                                                    lambda w: ["validate", w / ADAPTER, "--base", w / BASE], 1,
                                                    "config group 'g' has weights.num_bits = \"4\""),
    "diffusers LoraConfig lora_alpha text": (_diffusers_file, lambda w: ["inspect", w / "diffusers.safetensors"], 1,
                                             "the unet LoraConfig in lora_adapter_metadata is not valid"),
    "float8 factor, validate": (lambda w: edit_tensors(w / ADAPTER / ADAPTER_WEIGHTS,
                                                       lambda ts: ts.update({Q_A: ts[Q_A].to(torch.float8_e4m3fn)})),
                                lambda w: ["validate", w / ADAPTER], 1, "dtype F8_E4M3"),
    # 7g. what the file system and the registry's index cannot hold (an OverflowError and an OSError, reported as
    # loratool bugs)
    "registry version past SQLite's integers": (lambda w: _register(w / ADAPTER, "bot"),
                                                lambda w: ["validate", "bot@v99999999999999999999"], 1,
                                                "no registered adapter bot@v99999999999999999999"),
    "a path component too long": (_nothing, lambda w: ["inspect", w / ("b" * 300)], 1, "File name too long"),
    # 8. quantized checkpoints
    "fp8 without its config": (_fp8_base, lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                               "config.json has no quantization_config saying how its FP8 scales apply"),
    "gptq config, extract": (_quant_config, lambda w: ["extract", w / BASE, w / FT, "-o", w / "out"], 1,
                             "config.json says gptq, but no tensor is stored that way"),
    "fp8 without its config, unmerge": (_fp8_base, lambda w: ["unmerge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                                        "quantized: fp8 (block-scaled)"),
    # 9. messages that say what happened
    "budget too small": (_nothing, lambda w: ["extract", w / BASE, w / FT, "--budget", "3", "-o", w / "out"], 1,
                         "--budget 3 buys no rank"),
    # bad files and mismatched models
    "truncated base": (_truncate, lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                       "truncated or corrupt"),
    "corrupt header": (_corrupt_header, lambda w: ["extract", w / BASE, w / FT, "-o", w / "out"], 1,
                       "not a readable safetensors file"),
    "pickle base": (_pickle_base, lambda w: ["merge", w / BASE, w / ADAPTER, "-o", w / "out"], 1,
                    "refusing to read a pickle file"),
    "adapter for another model": (_nothing, lambda w: ["merge", w / "gpt2-base", w / ADAPTER, "-o", w / "out"], 1,
                                  "Is this adapter for another model"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(cli, work: Path, name: str) -> None:
    prepare, args, code, phrase = CASES[name]
    prepare(work)
    before = file_digest(work)
    r = cli(*args(work))
    assert r.exit_code == code, r.output
    assert phrase in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "loratool bug" not in r.stderr
    for out in (work / "out", work / "out.safetensors", Path("/proc/loratool-out")):
        assert not out.exists() or out.is_symlink()
    assert file_digest(work) == before  # every input intact, nothing added
    assert not litter(work)


def test_a_legacy_pickle_loads_with_allow_pickle(cli, work: Path) -> None:
    """The pre-zip torch.save format cannot be memory-mapped; it is read whole, still weights_only."""
    st = work / BASE / "model.safetensors"
    torch.save(load_file(str(st)), work / BASE / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    st.unlink()
    r = cli("inspect", work / BASE, "--allow-pickle", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["tensors"] > 0


def test_a_missing_alpha_is_a_warning_when_nothing_disagrees(cli, work: Path) -> None:
    f = work / KOHYA
    ts = load_file(str(f))
    del ts[next(k for k in ts if k.endswith(".alpha"))]
    save_file(ts, str(f))  # no header: no ss_network_alpha to disagree with
    r = cli("resize", f, "-r", 2, "-o", work / "out.safetensors", "--format", "kohya", "-q")
    assert r.exit_code == 0, r.stderr
    assert "is missing: scaled by alpha = r" in r.stderr


def test_inspect_names_the_quantization(cli, work: Path) -> None:
    _fp8_base(work)
    r = cli("inspect", work / BASE, "--json")
    q = json.loads(r.stdout)["quantization"]
    assert r.exit_code == 0 and q["method"] == "fp8 (block-scaled)" and not q["supported"]
    assert "no quantization_config" in q["why_unsupported"]


# -- faults and races, in real processes --------------------------------------------------------------------
def _big_pair(root: Path) -> tuple[Path, Path]:
    """A base large enough that a merge takes a moment (zeros: fast to make), and an adapter for it."""
    base = root / "base"
    base.mkdir()
    n, d = 6, 2048
    tensors = {f"layers.{i}.proj.weight": torch.zeros(d, d) for i in range(n)}
    save_file(tensors, str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    adapter = {}
    for i in range(n):
        adapter[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(2, d, generator=g)
        adapter[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(d, 2, generator=g)
    (root / "adapter").mkdir()
    save_file(adapter, str(root / "adapter" / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["proj"]}
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    return base, root / "adapter"


def _merge_cmd(base: Path, adapter: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "loratool", "merge", str(base), str(adapter), "-o", str(out), "-q", "--device", "cpu"]


def _check_merged(out: Path, adapter: Path) -> None:
    merged = load_file(str(out))
    factors = load_file(str(adapter / ADAPTER_WEIGHTS))
    for i in range(6):
        a = factors[f"base_model.model.layers.{i}.proj.lora_A.weight"]
        b = factors[f"base_model.model.layers.{i}.proj.lora_B.weight"]
        assert torch.allclose(merged[f"layers.{i}.proj.weight"], b @ a, atol=1e-5)


@pytest.mark.slow
def test_kill_9_midway_then_a_rerun_cleans_up_and_succeeds(tmp_path: Path) -> None:
    base, adapter = _big_pair(tmp_path)
    out = tmp_path / "merged.safetensors"
    proc = subprocess.Popen(_merge_cmd(base / "model.safetensors", adapter, out), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it is writing its temporary output
        tmp = [p for p in litter(tmp_path) if p.is_file() and p.stat().st_size > 0]
        if tmp or proc.poll() is not None:
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the merge finished before it could be killed"
    left = litter(tmp_path)
    assert left and not out.exists()  # what kill -9 leaves: a temporary file, no output
    rerun = subprocess.run(_merge_cmd(base / "model.safetensors", adapter, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "left behind by an interrupted loratool run" in rerun.stderr
    assert not litter(tmp_path)
    _check_merged(out, adapter)


@pytest.mark.slow
def test_two_runs_racing_to_one_output_one_wins(tmp_path: Path) -> None:
    base, adapter = _big_pair(tmp_path)
    out = tmp_path / "merged.safetensors"
    procs = [subprocess.Popen(_merge_cmd(base / "model.safetensors", adapter, out), stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    results = [(p.wait(), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert str(out) in loser and ("appeared while this run was writing it" in loser or "the output exists" in loser)
    assert not litter(tmp_path)
    _check_merged(out, adapter)


def test_a_temporary_of_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    from loratool.io.atomic import _HOST, sweep_litter

    out = tmp_path / "merged"
    mine = tmp_path / f".merged.loratool-tmp-{_HOST}-{os.getpid()}-0123abcd"
    other_host = tmp_path / ".merged.loratool-tmp-elsewhere-1-0123abcd"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".merged.loratool-tmp-{_HOST}-{gone.stdout.strip()}-0123abcd"
    for p in (mine, other_host, dead):
        p.mkdir()
    assert sweep_litter(out) == [dead]
    assert mine.exists() and other_host.exists() and not dead.exists()


def _dead_pid() -> str:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return gone.stdout.strip()


@pytest.mark.parametrize("exchange", [True, False])
def test_a_forced_replacement_keeps_the_old_output_until_the_new_is_in_place(tmp_path: Path, monkeypatch,
                                                                             exchange: bool) -> None:  # fmt: skip
    """#31 item 7: a failed second rename (EIO) used to leave no output at all. With a rename-exchange
    (Linux) the swap is one step, and a failed one moves nothing; without, the old output is put back."""
    from loratool.io import atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    real = os.replace

    def eio(*args: object) -> None:
        raise OSError(5, "Input/output error")

    def failing_second_rename(src: object, dst: object) -> None:
        if ".loratool-tmp-" in str(src):  # the new output's move into place
            eio()
        real(src, dst)

    if exchange:
        monkeypatch.setattr(atomic, "_exchange", eio)
    else:  # where the OS or file system has no rename-exchange: two renames
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        monkeypatch.setattr(atomic.os, "replace", failing_second_rename)
    with pytest.raises(Exception, match="Input/output error"):
        with atomic.atomic_output(out, force=True, directory=True) as tmp:
            (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old" and not litter(tmp_path)
    monkeypatch.undo()
    with atomic.atomic_output(out, force=True, directory=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new" and not litter(tmp_path)


def test_an_old_output_left_aside_by_a_killed_forced_run_is_restored_not_deleted(tmp_path: Path) -> None:
    from loratool.errors import OutputExistsError
    from loratool.io.atomic import _HOST, check_output

    out = tmp_path / "out"
    pid = _dead_pid()
    old = tmp_path / f".out.loratool-old-{_HOST}-{pid}-0123abcd"  # killed between its two renames
    new = tmp_path / f".out.loratool-tmp-{_HOST}-{pid}-4567cdef"
    for p, text in ((old, "old"), (new, "half-written")):
        p.mkdir()
        (p / "weights").write_text(text)
    with pytest.raises(OutputExistsError, match="the output exists"):
        check_output(out, force=False)  # the old output is back, so it exists
    assert (out / "weights").read_text() == "old" and not litter(tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_the_rename_exchange_swaps_two_paths_in_one_step(tmp_path: Path) -> None:
    from loratool.io.atomic import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.write_text("file")
    (a / "inside").write_text("dir")
    assert _exchange(a, b) is True
    assert (b / "inside").read_text() == "dir" and a.read_text() == "file"


def test_a_registry_home_of_the_wrong_kind_is_named_not_a_bug(cli, work: Path, monkeypatch) -> None:
    """#31 items 10 and 13: LORATOOL_HOME a file was a 'loratool bug'; registry.db a folder said 'no adapters'."""
    home = work / "home-file"
    home.write_text("")
    monkeypatch.setenv("LORATOOL_HOME", str(home))
    for args in (["registry", "add", work / ADAPTER, "--name", "x"], ["registry", "ls"]):
        r = cli(*args)
        assert r.exit_code == 1 and "not a folder" in r.stderr and "loratool bug" not in r.stderr, r.stderr
    home = work / "home"
    (home / "registry.db").mkdir(parents=True)
    monkeypatch.setenv("LORATOOL_HOME", str(home))
    r = cli("registry", "ls")
    assert r.exit_code == 1 and "catalog is not a file" in r.stderr


def test_a_fix_that_is_a_command_keeps_its_spelling() -> None:
    """#31 item 16: 'Loratool registry ls', '--Rounding'."""
    from loratool.errors import LoraToolError

    assert str(LoraToolError("x", fix="loratool registry ls")).endswith(". loratool registry ls")
    assert str(LoraToolError("x", fix="--dtype bfloat16")).endswith(". --dtype bfloat16")
    assert str(LoraToolError("x", fix="pass --force")).endswith(". Pass --force")


@pytest.mark.parametrize("direct", [True, False])
def test_a_full_disk_while_writing_an_output_is_named_and_leaves_nothing(tmp_path: Path, cli, monkeypatch,
                                                                         direct: bool) -> None:  # fmt: skip
    """#31 item 10: a full disk on the direct-write path (files of 64 MiB and more) was a 'loratool bug'."""
    from loratool.io import directio

    base, adapter = _big_pair(tmp_path)  # 96 MiB of float32 in one file: the direct-write path
    monkeypatch.setenv("LORATOOL_DIRECT_IO", "1" if direct else "0")
    real, calls = os.write, {"n": 0}

    def enospc(fd: int, data: object) -> int:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return real(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(directio.os, "write", enospc)
    monkeypatch.setattr(os, "write", enospc)
    res = cli("merge", base, adapter, "-o", tmp_path / "out", "-q")
    assert res.exit_code == 1 and "No space left on device" in res.stderr, res.stderr
    assert "loratool bug" not in res.stderr and not (tmp_path / "out").exists() and not litter(tmp_path)


def test_a_full_disk_during_registry_add_is_named_and_stores_nothing(tmp_path: Path, cli, monkeypatch) -> None:
    """#31 item 10: a full disk during registry add was a 'loratool bug'. (A full disk often shows at
    fsync, where the file system allocates what the writes only reserved.)"""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("LORATOOL_HOME", str(tmp_path / "home"))

    def enospc(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", enospc)
    res = cli("registry", "add", FIXTURES / "llama-peft-adapter", "--name", "bot")
    assert res.exit_code == 1 and "No space left on device" in res.stderr, res.stderr
    assert "loratool bug" not in res.stderr
    assert not [p for p in (tmp_path / "home").rglob("*") if p.is_file() and p.suffix == ".part"]


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_merge_exits_130_or_143_and_leaves_nothing(tmp_path: Path, sig: int, code: int) -> None:
    """#31 item 10: SIGINT/SIGTERM in the middle of a large merge ended in 'BufferError', exit 1 (the
    direct writer's abort raised it over the interrupt)."""
    base, adapter = _big_pair(tmp_path)  # 96 MiB in one file: the direct-write path
    out = tmp_path / "merged.safetensors"
    proc = subprocess.Popen(_merge_cmd(base / "model.safetensors", adapter, out), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until it is writing its temporary output
        if [p for p in litter(tmp_path) if p.is_file() and p.stat().st_size > 0] or proc.poll() is not None:
            break
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the merge finished before the signal came")
    assert proc.returncode == code, err
    assert "BufferError" not in err and "loratool bug" not in err
    assert not out.exists() and not litter(tmp_path)
