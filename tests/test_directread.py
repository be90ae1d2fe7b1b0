"""Reading weights with O_DIRECT (loratool.io.directread) for extraction: the same bytes, the same
adapter, and only where it pays (files not in the page cache, no hasher reading them)."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratool.errors import NonFiniteError
from loratool.formats import load_adapter
from loratool.io import directread
from loratool.io.checkpoint import open_checkpoint
from loratool.ops import extract as extract_op
from loratool.stream import deltas


def direct_ok(path: Path) -> bool:
    reader = directread.DirectReader(buffers=1)
    try:
        return reader.usable(path)
    finally:
        reader.close()


def test_reads_the_bytes_at_any_offset_and_length(tmp_path: Path) -> None:
    """Offsets and lengths off the 4 KiB blocks O_DIRECT works in, up to the file's unaligned end."""
    data = os.urandom(3 * directread.ALIGN * 7 + 123)
    f = tmp_path / "data.bin"
    f.write_bytes(data)
    if not direct_ok(f):
        pytest.skip("this file system refuses O_DIRECT")
    reader = directread.DirectReader(buffers=2, strip_bytes=5 * directread.ALIGN)
    try:
        assert reader.usable(f)
        for offset, n in [(0, 1), (1, 4095), (4095, 2), (4096, 4096), (5000, 5 * directread.ALIGN),
                          (len(data) - 1, 1), (len(data) - 20000, 20000)]:  # fmt: skip
            view = reader.read(1, f, offset, n)
            assert view is not None and bytes(view) == data[offset : offset + n], (offset, n)
        with pytest.raises(ValueError, match="at most"):
            reader.read(0, f, 0, 5 * directread.ALIGN + 1)
    finally:
        reader.close()


