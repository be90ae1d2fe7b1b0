"""LyCORIS LoHa and LoKr adapters (kohya-style single files), turned into LoRA by a truncated SVD.

Neither is a low-rank product, so no LoRA holds one exactly at its own rank: each module's delta
is formed whole and truncated (``convert --to peft -r R``), its relative error reported. The
deltas, as LyCORIS itself forms them (``lycoris/functional/loha.py``, ``lokr.py``), for a module
with prefix ``P``:

- LoHa: ``(P.hada_w1_a @ P.hada_w1_b) * (P.hada_w2_a @ P.hada_w2_b) * alpha / r``, the Hadamard
  product of two rank-``r`` terms (rank up to ``r**2``), ``r = hada_w1_b.shape[0]``;
- LoKr: ``kron(w1, w2) * scale``, each of ``w1``/``w2`` stored whole (``lokr_w1``) or as a product
  (``lokr_w1_a @ lokr_w1_b``); ``scale = alpha / r`` with ``r`` the rank of the first factored half
  (``w1``'s, else ``w2``'s), and 1 where both are whole (LyCORIS ignores alpha then);
- ``alpha`` absent or 0 means ``alpha = r`` (scale 1), as LyCORIS reads it.

Modules stored as plain LoRA (``lora_down``/``lora_up``, LyCORIS's LoCon) are kept as they are.
Tucker-decomposed convolutions (``hada_t1``, ``lokr_t2``), any 4-D weight and DoRA-weighted
modules (``dora_scale``) are refused by name: their deltas are not formed here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import Adapter, LoraModule
from ..errors import InputFileError, MissingKeyError, NonFiniteError, ShapeMismatchError, UnsupportedAdapterError
from ..io.checkpoint import open_checkpoint

if TYPE_CHECKING:
    import torch

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_REFUSED = {
    "hada_t1": "a Tucker-decomposed LoHa (convolution)", "hada_t2": "a Tucker-decomposed LoHa (convolution)",
    "lokr_t2": "a Tucker-decomposed LoKr (convolution)", "dora_scale": "DoRA-weighted (dora_scale)",
}  # fmt: skip
_SLOTS = (*LOHA, *LOKR, *_REFUSED, "alpha", "lora_down.weight", "lora_up.weight")
_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<slot>" + "|".join(re.escape(s) for s in _SLOTS) + r")$")


LYCORIS_WHAT = "a LyCORIS LoHa/LoKr file: its deltas are not low-rank products, so no command takes it as LoRA"
LYCORIS_FIX = "turn it into LoRA first: loratool convert FILE --to peft -r RANK --base MODEL -o adapter/"


def is_lycoris(keys: list[str]) -> bool:
    """Whether a single-file adapter's keys hold LoHa or LoKr modules."""
    return any(k.rsplit(".", 1)[-1] in (*LOHA, *LOKR) for k in keys)


