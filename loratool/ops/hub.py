"""``loratool push`` / ``loratool pull``: adapters to and from the Hugging Face Hub.

The one module that imports ``huggingface_hub``. One ``HfApi(endpoint=..., token=...)`` serves
every call, so the endpoint never depends on when ``HF_ENDPOINT`` was read. Uploads go in one
commit (adapter files and the model card); downloads are checked against the sha256 (LFS files)
or git blob sha1 (small files) that the Hub lists, because the client itself checks only sizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ChecksumError, HubError, LoraToolError, MetadataError
from ..formats.peft import CONFIG_NAME, WEIGHTS_NAME, read_config
from ..io.atomic import atomic_output, check_output
from ..io.header import header_metadata
from ..metadata.card import check_base_model_id, render_card
from ..metadata.provenance import decode
from ..validation import require_valid, validate_adapter

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")


@dataclass
class PushResult:
    repo_id: str
    commit_url: str
    commit_id: str
    revision: str
    pull_request_url: str | None = None
    uploaded: list[str] = field(default_factory=list)
    changed: bool = True

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PullResult:
    repo_id: str
    output: Path
    revision: str
    commit_id: str
    files: dict[str, str]  # file -> verified digest ("sha256:..." or "git-sha1:...")

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "output": str(self.output)}


def _api(endpoint: str | None, token: str | bool | None):  # type: ignore[no-untyped-def]
    from huggingface_hub import HfApi

    url = endpoint or os.environ.get("HF_ENDPOINT") or None
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            where = "--endpoint" if endpoint else "HF_ENDPOINT"
            raise HubError(f"{where} {url!r} is not an http(s) URL", fix="give one like https://huggingface.co")
    return HfApi(endpoint=url, token=token)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Map huggingface_hub's exceptions onto loratool messages that say what to do."""
    from huggingface_hub import errors as e

    rev = revision or "main"
    try:
        yield
    except e.HFValidationError as err:
        raise HubError(
            f"{repo_id!r} is not a valid repo id ({_first_line(err)})",
            fix="use namespace/name: letters, digits, '-', '_' and '.', at most 96 characters",
        ) from None
    except e.RevisionNotFoundError:
        raise HubError(f"revision '{rev}' not found in {repo_id}", fix="check the branch, tag or commit id") from None
    except e.GatedRepoError:
        raise HubError(f"{repo_id} is gated", fix="accept its conditions on the Hub page, then retry") from None
    except e.RepositoryNotFoundError as err:
        if _status(err) in (401, 403):
            raise _token_error(repo_id) from None
        raise HubError(
            f"repository {repo_id} not found (or it is private and your token cannot see it)",
            fix="check the repo id; for a private repo set HF_TOKEN or run `hf auth login`",
        ) from None
    except e.RemoteEntryNotFoundError:
        raise HubError(f"{repo_id}@{rev} holds no {CONFIG_NAME}", fix="is it a PEFT adapter repo?") from None
    except e.LocalEntryNotFoundError:
        raise HubError(
            f"{repo_id}@{rev} is not in the local cache and the Hub cannot be reached (offline mode?)",
            fix="pull once while online, pin a commit id, or unset HF_HUB_OFFLINE",
        ) from None
    except e.OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set, and this needs the Hub", fix="unset HF_HUB_OFFLINE") from None
    except e.HfHubHTTPError as err:
        status = _status(err)
        if status in (401, 403):
            raise _token_error(repo_id) from None
        if status == 429:
            raise HubError("the Hub is rate-limiting these requests", fix="wait a minute and retry") from None
        if status is not None and status >= 500:
            raise HubError(f"the Hub answered {status} (a server error)", fix="retry later") from None
        raise HubError(f"the Hub refused the request ({status}): {_first_line(err)}") from None
    except (ValueError, KeyError, TypeError) as err:  # a JSON answer that is not JSON, or lacks what it must hold
        if isinstance(err, LoraToolError):
            raise
        raise HubError(
            f"the Hub's answer is not the JSON it should be ({type(err).__name__}: {_first_line(err)})",
            fix="check that --endpoint or HF_ENDPOINT is a Hugging Face Hub (a proxy or another server answers "
            "otherwise), then retry",
        ) from None  # fmt: skip
    except Exception as err:
        if isinstance(err, LoraToolError) or not _is_network_error(err):
            raise
        if type(err).__name__ in _BROKEN_OFF:
            raise HubError(
                f"the Hub's answer broke off before its end ({type(err).__name__}: {_first_line(err)})",
                fix="retry; if it happens again, check for a proxy between you and the Hub",
            ) from None
        raise HubError(
            f"cannot reach the Hub ({type(err).__name__}: {_first_line(err)})",
            fix="check the network, and --endpoint or HF_ENDPOINT",
        ) from None


