"""The one error hierarchy of loratool.

Every failure a user can cause is a :class:`LoraToolError`. Each subclass also derives from the
matching built-in exception, so ``except ValueError`` keeps working for callers who do not know
loratool. The CLI turns any of them into exit code 1 and prints ``str(error)``, which always names
the file or tensor, what was expected, what arrived, and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LoraToolError(Exception):
    """Root of every error loratool raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        expected: Any = None,
        got: Any = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.key = key
        self.expected = expected
        self.got = got
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        if self.key:
            parts.append(f"tensor '{self.key}': ")
        parts.append(self.message)
        if self.expected is not None or self.got is not None:
            parts.append(f" (expected {self.expected}, got {self.got})")
        if self.fix:
            command = self.fix.startswith(("loratool ", "--", "-"))  # a command or an option, spelled as typed
            parts.append(f". {self.fix if command else self.fix[:1].upper() + self.fix[1:]}")
        return "".join(parts)

    def __str__(self) -> str:  # KeyError-style subclasses would otherwise quote the message
        return self._render()


class InputFileError(LoraToolError, ValueError):
    """An input file is missing, unreadable, corrupt, truncated, or of a refused kind (pickle)."""


class MissingInputError(InputFileError, FileNotFoundError):
    """An input path does not exist."""


class ShapeMismatchError(LoraToolError, ValueError):
    """Two tensors that must agree in shape do not (base vs fine-tune, adapter vs base)."""


class MissingKeyError(LoraToolError, LookupError):
    """A tensor or module that must be present is absent (or one that must not be is present)."""


class NonFiniteError(LoraToolError, ValueError):
    """A tensor holds NaN or Inf where a finite value is required."""


class UnsupportedAdapterError(LoraToolError, ValueError):
    """The adapter is valid, but the asked operation cannot be done correctly on it (DoRA, PiSSA...)."""


class UnsupportedCheckpointError(LoraToolError, ValueError):
    """The checkpoint is valid, but loratool cannot operate on it correctly (e.g. quantized weights)."""


class AdapterLostError(LoraToolError, ValueError):
    """A merge into a quantized base would carry less of the adapter than the caller asked for
    (``min_kept``); nothing was written."""


class RoundTripError(LoraToolError, ValueError):
    """An unmerge's restored weights lie further from the original base than the caller allows
    (``max_units``); nothing was written."""


class OutputExistsError(LoraToolError, FileExistsError):
    """The output path exists and ``force`` was not given."""


class OutputLocationError(LoraToolError, OSError):
    """The output's location cannot be created or written (read-only, a file where a folder is needed)."""


class MetadataError(LoraToolError, ValueError):
    """Adapter metadata fails its schema or disagrees with the tensors.

    ``problems`` lists every finding as ``(json_path, message)`` pairs, sorted.
    """

    def __init__(self, message: str, *, problems: list[tuple[str, str]] | None = None, **kw: Any) -> None:
        self.problems = problems or []
        super().__init__(message, **kw)


class HubError(LoraToolError, RuntimeError):
    """A Hugging Face Hub request failed; the message says why and what to do."""


class ChecksumError(HubError):
    """A downloaded file does not match the sha256 the Hub lists for it."""


@dataclass(frozen=True)
class Refusal:
    """One thing a target (a file format, a runtime) cannot take, and what to do about it; for
    reports that list every one rather than raising at the first."""

    where: str
    message: str
    fix: str

    def error(self, path: str | None, more: int = 0) -> UnsupportedAdapterError:
        tail = f" (and {more} more)" if more else ""
        return UnsupportedAdapterError(f"{self.where}: {self.message}{tail}", path=path, fix=self.fix)
