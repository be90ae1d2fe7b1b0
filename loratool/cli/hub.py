"""``loratool push`` and ``loratool pull``: adapters to and from the Hugging Face Hub."""

from __future__ import annotations

from typing import Any

import click

from .app import cli
from .params import (
    ADAPTER_PATH,
    BASE_MODEL_ID,
    ENDPOINT,
    FORCE,
    JSON,
    OUTPUT,
    QUIET,
    REGISTER,
    REVISION,
    emit,
    options,
    record_uses,
    registered,
)


@cli.command()
@click.argument("adapter", type=ADAPTER_PATH)
@click.argument("repo_id")
@REVISION
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@options(BASE_MODEL_ID, ENDPOINT, JSON)
def push(
    adapter: str,
    repo_id: str,
    revision: str | None,
    private: bool,
    message: str | None,
    create_pr: bool,
    base_model_id: str | None,
    endpoint: str | None,
    as_json: bool,
) -> None:
    """Validate ADAPTER and upload it, with a model card, to REPO_ID in one commit.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed. Re-pushing unchanged
    files makes no commit.

    \b
    Examples:
      loratool push adapter/ me/my-adapter --private --base-model-id meta-llama/Llama-3.2-1B
      loratool push adapter/ me/my-adapter --revision v2 -m "rank 32"
    """
    from ..ops.hub import push as run

    result = run(adapter, repo_id, revision=revision, private=private, message=message, create_pr=create_pr,
                 base_model_id=base_model_id, endpoint=endpoint)  # fmt: skip
    record_uses([adapter], "pushed to", f"{repo_id}@{result.revision}", result.commit_id)

    def text(d: dict[str, Any]) -> str:
        if not d["changed"]:
            return f"{d['repo_id']}@{d['revision']} already holds these files: no commit made ({d['commit_id']})"
        where = d["pull_request_url"] or d["commit_url"]
        return f"pushed {', '.join(d['uploaded'])} to {d['repo_id']}@{d['revision']}\ncommit {d['commit_id']}\n{where}"

    emit(result, as_json, text)


@cli.command()
@click.argument("repo_id")
@options(REVISION, ENDPOINT, OUTPUT, REGISTER, FORCE, QUIET, JSON)
def pull(repo_id: str, revision: str | None, endpoint: str | None, output: str, register: str | None, force: bool,
         quiet: bool, as_json: bool) -> None:  # fmt: skip
    """Download the adapter in REPO_ID into -o OUT, checking every file's checksum.

    Works offline from the cache (HF_HUB_OFFLINE=1) for a revision pulled before.

    \b
    Examples:
      loratool pull me/my-adapter -o adapter/
      loratool pull me/my-adapter --revision 0a1b2c... -o adapter/
    """
    from ..ops.hub import pull as run

    result = run(repo_id, output=output, revision=revision, endpoint=endpoint, force=force, show_progress=not quiet)
    emit(
        registered(result, register, event=("pulled", repo_id, result.commit_id)),
        as_json,
        lambda d: f"pulled {d['repo_id']}@{d['commit_id'][:12]} into {d['output']} (checksums verified)",
    )