def test_a_refused_open_or_read_says_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs and some network file systems refuse O_DIRECT at the open, others at the read: both mean
    'read another way', never an error."""
    f = tmp_path / "data.bin"
    f.write_bytes(bytes(range(256)) * 64)
    real_open = os.open

    def refusing_open(path: object, flags: int, *a: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)  # type: ignore[arg-type]

    reader = directread.DirectReader(buffers=1)
    with monkeypatch.context() as m:
        m.setattr(os, "open", refusing_open)
        assert not reader.usable(f)
    assert reader.read(0, f, 0, 10) is None
    reader.close()
    if not direct_ok(f):
        pytest.skip("this file system refuses O_DIRECT at the open: a refused read cannot be tried")
    reader = directread.DirectReader(buffers=1)
    assert reader.usable(f)

    def refusing_read(*a: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "preadv", refusing_read)
    assert reader.read(0, f, 0, 10) is None
    assert not reader.usable(f)  # given up for the file
    reader.close()


def test_byte_range_holds_the_tensor(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), "b": torch.ones(5, dtype=torch.float32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as ck:
        for key, t in tensors.items():
            path, offset, n = ck.byte_range(key)  # type: ignore[misc]
            raw = path.read_bytes()[offset : offset + n]
            assert n == t.numel() * t.element_size()
            assert torch.equal(torch.frombuffer(bytearray(raw), dtype=t.dtype).view(t.shape), t)


def test_resident_share_tells_cached_files_from_cold_ones(tmp_path: Path) -> None:
    """A file just read is in the page cache; once the kernel drops its (clean) pages it is not, and
    extraction would read it with O_DIRECT."""
    if not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        pytest.skip("mincore and posix_fadvise are Linux's: elsewhere every file counts as cached")
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(1 << 20))
    if not direct_ok(f):
        pytest.skip("a file system without O_DIRECT (tmpfs) holds its files in memory")
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.read(fd, 1 << 20)
        assert directread.resident_share([f]) > 0.9
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert directread.resident_share([f]) < 0.5


def pair(tmp_path: Path, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"q.weight": torch.randn(300, 96, generator=g), "up.weight": torch.randn(1030, 64, generator=g),
            "norm.weight": torch.ones(96), "head.bias": torch.zeros(64)}  # fmt: skip
    ft = {k: v + (0.05 * torch.randn(v.shape, generator=g) if v.dim() == 2 else 0) for k, v in base.items()}
    ft["head.bias"] = ft["head.bias"] + 1
    for name, tensors in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(tmp_path / name / "model.safetensors"))
    return tmp_path / "base", tmp_path / "ft"


def force_direct(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Extraction reads with O_DIRECT as on a cold pair whose digests are kept; the keys it so read."""
    monkeypatch.setattr(extract_op, "resident_share", lambda paths: 0.0)
    monkeypatch.setattr("loratool.metadata.provenance.kept_sha256", lambda f: "0" * 64)
    read: list[str] = []
    real = deltas.DeltaReader._direct_difference

    def spy(self: deltas.DeltaReader, key: str) -> torch.Tensor | None:
        out = real(self, key)
        if out is not None:
            read.append(key)
        return out

    monkeypatch.setattr(deltas.DeltaReader, "_direct_difference", spy)
    return read


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_extraction_read_direct_gives_the_same_adapter(
    tmp_path: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit for bit the adapter and report of the memory-mapped read, strips of several reads each
    (the small strips below) and the rest (a 1-D tensor) read as before."""
    base, ft = pair(tmp_path, dtype)
    if not direct_ok(base / "model.safetensors"):
        pytest.skip("this file system refuses O_DIRECT")
    kw = dict(rank=4, show_progress=False, keep_full="head.bias")
    before = extract_op.extract(base, ft, output=tmp_path / "mmap", **kw)
    read = force_direct(monkeypatch)
    monkeypatch.setattr(deltas, "STRIP_BYTES", 16 * 1024)  # several strips a weight, rows of any size
    after = extract_op.extract(base, ft, output=tmp_path / "direct", **kw)
    assert sorted(read) == ["q.weight", "up.weight"]
    a, b = load_adapter(tmp_path / "mmap"), load_adapter(tmp_path / "direct")
    for name, m in a.modules.items():
        assert torch.equal(m.lora_A, b.modules[name].lora_A) and torch.equal(m.lora_B, b.modules[name].lora_B)
    assert torch.equal(a.whole["head.bias"], b.whole["head.bias"])
    assert [r.relative_error for r in before.report] == [r.relative_error for r in after.report]


def test_a_weight_left_alone_is_told_from_its_direct_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read with O_DIRECT, a weight the fine-tune left alone is unchanged without its difference being
    formed, and one whose leading strips are the same gets zeros there: the adapter and report of the
    memory-mapped read, bit for bit."""
    g = torch.Generator().manual_seed(5)
    base = {"same.weight": torch.randn(300, 96, generator=g), "late.weight": torch.randn(300, 96, generator=g),
            "q.weight": torch.randn(200, 64, generator=g)}  # fmt: skip
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ft["same.weight"] = base["same.weight"].clone()
    ft["late.weight"][:250] = base["late.weight"][:250]  # the first strips (of 16 KiB: 85 rows) the same
    for name, tensors in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / name / "model.safetensors"))
    if not direct_ok(tmp_path / "base" / "model.safetensors"):
        pytest.skip("this file system refuses O_DIRECT")
    kw = dict(rank=4, show_progress=False)
    before = extract_op.extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / "mmap", **kw)
    read = force_direct(monkeypatch)
    monkeypatch.setattr(deltas, "STRIP_BYTES", 16 * 1024)
    after = extract_op.extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / "direct", **kw)
    assert sorted(read) == ["late.weight", "q.weight", "same.weight"]
    assert before.unchanged == after.unchanged == 1
    a, b = load_adapter(tmp_path / "mmap"), load_adapter(tmp_path / "direct")
    assert sorted(a.modules) == sorted(b.modules) == ["late", "q"]
    for name, m in a.modules.items():
        assert torch.equal(m.lora_A, b.modules[name].lora_A) and torch.equal(m.lora_B, b.modules[name].lora_B)
    assert [r.relative_error for r in before.report] == [r.relative_error for r in after.report]


