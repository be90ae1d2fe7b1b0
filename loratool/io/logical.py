"""A checkpoint as transformers' model holds it once dequantized: each packed low-bit weight
(MXFP4, NVFP4, INT4/INT8 pack-quantized) appears once, under its logical name and shape, where
its first stored tensor stands, and reads as float32; its scales and other parts do not appear.

Adapters, base-fine-tune pairs and plans address weights by these names; writers still walk the
stored tensors (the wrapped :class:`Checkpoint`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InputFileError, MissingKeyError, ShapeMismatchError
from ..quant import packed
from ..quant.layout import PackedLayout, PackedWeight
from .checkpoint import Checkpoint, TensorInfo

if TYPE_CHECKING:
    import torch


class ModelView(Checkpoint):
    """``stored`` seen through its :class:`PackedLayout` (headers as the model's, data dequantized)."""

    def __init__(self, stored: Checkpoint, layout: PackedLayout) -> None:  # noqa: D107 - no files are opened
        self.__dict__.update(stored.__dict__)  # the same handles, files and metadata
        self.stored, self.layout = stored, layout
        infos: dict[str, TensorInfo] = {}
        for info in stored.infos():
            owner = layout.companions.get(info.name)
            if owner is None:
                infos[info.name] = info
            elif owner not in infos:
                w = layout.weights[owner]
                infos[owner] = TensorInfo(owner, w.shape, "BF16", stored.info(w.parts["codes"]).file)
        self._infos = infos

    def parts(self, w: PackedWeight, expert: int | None = None) -> packed.Parts:
        """The stored tensors of ``w`` (one expert's slices where ``expert`` is given), checked."""
        out = {}
        for role, name in w.parts.items():
            if expert is not None and role in ("codes", "scale"):
                out[role] = self.stored.get_rows(name, expert, expert + 1)[0]
            else:
                out[role] = self.stored.get(name)
        if "shape" in out:
            got = [int(x) for x in out["shape"].reshape(-1).tolist()]
            if got != list(w.rows_cols):
                raise ShapeMismatchError(
                    "the packed weight's weight_shape disagrees with its packed tensor", key=w.parts["shape"],
                    expected=list(w.rows_cols), got=got, fix="the checkpoint is damaged: download it again",
                )  # fmt: skip
        if "g_idx" in out and (out["g_idx"].numel() != w.rows_cols[1] or int(out["g_idx"].min()) < 0
                               or int(out["g_idx"].max()) >= out["scale"].shape[-1]):  # fmt: skip
            raise InputFileError(f"'{w.parts['g_idx']}' names groups the scales do not have", path=str(self.path),
                                 fix="the checkpoint is damaged: download it again")  # fmt: skip
        return out

    def get(self, key: str) -> torch.Tensor:
        """A weight as the model holds it: packed ones dequantized to float32."""
        w = self.layout.weights.get(key)
        if w is None:
            if key not in self._infos:
                raise MissingKeyError("not in the checkpoint", path=str(self.path), key=key)
            return self.stored.get(key)
        if w.experts is None:
            return packed.logical(w, packed.dequantize(w, self.parts(w)))
        return self.get_rows(key, 0, w.experts)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        w = self.layout.weights.get(key)
        if w is None:
            return self.stored.get_rows(key, start, stop)
        if w.experts is None:
            return self.get(key)[start:stop]
        import torch

        return torch.stack([packed.logical(w, packed.dequantize(w, self.parts(w, e))) for e in range(start, stop)])


def model_view(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` as the model holds it: packed low-bit weights under their logical names and shapes,
    dequantized when read (:class:`ModelView`); ``ckpt`` itself when nothing is packed."""
    layout = ckpt.packed_layout()
    return ckpt if layout is None else ModelView(ckpt, layout)
