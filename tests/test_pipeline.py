"""The streaming pipeline: prefetch order and errors, write-behind casting into pooled buffers."""

from __future__ import annotations

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


def test_the_writer_holds_few_computed_tensors_but_queues_borrowed_ones() -> None:
    """Behind a writer that is still busy, tensors passed on as read (borrowed) queue without limit,
    while computed ones wait once depth are queued beside the one being written; all are written
    in order."""
    import threading

    started, release, written = threading.Event(), threading.Event(), []

    class Slow:
        def write(self, name: str, tensor: torch.Tensor) -> None:
            started.set()
            release.wait()
            written.append(name)

        def close(self) -> None:
            pass

        def abort(self) -> None:
            pass

    writer = BackgroundWriter(Slow(), depth=2)  # type: ignore[arg-type]
    t = torch.zeros(3)
    writer.write("first", t, borrowed=True)
    assert started.wait(5)  # the writer is stuck on it
    for i in range(20):
        writer.write(f"b{i}", t, borrowed=True)  # none of these waits
    for i in range(3):
        writer.write(f"c{i}", t)  # depth queued, and room for the one to be written
    blocked = threading.Thread(target=writer.write, args=("c3", t))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # a fourth computed tensor waits for room
    release.set()
    blocked.join(5)
    writer.close()
    assert written == ["first", *(f"b{i}" for i in range(20)), *(f"c{i}" for i in range(4))]


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
