"""``loratool validate``: an adapter's metadata against ``schemas/``, and its structure against its tensors."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import LoraToolError, Refusal
from ..formats import load_adapter
from ..io.checkpoint import open_checkpoint
from ..runtimes.checks import Runtime, runtime_refusals
from ..validation import Problem, ValidationReport, check_against_base, validate_adapter


def validate(
    adapter: str | os.PathLike[str],
    *,
    check_values: bool = True,
    base: str | os.PathLike[str] | None = None,
    runtimes: Sequence[Runtime] = (),
) -> ValidationReport:
    """Validate an adapter's metadata and structure.

    Reports every problem at once, sorted, each with a path (``$.r`` in the config,
    ``tensors/<key>`` for a tensor, ``header/loratool...`` for the provenance record) and a plain
    message. Tensors are read one at a time, so a large adapter is never loaded whole.

    Args:
        adapter: a PEFT or mlx-lm adapter directory, or a kohya ``.safetensors`` file.
        check_values: also read every tensor to check it is finite and matches the recorded digest.
        base: also check that the adapter fits this checkpoint: every module names one of its
            weights with fitting shapes (an adapter that matches nothing, or only part, is invalid).
        runtimes: also check what each runtime (``vllm``, ``llama.cpp``, ``mlx``, ``peft``) can
            serve; each problem (``runtime/<name>/<where>``) names its fix, and notes (warnings)
            say what to run before serving.

    Returns:
        A :class:`~loratool.validation.ValidationReport`; it never raises for an invalid adapter
        (``valid`` says).

    Example:
        >>> report = loratool.validate("adapter/")
        >>> report.valid, [str(p) for p in report.problems]
    """
    report = validate_adapter(adapter, check_values=check_values)
    readable = report.valid
    if base is not None and readable:
        check_against_base(adapter, base, report)
    if runtimes and readable:
        _check_runtimes(adapter, base, runtimes, report)
    report.problems.sort(key=lambda p: (p.path, p.message))
    return report


def _check_runtimes(
    adapter: str | os.PathLike[str], base: str | os.PathLike[str] | None, runtimes: Sequence[Runtime],
    report: ValidationReport,
) -> None:  # fmt: skip
    a = load_adapter(adapter, lazy=True)
    config = None
    if base is not None:
        with open_checkpoint(base) as ck:
            config = ck.config()
    for runtime in runtimes:
        try:
            problems, notes = runtime_refusals(
                a, runtime, source=str(adapter), base=None if base is None else str(base), base_config=config
            )
        except LoraToolError as e:  # e.g. the gguf package is missing for llama.cpp's names
            problems, notes = [Refusal("check", e.message, e.fix or "")], []
        for p in problems:
            report.add(f"runtime/{runtime}/{p.where}", f"{p.message}; fix: {p.fix}")
        report.warnings += [Problem(f"runtime/{runtime}", n.split(": ", 1)[1]) for n in notes]
