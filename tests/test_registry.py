"""The adapter registry: versions, aliases, references in every command, compatibility, lineage,
the Hub, and what happens when writers race, crash or find a corrupted file."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import file_digest, main_in_a_process

from loratool.adapter import Adapter, LoraModule
from loratool.formats import load_adapter, save_adapter
from loratool.registry.ops import list_entries, register
from loratool.registry.store import SCHEMA_VERSION, Registry, RegistryError


def small_adapter(path: Path, seed: int = 0, *, out: int = 32, modules: int = 2) -> Path:
    g = torch.Generator().manual_seed(seed)
    a = Adapter()
    for i in range(modules):
        a.modules[f"model.layers.{i}.self_attn.q_proj"] = LoraModule(
            torch.randn(2, 32, generator=g), torch.randn(out, 2, generator=g), 4.0
        )
    save_adapter(a, path)
    return path


def test_versions_aliases_and_references(tmp_path: Path, cli) -> None:
    one = register(small_adapter(tmp_path / "a", 0), name="bot", aliases=["staging"], tags={"task": "support"})
    assert one.created and one.entry.ref == "bot@v1" and one.entry.aliases == ["staging"]
    again = register(tmp_path / "a", name="bot")
    assert not again.created and again.entry.ref == "bot@v1"  # the same files are the same version
    two = register(small_adapter(tmp_path / "b", 1), name="bot")
    assert two.entry.ref == "bot@v2"
    reg = Registry()
    assert reg.resolve("bot").ref == "bot@v2" and reg.resolve("bot@v1").ref == "bot@v1"
    assert reg.resolve("bot@staging").ref == "bot@v1"
    assert reg.resolve(f"sha256:{two.entry.digest[:10]}").ref == "bot@v2"
    weights_blob = next(b for p, b, _ in one.entry.files if p == "adapter_model.safetensors")
    assert reg.resolve(f"sha256:{weights_blob[:12]}").ref == "bot@v1"  # a file's digest, as provenance names it
    assert reg.alias("bot@v2", "staging").ref == "bot@v2" and reg.resolve("bot@staging").ref == "bot@v2"
    for bad in ("bot@v9", "bot@prod", "nobody", "sha256:12"):
        with pytest.raises(RegistryError):
            reg.resolve(bad)
    with pytest.raises(RegistryError, match="not an alias"):
        reg.alias("bot", "v3")
    res = cli("registry", "ls", "--json")
    assert [e["ref"] for e in json.loads(res.stdout)["entries"]] == ["bot@v2", "bot@v1"]
    assert cli("registry", "ls", "--name", "b*").exit_code == 0
    shown = json.loads(cli("registry", "show", "bot@v1", "--json").stdout)
    assert shown["tags"] == {"task": "support"} and {f["path"] for f in shown["files"]} >= {"adapter_config.json"}


def test_every_command_takes_a_reference_and_a_path_wins(tmp_path: Path, fixtures: Path, cli, monkeypatch) -> None:
    register(fixtures / "llama-peft-adapter", name="bot", aliases=["prod"])
    by_path = cli("merge", fixtures / "llama-base", fixtures / "llama-peft-adapter", "-o", tmp_path / "p", "--quiet")
    by_ref = cli("merge", fixtures / "llama-base", "bot@prod", "-o", tmp_path / "r", "--quiet")
    assert by_path.exit_code == 0 and by_ref.exit_code == 0, by_ref.output
    from safetensors.torch import load_file

    p, r = load_file(str(tmp_path / "p" / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert p.keys() == r.keys() and all(torch.equal(p[k], r[k]) for k in p)  # the headers name other paths
    for args in (("validate", "bot"), ("inspect", "bot@v1"), ("resize", "bot", "-r", "2", "-o", tmp_path / "s"),
                 ("convert", "bot@prod", "--to", "mlx", "-o", tmp_path / "m"),
                 ("combine", "bot:0.5", "bot@v1:0.5", "-o", tmp_path / "c"),
                 ("unmerge", tmp_path / "r", "bot@prod", "-o", tmp_path / "u", "--quiet")):  # fmt: skip
        res = cli(*args)
        assert res.exit_code == 0, (args, res.output)
    # a path that exists wins over a registered name of the same spelling
    monkeypatch.chdir(tmp_path)
    small_adapter(tmp_path / "bot", 7, modules=1)
    shown = json.loads(cli("inspect", "bot", "--json").stdout)
    assert len(shown["modules"]) == 1
    missing = cli("inspect", "bot@v7")
    assert missing.exit_code == 1 and "no registered adapter bot@v7" in missing.output


def test_ls_base_lists_what_fits_from_headers(tmp_path: Path, fixtures: Path, cli) -> None:
    register(fixtures / "llama-peft-adapter", name="llama-bot")
    register(small_adapter(tmp_path / "wide", out=64), name="wide")  # q_proj of another width
    fits = json.loads(cli("registry", "ls", "--base", fixtures / "llama-base", "--json").stdout)["entries"]
    assert [e["ref"] for e in fits] == ["llama-bot@v1"]
    assert list_entries(base=fixtures / "gpt2-base") == []


@pytest.mark.parametrize("entry", [{"dtype": "F32", "data_offsets": [0, 4]}, "not an entry",
                                   {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]},
                                   {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
                                   {"shape": [1], "data_offsets": [0, 4]}])  # fmt: skip
def test_ls_base_refuses_a_malformed_header_entry_by_name(tmp_path: Path, fixtures: Path, cli, entry) -> None:
    """ls --base reads headers without safe_open (which checks every entry): a malformed entry is an
    input error naming the file and the tensor, not a loratool bug (a KeyError or TypeError before)."""
    register(fixtures / "llama-peft-adapter", name="llama-bot")
    (tmp_path / "base").mkdir()
    header = json.dumps({"model.embed_tokens.weight": entry}).encode()
    (tmp_path / "base" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    r = cli("registry", "ls", "--base", tmp_path / "base")
    assert r.exit_code == 1
    assert "model.safetensors" in r.stderr and "'model.embed_tokens.weight'" in r.stderr and "bug" not in r.stderr


def test_listing_and_showing_need_no_torch(fixtures: Path) -> None:
    """ls (with --base), show and show --lineage answer from the index and headers, so a fresh process
    does not import torch for them: about a second of a pipeline's every call (it did, through the
    experts module and the packed formats' arithmetic, which validation imported)."""
    register(fixtures / "llama-peft-adapter", name="llama-bot")
    runs = [["ls"], ["ls", "--json"], ["ls", "--base", fixtures / "llama-base"], ["show", "llama-bot@v1"],
            ["show", "llama-bot@v1", "--lineage", "--json"]]  # fmt: skip
    out = main_in_a_process(*(["registry", *args] for args in runs))
    assert "llama-bot@v1" in out
    assert out.strip().endswith("torch imported: False")


