"""Shared fixtures: tiny checkpoints made on the spot, the shipped fixtures, a CLI runner."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

# huggingface_hub reads these once, at import: set them before anything imports it. Caches and
# tokens live in a temporary HF_HOME; the only Hub the tests talk to is tests/hub_server.py.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="loratool-test-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HF_ENDPOINT", None)
os.environ["HF_TOKEN"] = "hf_test_token_do_not_print"
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the test Hub speaks plain LFS, not Xet
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the adapter registry of a test run lives in a temporary directory too (each test gets its own below)
os.environ["LORATOOL_HOME"] = tempfile.mkdtemp(prefix="loratool-test-home-")
atexit.register(shutil.rmtree, os.environ["LORATOOL_HOME"], ignore_errors=True)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def registry_home(tmp_path_factory, monkeypatch) -> Path:
    """A registry of its own for every test: no test sees another's entries, none touches ~/.cache."""
    home = tmp_path_factory.mktemp("registry")
    monkeypatch.setenv("LORATOOL_HOME", str(home))
    return home


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def cli():
    """Run ``loratool ARGS...`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from loratool.cli import cli as group

    runner = CliRunner()

    def run(*args: object):
        return runner.invoke(group, [str(a) for a in args], catch_exceptions=False, prog_name="loratool")

    return run
