"""Tensors computed side by side (loratool.stream.workers), and extraction's use of it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratool.formats import load_adapter
from loratool.ops import extract as extract_op
from loratool.stream import workers


def test_results_come_in_order_at_most_two_at_once_and_within_the_byte_budget() -> None:
    running, most, lock = [0], [0], threading.Lock()
    held, most_held = [0], [0]

    def fn(item: tuple[int, int]) -> int:
        with lock:
            running[0] += 1
            held[0] += item[1]
            most[0], most_held[0] = max(most[0], running[0]), max(most_held[0], held[0])
        time.sleep(0.005 + 0.01 * (item[0] % 3))  # later items often finish first
        with lock:
            running[0] -= 1
            held[0] -= item[1]
        return item[0] * 10

    sizes = [10, 10, 10, 95, 10, 100, 100, 10, 10, 10]  # 95 and 100 only fit beside nothing (budget 100)
    items = list(enumerate(sizes))
    out = list(workers.run_side_by_side(fn, items, 2, size=lambda item: item[1], budget=100))
    assert out == [i * 10 for i in range(len(sizes))]
    assert most[0] == 2 and most_held[0] <= 100


def test_an_error_is_raised_in_order_and_the_thread_count_restored() -> None:
    saved = torch.get_num_threads()
    done: list[int] = []

    def fn(i: int) -> int:
        if i == 3:
            raise ValueError("item 3")
        done.append(i)
        return i

    got: list[int] = []
    with pytest.raises(ValueError, match="item 3"):
        for r in workers.run_side_by_side(fn, range(8), 2):
            got.append(r)
    assert got == [0, 1, 2] and torch.get_num_threads() == saved


def test_workers_each_take_their_share_of_the_threads() -> None:
    """Each worker runs with its share of the caller's torch threads; the caller's own count is
    unchanged, and restored for threads that start later."""
    if workers.side_by_side_workers(torch.device("cpu")) == 1:
        pytest.skip("torch's thread count is not per thread here, or one core: one tensor at a time")
    saved = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        seen = list(workers.run_side_by_side(lambda i: torch.get_num_threads(), range(4), 2))
        assert seen == [4, 4, 4, 4] and torch.get_num_threads() == 8
        later: list[int] = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [8]  # not the workers' 4
    finally:
        torch.set_num_threads(saved)


def test_an_item_past_the_budget_runs_alone_on_all_the_threads() -> None:
    """It runs alone (nothing begins beside it), so on all the caller's threads; items that may run
    beside others on their share."""
    if workers.side_by_side_workers(torch.device("cpu")) == 1:
        pytest.skip("torch's thread count is not per thread here, or one core: one tensor at a time")
    saved = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        sizes = [10, 200, 10, 10]  # budget 100
        seen = list(workers.run_side_by_side(lambda n: torch.get_num_threads(), sizes, 2, size=lambda n: n, budget=100))
        assert seen == [4, 8, 4, 4] and torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(saved)


def test_one_torch_thread_means_one_tensor_at_a_time() -> None:
    """torchrun sets OMP_NUM_THREADS=1 in each process, a user may set any count: the workers share it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert workers.side_by_side_workers(torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(saved)


def test_one_worker_runs_on_the_calling_thread() -> None:
    names = list(workers.run_side_by_side(lambda i: threading.current_thread().name, range(3), 1))
    assert names == [threading.current_thread().name] * 3
    assert workers.side_by_side_workers(torch.device("meta")) == 1


def _pair_for_workers(tmp_path: Path, seed: int, fourth: tuple[str, tuple[int, int]], *, left_alone: str = "") -> None:
    """A three-layer bf16 pair in ``tmp_path`` / base and ft: q, up, down and ``fourth`` a layer and a norm,
    each changed but the weights named ``left_alone``. Skips where tensors are not factored side by side."""
    if workers.side_by_side_workers(torch.device("cpu")) == 1:
        pytest.skip("torch's thread count is not per thread here, or one core: one tensor at a time")
    g = torch.Generator().manual_seed(seed)
    base = {f"layers.{i}.{n}.weight": torch.randn(s, generator=g) for i in range(3)
            for n, s in (("q", (96, 64)), ("up", (200, 64)), ("down", (64, 200)), fourth)}  # fmt: skip
    base["norm.weight"] = torch.ones(64)
    ft = {k: v if left_alone and f".{left_alone}." in k else v + 0.05 * torch.randn(v.shape, generator=g)
          for k, v in base.items()}  # fmt: skip
    for name, tensors in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / name / "model.safetensors"))