def test_lineage_in_both_directions(tmp_path: Path, fixtures: Path, cli) -> None:
    base, ft = fixtures / "llama-base", fixtures / "llama-ft"
    assert cli("extract", base, ft, "-r", "4", "-o", tmp_path / "ex", "--quiet", "--register", "ext").exit_code == 0
    register(fixtures / "llama-peft-adapter", name="bot")
    res = cli("combine", "ext", "bot", "-o", tmp_path / "mix", "--register", "mix", "--json", "--quiet")
    assert json.loads(res.stdout)["registered"] == "mix@v1"
    assert cli("merge", base, "mix", "-o", tmp_path / "merged", "--quiet").exit_code == 0
    reg = Registry()
    up = reg.lineage(reg.resolve("mix"))
    parents = {p["ref"]: p for p in up["parents"] if "ref" in p}
    assert set(parents) == {"ext@v1", "bot@v1"}  # each source once, however many files it has
    assert {p["role"] for p in parents["ext@v1"]["parents"]} == {"base", "finetuned"}
    fingerprint = json.loads(cli("registry", "show", "ext", "--json").stdout)["base_fingerprint"]
    assert fingerprint["targets"]["model.layers.0.self_attn.q_proj.weight"] == [32, 32]
    assert [b["path"] for b in fingerprint["base_files"]] == [str(base / "model.safetensors")]
    assert any(c.get("event") == "merged into" and c["target"] == str(tmp_path / "merged") for c in up["children"])
    down = reg.lineage(reg.resolve("ext"))
    assert [c["ref"] for c in down["children"] if "ref" in c] == ["mix@v1"]
    text = cli("registry", "show", "mix", "--lineage").stdout
    assert "<- ext@v1" in text and "-> merged into" in text


