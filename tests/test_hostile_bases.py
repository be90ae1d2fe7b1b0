"""Property sweep: whatever is done to one part of a packed base (a row or column less, another dtype),
extract, merge in place and merge --dtype answer with exit 0 (the part still fits) or with loratool's own
error and nothing written: never a traceback, never 'a loratool bug'. (tests/test_lowbit.py holds each
contradiction that was once read by a guess to its own refusal.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_model, peft_adapter, tiny_model
from safetensors.torch import load_file, save_file
from test_lowbit import PROJ, make_quantized

pytest.importorskip("compressed_tensors")

PARTS = {
    "int4-asym": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"),
    "nvfp4-compressed": ("weight_packed", "weight_scale", "weight_global_scale"),
    "nvfp4-modelopt": ("weight", "weight_scale", "weight_scale_2"),
}
DAMAGE = {
    "a row less": lambda t: t[:-1] if t.dim() else t.reshape(1)[:0],
    "a column less": lambda t: t[:, :-1] if t.dim() == 2 else t.reshape(-1)[:-1],
    "float32": lambda t: t.float() if t.dtype != torch.float32 else t.to(torch.int32),
    "int8": lambda t: t.view(torch.uint8).to(torch.int8) if t.element_size() == 1 else t.to(torch.int8),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    """A tiny Llama, an adapter on every projection, and the Llama in each packed format."""
    root = tmp_path_factory.mktemp("hostile")
    tiny_model("llama").save_pretrained(root / "base")
    peft_adapter(load_model("llama", root / "base"), list(PROJ), r=4, alpha=8, seed=3).save_pretrained(root / "adapter")
    for fmt in PARTS:
        make_quantized(root / "base", root / fmt, fmt)
    return root / "base", root / "adapter", {fmt: root / fmt for fmt in PARTS}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize(("fmt", "part"), [(f, p) for f, parts in PARTS.items() for p in parts])
def test_a_damaged_part_gets_an_answer_never_a_traceback(tmp_path: Path, bases, cli, fmt, part, damage) -> None:
    base, adapter, packed = bases
    q = tmp_path / "q"
    shutil.copytree(packed[fmt], q)
    ts = load_file(str(q / "model.safetensors"))
    key = f"model.layers.1.mlp.down_proj.{part}"
    ts[key] = DAMAGE[damage](ts[key]).contiguous()
    save_file(ts, str(q / "model.safetensors"), metadata={"format": "pt"})
    for args in (("merge", q, adapter, "--min-kept", "0"), ("merge", q, adapter, "--dtype", "bfloat16"),
                 ("extract", q, base, "-r", "2")):  # fmt: skip
        out = tmp_path / "out"
        res = cli(*args, "-o", out)
        said = res.stdout + res.stderr
        assert res.exit_code in (0, 1) and "loratool bug" not in said and "Traceback" not in said, (args[0], said)
        if res.exit_code == 1:
            assert said.startswith("error:") or "\nerror:" in said or "error:" in res.stderr, said
            assert not out.exists(), (args[0], said)
        shutil.rmtree(out, ignore_errors=True)
