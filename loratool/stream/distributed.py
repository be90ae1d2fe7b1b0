"""Scale-out over ``torch.distributed``: run under ``torchrun`` (or inside an initialized process group)
and each rank takes a disjoint, size-balanced share of the work.

Nothing here schedules by itself: ``torchrun`` starts the processes, ``torch.distributed`` moves
the (small) results, and every operation stays a plain function that also runs in one process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import LoraToolError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: ``rank`` of ``world`` (0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj``, on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed (so none waits forever at the next barrier)."""
        errors = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, message = failed[0]
            raise LoraToolError(f"rank {rank} failed: {message}")

    def share(self, sizes: Iterable[tuple[str, int]]) -> list[str]:
        """The names this rank owns under a size-balanced split (:func:`balanced_share`), in the given order."""
        items = list(sizes)
        owner = balanced_share(items, self.world)
        return [name for name, _ in items if owner[name] == self.rank]

    def gather(self, work: Callable[[], T]) -> list[T]:
        """Run this rank's ``work``, then every rank's result, in rank order, on every rank.

        If any rank fails, every rank raises (so none waits forever at the next collective call).
        """
        error: BaseException | None = None
        result: T | None = None
        try:
            result = work()
        except BaseException as e:  # every rank must hear of it before anyone waits on the others
            error = e
        self.agree(error)
        return self.all_gather(result)  # type: ignore[arg-type]  # no rank failed: each has its result


def current() -> Dist:
    """The process group this process belongs to; joins the one ``torchrun`` describes if needed."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return Dist()
    if not dist.is_available():
        return Dist()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Dist()
        import torch

        if torch.cuda.is_available():  # one GPU per rank; more ranks than GPUs share them round-robin
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        # The group carries only small Python objects (results, errors, barriers), which gloo moves on
        # any machine; NCCL would refuse two ranks on one GPU and gains nothing here.
        dist.init_process_group(backend="gloo")
        atexit.register(_destroy_group)  # gloo's threads, left to static destructors at exit, can abort the process
    return Dist(dist.get_rank(), dist.get_world_size())


def _destroy_group() -> None:
    """Tear down the process group this module started, before the interpreter's own teardown."""
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):  # exiting anyway: a failed teardown changes nothing
            dist.destroy_process_group()


def balanced_share(sizes: Iterable[tuple[str, int]], world: int) -> dict[str, int]:
    """Assign items to ranks, largest first, each to the least loaded rank (LPT scheduling).

    Deterministic: every rank computes the same assignment from the same sizes.
    """
    load = [0] * world
    owner = {}
    for name, size in sorted(sizes, key=lambda t: (-t[1], t[0])):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += size
    return owner
