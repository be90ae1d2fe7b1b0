"""Build hook: compile ``loratool/quant/csrc``'s ``fp8.c`` and ``lowbit.c`` (the FP8 and packed low-bit
kernels) into one library, ``loratool/quant/_fp8kernel.*``, when a C compiler is present.

The library is plain C loaded with ctypes (no Python headers: any C compiler that makes a shared
library will do). Without a compiler, or with ``LORATOOL_BUILD_NATIVE=0``, the wheel is pure Python
and loratool runs the same arithmetic as torch passes (slower FP8 merges, the same bytes).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCES = ("loratool/quant/csrc/fp8.c", "loratool/quant/csrc/lowbit.c")  # one library
PACKAGE_DIR = "loratool/quant"  # the library lies beside loratool/quant/native.py, which loads it
# -ffp-contract=off: no fused multiply-add (torch rounds twice). Never -ffast-math: the kernels'
# rounding must be IEEE's. The AVX2 and F16C paths are chosen at run time, so no -march.
FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-trapping-math"]


def library_name() -> str:
    return "_fp8kernel" + {"win32": ".dll", "darwin": ".dylib"}.get(sys.platform, ".so")


def compilers() -> list[list[str]]:
    """$CC if set, else whichever of cc, gcc, clang is on PATH."""
    if os.environ.get("CC"):
        return [shlex.split(os.environ["CC"])]
    return [[found] for name in ("cc", "gcc", "clang") if (found := shutil.which(name))]


def compile_library(root: Path, out: Path) -> str | None:
    """Compile the kernels to ``out``; None on success, else why not."""
    errors = []
    for cc in compilers():
        try:
            sources = [str(root / source) for source in SOURCES]
            run = subprocess.run([*cc, *FLAGS, "-o", str(out), *sources], capture_output=True, text=True)
        except OSError as e:  # $CC names no program
            errors.append(f"{' '.join(cc)}: {e}")
            continue
        if run.returncode == 0:
            return None
        errors.append(f"{' '.join(cc)} exited with {run.returncode}: {run.stderr.strip()[-500:] or 'no message'}")
    return "; ".join(errors) or "no C compiler found (set CC, or install gcc or clang)"


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if version == "editable":  # a library an earlier install left in the tree must not outlive this one
            for folder in ("loratool", PACKAGE_DIR):  # loratool/ held it before quant/ did
                for stale in (Path(self.root) / folder).glob("_fp8kernel.*"):
                    stale.unlink()
        if os.environ.get("LORATOOL_BUILD_NATIVE", "1") == "0":
            return
        self._tmp = tempfile.mkdtemp(prefix="loratool-build-")
        built = Path(self._tmp) / library_name()
        failure = compile_library(Path(self.root), built)
        if failure is not None:
            self.app.display_warning(
                f"loratool: the FP8 kernels were not compiled ({failure}); FP8 merges will use torch's slower passes"
            )
            return
        if version == "editable":  # imported from the source tree: the library goes beside the package
            shutil.copy2(built, Path(self.root) / PACKAGE_DIR / library_name())
        else:
            build_data["force_include"][str(built)] = f"{PACKAGE_DIR}/{library_name()}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if getattr(self, "_tmp", None):
            shutil.rmtree(self._tmp, ignore_errors=True)
