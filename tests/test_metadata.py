"""Schemas, provenance, `loratool validate` and model cards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from helpers import edit_tensors

from loratool.io.checkpoint import open_checkpoint
from loratool.metadata.card import is_hub_id, render_card
from loratool.metadata.provenance import decode
from loratool.metadata.schema import check, check_schemas
from loratool.ops.extract import extract
from loratool.ops.validate import validate

CASES = json.loads((FIXTURES / "metadata" / "cases.json").read_text())


def test_schemas_are_valid_json_schema_2020_12() -> None:
    check_schemas()


@pytest.mark.parametrize("case", CASES["valid"], ids=lambda c: c["name"])
def test_valid_configs(case) -> None:
    assert check(case["config"], case["schema"]) == []


@pytest.mark.parametrize("case", CASES["invalid"], ids=lambda c: c["name"])
def test_invalid_configs_name_path_and_message(case) -> None:
    assert check(case["config"], case["schema"]) == [(case["path"], case["message"])]


def test_all_problems_are_reported_at_once_and_sorted() -> None:
    problems = check({"peft_type": "LORA", "r": 0, "bias": "x", "lora_dropout": 2}, "adapter_config")
    assert [p for p, _ in problems] == ["$.bias", "$.lora_dropout", "$.r"]


def test_schemas_ship_with_the_package() -> None:
    from loratool.metadata.schema import schema_dir

    assert (schema_dir() / "provenance.schema.json").is_file()


# -- validate -------------------------------------------------------------------------------------------
@pytest.fixture
def ours(tmp_path: Path) -> Path:
    extract(FIXTURES / "llama-base", FIXTURES / "llama-ft", output=tmp_path / "a", rank=4, show_progress=False)
    return tmp_path / "a"


def test_peft_written_and_loratool_written_adapters_validate(ours: Path, cli) -> None:
    assert validate(FIXTURES / "llama-peft-adapter").valid
    assert validate(FIXTURES / "llama-kohya.safetensors").valid
    report = validate(ours)
    assert report.valid and report.sha256_checked and report.modules == 8
    r = cli("validate", ours, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["valid"] is True


def _edit(adapter: Path, **changes) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def _tensors(adapter: Path, edit) -> None:
    edit_tensors(adapter / "adapter_model.safetensors", edit)


Q = "base_model.model.model.layers.0.self_attn.q_proj"
UNTARGETED = "has LoRA weights but target_modules does not select this module"
SUFFIXES = ["q_proj", "v_proj", "up_proj", "down_proj"]  # PEFT narrows these by layer, never a whole path


@pytest.mark.parametrize(
    "breakage, path, message",
    [
        (
            lambda a: _edit(a, r=8),
            "tensors/model.layers.0.mlp.down_proj",
            "rank 4 disagrees with the config (r says 8)",
        ),
        (
            lambda a: _edit(a, target_modules=["q_proj"]),
            "tensors/model.layers.0.mlp.up_proj",
            "has LoRA weights but target_modules does not select this module",
        ),
        (
            lambda a: _tensors(a, lambda t: t.pop(f"{Q}.lora_B.weight")),
            "tensors/model.layers.0.self_attn.q_proj",
            "has lora_A but not lora_B",
        ),
        (
            lambda a: _tensors(a, lambda t: t.__setitem__(f"{Q}.lora_A.weight", torch.ones(4, 32, dtype=torch.int32))),
            f"tensors/{Q}.lora_A.weight",
            "dtype I32 cannot hold an adapter's factors (F64, F32, F16, BF16 can)",
        ),
        (
            lambda a: _tensors(
                a, lambda t: t.__setitem__(f"{Q}.lora_A.weight", torch.ones(4, 32).to(torch.float8_e4m3fn))
            ),
            f"tensors/{Q}.lora_A.weight",
            "dtype F8_E4M3 cannot hold",  # it said "is not floating point"
        ),
        (
            lambda a: _tensors(a, lambda t: t[f"{Q}.lora_A.weight"].__setitem__((0, 0), float("nan"))),
            f"tensors/{Q}.lora_A.weight",
            "holds NaN or Inf",
        ),
        (
            lambda a: _tensors(a, lambda t: t[f"{Q}.lora_A.weight"].mul_(1.001)),
            "header/loratool.tensors_sha256",
            "does not match the tensors: the file was changed after loratool wrote it",
        ),
        (lambda a: _edit(a, lora_dropout=3), "$.lora_dropout", "lora_dropout must be a number from 0 to 1 (got 3)"),
        # what PEFT's target rule leaves out, PEFT does not load: merging it would disagree with PEFT's merge
        (lambda a: _edit(a, exclude_modules=["up_proj"]), "tensors/model.layers.0.mlp.up_proj", UNTARGETED),
        (lambda a: _edit(a, exclude_modules=r".*\.0\.mlp\..*"), "tensors/model.layers.0.mlp.up_proj", UNTARGETED),
        (
            lambda a: _edit(a, target_modules=SUFFIXES, layers_to_transform=[5]),
            "tensors/model.layers.0.mlp.up_proj",
            UNTARGETED,
        ),
        (
            lambda a: _edit(a, target_modules=SUFFIXES, layers_to_transform=[5], layers_pattern="layers"),
            "tensors/model.layers.0.mlp.up_proj",
            UNTARGETED,
        ),
        (lambda a: _edit(a, modules_to_save=["up_proj"]), "tensors/model.layers.0.mlp.up_proj", UNTARGETED),
        (
            lambda a: _edit(a, use_dora=True),
            f"tensors/{Q.removeprefix('base_model.model.')}",
            "use_dora is true but the module has no lora_magnitude_vector",
        ),
        (
            lambda a: _tensors(
                a,
                lambda t: t.update(
                    {
                        f"{Q}.lora_A.weight": t[f"{Q}.lora_A.weight"][:0].clone(),
                        f"{Q}.lora_B.weight": t[f"{Q}.lora_B.weight"][:, :0].clone(),
                    }
                ),
            ),
            f"tensors/{Q.removeprefix('base_model.model.')}",
            "has rank 0",
        ),
        (lambda a: _tensors(a, lambda t: t.clear()), "tensors", "holds no tensors"),
    ],
    ids=[
        "rank vs r",
        "target_modules",
        "missing lora_B",
        "integer dtype",
        "float8 dtype",
        "nan",
        "tampered",
        "schema",
        "exclude_modules",
        "exclude_modules regex",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "use_dora without magnitudes",
        "rank 0",
        "empty",
    ],
)
def test_broken_adapters_are_reported(ours: Path, cli, breakage, path, message) -> None:
    breakage(ours)
    report = validate(ours)
    assert not report.valid
    assert any(p.path == path and message in p.message for p in report.problems), report.problems
    r = cli("validate", ours)
    assert r.exit_code == 1 and path in r.stderr


def test_a_module_scaled_by_zero_is_warned_of_and_a_negative_alpha_is_not(tmp_path: Path, cli) -> None:
    """An alpha of 0 (kohya's alpha tensor, PEFT's lora_alpha) leaves an adapter valid, since every reader
    loads it, but its modules add nothing: validate and merge say so. A negative alpha subtracts the delta
    on purpose and passes quietly."""
    import shutil

    kohya = FIXTURES / "llama-kohya.safetensors"
    alpha = next(k for k in open_checkpoint(kohya, headers_only=True).keys() if k.endswith(".alpha"))
    for value, warned in ((0.0, True), (-4.0, False)):
        k = tmp_path / f"kohya{value}.safetensors"
        shutil.copy(kohya, k)
        edit_tensors(k, lambda ts, value=value: ts.update({alpha: torch.tensor(value)}))
        peft = tmp_path / f"peft{value}"
        shutil.copytree(FIXTURES / "llama-peft-adapter", peft)
        config = json.loads((peft / "adapter_config.json").read_text())
        (peft / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": value, "alpha_pattern": {}}))
        for adapter, zero in ((k, 1), (peft, 6)):
            report = validate(adapter)
            assert report.valid and bool(report.warnings) == warned, report.warnings
            if warned:
                assert f"{zero} module(s) scaled by 0" in str(report.warnings[0])
            res = cli("merge", FIXTURES / "llama-base", adapter, "-o", tmp_path / f"m{value}{zero}", "--json")
            assert res.exit_code == 0 and ("scaled by 0" in res.stderr) == warned


def test_an_alpha_float32_cannot_scale_by_is_invalid(tmp_path: Path, cli) -> None:
    """An alpha the schema allows but whose scaling float32 cannot hold (1e39 / r) is refused by every
    command that reads the adapter; validate called it valid, so push and registry add took it."""
    import shutil

    peft = tmp_path / "a"
    shutil.copytree(FIXTURES / "llama-peft-adapter", peft)
    config = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": 1e39, "alpha_pattern": {}}))
    report = validate(peft)
    assert (
        not report.valid and "float32" in str(report.problems[0]) and "modules/model.layers" in str(report.problems[0])
    )
    res = cli("registry", "add", peft, "--name", "huge")
    assert res.exit_code == 1 and "float32" in res.stderr


def test_validate_missing_adapter(cli, tmp_path: Path) -> None:
    r = cli("validate", tmp_path / "nope")
    assert r.exit_code == 1 and "no such file" in r.stderr


def test_validate_streams_one_tensor_at_a_time(ours: Path, monkeypatch) -> None:
    """validate reads every tensor (finite values, digest) but never holds more than one or two."""
    import weakref

    from loratool.formats import kohya, peft
    from loratool.io.checkpoint import Checkpoint

    def headers_only(read):  # type: ignore[no-untyped-def]
        return lambda *a, **k: read(*a, **k) if k.get("lazy") else pytest.fail("loaded the adapter whole")

    for module, name in ((peft, "read_peft"), (kohya, "read_kohya")):
        monkeypatch.setattr(module, name, headers_only(getattr(module, name)))
    real_get, alive, peak, reads = Checkpoint.get, [], [0], []

    def get(self, key):
        t = real_get(self, key)
        alive[:] = [r for r in alive if r() is not None] + [weakref.ref(t)]
        peak[0] = max(peak[0], len(alive))
        reads.append(key)
        return t

    monkeypatch.setattr(Checkpoint, "get", get)
    report = validate(ours)
    assert report.valid and report.sha256_checked
    with open_checkpoint(ours / "adapter_model.safetensors") as ck:
        assert set(reads) == set(ck.keys())  # every value was looked at...
    assert peak[0] <= 2  # ...one at a time


# -- provenance and cards --------------------------------------------------------------------------------
def test_provenance_record_matches_its_schema(ours: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(ours / "adapter_model.safetensors"), "pt") as f:
        record = decode(f.metadata())
    assert check(record, "provenance") == []
    assert record["tool"] == "loratool" and record["operation"] == "extract"


def test_card_front_matter_never_holds_a_local_path(tmp_path: Path) -> None:
    local = tmp_path / "my-base"
    local.mkdir()
    card = render_card({"r": 4, "base_model_name_or_path": str(local)}, None)
    assert "base_model:" not in card and str(local) not in card
    card = render_card({"r": 4}, None, base_model_id="meta-llama/Llama-3.2-1B")
    front = card.split("---")[1]
    assert 'base_model: "meta-llama/Llama-3.2-1B"' in front and "base_model_relation: adapter" in front
    assert '"base_model:adapter:meta-llama/Llama-3.2-1B"' in front and "library_name: peft" in front
    assert not is_hub_id("./models/base") and not is_hub_id("/abs/path") and is_hub_id("gpt2")


def test_extract_card_carries_the_report(ours: Path, tmp_path: Path, cli) -> None:
    text = (ours / "README.md").read_text()
    assert "| `model.layers.0.self_attn.q_proj` | 4 |" in text
    r = cli(
        "extract",
        FIXTURES / "llama-base",
        FIXTURES / "llama-ft",
        "-o",
        tmp_path / "x",
        "--base-model-id",
        str(tmp_path),
    )
    assert r.exit_code == 1 and "is not a Hub repo id" in r.stderr


def test_input_hasher_hashes_files_side_by_side(tmp_path: Path, monkeypatch) -> None:
    """Several hashing threads (as on a many-core machine) give each file its own sha256, in order."""
    import hashlib

    from loratool.metadata import provenance

    monkeypatch.setattr(provenance, "available_cores", lambda: 8)
    files = []
    for i, size in enumerate([0, 1, 5000, 1 << 20, 3]):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(bytes((i * 7 + j) % 256 for j in range(size)))
        files.append(f)
    got = provenance.InputHasher(files).result()
    assert [r["sha256"] for r in got] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert [r["size"] for r in got] == [f.stat().st_size for f in files]


def test_input_hasher_streams_files_its_caller_reads(tmp_path: Path) -> None:
    """A streamed file is hashed from what is fed to it; the others on the hashing threads as before."""
    import hashlib

    from loratool.metadata import provenance

    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for i, f in enumerate(files):
        f.write_bytes(bytes((i + j * 13) % 251 for j in range(70_000)))
    hasher = provenance.InputHasher(files, streamed=[files[1]])
    assert list(hasher.streams) == [files[1]]
    hasher.streams[files[1]].feed(1000, memoryview(files[1].read_bytes())[1000:60_000])
    got = hasher.result()
    assert [r["sha256"] for r in got] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert hasher.streams[files[1]].fed == 59_000
    assert provenance.InputHasher(files, streamed=files, enabled=False).streams == {}  # nothing hashed at all


@pytest.mark.parametrize("reads", ["in order", "gaps", "overlaps", "backwards", "past the end", "none"])
def test_sequential_sha256_is_the_files_digest_whatever_the_reads(tmp_path: Path, reads: str) -> None:
    """Whatever the reader's reads (in order, with gaps, overlapping, out of order, none), the digest is
    the file's; the bytes taken from the reads are those that continued the hash."""
    import hashlib
    import random

    from loratool.metadata.digests import SequentialSha256

    data = random.Random(reads).randbytes(300_001)
    f = tmp_path / "model.safetensors"
    f.write_bytes(data)
    spans = {
        "in order": [(0, 100_000), (100_000, 200_000), (200_000, 300_001)],
        "gaps": [(10, 50_000), (60_000, 61_000), (200_000, 250_000)],
        "overlaps": [(0, 50_000), (40_000, 90_000), (90_000, 90_000), (80_000, 300_001)],
        "backwards": [(200_000, 300_001), (0, 100_000), (100_000, 200_000)],
        "past the end": [(0, 299_000), (299_000, 300_001)],
        "none": [],
    }[reads]
    fed = {"in order": 300_001, "gaps": 49_990 + 1000 + 50_000, "overlaps": 300_001, "backwards": 100_001,
           "past the end": 300_001, "none": 0}[reads]  # fmt: skip
    digest = SequentialSha256(f)
    for start, stop in spans:
        digest.feed(start, memoryview(data)[start:stop])
    assert digest.finish() == hashlib.sha256(data).hexdigest()
    assert digest.fed == fed


