"""The README's promises: its test command is what CI runs, and `--help` is instant and complete."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install .*?)\n```", readme)
    assert len(commands) == 2, commands
    install_and_run, test = commands
    assert "loratool extract fixtures/" in install_and_run
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_help_lists_every_command_without_importing_torch() -> None:
    code = "import sys; from loratool.cli import cli; cli(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
    for command in ("extract", "merge", "unmerge", "inspect"):
        assert command in out


def test_usage_error_exits_2(cli) -> None:
    r = cli("extract", "only-one-arg")
    assert r.exit_code == 2
