"""`loratool push`/`pull` with the real huggingface_hub client against tests/hub_server.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES
from hub_server import HubServer

from loratool.errors import HubError, MetadataError
from loratool.ops.extract import extract
from loratool.ops.hub import pull, push

TOKEN = os.environ["HF_TOKEN"]


@pytest.fixture(scope="session")
def hub():
    server = HubServer(TOKEN).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    extract(FIXTURES / "llama-base", FIXTURES / "llama-ft", output=root / "r4", rank=4, show_progress=False)
    extract(FIXTURES / "llama-base", FIXTURES / "llama-ft", output=root / "r2", rank=2, show_progress=False)
    return root / "r4", root / "r2"


def same_files(a: Path, b: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_push_then_pull_is_bit_identical(hub, adapters, tmp_path: Path, cli) -> None:
    r4, _ = adapters
    r = cli("push", r4, "me/roundtrip", "--endpoint", hub.url, "--json", "--base-model-id", "meta-llama/Llama-3.2-1B")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["changed"] and out["commit_url"].startswith(hub.url) and len(out["commit_id"]) == 40
    repo = hub.state.repos["me/roundtrip"]
    files = repo.commits[repo.refs["main"]]
    assert files["adapter_model.safetensors"].lfs and not files["adapter_config.json"].lfs  # LFS vs regular
    r = cli("pull", "me/roundtrip", "-o", tmp_path / "pulled", "--endpoint", hub.url)
    assert r.exit_code == 0, r.stderr
    same_files(r4, tmp_path / "pulled")
    card = (tmp_path / "pulled" / "README.md").read_text()
    assert 'base_model: "meta-llama/Llama-3.2-1B"' in card
    # the token travelled as a bearer token and was never printed
    assert any(auth == f"Bearer {TOKEN}" for _, path, auth in hub.state.requests if path.startswith("/api/"))
    assert TOKEN not in r.stdout + r.stderr


def test_the_card_never_carries_a_local_path(hub, adapters, tmp_path: Path) -> None:
    r4, _ = adapters
    local = tmp_path / "adapter"
    shutil.copytree(r4, local)
    cfg = json.loads((local / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(FIXTURES / "llama-base")  # what PEFT writes for a local base
    (local / "adapter_config.json").write_text(json.dumps(cfg))
    push(local, "me/localpath", endpoint=hub.url)
    repo = hub.state.repos["me/localpath"]
    card = repo.commits[repo.refs["main"]]["README.md"].data.decode()
    assert "base_model:" not in card.split("---")[1] and str(FIXTURES) not in card


def test_unchanged_repush_makes_no_commit(hub, adapters) -> None:
    r4, _ = adapters
    first = push(r4, "me/noop", endpoint=hub.url)
    before = hub.state.commits_made
    again = push(r4, "me/noop", endpoint=hub.url)
    assert hub.state.commits_made == before
    assert not again.changed and again.commit_id == first.commit_id


def test_pinned_revisions_give_the_old_files(hub, adapters, tmp_path: Path) -> None:
    r4, r2 = adapters
    v1 = push(r4, "me/pinned", endpoint=hub.url)
    hub.state.tag("me/pinned", "v1")
    push(r2, "me/pinned", endpoint=hub.url, message="rank 2")
    pull("me/pinned", output=tmp_path / "head", endpoint=hub.url)
    same_files(r2, tmp_path / "head")
    pull("me/pinned", output=tmp_path / "tag", revision="v1", endpoint=hub.url)
    same_files(r4, tmp_path / "tag")
    res = pull("me/pinned", output=tmp_path / "sha", revision=v1.commit_id, endpoint=hub.url)
    same_files(r4, tmp_path / "sha")
    assert res.commit_id == v1.commit_id


def test_offline_pull_of_a_pinned_commit(hub, adapters, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    r4, _ = adapters
    info = push(r4, "me/offline", endpoint=hub.url)
    pull("me/offline", output=tmp_path / "online", revision=info.commit_id, endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.state.requests)
    res = pull("me/offline", output=tmp_path / "offline", revision=info.commit_id, endpoint=hub.url)
    assert len(hub.state.requests) == seen  # not one request
    same_files(r4, tmp_path / "offline")
    assert res.files["adapter_model.safetensors"].startswith("sha256:")
    with pytest.raises(HubError, match="not in the local cache"):
        pull("me/never-pulled", output=tmp_path / "x", revision="a" * 40, endpoint=hub.url)


def test_corrupted_download_is_caught_and_nothing_is_left(hub, adapters, tmp_path: Path, cli) -> None:
    r4, _ = adapters
    push(r4, "me/corrupt", endpoint=hub.url)
    hub.state.corrupt.add("adapter_model.safetensors")
    try:
        r = cli("pull", "me/corrupt", "-o", tmp_path / "out", "--endpoint", hub.url)
    finally:
        hub.state.corrupt.clear()
    assert r.exit_code == 1
    assert "adapter_model.safetensors does not match the sha256 the Hub lists" in r.stderr
    assert not (tmp_path / "out").exists()
    # the bad blob was evicted from the cache: a second pull downloads it again, correctly
    pull("me/corrupt", output=tmp_path / "out", endpoint=hub.url)
    same_files(r4, tmp_path / "out")


def test_invalid_metadata_blocks_a_push(hub, adapters, tmp_path: Path, cli) -> None:
    r4, _ = adapters
    bad = tmp_path / "bad"
    shutil.copytree(r4, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_dropout"] = 5
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    r = cli("push", bad, "me/invalid", "--endpoint", hub.url)
    assert r.exit_code == 1
    assert "not valid, so it was not pushed" in r.stderr and "$.lora_dropout" in r.stderr
    assert "me/invalid" not in hub.state.repos
    with pytest.raises(MetadataError) as info:
        push(bad, "me/invalid", endpoint=hub.url)
    assert info.value.problems == [("$.lora_dropout", "lora_dropout must be a number from 0 to 1 (got 5)")]


@pytest.mark.parametrize(
    "repo, revision, message",
    [
        ("me/does-not-exist", None, "repository me/does-not-exist not found"),
        ("me/roundtrip-errors", "no-such-branch", "revision 'no-such-branch' not found in me/roundtrip-errors"),
        ("me/empty", None, "holds no adapter_config.json"),
    ],
)
def test_not_found_errors(hub, adapters, tmp_path: Path, cli, repo, revision, message) -> None:
    r4, _ = adapters
    if repo == "me/roundtrip-errors":
        push(r4, repo, endpoint=hub.url)
    if repo == "me/empty" and repo not in hub.state.repos:
        from huggingface_hub import HfApi

        HfApi(endpoint=hub.url).create_repo(repo)
    args = ["pull", repo, "-o", tmp_path / "out", "--endpoint", hub.url] + (
        ["--revision", revision] if revision else []
    )
    r = cli(*args)
    assert r.exit_code == 1
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_bad_token(hub, adapters, tmp_path: Path, cli, monkeypatch) -> None:
    r4, _ = adapters
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value")
    r = cli("push", r4, "me/badtoken", "--endpoint", hub.url)
    assert r.exit_code == 1
    assert "the Hub rejected the token" in r.stderr and "HF_TOKEN" in r.stderr
    assert "hf_wrong_token_value" not in r.stdout + r.stderr


def test_branch_and_pull_request(hub, adapters) -> None:
    r4, r2 = adapters
    push(r4, "me/branches", endpoint=hub.url)
    res = push(r2, "me/branches", endpoint=hub.url, revision="rank2")
    repo = hub.state.repos["me/branches"]
    assert repo.refs["rank2"] == res.commit_id != repo.refs["main"]
    pr = push(r2, "me/branches", endpoint=hub.url, create_pr=True)
    assert pr.pull_request_url and repo.refs["refs/pr/1"] == pr.commit_id


def test_pulled_adapter_loads_in_peft_from_the_repo_id(hub, adapters, monkeypatch) -> None:
    import huggingface_hub
    import torch
    from helpers import load_model, logits
    from huggingface_hub import constants
    from peft import PeftModel

    r4, _ = adapters
    push(r4, "me/peftload", endpoint=hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)  # the module-level HfApi() PEFT uses
    from_hub = PeftModel.from_pretrained(load_model("llama", FIXTURES / "llama-base"), "me/peftload").eval()
    local = PeftModel.from_pretrained(load_model("llama", FIXTURES / "llama-base"), r4).eval()
    assert torch.equal(logits(from_hub), logits(local))


@pytest.mark.skipif(not os.environ.get("LORATOOL_HUB_SMOKE_TOKEN"), reason="opt-in: set LORATOOL_HUB_SMOKE_TOKEN")
def test_smoke_against_the_real_hub(adapters, tmp_path: Path, monkeypatch) -> None:
    """Push a private repo to huggingface.co, pull it back, delete it (needs network and a write token)."""
    import uuid

    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # the real Hub wants Xet
    token = os.environ["LORATOOL_HUB_SMOKE_TOKEN"]
    endpoint = "https://huggingface.co"
    api = HfApi(endpoint=endpoint, token=token)
    repo = f"{api.whoami()['name']}/loratool-smoke-{uuid.uuid4().hex[:8]}"
    r4, _ = adapters
    try:
        push(r4, repo, private=True, endpoint=endpoint, token=token)
        pull(repo, output=tmp_path / "pulled", endpoint=endpoint, token=token)
        same_files(r4, tmp_path / "pulled")
    finally:
        api.delete_repo(repo, missing_ok=True)


def test_a_hugging_face_cache_snapshot_is_read_where_it_lies(hub, tmp_path: Path, cli) -> None:
    """A snapshot in huggingface_hub's cache holds links into ../../blobs: the shards an index names
    are inside the folder by name, and loratool reads them through the links."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("me/sharded-ft", exist_ok=True)
    api.upload_folder(folder_path=str(FIXTURES / "llama-ft"), repo_id="me/sharded-ft")
    snapshot = Path(snapshot_download("me/sharded-ft", cache_dir=str(tmp_path / "cache"), endpoint=hub.url,
                                      token=TOKEN))  # fmt: skip
    shard = snapshot / "model-00001-of-00002.safetensors"
    assert shard.is_symlink() and "blobs" in str(shard.resolve())  # the cache's own layout
    assert cli("inspect", snapshot).exit_code == 0
    res = cli("merge", snapshot, FIXTURES / "llama-peft-adapter", "-o", tmp_path / "merged")
    assert res.exit_code == 0, res.stderr
    res = cli("extract", FIXTURES / "llama-base", snapshot, "-r", "2", "-o", tmp_path / "adapter")
    assert res.exit_code == 0, res.stderr
    # an index entry that leaves the folder by name is still refused
    index = json.loads((FIXTURES / "llama-ft" / "model.safetensors.index.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (FIXTURES / "llama-ft").iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "model.safetensors.index.json").unlink()
    index["weight_map"] = {k: "../" + v for k, v in index["weight_map"].items()}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    res = cli("inspect", bad)
    assert res.exit_code == 1 and "lies outside the checkpoint's folder" in res.stderr


def test_pull_and_convert_take_quiet(hub, adapters, tmp_path: Path, cli) -> None:
    """#31 item 16: the README said every writing command takes --quiet; convert and pull refused it."""
    r4, _ = adapters
    assert cli("push", r4, "me/quiet", "--endpoint", hub.url).exit_code == 0
    res = cli("pull", "me/quiet", "-o", tmp_path / "pulled", "--endpoint", hub.url, "--quiet")
    assert res.exit_code == 0, res.stderr
    assert "%|" not in res.stderr  # no progress bar
    assert cli("convert", tmp_path / "pulled", "--to", "kohya", "-o", tmp_path / "k.safetensors", "-q").exit_code == 0


def test_an_offline_pull_of_a_branch_pulled_before_reads_the_cache(hub, adapters, tmp_path: Path, monkeypatch) -> None:
    """#31 item 16: HF_HUB_OFFLINE=1 pull failed for a branch pulled before (the README promises the cache)."""
    from huggingface_hub import constants

    r4, _ = adapters
    push(r4, "me/offline-branch", endpoint=hub.url)
    pull("me/offline-branch", output=tmp_path / "online", endpoint=hub.url)  # main, by name
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.state.requests)
    pull("me/offline-branch", output=tmp_path / "offline", endpoint=hub.url)
    assert len(hub.state.requests) == seen
    same_files(r4, tmp_path / "offline")


def test_listing_the_hub_offline_says_so_at_once(hub, cli, monkeypatch) -> None:
    """#31 item 16: registry ls --hub me offline took 32 s with five retry lines."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    res = cli("registry", "ls", "--hub", "me", "--endpoint", hub.url)
    assert res.exit_code == 1 and "HF_HUB_OFFLINE is set" in res.stderr and "registry ls" in res.stderr
    assert time.monotonic() - start < 5 and "Retrying" not in res.stderr


@pytest.mark.parametrize(("path", "how", "says"), [
    ("/api/models", "garbage", "not the JSON"),
    pytest.param("/api/models", "truncated", "broke off", marks=pytest.mark.slow),  # 23 s of the client's retries
    ("/api/models/me/spoiled/commit", "no-url", "not the JSON"),
])  # fmt: skip
def test_a_hub_answer_that_is_not_what_it_should_be_is_named(hub, adapters, cli, path: str, how: str,
                                                              says: str) -> None:  # fmt: skip
    """#31 items 10 and 13: non-JSON answers and a push answer without its url were 'loratool bugs'; a
    truncated body said 'cannot reach the Hub'."""
    r4, _ = adapters
    hub.state.spoil[path] = how
    try:
        if "commit" in path:
            res = cli("push", r4, "me/spoiled", "--endpoint", hub.url)
        else:
            res = cli("registry", "ls", "--hub", "me", "--endpoint", hub.url)
    finally:
        hub.state.spoil.clear()
    assert res.exit_code == 1 and says in res.stderr, res.stderr
    assert "loratool bug" not in res.stderr and "cannot reach the Hub" not in res.stderr