def test_sequential_sha256_names_a_file_cut_short(tmp_path: Path) -> None:
    from loratool.errors import InputFileError
    from loratool.metadata.digests import SequentialSha256

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 10_000)
    digest = SequentialSha256(f)
    digest.feed(0, memoryview(b"x" * 100))
    with open(f, "r+b") as h:
        h.truncate(5000)
    with pytest.raises(InputFileError, match="5000 fewer than when it was opened") as e:
        digest.finish()
    assert e.value.path == str(f)


@pytest.fixture
def hash_calls(monkeypatch) -> list[str]:
    """The files :mod:`loratool.metadata.digests` really hashes; a file written in the test counts
    as old enough to keep its digest."""
    from loratool.metadata import digests

    calls: list[str] = []
    real = digests.sha256_file

    def counted(path) -> str:  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(digests, "sha256_file", counted)
    monkeypatch.setattr(digests, "RACY_NS", -10_000_000_000)
    return calls


def test_an_unchanged_input_is_hashed_once(tmp_path: Path, hash_calls: list[str]) -> None:
    import hashlib
    import os

    from loratool.metadata.digests import CACHE_FILE, cached_sha256, kept_sha256

    f = tmp_path / "base.safetensors"
    f.write_bytes(b"weights" * 1000)
    assert kept_sha256(f) is None
    truth = hashlib.sha256(f.read_bytes()).hexdigest()
    assert cached_sha256(f) == truth and cached_sha256(f) == truth
    assert cached_sha256(tmp_path / "." / "base.safetensors") == truth  # the same file by another path
    assert len(hash_calls) == 1 and kept_sha256(f) == truth
    home = Path(os.environ["LORATOOL_HOME"])
    assert (home / CACHE_FILE).stat().st_mode & 0o777 == 0o600  # it names the user's files


