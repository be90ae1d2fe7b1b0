"""The command line's contract: usage errors exit 2 with click's usage text, failed operations exit 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES
from helpers import SYMBOLIC_SHAPES, main_in_a_process

BASE = FIXTURES / "llama-base"
FT = FIXTURES / "llama-ft"
ADAPTER = FIXTURES / "llama-peft-adapter"

USAGE_ERRORS = [
    (["extract", BASE, FT, "--energy", "0.9", "--budget", "100"], "--energy and --budget"),
    (["extract", BASE, FT, "--energy", "1.5"], "--energy"),
    (["extract", BASE, FT, "--include", "(unclosed"], "not a valid regular expression"),
    (["extract", BASE, FT, "--exclude", "*"], "not a valid regular expression"),
    (["extract", BASE, FT, "--keep-full", "[a-"], "not a valid regular expression"),
    (["extract", BASE, FT, "-r", "0"], "--rank"),
    (["merge", BASE, ADAPTER, "--dtype", "int8"], "not an output dtype"),
    (["merge", BASE, ADAPTER, "--device", "tpu"], "not a device"),
    (["merge", BASE, f"{ADAPTER}:nan"], "give a finite number"),
    (["unmerge", BASE, f"{ADAPTER}:inf"], "give a finite number"),
    (["combine", f"{ADAPTER}:-inf", ADAPTER], "give a finite number"),
    (["combine", ADAPTER, ADAPTER, "-r", "4"], "apply to --method svd"),
    (["combine", ADAPTER, ADAPTER, "--method", "linear", "--energy", "0.5"], "apply to --method svd"),
    (["combine", ADAPTER, "--method", "ties"], "needs --density"),
    (["combine", ADAPTER, "--method", "bogus"], "--method"),
    (["combine", ADAPTER, "--density", "0.5"], "--density applies to TIES"),
    (["combine", ADAPTER, ADAPTER, "--method", "ties", "--density", "0.5", "-r", "2"], "apply to --method svd"),
    (["combine", ADAPTER, ADAPTER, "--method", "ties", "--density", "0.5", "--svd-clamp", "0.9"], "--svd-clamp"),
    (["combine", ADAPTER, ADAPTER, "--method", "ties_svd", "--density", "1.5"], "--density"),
    (["resize", ADAPTER], "resize needs -r/--rank or --energy"),
    (["extract", BASE], "Missing argument"),
]


@pytest.mark.parametrize(
    ("args", "phrase"), USAGE_ERRORS, ids=lambda v: " ".join(map(str, v))[:60] if isinstance(v, list) else None
)
def test_usage_errors_exit_2_and_write_nothing(cli, tmp_path: Path, args: list[object], phrase: str) -> None:
    out = tmp_path / "out"
    r = cli(*args, "-o", out)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("Usage: loratool") and phrase in r.stderr
    assert not out.exists()


OPERATION_FAILURES = [
    (["extract", BASE, FIXTURES / "gpt2-ft"], "lacks this tensor"),
    (["merge", FIXTURES / "gpt2-base", ADAPTER], "the base has no matching"),
    (["merge", BASE, "no-such-adapter/"], "no such adapter"),
    (["inspect", "no-such-path"], "no such file"),
    # a kohya or diffusers adapter is one .safetensors file: 'out' was written and then not read as an adapter
    (["extract", BASE, FT, "--format", "kohya"], "does not end in .safetensors"),
    (["extract", BASE, FT, "--format", "diffusers"], "does not end in .safetensors"),
    (["convert", ADAPTER, "--to", "kohya"], "does not end in .safetensors"),
    (["combine", ADAPTER, ADAPTER, "--format", "kohya"], "does not end in .safetensors"),
    (["resize", ADAPTER, "-r", "2", "--format", "kohya"], "does not end in .safetensors"),
]


@pytest.mark.parametrize(
    ("args", "phrase"), OPERATION_FAILURES, ids=lambda v: str(v[0]) if isinstance(v, list) else None
)
def test_failed_operations_exit_1_with_the_cause(cli, tmp_path: Path, args: list[object], phrase: str) -> None:
    out = tmp_path / "out"
    extra = [] if args[0] == "inspect" else ["-o", out]
    r = cli(*args, *extra)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: ") and phrase in r.stderr and "Usage:" not in r.stderr
    assert not out.exists()


def test_validate_reports_through_the_emitter(cli, tmp_path: Path) -> None:
    r = cli("validate", ADAPTER)
    assert r.exit_code == 0 and r.stdout.startswith("valid: ")
    r = cli("validate", tmp_path / "nope", "--json")
    assert r.exit_code == 1 and '"valid": false' in r.stdout


def test_the_cli_lists_every_combine_method() -> None:
    from loratool.cli.combine import COMBINE_METHODS
    from loratool.ops.combine import METHODS

    assert COMBINE_METHODS == METHODS  # spelled twice so that --help needs no torch: kept equal here


def test_shared_options_say_what_they_do_in_each_command(cli) -> None:
    """#31 item 16: extract -r talked about combine and resize; analyze --energy about a -r it lacks."""
    import re

    def option_help(command: str, flag: str) -> str:
        text = cli(command, "--help").output
        text = text[text.index("Options:") :]  # not the examples above
        block = text[text.index(flag) :]
        return " ".join(re.split(r"\n  -", block)[0].split())

    assert "combine" not in option_help("extract", "-r, --rank") and "resize" not in option_help(
        "extract", "-r, --rank"
    )
    assert "-r" not in option_help("analyze", "--energy")
    assert "svd" in option_help("combine", "-r, --rank") and "new rank" in option_help("resize", "-r, --rank")


