"""A checkpoint as transformers' model holds it once loaded: each packed low-bit weight (MXFP4,
NVFP4, INT4/INT8 pack-quantized) appears once, under its logical name and shape, where its first
stored tensor stands, and reads as float32 (its scales and other parts do not appear); and the
tensors of a vision-language checkpoint appear under the names transformers gives them on load
(``model.layers.0...`` as ``model.language_model.layers.0...``: :data:`loratool.arch.LIVE_NAMES`).

Adapters, base-fine-tune pairs and plans address weights by these names; writers still walk the
stored tensors (the wrapped :class:`Checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import arch
from ..errors import InputFileError, MissingKeyError, ShapeMismatchError
from ..quant.layout import PackedLayout, PackedWeight
from .checkpoint import Checkpoint, TensorInfo

if TYPE_CHECKING:  # torch (and the packed formats' arithmetic) only where data is read: headers need neither
    import torch

    from ..quant import packed


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
        from ..quant import packed

        packed.check_scales(w, out)
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
            from ..quant import packed

            return packed.logical(w, packed.dequantize(w, self.parts(w)))
        return self.get_rows(key, 0, w.experts)

    def byte_range(self, key: str) -> tuple[Path, int, int] | None:
        """None for a packed weight (no tensor holds its values as the model does: it is decoded from
        its parts), else the stored tensor's: reads that bypass safetensors take only the latter."""
        self.info(key)
        return None if key in self.layout.weights else self.stored.byte_range(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        w = self.layout.weights.get(key)
        if w is None:
            return self.stored.get_rows(key, start, stop)
        if w.experts is None:
            return self.get(key)[start:stop]
        import torch

        from ..quant import packed

        experts = [packed.logical(w, packed.dequantize(w, self.parts(w, e))) for e in range(start, stop)]
        return experts[0][None] if len(experts) == 1 else torch.stack(experts)  # (one: a view, not a copy)

    def packed_weight(self, key: str, into: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """The packed weight ``key`` (one expert of it) as the model holds it: a view of ``into``, a
        float32 buffer of its stored shape (:meth:`packed_shape`) its values are decoded into."""
        from ..quant import packed

        w = self.layout.weights[key]
        return packed.logical(w, packed.dequantize(w, self.parts(w, expert), out=into))

    def packed_shape(self, key: str, *, experts: bool = True) -> tuple[int, int] | None:
        """The stored (rows, cols) of ``key`` (one expert's) where it is a packed weight with experts
        (``experts``) or without, else None."""
        w = self.layout.weights.get(key)
        return None if w is None or (w.experts is not None) != experts else w.rows_cols


class RenamedView(Checkpoint):
    """``inner`` under the names a vision-language model holds its tensors by once loaded."""

    def __init__(self, inner: Checkpoint, rules: tuple[tuple[str, str], ...]) -> None:  # noqa: D107
        self.__dict__.update(inner.__dict__)  # the same handles, files and metadata
        self.inner = inner
        self._inner_names: dict[str, str] = {}
        infos: dict[str, TensorInfo] = {}
        for info in inner.infos():
            live = arch.live_name(rules, info.name)
            if live in infos:
                raise InputFileError(
                    f"'{info.name}' and '{self._inner_names[live]}' are both '{live}' once loaded",
                    path=str(self.path), fix="the checkpoint mixes two namings: re-save it",
                )  # fmt: skip
            infos[live] = TensorInfo(live, info.shape, info.dtype, info.file)
            self._inner_names[live] = info.name
        self._infos = infos

    def inner_name(self, key: str) -> str:
        """The name ``key`` (as the model holds it) has in the wrapped checkpoint."""
        return self._inner_names.get(key, key)

    def get(self, key: str) -> torch.Tensor:
        self.info(key)  # a MissingKeyError that names the model's name
        return self.inner.get(self._inner_names[key])

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        self.info(key)
        return self.inner.get_rows(self._inner_names[key], start, stop)

    def byte_range(self, key: str) -> tuple[Path, int, int] | None:
        self.info(key)
        return self.inner.byte_range(self._inner_names[key])


def model_view(ckpt: Checkpoint, *, live_names: bool = True) -> Checkpoint:
    """``ckpt`` as the model holds it: packed low-bit weights under their logical names and shapes,
    dequantized when read (:class:`ModelView`), and with ``live_names`` a vision-language
    checkpoint's tensors under the names transformers gives them on load (:class:`RenamedView`,
    over the packed view of a quantized one: the plan names weights as the model does, the
    stream, FP8 and packed layouts as the files do); ``ckpt`` itself when neither applies."""
    layout = ckpt.packed_layout()
    view = ckpt if layout is None else ModelView(ckpt, layout)
    rules = arch.live_name_rules(ckpt.config()) if live_names else None
    if not rules:
        return view
    return RenamedView(view, rules)


def live_keys(ckpt: Checkpoint) -> dict[str, str]:
    """Each tensor's name as the model holds it -> its name in ``ckpt``: the same name but for a
    vision-language model's tensors (headers only; packed weights keep their stored names here)."""
    rules = arch.live_name_rules(ckpt.config())
    return {arch.live_name(rules, k) if rules else k: k for k in ckpt.keys()}