def test_a_digest_taken_from_reads_is_kept_as_a_hashed_one(tmp_path: Path, hash_calls: list[str]) -> None:
    import hashlib

    from loratool.metadata.digests import SequentialSha256, cached_sha256, kept_sha256

    f = tmp_path / "base.safetensors"
    f.write_bytes(b"weights" * 1000)
    digest = SequentialSha256(f)
    digest.feed(0, memoryview(f.read_bytes()))
    truth = hashlib.sha256(f.read_bytes()).hexdigest()
    assert digest.finish() == truth and kept_sha256(f) == truth
    assert cached_sha256(f) == truth and hash_calls == []  # not hashed again


@pytest.mark.parametrize("exists", [False, True])
def test_the_digest_cache_home_is_made_private_but_a_chosen_one_left_alone(tmp_path: Path, hash_calls, monkeypatch,
                                                                           exists: bool) -> None:  # fmt: skip
    from loratool.metadata.digests import CACHE_FILE, cached_sha256

    home = tmp_path / "parent" / "home"
    if exists:
        home.mkdir(parents=True)
        home.chmod(0o755)
    monkeypatch.setenv("LORATOOL_HOME", str(home))
    (tmp_path / "f").write_bytes(b"x")
    cached_sha256(tmp_path / "f")
    assert home.stat().st_mode & 0o777 == (0o755 if exists else 0o700)
    assert (home / CACHE_FILE).stat().st_mode & 0o777 == 0o600


