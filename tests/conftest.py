"""Shared fixtures: tiny checkpoints made on the spot, the shipped fixtures, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def cli():
    """Run ``loratool ARGS...`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from loratool.cli import cli as group

    runner = CliRunner()

    def run(*args: object):
        return runner.invoke(group, [str(a) for a in args], catch_exceptions=False)

    return run
