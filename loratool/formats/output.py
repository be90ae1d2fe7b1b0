"""What every adapter writer (PEFT, kohya, diffusers, mlx-lm, GGUF) checks before it writes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import NonFiniteError

if TYPE_CHECKING:
    import torch


def require_finite_output(
    tensors: Mapping[str, torch.Tensor], out: str | os.PathLike[str], *, wider: str = "--dtype float32"
) -> None:
    """Refuse to write an adapter whose tensors, in the dtype they are written in, hold NaN or Inf,
    naming the first (every adapter writer asks, before it writes). Its inputs were finite
    (:func:`loratool.formats.require_finite`), so such a value overflowed: a scale given with the
    adapters, or a cast to float16 (largest 65504) or bfloat16 (``wider``: the option that writes
    float32 instead)."""
    import torch

    from ..math.linalg import is_finite  # torch's: imported where an adapter is written, not read

    for key, t in tensors.items():
        if not is_finite(t):
            dtype = str(t.dtype).removeprefix("torch.")
            half = t.dtype in (torch.float16, torch.bfloat16)
            raise NonFiniteError(
                f"the adapter to write would hold Inf or NaN here: its values pass {dtype}'s range "
                f"(+-{torch.finfo(t.dtype).max:.6g})", path=str(out), key=key,
                fix="check the scales given with the adapters (ADAPTER:SCALE)"
                + (f", or write float32 ({wider})" if half else ""),
            )  # fmt: skip
