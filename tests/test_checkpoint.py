"""Checkpoint reading and writing: round trips, atomicity, bad input, header-only listing."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import main_in_a_process
from safetensors.torch import load_file, save_file

from loratool.errors import InputFileError, MissingInputError, OutputExistsError
from loratool.io import directio, writer
from loratool.io.atomic import atomic_output
from loratool.io.checkpoint import dtype_name, open_checkpoint
from loratool.io.directio import ALIGN, DirectFile
from loratool.io.header import patch_metadata
from loratool.io.writer import SafetensorsStreamWriter, TensorSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from shards import write_checkpoint  # noqa: E402  (bench/ makes the synthetic checkpoints)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tensors(dtype: torch.dtype, n: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"layers.{i}.w": torch.randn(16 + i, 8, generator=g).to(dtype) for i in range(n)}
    out["scalar"] = torch.tensor(3.0).to(dtype)
    out["empty"] = torch.zeros(0, 4, dtype=dtype)
    out["ids"] = torch.arange(10)
    return out


def specs(ts: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), dtype_name(v.dtype)) for k, v in ts.items()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_shard", [10**9, 700], ids=["single", "sharded"])
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_write_then_read_is_bit_exact(
    tmp_path: Path, dtype: torch.dtype, max_shard: int, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "DIRECT_MIN_BYTES", 0 if direct else 2**62)
    ts = tensors(dtype)
    with atomic_output(tmp_path / "ckpt", force=False, directory=True) as tmp:
        names = write_checkpoint(tmp, iter(ts.items()), specs(ts), max_shard_bytes=max_shard, metadata={"a": "b"})
    assert (len(names) > 1) == (max_shard == 700)
    with open_checkpoint(tmp_path / "ckpt") as ck:
        assert ck.keys() == list(ts)  # on-disk order is the written order
        for k, v in ts.items():
            got = ck.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.view(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)) if v.numel() else True
        assert ck.header_metadata["a"] == "b"
    # what we stream is what safetensors itself reads
    for f in names:
        loaded = load_file(str(tmp_path / "ckpt" / f))
        for k, v in loaded.items():
            assert torch.equal(v, ts[k])
    if len(names) > 1:
        index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(ts)
        assert names[0] == f"model-00001-of-{len(names):05d}.safetensors"


def test_patched_header_keeps_file_valid(tmp_path: Path) -> None:
    ts = tensors(torch.float32, 2)
    f = tmp_path / "x.safetensors"
    w = SafetensorsStreamWriter(f, specs(ts), {"loratool": "0" * 64})
    for k, v in ts.items():
        w.write(k, v)
    w.close()
    patch_metadata(f, {"loratool": "f" * 64})
    with open_checkpoint(f) as ck:
        assert ck.header_metadata == {"loratool": "f" * 64}
        assert torch.equal(ck.get("layers.1.w"), ts["layers.1.w"])


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    ts = tensors(torch.float32)

    def failing():
        for i, item in enumerate(ts.items()):
            if i == 3:
                raise RuntimeError("disk full (simulated)")
            yield item

    with pytest.raises(RuntimeError, match="simulated"):
        with atomic_output(tmp_path / "out", force=False, directory=True) as tmp:
            write_checkpoint(tmp, failing(), specs(ts), max_shard_bytes=700)
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_write_keeps_the_old_output(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target, force=True, directory=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "keep.txt").read_text() == "old"


def test_existing_output_is_refused_without_force(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output(tmp_path / "out", force=False, directory=True):
            pass


def test_stream_writer_checks_declared_layout(tmp_path: Path) -> None:
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", [TensorSpec("a", (2, 2), "F32")])
    with pytest.raises(ValueError, match="'a'.*expected \\[2, 2\\] F32, got \\[3\\] F32"):
        w.write("a", torch.zeros(3))
    w.abort()


# -- direct I/O -------------------------------------------------------------------------------------
def _chunks(seed: int) -> list[bytes]:
    """Chunk sizes that straddle the alignment and the (shrunk) staging buffer, and end unaligned."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 7, ALIGN - 1, ALIGN, 3 * ALIGN + 5, 0, 5 * ALIGN, 13]
    return [bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()) for n in sizes]


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("source", ["bytes", "writable"])
def test_direct_file_writes_exact_bytes(tmp_path: Path, direct: bool, source: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Every byte as written, from read-only chunks (copied into the staging buffers as slices) and from
    writable ones, as a tensor's bytes are (copied by memmove, which lets go of the GIL)."""
    monkeypatch.setattr(directio, "STAGING_BYTES", 2 * ALIGN)
    monkeypatch.setattr(directio, "_MEMMOVE_MIN", 1)
    moved = []
    memmove = ctypes.memmove
    monkeypatch.setattr(directio.ctypes, "memmove", lambda d, s, n: moved.append(n) or memmove(d, s, n))
    chunks = _chunks(0)
    f = DirectFile(tmp_path / "x.bin", direct=direct)
    if direct and not f.direct:
        f.abort()
        pytest.skip("this file system refuses O_DIRECT")
    for c in chunks:
        f.write(c if source == "bytes" else memoryview(bytearray(c)))
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == b"".join(chunks)
    assert sum(moved) == (sum(map(len, chunks)) if direct and source == "writable" else 0)


def test_direct_file_falls_back_when_writes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems accept O_DIRECT at open and refuse it at write (EINVAL)."""
    monkeypatch.setattr(directio, "STAGING_BYTES", 2 * ALIGN)
    real_write, refused = directio.os.write, []

    def write(fd: int, data) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(directio.os, "write", write)
    chunks = _chunks(1)
    f = DirectFile(tmp_path / "x.bin", direct=True)
    if not f.direct:
        f.abort()
        pytest.skip("this file system refuses O_DIRECT")
    for c in chunks:
        f.write(c)
    f.close()
    assert refused and not f.direct
    assert (tmp_path / "x.bin").read_bytes() == b"".join(chunks)


def test_a_failed_direct_write_is_raised_by_a_later_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The staging buffers are written on a thread of the file's own while the next is filled: a write
    that fails there (a full disk) is raised by the caller's next write, or by close, and never leaves
    it waiting for a buffer."""
    monkeypatch.setattr(directio, "STAGING_BYTES", 2 * ALIGN)
    real_write, calls = directio.os.write, []

    def write(fd: int, data) -> int:
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(directio.os, "write", write)
    for chunks in ([b"x" * (2 * ALIGN)] * 50, [b"x" * (2 * ALIGN + 1)]):  # raised by a write; by close
        calls.clear()
        f = DirectFile(tmp_path / "x.bin", direct=True)
        if not f.direct:
            f.abort()
            pytest.skip("this file system refuses O_DIRECT")
        with pytest.raises(OSError, match="No space left"):
            for c in chunks:
                f.write(c)
            f.write(b"x" * (2 * ALIGN))
            f.close()
        f.abort()
        assert calls == ["loratool-direct-io"] * 2


def test_direct_io_can_be_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATOOL_DIRECT_IO", "0")
    f = DirectFile(tmp_path / "x.bin", direct=True)
    f.write(b"abc")
    f.close()
    assert not f.direct and (tmp_path / "x.bin").read_bytes() == b"abc"


# -- bad input ---------------------------------------------------------------------------------------
def _model(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    save_file({"w": torch.randn(64, 64), "b": torch.randn(64)}, str(d / "model.safetensors"))
    return d


def test_truncated_file(tmp_path: Path, cli) -> None:
    d = _model(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(InputFileError, match="truncated or corrupt"):
        open_checkpoint(d)
    r = cli("inspect", d)
    assert r.exit_code == 1
    assert "model.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_garbage_header(tmp_path: Path, cli) -> None:
    f = tmp_path / "bad.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbagegarbagega")
    r = cli("inspect", f)
    assert r.exit_code == 1 and "bad.safetensors" in r.stderr and "not a readable safetensors file" in r.stderr


def test_missing_shard(tmp_path: Path, cli) -> None:
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, str(d / "model-00001-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingInputError, match="shard 'model-00002-of-00002.safetensors' is named in"):
        open_checkpoint(d)
    r = cli("inspect", d)
    assert r.exit_code == 1 and "model-00002-of-00002.safetensors" in r.stderr


def test_pickle_refused_without_allow(tmp_path: Path, cli) -> None:
    d = tmp_path / "pt"
    d.mkdir()
    torch.save({"w": torch.ones(3, 3)}, d / "pytorch_model.bin")
    r = cli("inspect", d)
    assert r.exit_code == 1
    assert "pytorch_model.bin" in r.stderr and "--allow-pickle" in r.stderr
    r = cli("inspect", d, "--allow-pickle", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["tensors"] == 1


def test_missing_path(cli, tmp_path: Path) -> None:
    r = cli("inspect", tmp_path / "nope")
    assert r.exit_code == 1 and "no such file or directory" in r.stderr


# -- listing reads headers only ------------------------------------------------------------------------
def test_listing_reads_no_tensor(fixtures: Path, monkeypatch) -> None:
    from loratool.io.checkpoint import Checkpoint
    from loratool.ops.inspect import inspect

    calls = []
    monkeypatch.setattr(Checkpoint, "get", lambda self, key: calls.append(key))
    info = inspect(fixtures / "llama-ft")
    assert info["tensors"] == 21 and info["index"] == "model.safetensors.index.json"
    assert calls == []


@pytest.mark.slow
def test_inspect_of_a_large_checkpoint_does_not_load_it(tmp_path: Path) -> None:
    big = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.zeros(4096, 4096) for i in range(4)}, str(big))  # 256 MiB on disk
    code = (
        "import resource, sys, torch, safetensors, loratool;"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"info = loratool.inspect({str(big)!r});"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "print(info['parameters'], (after - before) // 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == 4 * 4096 * 4096
    assert int(out[1]) < 64, f"inspect grew RSS by {out[1]} MiB for a 256 MiB file"


def test_inspecting_an_adapter_reads_headers_only(fixtures: Path, monkeypatch) -> None:
    from loratool.io.checkpoint import Checkpoint
    from loratool.ops.inspect import inspect

    monkeypatch.setattr(Checkpoint, "get", lambda self, key: pytest.fail(f"read {key}"))
    info = inspect(fixtures / "llama-peft-adapter")
    assert info["module_count"] == 6 and info["ranks"] == {4: 5, 2: 1}
    assert {m["module"]: m["scaling"] for m in info["modules"]}["model.layers.0.mlp.down_proj"] == 1.0  # alpha 4 / r 4


FIXTURE_CHECKPOINTS = ["llama-base", "llama-ft", "llama-fp8-block", "llama-fp8-channel", "llama-gptq-like",
                       "llama-bnb-like", "gpt2-base", "gpt2-ft", "llama-kohya.safetensors"]  # fmt: skip


@pytest.mark.parametrize("name", FIXTURE_CHECKPOINTS)
def test_headers_only_lists_and_reads_as_safetensors_does(fixtures: Path, name: str) -> None:
    """inspect opens checkpoints headers_only (tests/test_mutations.py holds the refusals to safe_open's): the
    same tensors in the same order, shapes, dtypes, shards and metadata, and the same tensors read, each
    file opened by safetensors at its first read."""
    with open_checkpoint(fixtures / name) as eager, open_checkpoint(fixtures / name, headers_only=True) as lazy:
        assert lazy.infos() == eager.infos() and lazy.metadata == eager.metadata
        assert not lazy._handles  # nothing opened by listing
        for key in eager.keys():
            assert torch.equal(lazy.get(key), eager.get(key)), key


def test_inspecting_a_checkpoint_imports_no_torch(fixtures: Path) -> None:
    """About a second of every `loratool inspect CHECKPOINT` (safe_open imports torch to open a file); an
    adapter is still read as before."""
    out = main_in_a_process(*(["inspect", fixtures / name, "--json"] for name in ("llama-fp8-block", "llama-base")))
    assert '"method": "fp8"' in out and out.strip().endswith("torch imported: False")
    r = subprocess.run([sys.executable, "-m", "loratool", "inspect", str(fixtures / "llama-peft-adapter"), "--json"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)["kind"] == "adapter", r.stderr


def test_a_file_first_read_on_two_threads_at_once_opens_once(tmp_path: Path, monkeypatch) -> None:
    """A file listed from its header opens at its first read; a merge's reader and look-ahead threads may
    make that read at the same moment: both get its tensors, and it is opened once."""
    import threading
    import time

    save_file({"a": torch.arange(6.0), "b": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path, headers_only=True)
    opened: list[str] = []
    slow_open = type(ckpt)._safe_open

    def slowly(self, file):  # type: ignore[no-untyped-def]
        opened.append(str(file))
        time.sleep(0.2)  # both threads are inside the first read before either has opened the file
        return slow_open(self, file)

    monkeypatch.setattr(type(ckpt), "_safe_open", slowly)
    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def read(key: str) -> None:
        try:
            got[key] = ckpt.get(key)
        except BaseException as e:  # noqa: BLE001  (the test reports it)
            errors.append(e)

    threads = [threading.Thread(target=read, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(opened) == 1
    assert torch.equal(got["a"], torch.arange(6.0)) and torch.equal(got["b"], torch.ones(3))