def test_extraction_reads_direct_only_where_it_pays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not from files in the page cache, not with LORATOOL_DIRECT_IO=0, and where the files' digests are
    not kept only if the reads go through them forward (then the hash is taken from them): else a
    hasher would read the same files and the disk serve them twice. Then every weight is read as before."""
    base, ft = pair(tmp_path)
    if not direct_ok(base / "model.safetensors"):
        pytest.skip("this file system refuses O_DIRECT")
    sides: list[tuple[bool, bool]] = []
    real_init = deltas.DeltaReader.__init__

    def init(self: deltas.DeltaReader, *a: object, **k: object) -> None:
        real_init(self, *a, **k)  # type: ignore[arg-type]
        sides.append(self.direct_sides)

    monkeypatch.setattr(deltas.DeltaReader, "__init__", init)
    expected = {"hashing": (True, True), "cached": None, "off": None, "direct": (True, True),
                "new fine-tune": (True, True), "fine-tune in cache": (True, False),
                "hashing, one weight of two": None, "new fine-tune, one weight of two": (True, False)}  # fmt: skip
    for case, want in expected.items():
        with monkeypatch.context() as m:
            read = force_direct(m)
            if case.startswith("hashing"):
                m.setattr("loratool.metadata.provenance.kept_sha256", lambda f: None)
            elif case.startswith("new fine-tune"):  # its digest not kept: hashed from the direct reads
                m.setattr("loratool.metadata.provenance.kept_sha256", lambda f: None if ft in f.parents else "0" * 64)
            elif case == "cached":
                m.setattr(extract_op, "resident_share", lambda paths: 0.9)
            elif case == "fine-tune in cache":
                m.setattr(extract_op, "resident_share", lambda paths: 0.9 if ft in paths[0].parents else 0.0)
            elif case == "off":
                m.setenv("LORATOOL_DIRECT_IO", "0")
            sides.clear()
            # reading q alone covers a third of each file: a hasher would read it all again
            only = {"include": "q"} if case.endswith("one weight of two") else {}
            result = extract_op.extract(base, ft, output=tmp_path / case, rank=2, show_progress=False, **only)
            weights = ["q.weight"] if only else ["q.weight", "up.weight"]
            assert sorted(read) == ([] if want is None else weights), case
            assert want is None or sides == [want], (case, sides)
            errors = {r.module: r.relative_error for r in result.report}
            if case == "hashing":
                reference = errors
            assert errors == {k: reference[k] for k in errors}, case  # the same adapter whichever way read


def test_a_file_hashed_for_provenance_is_hashed_from_the_direct_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Digests not kept, files cold: both read once, with O_DIRECT, their sha256 in the adapter's
    provenance taken from those reads (the header and the small tensors between the weights read for
    it), the file's own; no file hashed apart; the digests then kept."""
    import hashlib

    from loratool.metadata import digests
    from loratool.metadata.provenance import decode

    base, ft = pair(tmp_path)
    if not direct_ok(base / "model.safetensors"):
        pytest.skip("this file system refuses O_DIRECT")
    read = force_direct(monkeypatch)
    monkeypatch.setattr("loratool.metadata.provenance.kept_sha256", digests.kept_sha256)
    monkeypatch.setattr(digests, "RACY_NS", -10_000_000_000)  # files written in the test count as old
    monkeypatch.setattr(deltas, "STRIP_BYTES", 16 * 1024)
    hashed_apart: list[str] = []
    monkeypatch.setattr(digests, "sha256_file", lambda p: hashed_apart.append(str(p)))
    fed: dict[str, float] = {}
    real_finish = digests.SequentialSha256.finish

    def finish(self: digests.SequentialSha256) -> str:
        fed[Path(self.path).parent.name] = self.fed / os.path.getsize(self.path)
        return real_finish(self)

    monkeypatch.setattr(digests.SequentialSha256, "finish", finish)
    extract_op.extract(base, ft, output=tmp_path / "out", rank=2, show_progress=False)
    assert sorted(read) == ["q.weight", "up.weight"] and hashed_apart == []
    assert set(fed) == {"base", "ft"} and min(fed.values()) > 0.95
    record = decode(load_adapter(tmp_path / "out").metadata)
    assert record is not None
    for side in (base, ft):
        truth = hashlib.sha256((side / "model.safetensors").read_bytes()).hexdigest()
        assert [i["sha256"] for i in record["inputs"] if i["path"].startswith(str(side))] == [truth]
        assert digests.kept_sha256(side / "model.safetensors") == truth


def test_a_nan_read_direct_is_named_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, ft = pair(tmp_path)
    if not direct_ok(base / "model.safetensors"):
        pytest.skip("this file system refuses O_DIRECT")
    from safetensors.torch import load_file

    tensors = load_file(str(ft / "model.safetensors"))
    tensors["up.weight"][7, 3] = float("nan")
    save_file(tensors, str(ft / "model.safetensors"))
    read = force_direct(monkeypatch)
    with pytest.raises(NonFiniteError, match="fine-tune holds NaN") as e:
        extract_op.extract(base, ft, output=tmp_path / "out", rank=2, show_progress=False)
    assert e.value.key == "up.weight" and "up.weight" in read
    assert not (tmp_path / "out").exists()


