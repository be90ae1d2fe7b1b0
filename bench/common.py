"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Figures are of a first run: loratool hashes every input for its provenance record. A run whose
# inputs' digests are kept from an earlier one (loratool.metadata.digests) is measured apart, with
# ``measure(..., _digests=HOME)`` after ``keep_digests(HOME, ...)``.
os.environ.setdefault("LORATOOL_DIGEST_CACHE", "0")


def compile_loratool() -> None:
    """Compile loratool's modules to bytecode beside them (``__pycache__``, which git ignores), as an
    installed package has them: under PYTHONDONTWRITEBYTECODE, which this VM sets, every process
    would compile them again (about 0.17 s of a command's start-up, measured on the fixtures' merge)."""
    import compileall

    compileall.compile_dir(HERE.parent / "loratool", quiet=1)


compile_loratool()  # every bench measures loratool as installed


def keep_digests(home: Path, *paths: Path) -> Path:
    """Hash every file under ``paths`` into the digest cache under ``home`` (a LORATOOL_HOME), as a
    first run of loratool on them would: later runs with that home find their digests kept."""
    from loratool.metadata import digests

    files = [f for p in paths for f in sorted(p.rglob("*") if p.is_dir() else [p]) if f.is_file()]
    newest = max((max(f.stat().st_mtime_ns, f.stat().st_ctime_ns) for f in files), default=0)
    if (wait := newest + digests.RACY_NS - time.time_ns()) > 0:  # a file this fresh would not be kept
        time.sleep(wait / 1e9 + 0.1)
    saved = {k: os.environ.get(k) for k in ("LORATOOL_HOME", digests.CACHE_ENV)}
    os.environ.update({"LORATOOL_HOME": str(home), digests.CACHE_ENV: "1"})
    try:
        for f in files:
            digests.cached_sha256(f)
            if digests.kept_sha256(f) is None:
                raise RuntimeError(f"{f}: its digest was not kept, so a 'digests kept' figure would be a first run's")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return home


def measure(op: str, *, _digests: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run ``loratool.<op>(**kwargs)`` in a fresh process; returns seconds, peak memory, result.
    ``_digests``: a LORATOOL_HOME whose digest cache the run uses (see :func:`keep_digests`)."""
    env = None if _digests is None else {**os.environ, "LORATOOL_HOME": str(_digests), "LORATOOL_DIGEST_CACHE": "1"}
    out = subprocess.run(
        [sys.executable, str(HERE / "measure.py"), op, json.dumps(kwargs, default=str)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{op} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_page_cache() -> bool:
    """Write dirty pages out and drop the page cache (root only, Linux), so that the next read comes
    from the disk; whether it could."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def read_floor(*paths: Path) -> float:
    """Seconds to read every file under ``paths`` once (16 MiB reads into one reused buffer): the
    least any tool must spend. (A fresh buffer per read would add the cost of faulting in new
    memory, which on this VM is larger than the read itself.)"""
    buf = bytearray(1 << 24)
    t = time.perf_counter()
    for p in paths:
        for f in sorted(p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
    return time.perf_counter() - t


def hash_seconds(src: Path) -> float:
    """Seconds to sha256 every file of ``src`` one after another (as loratool hashes its inputs for
    their provenance record), read from the page cache where they lie there."""
    from loratool.metadata.digests import sha256_file

    t = time.perf_counter()
    for f in sorted(src.iterdir()):
        if f.is_file():
            sha256_file(f)
    return time.perf_counter() - t


def copy_tree(src: Path, dst: Path, *, fsync: bool = True) -> float:
    """Seconds for a plain copy of a model directory (flushed to disk like loratool's outputs)."""
    if dst.exists():
        shutil.rmtree(dst)
    t = time.perf_counter()
    shutil.copytree(src, dst)
    if fsync:
        for f in dst.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    return time.perf_counter() - t


def direct_copy_tree(src: Path, dst: Path) -> float:
    """Seconds to read every file under ``src`` and write it through loratool's own writer
    (``O_DIRECT`` where the file system has it): the read + write floor of a streaming job."""
    from loratool.io.directio import DirectFile

    if dst.exists():
        shutil.rmtree(dst)
    buf = bytearray(1 << 24)
    view = memoryview(buf)
    t = time.perf_counter()
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            out = DirectFile(dst / f.name)
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    out.write(view[:n])
            out.close()
    return time.perf_counter() - t


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")  # fmt: skip


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return path


def pair_args(doc: str | None, *, layers: int = 16, repeats: int = 3) -> argparse.Namespace:
    """The command line of a script that alternates runs on bench_extract's pair: --workdir, --layers, --repeats."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--repeats", type=int, default=repeats)
    return ap.parse_args()


def bench_main(doc: str | None, run: Callable[..., dict[str, Any]], report: Callable[[dict[str, Any]], str], *,
               layers: int, rank: int, options: dict[str, str] | None = None) -> None:  # fmt: skip
    """The command line every bench script shares: --workdir, --layers, --rank, --device, and the
    script's own ``options`` (flag: help), passed to ``run`` by name."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench"))
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--rank", type=int, default=rank)
    ap.add_argument("--device", default="cpu")
    for flag, text in (options or {}).items():
        ap.add_argument(flag, help=text)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    extra = {k: v for k, v in vars(args).items() if k not in ("workdir", "layers", "rank", "device")}
    print(report(run(args.workdir, args.layers, args.rank, args.device, **extra)))
