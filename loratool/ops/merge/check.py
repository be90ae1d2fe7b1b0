"""``unmerge --check``: how far the restored checkpoint lies from the original base (in units of
rounding, or in FP8 steps), compared in chunks as the tensors stream by."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import NonFiniteError, RoundTripError, ShapeMismatchError
from ...host import available_cores
from ...math.linalg import is_finite, unit_of_rounding
from ...quant import native
from ...quant.fp8 import dequantize_fp8
from ...quant.layout import Fp8Scheme

_CHECK_CHUNK = 1 << 18  # elements --check compares at a time (1 to 2 MiB a copy: reused, never fresh pages)


@dataclass
class RoundTripCheck:
    """How far an unmerged checkpoint is from the original base."""

    max_abs_diff: float = 0.0
    relative_diff: float = 0.0  # ||out - base||_F / ||base||_F over all tensors
    max_rounding_units: float = 0.0  # largest difference in units of rounding of the stored dtype
    worst_tensor: str | None = None  # where that largest difference lies
    elements_differing: int = 0
    elements: int = 0
    _sq_diff: float = 0.0
    _sq_base: float = 0.0

    def add(self, out: torch.Tensor, ref: torch.Tensor, merged: torch.Tensor, key: str | None = None) -> None:
        """Compare one restored tensor with the original; ``merged`` is the unmerge's input.

        In float64, a chunk of ``_CHECK_CHUNK`` elements at a time: the widened copies of a whole
        weight cost more in fresh pages than the arithmetic (45x the unmerge itself, before)."""
        if not out.is_floating_point():
            return
        if out.shape != ref.shape:
            raise ShapeMismatchError("--check BASE has this tensor in another shape", key=key,
                                     expected=list(out.shape), got=list(ref.shape))  # fmt: skip
        if self._native(out, ref, merged, key):
            self._require_finite(key, ref)
            return
        o, r, m = out.reshape(-1), ref.reshape(-1), merged.reshape(-1)
        # bfloat16 and float16 values, their differences and their units are exact in float32
        wide = torch.float32 if out.dtype in (torch.bfloat16, torch.float16) else torch.float64
        for i in range(0, o.numel(), _CHECK_CHUNK):
            oc, rc = o[i : i + _CHECK_CHUNK], r[i : i + _CHECK_CHUNK]
            if rc.dtype != oc.dtype:  # a base of another dtype: compared exactly, in float64
                oc, rc, wide = oc.double(), rc.double(), torch.float64
            rw = rc.to(wide)
            self._sq_base += float(torch.dot(rw, rw))  # the base's energy: a relative figure, float32 is plenty
            at = torch.nonzero(oc != rc).squeeze(1)  # a round trip brings most elements back exactly
            n = at.numel()
            if n == 0:
                continue
            od, rd, md = (t.index_select(0, at).to(wide) for t in (oc, rc, m[i : i + _CHECK_CHUNK]))
            diff = od - rd
            # A round trip rounds twice, at the magnitude of the merged and of the restored value.
            units = diff.abs() / unit_of_rounding(torch.maximum(rd.abs(), md.abs()), out.dtype)
            self.max_abs_diff = max(self.max_abs_diff, float(diff.abs().max()))
            self._note_units(float(units.max()), key)
            self._sq_diff += float(torch.sum(diff.square(), dtype=torch.float64))
            self.elements_differing += n
        self.relative_diff = (self._sq_diff / self._sq_base) ** 0.5 if self._sq_base else 0.0
        self.elements += out.numel()
        self._require_finite(key, ref)

    def _note_units(self, units: float, key: str | None) -> None:
        if units > self.max_rounding_units:
            self.max_rounding_units, self.worst_tensor = units, key

    def _require_finite(self, key: str | None, *refs: torch.Tensor) -> None:
        """A NaN or Inf in the original base makes its summed squares, and every figure after it, NaN,
        and the largest difference pass it by: refused, by name. The sums the check takes anyway tell
        it; only a non-finite one (or a finite sum that overflowed) looks at the tensor itself."""
        if not math.isfinite(self._sq_base) and not all(is_finite(r) for r in refs):
            raise NonFiniteError("--check BASE holds NaN or Inf", key=key,
                                 fix="check against the original base, which a merge takes only finite")  # fmt: skip

    def _native(self, out: torch.Tensor, ref: torch.Tensor, merged: torch.Tensor, key: str | None) -> bool:
        """bfloat16 on the CPU: the compiled kernel's one pass (csrc/fp8.c, lt_check_bf16), the tensor cut
        in parts for the cores; the same figures as the torch passes below (the sums up to rounding)."""
        kernels = native.fp8_kernels()
        tensors = (out, ref, merged)
        if kernels is None or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in tensors):
            return False
        o, r, m = (t.reshape(-1).contiguous() for t in tensors)
        n, parts = o.numel(), max(1, min(available_cores(), o.numel() // _CHECK_CHUNK))
        bounds = [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]

        def part(bound: tuple[int, int]) -> tuple[torch.Tensor, int]:
            lo, hi = bound
            sums = torch.zeros(4, dtype=torch.float64)
            return sums, kernels.check_bf16(o[lo:hi], r[lo:hi], m[lo:hi], sums)

        for sums, differing in native.run_parts(part, bounds):
            self._sq_base += float(sums[0])
            self._sq_diff += float(sums[1])
            self.max_abs_diff = max(self.max_abs_diff, float(sums[2]))
            self._note_units(float(sums[3]), key)
            self.elements_differing += differing
        self.relative_diff = (self._sq_diff / self._sq_base) ** 0.5 if self._sq_base else 0.0
        self.elements += n
        return True

    def add_fp8(
        self,
        out: tuple[torch.Tensor, torch.Tensor],
        ref: tuple[torch.Tensor, torch.Tensor],
        merged: tuple[torch.Tensor, torch.Tensor],
        scheme: Fp8Scheme,
        key: str | None = None,
    ) -> None:
        """Compare a restored FP8 weight (q, scale) with the original, dequantized. A round trip
        rounds on the merged grid and on the restored one, each with its own scales: a unit is the
        coarsest of the three grids' spacings at each element."""

        def values_and_unit(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return dequantize_fp8(q, scale, scheme).double(), fp8_steps(q, scale, scheme)

        (o, uo), (r, ur), (_, um) = values_and_unit(*out), values_and_unit(*ref), values_and_unit(*merged)
        diff = o - r
        if diff.numel():
            self.max_abs_diff = max(self.max_abs_diff, float(diff.abs().max()))
            units = diff.abs() / torch.maximum(torch.maximum(uo, ur), um)
            self._note_units(float(units.max()), key)
        q, ref_q = out[0], ref[0]
        self._sq_diff += float(diff.square().sum())
        self._sq_base += float(r.square().sum())
        self.relative_diff = (self._sq_diff / self._sq_base) ** 0.5 if self._sq_base else 0.0
        self.elements_differing += int((q.view(torch.uint8) != ref_q.view(torch.uint8)).sum())
        self.elements += q.numel()
        self._require_finite(key, *ref)

    def add_grid(self, out: torch.Tensor, ref: torch.Tensor, unit: torch.Tensor, differing: int,
                 key: str | None = None) -> None:  # fmt: skip
        """Compare restored values of a packed low-bit weight with the original's (float32), in
        ``unit``s, each element's coarsest grid step of the merged, restored and original grids;
        ``differing``: how many stored codes differ."""
        diff = out.double() - ref.double()
        if diff.numel():
            self.max_abs_diff = max(self.max_abs_diff, float(diff.abs().max()))
            self._note_units(float((diff.abs() / unit.double()).max()), key)
        self._sq_diff += float(diff.square().sum())
        self._sq_base += float(ref.double().square().sum())
        self.relative_diff = (self._sq_diff / self._sq_base) ** 0.5 if self._sq_base else 0.0
        self.elements_differing += differing
        self.elements += out.numel()
        self._require_finite(key, ref)

    @staticmethod
    def combine(parts: list[RoundTripCheck]) -> RoundTripCheck:
        """The check over all ranks' shares."""
        out = RoundTripCheck()
        for p in parts:
            out.max_abs_diff = max(out.max_abs_diff, p.max_abs_diff)
            out._note_units(p.max_rounding_units, p.worst_tensor)
            out.elements_differing += p.elements_differing
            out.elements += p.elements
            out._sq_diff += p._sq_diff
            out._sq_base += p._sq_base
        out.relative_diff = (out._sq_diff / out._sq_base) ** 0.5 if out._sq_base else 0.0
        return out

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def require_round_trip(check: RoundTripCheck, max_units: float | None) -> None:
    """Refuse a restored checkpoint further than ``max_units`` units of rounding from the original."""
    if max_units is not None and not check.max_rounding_units <= max_units:
        raise RoundTripError(
            f"the restored weights lie up to {check.max_rounding_units:.2f} unit(s) of rounding from the original "
            f"base (in '{check.worst_tensor}'), more than --max-units {max_units:g}; nothing was written",
            fix="unmerge the adapters and scales that were merged, from the checkpoint they were merged into: a "
            "bf16/fp16 round trip lands within 1 unit, an FP8 or 4-bit one within the merge's rounding and the "
            "unmerge's (2 steps); float32 weights round at the magnitude of the adapters' terms, which can be "
            "many units of a small weight",
        )


def fp8_steps(q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme) -> torch.Tensor:
    """Each element's FP8 unit of rounding at its value, in real units (float64)."""
    grid = dequantize_fp8(torch.ones_like(q), scale, scheme).double()  # each element's scale
    x = dequantize_fp8(q, scale, scheme).double()
    return unit_of_rounding((x / grid).abs(), q.dtype) * grid