def test_the_reader_closes_after_the_prefetch_thread_is_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in the SVD's thread mid-stream: the reader's files close only once the prefetch thread,
    which may be reading from them, has stopped (extraction closes the prefetch generator itself; before,
    CPython's freeing of the loop's iterator did it first, which nothing in the code promised)."""
    import threading

    base, ft = pair(tmp_path)
    force_direct(monkeypatch)
    alive_at_close: list[bool] = []
    real_close = deltas.DeltaReader.close

    def close(self: deltas.DeltaReader) -> None:
        alive_at_close.append(any(t.name == "loratool-prefetch" and t.is_alive() for t in threading.enumerate()))
        real_close(self)

    def failing(*a: object, **k: object) -> None:
        raise RuntimeError("the SVD failed")

    monkeypatch.setattr(deltas.DeltaReader, "close", close)
    monkeypatch.setattr(extract_op, "_factor", failing)
    with pytest.raises(RuntimeError, match="the SVD failed"):
        extract_op.extract(base, ft, output=tmp_path / "out", rank=2, show_progress=False)
    assert alive_at_close == [False]


def test_a_file_cut_short_under_the_reader_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that ends before a tensor's last byte while being read (its header, checked on opening,
    said otherwise): an error naming the file, exit 1 on the command line, and no output."""
    from loratool.errors import InputFileError

    base, ft = pair(tmp_path)
    if not direct_ok(base / "model.safetensors"):
        pytest.skip("this file system refuses O_DIRECT")
    force_direct(monkeypatch)
    monkeypatch.setattr(os, "preadv", lambda *a: 0)  # end of file, at once
    with pytest.raises(InputFileError, match="ends at byte") as e:
        extract_op.extract(base, ft, output=tmp_path / "out", rank=2, show_progress=False)
    assert "model.safetensors" in str(e.value) and not (tmp_path / "out").exists()


def test_reads_ahead_leave_no_thread_and_no_read_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each side's reads run a strip ahead on a thread of their own: the same deltas as reading in
    turn (above), and after an error on one side, or the same file on both (one thread then, its one
    hash fed in order), nothing left running once extraction returns."""
    import hashlib
    import threading

    from loratool.errors import InputFileError, LoraToolError
    from loratool.metadata import digests
    from loratool.metadata.provenance import InputHasher

    base, ft = pair(tmp_path)
    if not direct_ok(base / "model.safetensors"):
        pytest.skip("this file system refuses O_DIRECT")
    force_direct(monkeypatch)
    monkeypatch.setattr(deltas, "STRIP_BYTES", 16 * 1024)
    readers = lambda: [t for t in threading.enumerate() if t.name.startswith("loratool-read")]  # noqa: E731
    with monkeypatch.context() as m:
        calls = [0]
        real = os.preadv

        def flaky(fd: int, buffers: list[memoryview], offset: int) -> int:
            calls[0] += 1
            return 0 if calls[0] == 5 else real(fd, buffers, offset)  # one read meets an end of file

        m.setattr(os, "preadv", flaky)
        with pytest.raises(InputFileError, match="ends at byte"):
            extract_op.extract(base, ft, output=tmp_path / "out", rank=2, show_progress=False)
    assert readers() == [] and not (tmp_path / "out").exists()
    # the same file on both sides, hashed from the reads: one stream, fed from one thread, in order
    monkeypatch.setattr("loratool.metadata.provenance.kept_sha256", lambda f: None)
    streams: list[digests.SequentialSha256] = []
    real_init = InputHasher.__init__

    def init(self: InputHasher, *a: object, **k: object) -> None:
        real_init(self, *a, **k)  # type: ignore[arg-type]
        streams.extend(self.streams.values())

    monkeypatch.setattr(InputHasher, "__init__", init)
    with pytest.raises(LoraToolError, match="does not differ"):
        extract_op.extract(base, base, output=tmp_path / "same", rank=2, show_progress=False)
    assert readers() == [] and len(streams) == 1
    f = base / "model.safetensors"
    assert streams[0].fed > 0.95 * f.stat().st_size  # what both sides read, hashed once
    assert streams[0].finish() == hashlib.sha256(f.read_bytes()).hexdigest()
