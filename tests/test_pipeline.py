"""The streaming pipeline: prefetch order and errors, write-behind casting into pooled buffers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratool.io.writer import CheckpointWriter, TensorSpec
from loratool.stream.pipeline import BackgroundWriter, BufferPool, prefetch, widen


def test_prefetch_keeps_order_and_hands_on_errors() -> None:
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("boom")

    it = prefetch(failing(), depth=2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)


@pytest.mark.parametrize("recycle", [False, True])
def test_background_writer_casts_into_pooled_buffers(tmp_path: Path, recycle: bool) -> None:
    pool = BufferPool()
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(8, 5, generator=g) for i in range(4)}
    specs = [TensorSpec(k, (8, 5), "BF16") for k in tensors]
    writer = BackgroundWriter(CheckpointWriter(tmp_path, [("model.safetensors", specs)]), pool=pool)
    for k, t in tensors.items():
        w = widen(t, torch.device("cpu"), pool)  # a pooled float32 copy, as merge hands it over
        writer.write(k, w, torch.bfloat16, recycle=recycle)
    writer.close()
    out = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(out[k], t.to(torch.bfloat16)) for k, t in tensors.items())


class _StuckWriter:
    """A checkpoint writer stuck in its first write until ``release`` is set."""

    def __init__(self) -> None:
        self.started, self.release, self.written = threading.Event(), threading.Event(), []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.started.set()
        self.release.wait()
        self.written.append(name)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _waits(writer: BackgroundWriter, name: str, t: torch.Tensor) -> tuple[bool, threading.Thread]:
    """Whether writer.write(name, t) is still waiting after 0.2 s (its thread, to join)."""
    call = threading.Thread(target=writer.write, args=(name, t))
    call.start()
    call.join(0.2)
    return call.is_alive(), call


def test_the_writer_holds_few_computed_tensors_but_queues_borrowed_ones() -> None:
    """Behind a writer that is still busy, tensors passed on as read (borrowed) queue without limit,
    while computed ones wait once depth are queued beside the one being written; all are written
    in order."""
    stuck = _StuckWriter()
    writer = BackgroundWriter(stuck, depth=2, queue_bytes=0)  # type: ignore[arg-type]
    t = torch.zeros(3)
    writer.write("first", t, borrowed=True)
    assert stuck.started.wait(5)  # the writer is stuck on it
    for i in range(20):
        writer.write(f"b{i}", t, borrowed=True)  # none of these waits
    for i in range(3):
        writer.write(f"c{i}", t)  # depth queued, and room for the one to be written
    waiting, call = _waits(writer, "c3", t)
    assert waiting  # a fourth computed tensor waits for room
    stuck.release.set()
    call.join(5)
    writer.close()
    assert stuck.written == ["first", *(f"b{i}" for i in range(20)), *(f"c{i}" for i in range(4))]


def test_small_computed_tensors_queue_past_depth_while_their_bytes_fit() -> None:
    """Past depth, computed tensors go on queueing while all those held stay within queue_bytes (a
    4-bit merge's results, while the writer copies the tensors it passes on as read); the one that
    would go past it waits, and so does a large one once depth are held; all are written in order."""
    stuck = _StuckWriter()
    writer = BackgroundWriter(stuck, depth=1, queue_bytes=400)  # type: ignore[arg-type]
    writer.write("first", torch.zeros(3), borrowed=True)
    assert stuck.started.wait(5)
    small = torch.zeros(25)  # 100 bytes
    for i in range(4):
        writer.write(f"s{i}", small)  # 400 bytes held: past depth 1, within the budget
    waiting, call = _waits(writer, "s4", small)
    assert waiting
    stuck.release.set()
    call.join(5)
    writer.close()
    assert stuck.written == ["first", *(f"s{i}" for i in range(5))]

    stuck = _StuckWriter()
    writer = BackgroundWriter(stuck, depth=1, queue_bytes=400)  # type: ignore[arg-type]
    writer.write("first", torch.zeros(3), borrowed=True)
    assert stuck.started.wait(5)
    writer.write("big0", torch.zeros(1000))  # more than the budget: depth holds it
    writer.write("big1", torch.zeros(1000))  # and the one being written
    waiting, call = _waits(writer, "small", small)  # the budget is spent: even a small one waits
    assert waiting
    stuck.release.set()
    call.join(5)
    writer.close()
    assert stuck.written == ["first", "big0", "big1", "small"]


def test_a_capped_pool_lets_go_of_sizes_past_its_cap_and_keeps_the_rest() -> None:
    from loratool.stream.pipeline import BufferPool

    pool = BufferPool(keep_bytes=1000)
    cpu = torch.device("cpu")
    small, big = pool.take((50,), torch.float32, cpu), pool.take((300,), torch.float32, cpu)  # 200 and 1200 bytes
    pool.give(small)
    pool.give(big)  # past the cap beside the small one: let go
    assert pool.take((50,), torch.float32, cpu).data_ptr() == small.data_ptr()  # kept, and reused
    pool.give(small)
    again = pool.take((200,), torch.float32, cpu)  # 800 bytes: fits beside the small one, which stays
    pool.give(again)
    assert pool.take((50,), torch.float32, cpu).data_ptr() == small.data_ptr()


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                    (torch.float32, torch.float32)])  # fmt: skip
def test_the_difference_in_strips_is_the_whole_difference(dtypes) -> None:
    from loratool.stream.pipeline import BufferPool, widen_difference

    g = torch.Generator().manual_seed(0)
    wf, wb = (torch.randn(1000, 1500, generator=g).to(dt) for dt in dtypes)  # several strips of rows
    got = widen_difference(wf, wb, torch.device("cpu"), BufferPool())
    assert got.dtype == torch.float32 and torch.equal(got, wf.float() - wb.float())


def test_the_difference_from_a_transposed_base_is_the_whole_difference() -> None:
    """A base side that is a transposed float32 view (a packed expert dequantized as stored, held as the
    model holds it: gpt-oss's experts), beside a bfloat16 fine-tune: the same bits as the formula, the
    transposed side copied whole into a pooled buffer (strips of it are columns of what is stored)."""
    from loratool.stream.pipeline import BufferPool, widen_difference

    g = torch.Generator().manual_seed(1)
    stored = torch.randn(1500, 1000, generator=g)  # (out, in) as stored; the model holds (in, out)
    wf = torch.randn(1000, 1500, generator=g).bfloat16()
    pool = BufferPool()
    taken: list[tuple[int, ...]] = []
    take = pool.take

    def recorded(shape, dtype, device):  # type: ignore[no-untyped-def]
        taken.append(tuple(shape))
        return take(shape, dtype, device)

    pool.take = recorded  # type: ignore[method-assign]
    got = widen_difference(wf, stored.T, torch.device("cpu"), pool)
    assert got.dtype == torch.float32 and torch.equal(got, wf.float() - stored.T)
    assert taken == [(1000, 1500), (1000, 1500)]  # the transposed side made contiguous, then the difference


def test_a_tensor_the_fine_tune_left_alone_is_unchanged_without_its_difference(tmp_path: Path) -> None:
    """extract's reader tells an unchanged tensor by comparing the two sides (no float32 difference
    formed); one that changed, even in its last element only, and values that are not finite go the
    ordinary way: the difference, and its norm, or the refusal naming the side."""
    from safetensors.torch import save_file

    from loratool.errors import NonFiniteError
    from loratool.io.checkpoint import open_checkpoint
    from loratool.stream.deltas import DeltaReader

    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(16, 8, generator=g).to(torch.bfloat16) for k in ("same", "last", "inf", "nan")}
    ft = {k: v.clone() for k, v in base.items()}
    ft["last"][-1, -1] += 1
    for side in (base, ft):
        side["inf"][2, 3] = float("inf")  # the same Inf on both sides: their difference is NaN there
        side["nan"][5, 0] = float("nan")
    for name, tensors in (("b", base), ("f", ft)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    with open_checkpoint(tmp_path / "b") as b, open_checkpoint(tmp_path / "f") as f:
        read = DeltaReader(b, f, torch.device("cpu"), BufferPool())
        same = read("same")
        assert same.delta is None and same.norm == 0.0 and torch.equal(same.finetuned, ft["same"])
        last = read("last")
        assert isinstance(last.delta, torch.Tensor)
        assert torch.equal(last.delta, ft["last"].float() - base["last"].float())
        assert last.norm == pytest.approx(float(last.delta.norm()))
        for key in ("inf", "nan"):
            with pytest.raises(NonFiniteError, match="base holds NaN or Inf"):
                read(key)


def test_a_tensor_handed_over_in_pieces_is_written_as_each_is_ready(tmp_path: Path) -> None:
    """A tensor handed to the writer before it is computed (a mixture-of-experts weight's codes) is
    written a piece at a time, each once the computation marks it ready, between the tensors
    around it; the file is the one the whole tensor would give."""
    from loratool.stream.pipeline import Pieces

    specs = [TensorSpec("before", (2,), "F32"), TensorSpec("experts", (4, 3), "F32"), TensorSpec("after", (1,), "F32")]
    writer = BackgroundWriter(CheckpointWriter(tmp_path, [("model.safetensors", specs)]))
    experts, pieces = torch.zeros(4, 3), Pieces(4)
    writer.write("before", torch.ones(2))
    writer.write("experts", experts, pieces=pieces)
    for e in range(4):
        experts[e] = e + 1.0  # computed in place, then marked ready
        pieces.ready(e + 1)
    writer.write("after", torch.full((1,), 7.0))
    writer.close()
    out = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(out["experts"], torch.arange(1.0, 5.0)[:, None].expand(4, 3))
    assert torch.equal(out["before"], torch.ones(2)) and torch.equal(out["after"], torch.full((1,), 7.0))


def test_pieces_that_do_not_fit_the_declared_tensor_are_refused(tmp_path: Path) -> None:
    from loratool.errors import ShapeMismatchError
    from loratool.io.writer import SafetensorsStreamWriter

    for pieces, says in (([torch.zeros(1, 3)] * 5, "do not add up"), ([torch.zeros(1, 3)] * 3, "do not add up"),
                         ([torch.zeros(1, 2)], "a piece does not match"),
                         ([torch.zeros(1, 3, dtype=torch.float16)], "a piece does not match")):  # fmt: skip
        w = SafetensorsStreamWriter(tmp_path / "m.safetensors", [TensorSpec("experts", (4, 3), "F32")])
        with pytest.raises(ShapeMismatchError, match=says):
            w.write_pieces("experts", pieces)
        w.abort()


def test_an_abort_stops_the_writer_waiting_for_pieces_never_computed(tmp_path: Path) -> None:
    """A computation that fails halfway through a tensor handed over in pieces: abort returns (the
    writer stops waiting for the rest) instead of hanging."""
    from loratool.stream.pipeline import Pieces

    writer = BackgroundWriter(CheckpointWriter(tmp_path, [("model.safetensors", [TensorSpec("e", (3, 2), "F32")])]))
    pieces = Pieces(3)
    writer.write("e", torch.zeros(3, 2), pieces=pieces)
    pieces.ready(1)
    done = threading.Thread(target=writer.abort)
    done.start()
    done.join(5)
    assert not done.is_alive()
