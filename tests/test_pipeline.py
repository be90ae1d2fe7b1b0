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
