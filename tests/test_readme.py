"""The README's promises: its test command is what CI runs, and `--help` is instant and complete."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
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
    code = (
        "import sys; from loratool.cli import cli; "
        "cli(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
    for command in ("extract", "merge", "unmerge", "inspect"):
        assert command in out


def test_usage_error_exits_2(cli) -> None:
    r = cli("extract", "only-one-arg")
    assert r.exit_code == 2


@pytest.mark.slow
def test_the_main_jobs_need_no_numpy(tmp_path, fixtures) -> None:
    """A fresh install has no numpy (torch does not require it): extract, merge, validate without it."""
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from loratool.cli import main\n"
        "for args in ({cmds}):\n"
        "    sys.argv = ['loratool', *args]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (args, e.code)\n"
    )
    out = tmp_path / "adapter"
    cmds = [
        ["extract", str(fixtures / "llama-base"), str(fixtures / "llama-ft"), "-r", "2", "-o", str(out), "-q"],
        ["merge", str(fixtures / "llama-ft"), str(out), "-o", str(tmp_path / "merged"), "-q"],
        ["validate", str(out)],
        ["resize", str(out), "-r", "1", "--format", "kohya", "-o", str(tmp_path / "k.safetensors"), "-q"],
    ]
    r = subprocess.run([sys.executable, "-c", code.format(cmds=repr(cmds))], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file() and (tmp_path / "k.safetensors").is_file()
