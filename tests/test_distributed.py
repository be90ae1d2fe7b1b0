"""torchrun with 2 CPU ranks (gloo) writes the same tensors as one process, for extract and merge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratool.io.checkpoint import open_checkpoint
from loratool.stream.distributed import balanced_share


def loratool(*args: object, ranks: int, threads: int = 1) -> subprocess.CompletedProcess:
    """``loratool ARGS`` under torchrun with ``ranks`` CPU processes (gloo) of ``threads`` threads each
    (one by default, so that one and two ranks run the same float arithmetic)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LORATOOL_DEBUG": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "loratool", *map(str, args)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck.get(k) for k in ck.keys()}


def test_balanced_share_is_deterministic_and_balanced() -> None:
    sizes = [("a", 10), ("b", 9), ("c", 5), ("d", 4), ("e", 1)]
    owner = balanced_share(sizes, 2)
    assert owner == balanced_share(list(reversed(sizes)), 2)
    loads = [sum(s for n, s in sizes if owner[n] == r) for r in range(2)]
    assert sorted(loads) == [14, 15]


@pytest.mark.slow
def test_two_ranks_extract_like_one(tmp_path: Path, fixtures: Path) -> None:
    args = [fixtures / "llama-base", fixtures / "llama-ft", "-r", 3, "-q", "--keep-full", "norm"]
    loratool("extract", *args, "-o", tmp_path / "one", ranks=1)
    r = loratool("extract", *args, "-o", tmp_path / "two", ranks=2)
    one = tensors(tmp_path / "one" / "adapter_model.safetensors")
    two = tensors(tmp_path / "two" / "adapter_model.safetensors")
    assert list(one) == list(two)
    for k in one:
        assert torch.equal(one[k], two[k]), k
    assert (tmp_path / "one" / "adapter_config.json").read_text() == (
        tmp_path / "two" / "adapter_config.json"
    ).read_text()
    assert r.stdout.count("wrote") == 1  # rank 0 speaks for both


@pytest.mark.slow
def test_two_ranks_merge_like_one(tmp_path: Path, fixtures: Path) -> None:
    args = [fixtures / "llama-ft", fixtures / "llama-peft-adapter", "-q"]
    loratool("merge", *args, "-o", tmp_path / "one", ranks=1)
    loratool("merge", *args, "-o", tmp_path / "two", ranks=2)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert list(one) == list(two)
    for k in one:
        assert torch.equal(one[k], two[k]), k
    for shard in (tmp_path / "two").glob("*.safetensors"):  # both ranks patched in the final provenance
        with open_checkpoint(shard) as ck:
            assert "0" * 64 not in ck.header_metadata["loratool"]


@pytest.mark.slow
def test_other_thread_counts_differ_by_rounding_only(tmp_path: Path, fixtures: Path) -> None:
    """Two ranks of one thread against one process of two threads: not bit-identical (sums split
    differently), but the same adapter to float32 rounding, as the README says."""
    import json

    from helpers import load_adapter_deltas

    args = [fixtures / "llama-base", fixtures / "llama-ft", "-r", 3, "-q", "--json", "--device", "cpu"]  # threads
    one = json.loads(loratool("extract", *args, "-o", tmp_path / "one", ranks=1, threads=2).stdout)
    two = json.loads(loratool("extract", *args, "-o", tmp_path / "two", ranks=2).stdout)
    for a, b in zip(one["modules"], two["modules"]):
        assert a["module"] == b["module"] and a["rank"] == b["rank"]
        assert abs(a["relative_error"] - b["relative_error"]) <= 1e-6, a["module"]
    d1, d2 = load_adapter_deltas(tmp_path / "one"), load_adapter_deltas(tmp_path / "two")
    for mod, delta in d1.items():
        # rounding differences, amplified by the spectral gap at the truncation: far below the
        # truncation error itself (about 1e-6 here), bounded at 1e-4
        assert float((delta - d2[mod]).norm()) <= 1e-4 * float(delta.norm()), mod
