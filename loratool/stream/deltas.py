"""A base and a fine-tune read side by side, as a stream of float32 deltas (extract, analyze)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

import torch

from ..arch import OUTPUT_LAYER, UNTIE_STEPS, is_embedding, tied_output
from ..errors import MissingKeyError, NonFiniteError, ShapeMismatchError, UnsupportedCheckpointError
from ..io.checkpoint import Checkpoint, dtype_kind, torch_dtype
from ..io.directread import STRIP_BYTES, DirectReader
from ..io.logical import ModelView
from ..math.linalg import is_finite, squared_norm
from ..quant.fp8 import check_scale, dequantize_fp8
from ..quant.layout import Fp8Layout
from .pipeline import BufferPool, give_back, widen_difference


class ExpertDeltas:
    """The float32 difference of a 3-D experts parameter (E, a, b), one expert at a time: ``[e]``
    reads expert e's rows of both checkpoints and subtracts them, so memory holds one expert, never
    all of them (gpt-oss-120b's largest parameter would be several GB in float32)."""

    def __init__(self, key: str, base: Checkpoint, finetuned: Checkpoint, device: torch.device, pool: BufferPool):
        self.key, self.b, self.f, self.device, self.pool = key, base, finetuned, device, pool
        self.shape = tuple(base.info(key).shape)

    def dim(self) -> int:
        return 3

    def sides(self, e: int, into: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e of the base and of the fine-tune, as the model holds them; a packed base's expert
        decoded into ``into`` (a float32 buffer of :meth:`ModelView.packed_shape`) where given."""
        if into is not None and isinstance(self.b, ModelView):
            wb = self.b.packed_weight(self.key, into, expert=e)
        else:
            wb = self.b.get_rows(self.key, e, e + 1)[0]
        return wb, self.f.get_rows(self.key, e, e + 1)[0]

    def __getitem__(self, e: int) -> torch.Tensor:
        """Expert e's float32 delta, in a buffer of the pool: :meth:`release` it once consumed."""
        # a packed base's experts decoded into one reused buffer: a fresh one an expert cost a page fault
        # each 4 KiB (twice an expert: the norm's pass reads them too)
        shape = self.b.packed_shape(self.key) if isinstance(self.b, ModelView) else None
        into = self.pool.take(shape, torch.float32, torch.device("cpu")) if shape is not None else None
        try:
            wb, wf = self.sides(e, into)
            return widen_difference(wf, wb.to(self.device), self.device, self.pool)
        finally:
            if into is not None:
                self.pool.give(into)

    def release(self, d: torch.Tensor) -> None:
        give_back(d, self.pool)

    def finetuned_whole(self) -> torch.Tensor:
        return self.f.get(self.key)


class Delta(NamedTuple):
    """One paired tensor: the base's and the fine-tune's as read, and their float32 difference
    (``None`` for integer tensors and for floating ones the fine-tune left as they were;
    :class:`ExpertDeltas` for 3-D experts, where the reader was asked for them) with its Frobenius
    norm (0: unchanged)."""

    key: str
    base: torch.Tensor
    finetuned: torch.Tensor
    delta: torch.Tensor | ExpertDeltas | None
    norm: float

    @property
    def nbytes(self) -> int:
        """The bytes its float32 difference holds in memory (an expert at a time: none held whole)."""
        return self.delta.numel() * self.delta.element_size() if isinstance(self.delta, torch.Tensor) else 0


def _unchanged(wb: torch.Tensor, wf: torch.Tensor) -> bool:
    """Whether two floating tensors hold the same finite values, so that their difference is all zeros:
    ``torch.equal`` stops at the first element that differs, and a pass of ``aminmax`` (NaN or an
    infinity in its answer where one is in the tensor) leaves those to the difference's own check."""
    if wb.dtype != wf.dtype or wb.shape != wf.shape or wb.numel() == 0 or not torch.equal(wb, wf):
        return False
    lo, hi = torch.aminmax(wb)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


class DeltaReader:
    """Reads ``fine-tune - base`` per key, on ``device``; FP8 weights are dequantized first.

    Meant for the prefetch thread of :func:`loratool.stream.pipeline.stream`: reading, upcasting,
    subtracting and measuring overlap the consumer's SVD. The delta is widened into a buffer of
    ``pool``; the consumer gives it back once used (see :mod:`loratool.stream.pipeline`).
    """

    def __init__(
        self,
        base: Checkpoint,
        finetuned: Checkpoint,
        device: torch.device,
        pool: BufferPool,
        fp8: tuple[Fp8Layout | None, Fp8Layout | None] = (None, None),
        *,
        experts_apart: bool = False,
        direct: frozenset[str] = frozenset(),
        direct_sides: tuple[bool, bool] = (True, True),
        tee: Mapping[Path, Callable[[int, memoryview], None]] | None = None,
        base_unused: bool = False,
    ) -> None:
        self.b, self.f, self.device, self.pool, self.fp8 = base, finetuned, device, pool, fp8
        # the consumer reads only the delta (extract, not analyze): a packed base weight is decoded into a
        # reused buffer and the Delta holds the base as meta
        self.base_unused = base_unused
        self.experts_apart = experts_apart  # 3-D floating tensors as ExpertDeltas, one expert in memory
        self.direct = direct  # keys read with O_DIRECT (only their delta is used: base and fine-tune come as meta)
        self.direct_sides = direct_sides  # of those, which sides (base, fine-tune) are read so
        self.tee = tee  # files whose direct reads also feed their hash (DirectReader's tee)
        self._reader: DirectReader | None = None
        self._io_threads: list[ThreadPoolExecutor] = []  # a thread a side for the direct reads

    def __call__(self, key: str) -> Delta:
        if self.experts_apart and self._experts(key):  # base and fine-tune as meta tensors: nothing read whole
            experts = ExpertDeltas(key, self.b, self.f, self.device, self.pool)
            sq = 0.0
            for e in range(experts.shape[0]):  # the norm, an expert at a time (the consumer reads them again)
                sq += squared_norm(d := experts[e])
                if not (math.isfinite(norm := math.sqrt(sq)) and norm * norm <= _FLOAT32_MAX):
                    _require_finite(key, norm, d, *experts.sides(e))  # (the sides read again only to name one)
                experts.release(d)
            return Delta(key, self.b.get_meta(key), self.f.get_meta(key), experts, math.sqrt(sq))
        if key in self.direct and (delta := self._direct_difference(key)) is not None:
            if delta is _SAME:  # every strip the same finite values on both sides
                return Delta(key, self.b.get_meta(key), self.f.get_meta(key), None, 0.0)
            norm = math.sqrt(squared_norm(delta))
            if not (math.isfinite(norm) and norm * norm <= _FLOAT32_MAX):
                _require_finite(key, norm, delta, self.b.get(key), self.f.get(key))
            return Delta(key, self.b.get_meta(key), self.f.get_meta(key), delta, norm)
        # a packed or FP8 base weight the consumer does not read (extract) is decoded into a buffer of the pool
        # (a fresh tensor a weight costs a page fault each 4 KiB), handed back once the difference is formed
        packed_shape = None
        if self.base_unused and self.device.type == "cpu" and isinstance(self.b, ModelView):
            packed_shape = self.b.packed_shape(key, experts=False)
        fp8_shape = None
        if self.base_unused and self.device.type == "cpu" and self.fp8[0] is not None and key in self.fp8[0].weights:
            fp8_shape = tuple(self.b.info(key).shape)
        shape = packed_shape or fp8_shape
        into = self.pool.take(shape, torch.float32, self.device) if shape is not None else None
        try:
            if into is not None and packed_shape is not None:
                assert isinstance(self.b, ModelView)
                wb = self.b.packed_weight(key, into)
            else:
                wb = read_weight(self.b, self.fp8[0], key, self.device, out=into)
            wf = read_weight(self.f, self.fp8[1], key, self.device)
            held = wb if into is None else self.b.get_meta(key)  # the base the Delta hands on
            if not wb.is_floating_point():
                return Delta(key, held, wf, None, 0.0 if torch.equal(wb, wf) else 1.0)
            if _unchanged(wb, wf):  # no difference to form: an unchanged embedding in a tenth of the time
                return Delta(key, held, wf, None, 0.0)
            delta = widen_difference(wf, wb, self.device, self.pool)
            norm = math.sqrt(squared_norm(delta))  # one norm tells changed (> 0) and finite
            _require_finite(key, norm, delta, wb, wf)
            return Delta(key, held, wf, delta, norm)
        finally:
            if into is not None:
                self.pool.give(into)

    def _direct_difference(self, key: str) -> torch.Tensor | None:
        """``fine-tune - base`` in float32 as :func:`widen_difference` forms it (the same elementwise
        operations, so the same bits), the rows of each side in ``direct_sides`` read with O_DIRECT a
        strip at a time into a reused buffer (the other side memory-mapped); None where that cannot be
        done (a pickled or FP8 tensor, dtypes or shapes that differ, a file system that refuses), for
        the ordinary read; :data:`_SAME` where both sides hold the same finite values (strips compared as
        :func:`_unchanged` compares tensors, the leading ones left unwidened until one differs)."""
        ib, i_f = self.b.info(key), self.f.info(key)
        rb, rf = self.b.byte_range(key), self.f.byte_range(key)
        fp8 = any(layout is not None and key in layout.weights for layout in self.fp8)
        if (ib.dtype != i_f.dtype or ib.shape != i_f.shape or ib.dtype not in ("BF16", "F16", "F32") or fp8
                or not ib.shape or rb is None or rf is None or self.device.type != "cpu"):  # fmt: skip
            return None
        ranges = (rb, rf)
        if self._reader is None:
            self._reader = DirectReader(buffers=4, tee=self.tee)  # two a side
        reader, rows, nbytes = self._reader, ib.shape[0], ranges[0][2]
        row_bytes = nbytes // rows if rows else 0
        direct = [side and reader.usable(r[0]) for side, r in zip(self.direct_sides, ranges)]
        if not any(direct) or not 0 < row_bytes <= STRIP_BYTES:
            return None
        dtype = torch_dtype(ib.dtype)
        whole = [None if d else ck.get(key).view(rows, -1) for d, ck in zip(direct, (self.b, self.f))]
        step = STRIP_BYTES // row_bytes  # rows a read: elementwise, so any strip gives the same bits
        spans = [(i, min(step, rows - i)) for i in range(0, rows, step)]
        # each side's reads on its own thread, a strip ahead of the widening (into the other of its two
        # buffers): the disk keeps reading while a strip is widened, both sides' reads at once; one
        # thread where both sides are the same file (its reads feed one hash, in order)
        io = self._io if ranges[0][0] != ranges[1][0] else self._io[:1] * 2

        def fetch(k: int) -> list[Future[memoryview | None] | None]:
            i, n = spans[k]
            return [io[s].submit(reader.read, 2 * s + k % 2, path, offset + i * row_bytes, n * row_bytes)
                    if whole[s] is None else None for s, (path, offset, _) in enumerate(ranges)]  # fmt: skip

        out = self.pool.take(ib.shape, torch.float32, self.device)
        flat = out.view(rows, -1)
        scratch = self.pool.take((min(step, rows), flat.shape[1]), torch.float32, self.device)  # a base strip widened
        reads: list[Future[memoryview | None] | None] = []
        ahead = fetch(0)
        same = True  # every strip so far the same on both sides: the delta's rows up to here all zero
        try:
            for k, (i, n) in enumerate(spans):
                reads, ahead = ahead, fetch(k + 1) if k + 1 < len(spans) else []
                strips = []
                for side, r in enumerate(reads):
                    t = whole[side]
                    if t is not None:
                        strips.append(t[i : i + n])
                    elif (view := r.result() if r is not None else None) is not None:
                        strips.append(torch.frombuffer(view, dtype=dtype).view(n, -1))
                    else:
                        give_back(out, self.pool)
                        return None
                if same and _unchanged(strips[0], strips[1]):
                    continue
                if same:  # the strips before this one were the same: x - x, finite, is +0
                    flat[:i].zero_()
                    same = False
                flat[i : i + n].copy_(strips[1]).sub_(scratch[:n].copy_(strips[0]))
        finally:
            wait([r for r in (*reads, *ahead) if r is not None])  # no read left writing into the buffers
            self.pool.give(scratch)  # reused, not freed: a temporary a strip would stay with the allocator
        if same:
            give_back(out, self.pool)
            return _SAME
        return out

    @property
    def _io(self) -> list[ThreadPoolExecutor]:
        if not self._io_threads:
            self._io_threads = [ThreadPoolExecutor(1, thread_name_prefix="loratool-read") for _ in range(2)]
        return self._io_threads

    def close(self) -> None:
        """Close the direct readers' files (the memory-mapped ones close with their checkpoints)."""
        for pool in self._io_threads:
            pool.shutdown(wait=True)
        self._io_threads = []
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _experts(self, key: str) -> bool:
        """A 3-D floating-point tensor stored as such on both sides (FP8 ones are dequantized whole)."""
        info = self.b.info(key)
        fp8 = any(layout is not None and key in layout.weights for layout in self.fp8)
        return len(info.shape) == 3 and torch_dtype(info.dtype).is_floating_point and not fp8


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_SAME = torch.empty(0)  # _direct_difference's answer for a tensor the fine-tune left as it was


def _require_finite(key: str, norm: float, delta: torch.Tensor, wb: torch.Tensor, wf: torch.Tensor) -> None:
    """NaN or Inf on either side reaches the delta's norm: name the side that holds it. Finite sides
    whose difference, or its norm, overflows float32 (where the SVD and its error are computed) are
    refused too: values near 1e19 and beyond are no trained weights. (``norm`` is summed in float64:
    a square past float32's range is checked here, where a float32 sum would have overflowed.)"""
    if math.isfinite(norm) and norm * norm <= _FLOAT32_MAX:
        return
    for name, side in (("base", wb), ("fine-tune", wf)):
        if not is_finite(side):
            raise NonFiniteError(f"the {name} holds NaN or Inf", key=key, fix="repair the checkpoint")
    what = "the difference" if not is_finite(delta) else "the norm of the difference"
    raise NonFiniteError(
        f"{what} of base and fine-tune overflows float32, where the SVD runs",
        key=key,
        fix="values this large are no trained weights: check that neither checkpoint is corrupt",
    )


def read_weight(ck: Checkpoint, fp8: Fp8Layout | None, key: str, device: torch.device,
                out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """A tensor as stored (on the CPU), or an FP8 weight dequantized to float32 on ``device`` (into
    ``out``, a float32 tensor of its shape, where given)."""
    if fp8 is None or key not in fp8.weights:
        return ck.get(key)
    w = fp8.weights[key]
    scale = ck.get(w.scale_key)
    check_scale(w.scale_key, scale)
    return dequantize_fp8(ck.get(key).to(device), scale, w.scheme, out=out)


def paired_keys(b: Checkpoint, f: Checkpoint, *, skip: set[str]) -> list[str]:
    """The tensors both hold, in the base's order; FP8 scales (``skip``) pair with nothing.

    Raises MissingKeyError or ShapeMismatchError when the two are not one architecture.
    """
    missing = [k for k in b.keys() if k not in f and k not in skip]
    extra = [k for k in f.keys() if k not in b and k not in skip]
    head = OUTPUT_LAYER + ".weight"
    if extra == [head] and not missing and tied_output(list(b.keys()), b.config()) is not None:
        raise MissingKeyError(
            f"the base ties {OUTPUT_LAYER} to its input embedding (one matrix, no {head}), and the fine-tune stores a "
            f"{head} of its own: its training untied the two", path=str(f.path), key=head,
            fix=f"untie a copy of the base ({UNTIE_STEPS}) and extract against that",
        )  # fmt: skip
    if missing or extra:
        key = (missing or extra)[0]
        where = "the fine-tune lacks" if missing else "the base lacks"
        count = len(missing) + len(extra)
        raise MissingKeyError(
            f"{where} this tensor ({count} unpaired in all)",
            path=str(f.path if missing else b.path),
            key=key,
            fix="BASE and FT must be the same architecture with the same tensor names",
        )
    keys = [k for k in b.keys() if k not in skip]
    for k in keys:
        ib, jf = b.info(k), f.info(k)
        if ib.shape != jf.shape:
            raise ShapeMismatchError(
                "base and fine-tune shapes differ",
                key=k,
                expected=list(ib.shape),
                got=list(jf.shape),
                fix="was the vocabulary resized? Compare checkpoints of one architecture",
            )
        kb, kf = dtype_kind(ib.dtype), dtype_kind(jf.dtype)
        if kb != kf:  # a difference of floats and integers means nothing
            raise UnsupportedCheckpointError(
                f"the base holds {kb} values ({ib.dtype}) and the fine-tune {kf} ones ({jf.dtype}): a weight "
                "quantized on one side without a quantization_config that says how, or a damaged tensor", key=k,
                fix="compare checkpoints whose weights are both floating point (or quantized with their configs)",
            )  # fmt: skip
    return keys


def grown_vocabulary(b: Checkpoint, f: Checkpoint) -> list[str]:
    """Vocabulary tensors (input embeddings, the output layer) that have more rows in the fine-tune
    than in the base, columns equal: tokens were added. They pair with nothing: a LoRA delta
    cannot hold new rows, so extract stores them whole."""
    out = []
    for k in b.keys():
        if k not in f or not k.endswith(".weight"):
            continue
        sb, sf = tuple(b.info(k).shape), tuple(f.info(k).shape)
        module = k[: -len(".weight")]
        vocabulary = is_embedding(module) or module.rsplit(".", 1)[-1] == OUTPUT_LAYER
        if vocabulary and len(sb) == len(sf) == 2 and sf[1] == sb[1] and sf[0] > sb[0]:
            out.append(k)
    return out


def fp8_companions(*layouts: Fp8Layout | None) -> set[str]:
    """The scale tensors of FP8 weights: read with their weight, never paired on their own."""
    return {c for layout in layouts if layout for c in layout.companions}


def module_generator(seed: int, module: str) -> torch.Generator:
    """A generator per module, so a module's randomized SVD does not depend on which others are
    processed, in what order, or by which process."""
    return seeded_generator(seed, module)


def seeded_generator(seed: int, label: str, offset: int = 0) -> torch.Generator:
    """A CPU generator for ``label`` under ``seed``, seeded with seed * 1,000,003 + crc32(label) +
    offset; any seed: a value past the range torch takes ([-2^63, 2^64)), which it refuses with an
    overflow, is taken modulo 2^64 (the values inside it, as ever)."""
    value = seed * 1_000_003 + zlib.crc32(label.encode()) + offset
    if not -(2**63) <= value < 2**64:
        value %= 2**64
    return torch.Generator(device="cpu").manual_seed(value)