def test_a_rewritten_input_is_hashed_again_even_with_its_old_size_and_mtime(tmp_path: Path, hash_calls) -> None:
    import hashlib
    import os

    from loratool.metadata.digests import cached_sha256

    f = tmp_path / "base.safetensors"
    f.write_bytes(b"a" * 4096)
    cached_sha256(f)
    st = f.stat()
    with open(f, "r+b") as fh:  # same inode, same size; the mtime put back: only the ctime tells
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cached_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert len(hash_calls) == 2


def test_a_freshly_written_input_is_not_kept(tmp_path: Path, monkeypatch) -> None:
    """A write in the clock tick of the hashing could leave the file's times unchanged."""
    from loratool.metadata import digests

    f = tmp_path / "base.safetensors"
    f.write_bytes(b"x" * 100)
    calls = []
    real = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda p: calls.append(p) or real(p))
    digests.cached_sha256(f)
    digests.cached_sha256(f)
    assert len(calls) == 2


@pytest.mark.parametrize("breakage", ["off", "corrupt database", "home is a file"])
def test_the_digest_cache_never_fails_a_run(tmp_path: Path, hash_calls, monkeypatch, breakage: str) -> None:
    import hashlib
    import os

    from loratool.metadata.digests import CACHE_FILE, cached_sha256

    home = Path(os.environ["LORATOOL_HOME"])
    if breakage == "off":
        monkeypatch.setenv("LORATOOL_DIGEST_CACHE", "0")
    elif breakage == "corrupt database":
        home.mkdir(parents=True, exist_ok=True)
        (home / CACHE_FILE).write_bytes(b"not a database" * 100)
    else:
        monkeypatch.setenv("LORATOOL_HOME", str(tmp_path / "home-file"))
        (tmp_path / "home-file").write_text("")
    f = tmp_path / "base.safetensors"
    f.write_bytes(b"weights" * 10)
    truth = hashlib.sha256(f.read_bytes()).hexdigest()
    assert cached_sha256(f) == truth and cached_sha256(f) == truth
    assert len(hash_calls) == 2  # hashed each time, and no error


def test_a_second_merge_does_not_hash_its_base_again(tmp_path: Path, hash_calls: list[str]) -> None:
    import hashlib

    from loratool.ops.merge import merge

    for out in ("m1", "m2"):
        merge(FIXTURES / "llama-base", [FIXTURES / "llama-peft-adapter"], output=tmp_path / out, show_progress=False)
    with open_checkpoint(tmp_path / "m2") as ck:
        records = [decode(meta) for meta in ck.metadata.values()]
    for record in records:
        assert record is not None
        for entry in record["inputs"]:
            assert entry["sha256"] == hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()
    weights = [c for c in hash_calls if c.endswith(".safetensors") and "/llama-base/" in c]
    assert weights and len(weights) == len(set(weights))  # the second merge took them from the cache
