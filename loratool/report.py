"""Per-module reports shared by extract, combine and resize."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ModuleReport:
    """How well a module's LoRA factors hold the matrix they approximate."""

    module: str
    shape: tuple[int, ...]  # the base weight's shape
    rank: int
    relative_error: float  # ||M - B A||_F / ||M||_F
    energy_kept: float  # share of ||M||_F^2 the kept singular values hold
    kind: str = "linear"
    density: float | None = None  # TIES/DARE/magnitude pruning: the share of nonzero elements kept
    sign_agreement: float | None = None  # TIES: the share of kept elements whose sign was elected

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None or k not in ("density", "sign_agreement")}
        d["shape"] = list(self.shape)
        return d


@dataclass
class Dropped:
    """A changed tensor the output does not hold, and why."""

    key: str
    norm: float  # Frobenius norm of the change that is lost
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(reports: list[ModuleReport]) -> dict[str, Any]:
    if not reports:
        return {"modules": 0}
    errs = [r.relative_error for r in reports]
    return {
        "modules": len(reports),
        "max_relative_error": max(errs),
        "mean_relative_error": sum(errs) / len(errs),
        "min_energy_kept": min(r.energy_kept for r in reports),
        "ranks": sorted({r.rank for r in reports}),
    }