def test_extraction_side_by_side_gives_the_adapter_of_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same modules, reports and warnings in the same order, and factors equal to float32's
    rounding (one thread's products may add in another order than two threads')."""
    _pair_for_workers(tmp_path, 0, ("tiny", (3, 64)))
    kw = dict(rank=8, show_progress=False, keep_full="norm")
    apart = extract_op.extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / "two", **kw)
    monkeypatch.setattr(extract_op, "side_by_side_workers", lambda device: 1)
    alone = extract_op.extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / "one", **kw)
    assert [r.module for r in apart.report] == [r.module for r in alone.report]
    assert apart.warnings == alone.warnings and any("rank 8 clamped to 3" in w for w in apart.warnings)
    for r, s in zip(apart.report, alone.report):
        assert r.relative_error == pytest.approx(s.relative_error, rel=1e-5)
    a, b = load_adapter(tmp_path / "two"), load_adapter(tmp_path / "one")
    assert list(a.modules) == list(b.modules) and list(a.whole) == list(b.whole) == ["norm.weight"]
    for name, m in a.modules.items():
        n = b.modules[name]
        torch.testing.assert_close(m.lora_B.float() @ m.lora_A.float(), n.lora_B.float() @ n.lora_A.float(),
                                   rtol=0, atol=2e-2)  # fmt: skip


def test_analysis_side_by_side_gives_the_analysis_of_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """analyze's checkpoints mode on the same workers: the same modules in the same order, the same
    tensors skipped (an unchanged one not among them), spectra and amplification equal to float32's
    rounding."""
    from loratool.ops import analyze as analyze_op

    _pair_for_workers(tmp_path, 1, ("same", (32, 64)), left_alone="same")
    kw = dict(top_k=8, show_progress=False)
    apart = analyze_op.analyze(tmp_path / "base", tmp_path / "ft", **kw)
    monkeypatch.setattr(analyze_op, "side_by_side_workers", lambda device: 1)
    alone = analyze_op.analyze(tmp_path / "base", tmp_path / "ft", **kw)
    assert [m.module for m in apart.modules] == [m.module for m in alone.modules]
    assert len(apart.modules) == 9 and not any(".same" in m.module for m in apart.modules)
    assert [d.key for d in apart.skipped] == [d.key for d in alone.skipped] == ["norm.weight"]
    for m, n in zip(apart.modules, alone.modules):
        assert m.singular_values == pytest.approx(n.singular_values, rel=1e-5)
        assert m.amplification == pytest.approx(n.amplification, rel=1e-3)  # ratios to a projection of W: amplified


def _one_weight_pair(tmp_path: Path) -> None:
    """A float32 pair in ``tmp_path`` / base and ft: one 40 x 32 weight, changed."""
    g = torch.Generator().manual_seed(0)
    base = {"q.weight": torch.randn(40, 32, generator=g)}
    for name, tensors in (("base", base), ("ft", {"q.weight": base["q.weight"] + 1})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))


def test_the_exact_svd_factors_one_tensor_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its workspace is a dense matrix's size: two at once would double extraction's peak memory."""
    _one_weight_pair(tmp_path)
    seen: list[int] = []
    real = workers.run_side_by_side

    def spy(fn, items, n, **kw):  # type: ignore[no-untyped-def]
        seen.append(n)
        return real(fn, items, n, **kw)

    monkeypatch.setattr(workers, "run_side_by_side", spy)
    monkeypatch.setattr(extract_op, "side_by_side_workers", lambda device: 2)
    for svd in ("exact", "randomized"):
        extract_op.extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / svd, rank=2, svd=svd,
                           show_progress=False)  # fmt: skip
    assert seen == [1, 2]


def test_side_by_side_one_fewer_delta_is_queued_and_depth_0_still_reads_in_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _one_weight_pair(tmp_path)
    depths: list[int] = []
    real = workers.prefetch

    def spy(items, depth=2):  # type: ignore[no-untyped-def]
        depths.append(depth)
        return real(items, depth)

    monkeypatch.setattr(workers, "prefetch", spy)
    for workers_, depth in ((2, 2), (2, 0), (1, 2)):
        monkeypatch.setattr(extract_op, "side_by_side_workers", lambda device, n=workers_: n)
        extract_op.extract(tmp_path / "base", tmp_path / "ft", output=tmp_path / f"{workers_}-{depth}", rank=2,
                           prefetch_depth=depth, show_progress=False)  # fmt: skip
    assert depths == [1, 0, 2]


def test_a_worker_takes_the_next_item_when_its_call_ends_not_when_the_oldest_does() -> None:
    """Item 0 waits until item 2 has begun: item 1 ends at once, and its worker takes item 2 while
    item 0 still runs (waiting on the oldest call would leave that worker idle, here for the timeout)."""
    begun = threading.Event()

    def fn(i: int) -> bool:
        if i == 0:
            return begun.wait(timeout=10)
        if i == 2:
            begun.set()
        return True

    assert list(workers.run_side_by_side(fn, range(4), 2)) == [True] * 4