def test_rm_gc_and_verify(tmp_path: Path, cli, registry_home: Path) -> None:
    register(small_adapter(tmp_path / "a", 0), name="a")
    register(small_adapter(tmp_path / "b", 1), name="b")
    blobs = lambda: sorted(p.name for p in (registry_home / "blobs").rglob("*") if p.is_file())  # noqa: E731
    before = blobs()
    assert json.loads(cli("registry", "rm", "b", "--json").stdout)["ref"] == "b@v1"
    gc = json.loads(cli("registry", "gc", "--json").stdout)
    assert gc["blobs_removed"] >= 1 and gc["bytes_freed"] > 0 and len(blobs()) == len(before) - gc["blobs_removed"]
    assert Registry().resolve("a")  # what a still uses stays
    assert cli("registry", "verify").exit_code == 0
    entry = Registry().resolve("a")
    blob = registry_home / "blobs" / "sha256" / entry.files[-1][1][:2] / entry.files[-1][1]
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    res = cli("registry", "verify", "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["problems"][0]["entries"] == [f"a@v1/{entry.files[-1][0]}"]
    assert blob.exists()  # reported, never deleted


def _add_many(home: str, root: str, worker: int, n: int) -> None:
    os.environ["LORATOOL_HOME"] = home
    for i in range(n):
        register(small_adapter(Path(root) / f"w{worker}-{i}", 100 * worker + i), name="shared")


def test_concurrent_adds_lose_nothing(tmp_path: Path, registry_home: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(registry_home), str(tmp_path), w, 4)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    versions = sorted(e.version for e in Registry().entries(name_glob="shared"))
    assert versions == list(range(1, 17))


KILLED_WRITER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
con.execute("INSERT INTO tags VALUES (1, 'half', 'written')")
print("locked", flush=True)
time.sleep(60)
"""


def test_a_killed_writer_leaves_no_lock_and_no_half_entry(tmp_path: Path) -> None:
    register(small_adapter(tmp_path / "a", 0), name="a")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(Registry().db_path)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert writer.stdout and writer.stdout.readline().strip() == "locked"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    start = time.monotonic()
    assert register(small_adapter(tmp_path / "b", 1), name="b").created
    assert time.monotonic() - start < 30
    assert "half" not in Registry().resolve("a").tags


def test_an_interrupted_add_leaves_nothing_visible(tmp_path: Path, monkeypatch) -> None:
    register(small_adapter(tmp_path / "a", 0), name="a")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(Registry, "_entry", boom)  # fails inside the transaction, after the insert
        register(small_adapter(tmp_path / "b", 1), name="b")
    assert [e.ref for e in Registry().entries()] == ["a@v1"]
    assert Registry().gc()["blobs_removed"] >= 1  # the files it stored were not referenced


def test_schema_migrations(tmp_path: Path, registry_home: Path) -> None:
    register(small_adapter(tmp_path / "a", 0), name="a")
    con = sqlite3.connect(Registry().db_path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(RegistryError, match="newer than this loratool"):
        Registry().resolve("a")


def test_invalid_adapters_and_names_are_refused(tmp_path: Path, cli) -> None:
    bad = small_adapter(tmp_path / "bad", 0)
    (bad / "adapter_config.json").write_text("{not json")
    res = cli("registry", "add", bad, "--name", "bad")
    assert res.exit_code == 1 and "not registered" in res.output
    res = cli("registry", "add", small_adapter(tmp_path / "ok", 0), "--name", "has@at")
    assert res.exit_code == 1 and "not a registry name" in res.output
    assert cli("registry", "ls").stdout.strip() == "no adapters registered"


def test_hub_push_pull_and_listing(tmp_path: Path, fixtures: Path, cli) -> None:
    from hub_server import HubServer

    hub = HubServer(os.environ["HF_TOKEN"]).start()
    try:
        register(fixtures / "llama-peft-adapter", name="bot")
        res = cli("push", "bot", "me/bot", "--endpoint", hub.url, "--base-model-id", "meta-llama/Llama-3.2-1B",
                  "--json")  # fmt: skip
        assert res.exit_code == 0, res.output
        commit = json.loads(res.stdout)["commit_id"]
        events = Registry().resolve("bot").events
        assert (
            events[-1]["kind"] == "pushed to"
            and events[-1]["target"] == "me/bot@main"
            and events[-1]["detail"] == commit
        )
        res = cli("pull", "me/bot", "-o", tmp_path / "pulled", "--endpoint", hub.url, "--register", "pulled", "--json")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["registered"] == "pulled@v1"
        lineage = Registry().lineage(Registry().resolve("pulled"))
        assert {"hub": "me/bot", "commit": commit, "role": "pulled from"} in lineage["parents"]
        listed = json.loads(cli("registry", "ls", "--hub", "me", "--endpoint", hub.url, "--json").stdout)["hub"]
        assert [m["id"] for m in listed] == ["me/bot"]
        by_base = cli("registry", "ls", "--hub-base", "meta-llama/Llama-3.2-1B", "--endpoint", hub.url, "--json")
        assert [m["id"] for m in json.loads(by_base.stdout)["hub"]] == ["me/bot"]
        other = cli("registry", "ls", "--hub-base", "Qwen/Qwen3-8B", "--endpoint", hub.url, "--json")
        assert json.loads(other.stdout)["hub"] == []
    finally:
        hub.shutdown()
    assert load_adapter(Registry().materialize(Registry().resolve("pulled")))


def test_files_are_copied_in_so_editing_the_source_changes_nothing(tmp_path: Path, cli) -> None:
    src = small_adapter(tmp_path / "a", 0)
    entry = register(src, name="a").entry
    before = file_digest(Path(Registry().materialize(entry)))
    with open(src / "adapter_model.safetensors", "r+b") as f:  # edited in place: same inode
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    assert cli("registry", "verify").exit_code == 0
    assert file_digest(Path(Registry().materialize(Registry().resolve("a")))) == before


def test_a_damaged_index_is_an_error_not_a_traceback(tmp_path: Path, cli, registry_home: Path) -> None:
    register(small_adapter(tmp_path / "a", 0), name="a")
    (registry_home / "registry.db").write_bytes(b"this is not a database" * 100)
    for name in ("registry.db-wal", "registry.db-shm"):
        (registry_home / name).unlink(missing_ok=True)
    for args in (("registry", "ls"), ("registry", "show", "a"), ("inspect", "a@v1")):
        res = cli(*args)
        assert res.exit_code == 1 and "cannot be used" in res.output and "Traceback" not in res.output, args


@pytest.mark.parametrize("where", ["blobs", "views", ".", "..", "blobs/new"])
def test_no_output_touches_the_registry_store_even_with_force(tmp_path: Path, cli, registry_home: Path,
                                                              where: str) -> None:  # fmt: skip
    """`combine bot@v1 -o $LORATOOL_HOME/blobs --force` used to wipe the store (#31 item 6)."""
    small_adapter(tmp_path / "a")
    assert cli("registry", "add", tmp_path / "a", "--name", "bot").exit_code == 0
    before = file_digest(registry_home / "blobs")  # (reading bot@v1 may add a view and a use: the blobs stay)
    target = registry_home / where
    res = cli("combine", "bot@v1", "-o", target, "--force")
    assert res.exit_code == 1 and "loratool's registry store" in res.stderr, res.stderr
    assert file_digest(registry_home / "blobs") == before
    assert cli("registry", "verify").exit_code == 0 and load_adapter(tmp_path / "a").modules
    assert cli("combine", "bot@v1", "-o", tmp_path / "mix").exit_code == 0  # elsewhere, as ever


def test_add_stores_the_adapter_alone_and_keeps_the_store_private(tmp_path: Path, cli, registry_home: Path) -> None:
    """#31 item 8: a 0600 .env beside an adapter became a world-readable blob."""
    old = os.umask(0o022)
    try:
        a = small_adapter(tmp_path / "a")
        (a / ".env").write_text("HF_TOKEN=hf_secret")
        os.chmod(a / ".env", 0o600)
        (a / "notes.txt").write_text("not the adapter")
        (a / "README.md").write_text("# card")
        assert cli("registry", "add", a, "--name", "bot").exit_code == 0
        shown = json.loads(cli("registry", "show", "bot@v1", "--json").stdout)
        assert sorted(f["path"] for f in shown["files"]) == ["README.md", "adapter_config.json",
                                                             "adapter_model.safetensors"]  # fmt: skip
        blobs = [p for p in (registry_home / "blobs").rglob("*") if p.is_file()]
        assert blobs and not any(b.read_bytes() == b"HF_TOKEN=hf_secret" for b in blobs)
        for p in [registry_home, *registry_home.rglob("*")]:
            assert p.stat().st_mode & 0o077 == 0, (p, oct(p.stat().st_mode))  # the owner's alone
        # a file of the adapter that links out of its folder is refused, naming it
        b = small_adapter(tmp_path / "b", seed=1)
        (tmp_path / "outside.json").write_text((b / "adapter_config.json").read_text())
        (b / "adapter_config.json").unlink()
        (b / "adapter_config.json").symlink_to(tmp_path / "outside.json")
        res = cli("registry", "add", b, "--name", "other")
        assert res.exit_code == 1 and "outside the adapter's folder" in res.stderr and "cp -rL" in res.stderr
    finally:
        os.umask(old)


def test_reads_through_a_reference_are_the_registered_bytes(tmp_path: Path, cli, registry_home: Path) -> None:
    """#31 item 5: a replaced view file was used by merge and missed by verify; a blob edited in
    place was caught by verify but still used."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base.safetensors"
    save_file({f"model.layers.{i}.self_attn.q_proj.weight": torch.zeros(32, 32) for i in range(2)}, str(base))
    small_adapter(tmp_path / "a", 0)
    small_adapter(tmp_path / "other", 7)
    assert cli("registry", "add", tmp_path / "a", "--name", "bot").exit_code == 0
    assert cli("merge", base, tmp_path / "a", "-o", tmp_path / "want.safetensors").exit_code == 0
    assert cli("merge", base, "bot@v1", "-o", tmp_path / "m1.safetensors").exit_code == 0  # builds the view
    view = next((registry_home / "views").iterdir())
    weights = view / "adapter_model.safetensors"
    weights.unlink()  # replaced by other bytes, as an editor saving a new file would
    weights.write_bytes((tmp_path / "other" / "adapter_model.safetensors").read_bytes())
    res = cli("registry", "verify", "--json")
    assert res.exit_code == 1 and "not the registered blob" in res.stdout
    assert cli("merge", base, "bot@v1", "-o", tmp_path / "m2.safetensors").exit_code == 0
    want = load_file(str(tmp_path / "want.safetensors"))
    assert all(torch.equal(v, want[k]) for k, v in load_file(str(tmp_path / "m2.safetensors")).items())
    assert cli("registry", "verify").exit_code == 0  # the view was built again from the blobs

    blob = next(p for p in (registry_home / "blobs").rglob("*") if p.is_file() and p.stat().st_size > 1000)
    os.chmod(blob, 0o600)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")  # edited in place: the view's hard link sees it too
    res = cli("merge", base, "bot@v1", "-o", tmp_path / "m3.safetensors")
    assert (
        res.exit_code == 1 and "bot@v1: the registered bytes of 'adapter_model.safetensors' are changed" in res.stderr
    )
    assert not (tmp_path / "m3.safetensors").exists()
    shutil.rmtree(registry_home / "views")  # blob and view both gone (#31 item 10: a 'loratool bug')
    blob.unlink()
    res = cli("merge", base, "bot@v1", "-o", tmp_path / "m4.safetensors")
    assert res.exit_code == 1 and "are missing" in res.stderr and "loratool bug" not in res.stderr


@pytest.mark.parametrize("name", ["a/../b", "x/", "v1", "team/v2", "./x", "a//b"])
def test_names_that_cannot_be_names_are_refused(tmp_path: Path, cli, name: str) -> None:
    """#31 item 15: a/../b, x/ and v1 were accepted."""
    small_adapter(tmp_path / "a")
    res = cli("registry", "add", tmp_path / "a", "--name", name)
    assert res.exit_code == 1 and "is not a registry name" in res.stderr
    res = cli("combine", tmp_path / "a", "-o", tmp_path / "out", "--register", name)
    assert res.exit_code == 2 and "is not a registry name" in res.output and not (tmp_path / "out").exists()


def test_register_is_checked_before_the_work_and_a_late_failure_says_what_exists(tmp_path: Path, cli,
                                                                                 registry_home: Path,
                                                                                 monkeypatch) -> None:  # fmt: skip
    """#31 item 12: a bad --register name or an unusable registry failed after the output was written."""
    small_adapter(tmp_path / "a")
    registry_home.mkdir(parents=True, exist_ok=True)
    (registry_home / "registry.db").mkdir()  # the catalog's place taken by a folder
    res = cli("combine", tmp_path / "a", "-o", tmp_path / "out", "--register", "bot")
    assert res.exit_code == 1 and "not a file" in res.stderr and not (tmp_path / "out").exists()
    (registry_home / "registry.db").rmdir()

    from loratool.registry import ops as ops_registry

    def broken(*args: object, **kwargs: object) -> None:
        raise RegistryError("the disk is full")

    monkeypatch.setattr(ops_registry.Registry, "add", broken)
    res = cli("combine", tmp_path / "a", "-o", tmp_path / "out", "--register", "bot")
    assert res.exit_code == 1 and (tmp_path / "out").exists()
    assert f"the output was written to {tmp_path / 'out'}" in res.stderr
    assert f"loratool registry add {tmp_path / 'out'} --name bot" in res.stderr


def test_a_killed_adds_partial_blob_is_swept_by_the_next_add(tmp_path: Path, cli, registry_home: Path) -> None:
    """#31 item 15: a killed registry add left its .part until gc."""
    from loratool.io.atomic import HOST

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    parts = registry_home / "tmp"
    parts.mkdir(parents=True)
    dead = parts / f"{HOST}-{gone.stdout.strip()}-0123abcd.part"
    live = parts / f"{HOST}-{os.getpid()}-4567cdef.part"
    for p in (dead, live):
        p.write_bytes(b"x" * 1000)
    assert cli("registry", "add", small_adapter(tmp_path / "a"), "--name", "bot").exit_code == 0
    assert not dead.exists() and live.exists()


def test_a_locked_or_damaged_index_gets_advice_that_keeps_the_catalog(tmp_path: Path, cli, registry_home: Path,
                                                                      monkeypatch) -> None:  # fmt: skip
    """#31 item 13: a locked (busy) registry advised moving registry.db aside, which discards the catalog."""
    from loratool.registry import store as reg

    assert cli("registry", "add", small_adapter(tmp_path / "a"), "--name", "bot").exit_code == 0
    monkeypatch.setattr(reg, "_BUSY_SECONDS", 0.2)
    holder = sqlite3.connect(registry_home / "registry.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
    try:
        res = cli("registry", "add", small_adapter(tmp_path / "b", 1), "--name", "bot")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert res.exit_code == 1 and "nother process holds the registry" in res.stderr and "aside" not in res.stderr
    (registry_home / "registry.db").write_bytes(b"not a database" * 100)
    for extra in ("registry.db-wal", "registry.db-shm"):
        (registry_home / extra).unlink(missing_ok=True)
    res = cli("registry", "ls")
    assert res.exit_code == 1 and "egistry.db is damaged: keep a copy" in res.stderr


def test_a_new_registry_opened_by_many_processes_at_once_waits_for_wal() -> None:
    """On a database not yet in WAL mode, SQLite answers a journal-mode change that races another with
    "database is locked" at once, without its busy handler: a new registry opened by several processes
    together failed so (test_concurrent_adds_lose_nothing, once under load). The change is retried."""
    import sqlite3

    from loratool.registry import store

    class Racing:
        def __init__(self, failures: int, message: str = "database is locked") -> None:
            self.failures, self.message, self.calls = failures, message, 0

        def execute(self, sql: str) -> None:
            self.calls += 1
            if self.calls <= self.failures:
                raise sqlite3.OperationalError(self.message)

    con = Racing(3)
    store._journal_in_wal(con)  # type: ignore[arg-type]
    assert con.calls == 4
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        store._journal_in_wal(Racing(1, "disk I/O error"))  # type: ignore[arg-type]