COMMANDS = [["extract"], ["merge"], ["unmerge"], ["combine"], ["resize"], ["convert"], ["inspect"], ["validate"],
            ["analyze"], ["push"], ["pull"], *[["registry", c] for c in ("add", "ls", "show", "alias", "rm", "gc",
                                                                        "verify")]]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_each_command_help_has_an_example_and_speaks_of_its_own_options(cli, command: list[str]) -> None:
    """#34 item 5: --seed said "extract: the randomized SVD; combine: DARE's masks" wherever it appeared."""
    from loratool.cli import cli as group

    text = cli(*command, "--help").output
    assert "Example" in text, f"loratool {' '.join(command)} --help shows no example"
    options = text[text.index("Options:") :]
    names = set(group.commands) | {"unmerge"}
    for other in names - {command[-1]}:
        assert f"({other}:" not in options and f"; {other}:" not in options, f"{command}: speaks for {other}"
    if "-r, --rank" not in options:
        assert not re.search(r"(?<![\w-])-r\b", options), f"{command}: mentions a -r it does not have"


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["merge", "a", "b", "-o", "c"], True), (["extract", "-h"], False), (["registry", "ls"], False),
     (["registry", "add", "a"], True), (["registry", "verify"], False), (["registry"], False), (["--version"], False),
     ([], False), (["inspect", "x", "--help"], False), (["inspect", str(FIXTURES / "llama-base"), "--json"], False),
     (["inspect", "--json", str(FIXTURES / "llama-peft-adapter")], True),
     (["inspect", str(FIXTURES / "llama-kohya.safetensors")], True), (["inspect", "missing/"], False)],
)  # fmt: skip
def test_torch_is_imported_up_front_only_for_commands_that_use_it(args: list[str], expected: bool) -> None:
    from loratool.cli.startup import needs_torch

    assert needs_torch(args) is expected


def _in_a_process(code: str) -> str:
    """Run ``code`` in a fresh interpreter (freezing the collector here would last the whole test run)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_torch_is_imported_with_the_collector_paused_then_frozen() -> None:
    """bench/bench_startup.py: the collector's passes over torch's objects were a quarter to a third of a
    short command's process. The collector comes back as it was; a torch that fails to import is left to
    the command to report."""
    code = (
        "import gc, sys; from loratool.cli import startup\n"
        "paused = []; gc.callbacks.append(lambda phase, info: paused.append(phase))\n"
        "startup.import_torch_frozen()\n"
        "print('torch' in sys.modules, gc.isenabled(), gc.get_freeze_count() > 100_000, paused == [])\n"
    )
    assert _in_a_process(code).split() == ["True", "True", "True", "True"]
    code = (
        "import gc; from loratool.cli import startup\n"
        "gc.disable(); startup.import_torch_frozen(); print(gc.isenabled())"
    )
    assert _in_a_process(code).split() == ["False"]
    code = (
        "import gc, sys; sys.modules['torch'] = None; from loratool.cli import startup\n"
        "startup.import_torch_frozen(); print(gc.isenabled())"
    )
    assert _in_a_process(code).split() == ["True"]


def test_main_freezes_what_the_command_made_before_exit(tmp_path: Path) -> None:
    out = main_in_a_process(
        ["merge", BASE, ADAPTER, "-o", tmp_path / "out", "-q"],
        then="import gc; print(gc.isenabled(), gc.get_freeze_count() > 100_000, len(gc.get_objects()))",
    )
    enabled, frozen, unfrozen = out.splitlines()[-1].split()
    assert (enabled, frozen) == ("True", "True") and int(unfrozen) < 1_000, unfrozen  # about 7,500 made after torch
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_the_everyday_commands_cost_torch_no_symbolic_shapes(tmp_path: Path) -> None:
    """Reading adapters for their headers (meta tensors), merging, extracting: none of it makes torch import
    its symbolic shapes (sympy, 0.3 s or more), which some operations on meta tensors set off (tests/helpers.py)."""
    kohya = ADAPTER.parent / "llama-kohya.safetensors"
    out = main_in_a_process(["validate", ADAPTER, "--base", BASE, "--runtime", "peft", "--runtime", "mlx"],
                            ["inspect", ADAPTER], ["validate", kohya, "--base", BASE], ["inspect", kohya],
                            ["merge", BASE, ADAPTER, "-o", tmp_path / "m", "-q"],
                            ["extract", BASE, ADAPTER.parent / "llama-ft", "-r", "4", "-o", tmp_path / "e", "-q"],
                            then=SYMBOLIC_SHAPES)  # fmt: skip
    assert "symbolic shapes: False" in out, out


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path: Path) -> None:
    """`loratool ... | head`: the pipe's reader gone before the output is written is exit 1 and nothing on stderr;
    it was 'error: Broken pipe' (and could be a traceback at the interpreter's last flush)."""
    env = {**os.environ, "LORATOOL_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "loratool", "registry", "ls", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()  # before the child, which takes a while to start, writes a byte
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err == b"", err
