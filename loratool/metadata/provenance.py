"""Provenance: what every file loratool writes says about how it was made.

The record is one JSON string under the ``loratool`` key of the safetensors header: tool version,
operation, parameters, inputs (path as given, size, sha256), creation time, and the per-module
report where there is one. ``schemas/provenance.schema.json`` describes it.

Hashing multi-GB inputs takes seconds, so :class:`InputHasher` does it on a background thread while
the operation computes (``hashlib`` releases the GIL on large updates), and keeps each file's
digest for the next run while the file is unchanged (:mod:`loratool.metadata.digests`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .._version import __version__
from ..host import available_cores
from .digests import SequentialSha256, cached_sha256, kept_sha256

PROVENANCE_KEY = "loratool"
SHA256_PLACEHOLDER = "0" * 64


def tensors_sha256(names: Iterable[str], get: Callable[[str], Any]) -> str:
    """A digest of tensor names, dtypes, shapes and bytes, independent of the file layout.

    ``get`` reads one tensor, so a large file is hashed one tensor at a time.
    """
    from ..io.writer import tensor_bytes

    h = hashlib.sha256()
    for name in sorted(names):
        t = get(name).detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(tensor_bytes(t))
    return h.hexdigest()


def with_tensors_digest(metadata: dict[str, str], tensors: dict[str, Any]) -> dict[str, str]:
    """Add ``tensors_sha256`` of the tensors about to be written to the provenance record, if any."""
    record = decode(metadata)
    if record is None or "_invalid_json" in record:
        return metadata
    record["tensors_sha256"] = tensors_sha256(tensors, tensors.__getitem__)
    return {**metadata, **encode(record)}


class InputHasher:
    """Hash input files on background threads; :meth:`result` waits for the digests.

    sha256 runs at roughly 1 GB/s per core on the development machine, so a 140 GB checkpoint
    would keep one thread busy for minutes: files are hashed side by side on up to half the cores
    (one on 2 cores), leaving the rest to the operation itself.
    """

    def __init__(
        self, files: Iterable[str | os.PathLike[str]], *, enabled: bool = True, streamed: Iterable[Path] = ()
    ) -> None:
        """``streamed``: files of :func:`to_hash` that the operation reads itself, in order and bypassing the
        page cache (the disk would otherwise serve them twice), and hashes from its reads: each one's
        :class:`SequentialSha256` is in :attr:`streams`, for that reader to feed before :meth:`result`."""
        self.files = [Path(f) for f in files]
        chosen = set(streamed)
        self.streams = {f: SequentialSha256(f) for f in self.files if enabled and f in chosen}
        workers = max(1, min(len(self.files), available_cores() // 2))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loratool-sha256")
        self._futures: list[Future[str] | None] = [
            None if f in self.streams else self._pool.submit(cached_sha256, f) if enabled else _done(SHA256_PLACEHOLDER)
            for f in self.files
        ]  # fmt: skip
        self._pool.shutdown(wait=False)

    def placeholder(self) -> list[dict[str, Any]]:
        return [{"path": str(f), "size": f.stat().st_size, "sha256": SHA256_PLACEHOLDER} for f in self.files]

    def result(self) -> list[dict[str, Any]]:
        """The inputs' records; the streamed files' hashes finished (their reader must be done)."""
        futures = zip(self.files, self._futures)
        digests = [self.streams[f].finish() if fut is None else fut.result() for f, fut in futures]
        return [{"path": str(f), "size": f.stat().st_size, "sha256": h} for f, h in zip(self.files, digests)]


def to_hash(files: Iterable[str | os.PathLike[str]]) -> frozenset[Path]:
    """The files whose digests are not kept (:mod:`.digests`): hashing reads them in this run, so a reader
    that bypassed the page cache for them would have the disk serve them twice (unless it hashes them
    too: ``InputHasher(streamed=...)``)."""
    return frozenset(Path(f) for f in files if kept_sha256(f) is None)


def _done(value: str) -> Future[str]:
    fut: Future[str] = Future()
    fut.set_result(value)
    return fut


def make_record(
    operation: str,
    parameters: dict[str, Any],
    inputs: list[dict[str, Any]],
    *,
    report: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "tool": "loratool",
        "version": __version__,
        "operation": operation,
        "parameters": parameters,
        "inputs": inputs,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if report is not None:
        record["report"] = report
    if extra:
        record.update(extra)
    return record


def encode(record: dict[str, Any]) -> dict[str, str]:
    """Header metadata entries for a record."""
    return {PROVENANCE_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)}


def decode(metadata: dict[str, str]) -> dict[str, Any] | None:
    raw = metadata.get(PROVENANCE_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {"_invalid_json": raw[:200]}
    return value if isinstance(value, dict) else {"_invalid_json": raw[:200]}
