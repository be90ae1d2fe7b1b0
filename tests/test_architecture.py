"""The package's layout rules, read from the source with ``ast`` (docs/architecture.md explains them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "loratool"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(loratool modules, outside top-level packages) that ``path`` imports, lazily or not."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (inside if alias.name.split(".")[0] == "loratool" else outside).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "loratool":
                outside.add(target)
                continue
            for alias in node.names:  # ``from x import y`` imports module x.y when y is one
                sub = f"{target}.{alias.name}"
                inside.add(sub if _exists(sub) else target)
    return {m for m in inside if m != name}, {m.split(".")[0] for m in outside}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_graph_was_read() -> None:
    assert "loratool.ops.merge.stream" in GRAPH and "loratool.math.linalg" in GRAPH["loratool.ops.merge.stream"][0]
    assert "loratool.io.checkpoint" in GRAPH["loratool.formats.peft"][0]


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH.get(m, (set(), set()))[0]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(n) :], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in GRAPH:
        if m not in state and m != "loratool":  # the package's lazy __getattr__ hands out everything
            visit(m, [m])


def test_no_operation_imports_another() -> None:
    """ops/ holds one module (or package, for the largest) per command; the parts of one command may
    import each other, and nothing in ops/ imports another command."""
    for m, (inside, _) in GRAPH.items():
        if m.startswith("loratool.ops."):
            command = m.split(".")[2]
            others = {n for n in inside if n.startswith("loratool.ops") and n.split(".")[2:3] != [command]}
            assert not others, f"{m} imports {sorted(others)}: move the shared part out of ops/"


def test_the_adapter_model_depends_on_errors_only() -> None:
    assert GRAPH["loratool.adapter"][0] <= {"loratool.errors"}


@pytest.mark.parametrize(
    ("library", "home"),
    [("safetensors", "loratool.io."), ("huggingface_hub", "loratool.ops.hub"),
     ("jsonschema", "loratool.metadata.schema"), ("click", "loratool.cli"), ("tqdm", "loratool.host"),
     ("matplotlib", "loratool.analysis.plots"), ("gguf", "loratool.runtimes.gguf")],
)  # fmt: skip
def test_each_outside_library_enters_through_one_module(library: str, home: str) -> None:
    users = {m for m, (_, outside) in GRAPH.items() if library in outside}
    assert users and all(m.startswith(home) for m in users), f"{library} is imported by {sorted(users)}"


QUANT_MAY_USE = {"loratool.errors", "loratool.math.linalg", "loratool.host", "loratool._version"}


def test_quantization_is_one_package_below_the_operations() -> None:
    """loratool.quant (layouts, one module per scheme, rounding rules, kernels) uses the math and
    nothing that reads files or runs a command, and the FP8 layout types live nowhere else."""
    quant = {m for m in GRAPH if m.startswith("loratool.quant")}
    assert {"loratool.quant.layout", "loratool.quant.fp8", "loratool.quant.rounding", "loratool.quant.native"} <= quant
    for m in quant:
        outside = {n for n in GRAPH[m][0] if not n.startswith("loratool.quant")}
        assert outside <= QUANT_MAY_USE, f"{m} imports {sorted(outside - QUANT_MAY_USE)}"
    for m in GRAPH:
        source = (PACKAGE.parent / Path(*m.split("."))).with_suffix(".py")
        if m.startswith("loratool.quant") or not source.is_file():
            continue
        text = source.read_text()
        assert "class Fp8" not in text and "def quantize_" not in text, f"{m} defines quantization outside quant/"


ROOT_MODULES = {"__init__", "__main__", "_version", "errors", "adapter", "arch", "experts", "host", "report",
                "validation"}  # fmt: skip
PACKAGES = {"analysis", "cli", "formats", "io", "math", "metadata", "ops", "quant", "registry", "runtimes", "stream"}


def test_the_package_root_holds_the_model_and_the_packages() -> None:
    """The folder listing is the architecture (docs/architecture.md): the adapter model and what every
    layer shares sit at the root; everything else lives in the package of its concern. A new module
    goes into one of them, or the listing and the docs change together."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules == ROOT_MODULES, f"new at the root: {sorted(modules - ROOT_MODULES)}"
    assert packages == PACKAGES, f"packages changed: {sorted(packages ^ PACKAGES)}"
    documented = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [name for name in sorted((ROOT_MODULES - {"__init__", "__main__", "_version"}) | PACKAGES)
               if f"{name}/" not in documented and f"{name}.py" not in documented]  # fmt: skip
    assert not missing, f"docs/architecture.md does not describe {missing}"