def is_lycoris_file(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return False
    with open_checkpoint(p) as ck:
        return is_lycoris(list(ck.keys()))


@dataclass
class LycorisRead:
    """A LyCORIS file as LoRA: the adapter (module names are the file's prefixes), and for each
    truncated module its relative error ||delta - B A|| / ||delta||."""

    adapter: Adapter
    errors: dict[str, float] = field(default_factory=dict)


def loha_delta(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float
) -> torch.Tensor:
    """LoHa's delta: the Hadamard product of two rank-r terms, scaled."""
    return (w1a @ w1b) * (w2a @ w2b) * scale  # (out, r) @ (r, in), twice


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """LoKr's delta: the Kronecker product of the two halves, scaled."""
    import torch

    return torch.kron(w1, w2) * scale  # (a, b) x (c, d) -> (a c, b d)


def read_lycoris(file: str | os.PathLike[str], *, rank: int) -> LycorisRead:
    """Read a LyCORIS file, each LoHa/LoKr module's delta formed whole and truncated to ``rank``
    (:func:`loratool.math.linalg.top_svd`, as accurate as a full SVD) into LoRA factors with scaling 1.

    Raises:
        InputFileError, MissingKeyError, ShapeMismatchError: an unreadable or incomplete module.
        UnsupportedAdapterError: a Tucker-decomposed, convolutional or DoRA-weighted module.
    """
    import torch

    from ..math.linalg import is_finite, residual_error, split_factors, top_svd

    where = str(file)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    with open_checkpoint(file) as ck:
        metadata = ck.header_metadata
        for key in ck.keys():
            m = _KEY.match(key)
            if m is None:
                raise InputFileError(
                    f"unexpected tensor '{key}' in a LyCORIS file", path=where,
                    fix="LyCORIS files hold <prefix>.hada_w*_a/b, .lokr_w*, .lora_down/up.weight and .alpha",
                )  # fmt: skip
            if m["slot"] in _REFUSED:
                raise UnsupportedAdapterError(
                    f"{m['prefix']}: {_REFUSED[m['slot']]}: loratool forms LoHa and LoKr deltas of linear layers "
                    "only", path=where, fix="merge it with LyCORIS's own tools",
                )  # fmt: skip
            groups.setdefault(m["prefix"], {})[m["slot"]] = ck.get(key)
    out = LycorisRead(Adapter(config={"peft_type": "LORA"}, metadata=metadata, format="kohya", path=where))
    for prefix, slots in sorted(groups.items()):
        if any(t.dim() > 2 for name, t in slots.items() if name != "alpha"):
            raise UnsupportedAdapterError(
                f"{prefix}: a convolution (4-D factors): loratool forms LoHa and LoKr deltas of linear layers only",
                path=where, fix="merge it with LyCORIS's own tools",
            )  # fmt: skip
        alpha = _alpha(slots, prefix, where)
        if "lora_down.weight" in slots or "lora_up.weight" in slots:
            down, up = _need(slots, ("lora_down.weight", "lora_up.weight"), prefix, where)
            out.adapter.modules[prefix] = LoraModule(down, up, alpha=alpha if alpha else float(down.shape[0]))
            continue
        if any(s in slots for s in LOHA):
            w1a, w1b, w2a, w2b = (t.to(torch.float32) for t in _need(slots, LOHA, prefix, where))
            rank_loha = int(w1b.shape[0])
            _agree(prefix, where, w1a.shape[1] == rank_loha and w2a.shape[1] == w2b.shape[0] and
                   (w1a.shape[0], w1b.shape[1]) == (w2a.shape[0], w2b.shape[1]), slots)  # fmt: skip
            delta = loha_delta(w1a, w1b, w2a, w2b, alpha / rank_loha if alpha else 1.0)
        else:
            w1, r1 = _half(slots, "lokr_w1", prefix, where)
            w2, r2 = _half(slots, "lokr_w2", prefix, where)
            rank_lokr = r1 or r2  # None: both halves whole, and LyCORIS ignores alpha
            delta = lokr_delta(w1, w2, alpha / rank_lokr if (rank_lokr and alpha) else 1.0)
        if not is_finite(delta):
            raise NonFiniteError("its delta holds NaN or Inf", path=where, key=prefix,
                                 fix="the adapter is broken: export or train it again")  # fmt: skip
        keep = min(rank, *delta.shape)
        b, a = split_factors(top_svd(delta, keep), keep)
        out.errors[prefix] = residual_error(delta, b, a)  # consumes delta
        out.adapter.modules[prefix] = LoraModule(a, b, alpha=float(keep))
    return out


def _alpha(slots: dict[str, torch.Tensor], prefix: str, where: str) -> float:
    t = slots.get("alpha")
    if t is None:
        return 0.0
    if t.numel() != 1:
        raise ShapeMismatchError(
            "a LyCORIS module's alpha is one number", path=where, key=prefix + ".alpha", expected=[],
            got=list(t.shape), fix="the file is damaged: export it again",
        )  # fmt: skip
    return float(t.item())


def _need(slots: dict[str, torch.Tensor], names: tuple[str, ...], prefix: str, where: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in slots]
    if missing:
        raise MissingKeyError(
            f"has no {missing[0]}", path=where, key=prefix, fix="the file is incomplete: export it again"
        )
    return [slots[n] for n in names]


def _half(slots: dict[str, torch.Tensor], stem: str, prefix: str, where: str) -> tuple[torch.Tensor, int | None]:
    """One LoKr half, whole or from its factors, and the factors' rank (None when whole)."""
    import torch

    if stem in slots:
        return slots[stem].to(torch.float32), None
    a, b = (t.to(torch.float32) for t in _need(slots, (stem + "_a", stem + "_b"), prefix, where))
    _agree(prefix, where, a.shape[1] == b.shape[0], slots)
    return a @ b, int(b.shape[0])


def _agree(prefix: str, where: str, ok: bool, slots: dict[str, torch.Tensor]) -> None:
    if not ok:
        shapes = ", ".join(f"{k} {list(t.shape)}" for k, t in sorted(slots.items()) if k != "alpha")
        raise ShapeMismatchError("the factors' shapes do not fit together", path=where, key=prefix, got=shapes,
                                 fix="the file is damaged: export it again")  # fmt: skip