# the transport's names for a body that ended early (httpx, urllib3, requests): the Hub was reached
_BROKEN_OFF = frozenset({"RemoteProtocolError", "IncompleteRead", "ProtocolError", "ChunkedEncodingError",
                         "ContentDecodingError", "ReadError"})  # fmt: skip


def _is_network_error(err: Exception) -> bool:
    """Failures of the transport (the HTTP client huggingface_hub uses, or the OS), not of loratool."""
    transport = ("httpx", "httpcore", "requests", "urllib3")  # httpx2 too: prefixes of the package name
    return isinstance(err, (OSError, ConnectionError)) or type(err).__module__.startswith(transport)


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _token_error(repo_id: str) -> HubError:
    return HubError(
        f"the Hub rejected the token for {repo_id}",
        fix="set HF_TOKEN to a valid token with the needed permission (write, to push), or run `hf auth login`",
    )


def push(
    adapter: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    message: str | None = None,
    create_pr: bool = False,
    base_model_id: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Validate an adapter directory, then upload it with its model card in one commit.

    Args:
        adapter: a PEFT adapter directory.
        repo_id: ``namespace/name`` on the Hub (created if needed).
        revision: a branch to commit to (created from main if needed).
        private: create the repo private.
        message: the commit message.
        create_pr: open a pull request instead of committing to the branch.
        base_model_id: the base model's Hub id for the card (never a local path).
        endpoint: the Hub URL (default: ``HF_ENDPOINT`` or the public Hub).
        token: the token (default: ``HF_TOKEN`` or the stored login).

    Returns:
        A :class:`PushResult` with the commit URL and id; an unchanged re-push makes no commit
        (``changed`` is False and the id is the current head).

    Raises:
        MetadataError: the adapter fails validation (nothing is uploaded).
        HubError: not found, revision not found, bad token, rate limit, network.

    Example:
        >>> loratool.push("adapter/", "me/my-adapter", private=True)
    """
    from huggingface_hub import CommitOperationAdd

    directory = Path(adapter)
    if not directory.is_dir():
        raise LoraToolError("push takes a PEFT adapter directory", path=str(directory))
    check_base_model_id(base_model_id)
    require_valid(directory, "it was not pushed", check_values=True)
    record = decode(header_metadata(directory / WEIGHTS_NAME))
    card = render_card(read_config(directory), record, base_model_id=base_model_id)
    ops = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name))
        for name in (CONFIG_NAME, WEIGHTS_NAME)
    ]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api = _api(endpoint, token)
    with _hub_errors(repo_id, revision):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head = api.repo_info(repo_id, revision=revision).sha
        info = api.create_commit(
            repo_id,
            operations=ops,
            commit_message=message or f"Upload LoRA adapter with loratool ({len(ops)} files)",
            revision=revision,
            create_pr=create_pr,
        )
    return PushResult(
        repo_id=repo_id,
        commit_url=info.commit_url,
        commit_id=info.oid,
        revision=revision or "main",
        pull_request_url=info.pr_url,
        uploaded=[op.path_in_repo for op in ops],
        changed=info.oid != head,
    )


def _offline() -> bool:
    """Whether huggingface_hub is told to stay offline (its constant, or the variable set since import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _remember_ref(repo_id: str, revision: str, commit: str) -> None:
    """Record in huggingface_hub's cache that ``revision`` (a branch or tag) was ``commit``, as its own
    downloads do (``refs/<revision>``): pull downloads by commit, and an offline pull of the branch
    later reads this."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if revision == commit:
        return
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    with contextlib.suppress(OSError):  # a cache we cannot write only costs the offline use
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """huggingface_hub's download bars, off for the call when not ``show`` (then back as they were)."""
    from huggingface_hub.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    if not show and not was_off:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_off:
            enable_progress_bars()


def pull(
    repo_id: str,
    *,
    output: str | os.PathLike[str],
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> PullResult:
    """Download an adapter's files at ``revision`` into ``output``, verified and validated.

    Every file is checked against the digest the Hub lists for it (sha256 for LFS files, the git
    blob sha1 for small ones); offline (``HF_HUB_OFFLINE=1``) against the digests the cache
    recorded when it downloaded them. Nothing appears at ``output`` unless every check passes.

    Example:
        >>> loratool.pull("me/my-adapter", output="adapter/", revision="v1.0")
    """
    from huggingface_hub import snapshot_download

    out = check_output(output, force=force)
    api = _api(endpoint, token)
    offline = _offline()
    with _hub_errors(repo_id, revision):
        expected: dict[str, tuple[str, str]] = {}
        if not offline:
            commit = api.repo_info(repo_id, revision=revision).sha
            entries = api.list_repo_tree(repo_id, revision=commit, recursive=True)
            for entry in entries:
                if getattr(entry, "lfs", None) is not None:
                    expected[entry.path] = ("sha256", entry.lfs.sha256)
                elif hasattr(entry, "blob_id"):
                    expected[entry.path] = ("git-sha1", entry.blob_id)
            if CONFIG_NAME not in expected:
                raise HubError(
                    f"{repo_id}@{revision or 'main'} holds no {CONFIG_NAME}", fix="is it a PEFT adapter repo?"
                )
            revision_arg = commit
        else:
            revision_arg = revision
        with _progress_bars(show_progress):
            snapshot = Path(
                snapshot_download(
                    repo_id, revision=revision_arg, allow_patterns=list(ADAPTER_FILES), endpoint=api.endpoint,
                    token=token,
                )
            )  # fmt: skip
    commit_id = snapshot.name
    if not offline:
        _remember_ref(repo_id, revision or "main", commit_id)
    verified = {}
    for name in ADAPTER_FILES:
        local = snapshot / name
        if not local.exists():
            if name == "README.md":
                continue
            raise HubError(f"{repo_id}@{revision or 'main'} holds no {name}", fix="is it a PEFT adapter repo?")
        algo, digest = expected.get(name) or _cached_digest(local)
        actual = _digest(local, algo)
        if actual != digest:
            _evict(local)
            raise ChecksumError(
                f"{name} does not match the {algo} the Hub lists (expected {digest[:16]}..., got {actual[:16]}...)",
                fix="the download was corrupted; it was removed from the cache: pull again",
            )
        verified[name] = f"{algo}:{digest}"
    with atomic_output(out, force=force, directory=True) as tmp:
        for name in verified:
            shutil.copyfile(snapshot / name, tmp / name)
        report = validate_adapter(tmp)
        if not report.valid:
            raise MetadataError(
                "the pulled adapter is not valid: " + "; ".join(str(p) for p in report.problems),
                problems=[(p.path, p.message) for p in report.problems],
            )
    return PullResult(repo_id, out, revision or "main", commit_id, verified)


def _digest(path: Path, algo: str) -> str:
    if algo == "sha256":
        h = hashlib.sha256()
    else:  # git's blob id: sha1 over "blob <size>\0" and the content
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _cached_digest(local: Path) -> tuple[str, str]:
    """Offline: the cache names each blob by the etag it was served with (sha256 or git sha1)."""
    blob = local.resolve().name
    return ("sha256", blob) if len(blob) == 64 else ("git-sha1", blob)


def _evict(local: Path) -> None:
    with contextlib.suppress(OSError):
        target = local.resolve()
        local.unlink()
        target.unlink()


def list_hub_adapters(
    *,
    owner: str | None = None,
    base_model: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """PEFT adapters on the Hub, through its model listing: by ``owner`` and/or for ``base_model``
    (the Hub tags an adapter ``base_model:adapter:<id>`` from its card's ``base_model``).

    Example:
        >>> loratool.list_hub_adapters(base_model="meta-llama/Llama-3.2-1B")
    """
    if _offline():  # there is no cache of a listing: say so at once, not after the client's retries
        raise HubError("HF_HUB_OFFLINE is set, and listing the Hub's adapters needs the Hub",
                       fix="unset HF_HUB_OFFLINE, or list the local registry (loratool registry ls)")  # fmt: skip
    filters = ["peft", *([f"base_model:adapter:{base_model}"] if base_model else [])]
    api = _api(endpoint, token)
    with _hub_errors(owner or base_model or "models", None):
        models = list(api.list_models(author=owner, filter=filters, limit=limit))
    return [
        {"id": m.id, "sha": m.sha, "last_modified": str(m.last_modified) if m.last_modified else None,
         "tags": sorted(m.tags or [])}
        for m in models
    ]  # fmt: skip
