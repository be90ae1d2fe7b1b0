"""The README's promises: its test command is what CI runs, and `--help` is instant and complete."""

from __future__ import annotations

import os
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


def test_the_python_api_says_nothing_of_numpy_without_it(tmp_path, fixtures) -> None:
    """torch warns at import when numpy is absent; the CLI silenced it, the Python API printed it."""
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import loratool\n"
        f"loratool.extract({str(fixtures / 'llama-base')!r}, {str(fixtures / 'llama-ft')!r}, "
        f"output={str(tmp_path / 'a')!r}, rank=2, show_progress=False)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NumPy" not in r.stderr and (tmp_path / "a" / "adapter_model.safetensors").is_file()


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


def tour() -> tuple[list[str], list[str]]:
    """The bash lines and Python blocks of the README's tour, in order."""
    readme = (ROOT / "README.md").read_text()
    text = readme[readme.index("## A tour") : readme.index("## Exit codes")]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S)
    lines = [line for kind, body in blocks if kind == "bash" for line in body.splitlines() if line.strip()]
    return lines, [body for kind, body in blocks if kind == "python"]


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path, monkeypatch, cli) -> None:
    """Every command and code block of the tour, in order, from a folder holding the fixtures as the
    repository does; push and pull against the local test Hub."""
    import shlex

    from hub_server import HubServer

    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    hub = HubServer(os.environ["HF_TOKEN"]).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        lines, code = tour()
        assert len(lines) >= 20 and code
        for line in lines:
            args = shlex.split(line, comments=True)
            assert args[0] == "loratool", line
            result = cli(*args[1:], "-q") if "-o" in args and "registry" not in args else cli(*args[1:])
            assert result.exit_code == 0, f"{line}\n{result.output}"
        names: dict[str, object] = {}  # one session: a block goes on from the one before
        for block in code:
            exec(compile(block, "README.md", "exec"), names)  # noqa: S102  (the README's own code)
    finally:
        hub.shutdown()
    assert (tmp_path / "merged-prod" / "model.safetensors").exists() and (tmp_path / "pulled").is_dir()


FIGURE = re.compile(r"(?<![\w.-])\d+\.\d+(?:e[+-]\d+)?x?(?![\w.])|(?<![\w.])\d+x(?!\w)")


def test_every_figure_the_readme_quotes_is_one_the_benchmarks_print() -> None:
    """#34: a figure in the README comes from a section of docs/benchmarks.md, which a bench script
    wrote. Code (fenced or inline) holds commands and settings, not measurements, and is skipped."""
    readme = (ROOT / "README.md").read_text()
    prose = re.sub(r"```.*?```", "", readme, flags=re.S)
    prose = re.sub(r"`[^`]*`", "", prose)
    figures = set(FIGURE.findall(prose))
    assert {"0.891", "6.5x", "63.3x"} <= figures  # the comparison table was read
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    missing = sorted(f for f in figures if f not in benchmarks)
    assert not missing, f"README figures no bench section prints: {missing}"
