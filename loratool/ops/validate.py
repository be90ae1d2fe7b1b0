"""``loratool validate``: an adapter's metadata against ``schemas/``, and its structure against its tensors."""

from __future__ import annotations

import os

from ..validation import ValidationReport, check_against_base, validate_adapter


def validate(
    adapter: str | os.PathLike[str], *, check_values: bool = True, base: str | os.PathLike[str] | None = None
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

    Returns:
        A :class:`~loratool.validation.ValidationReport`; it never raises for an invalid adapter
        (``valid`` says).

    Example:
        >>> report = loratool.validate("adapter/")
        >>> report.valid, [str(p) for p in report.problems]
    """
    report = validate_adapter(adapter, check_values=check_values)
    if base is not None and report.valid:
        check_against_base(adapter, base, report)
        report.problems.sort(key=lambda p: (p.path, p.message))
    return report
