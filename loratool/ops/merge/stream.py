"""The streaming pass: read a tensor, add its terms in float32 on the device, round back (FP8 or packed
4-bit grids included), cast once and write; --check compared on the way."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...adapter import LoraModule
from ...errors import MissingKeyError, NonFiniteError, UnsupportedCheckpointError
from ...host import available_cores, compute_threads, torch_threads
from ...io.checkpoint import Checkpoint, torch_dtype
from ...io.logical import ModelView, model_view
from ...io.writer import CheckpointWriter, TensorSpec
from ...math.linalg import RowFactors, add_lora, dora_rescale, is_finite, merge_rows, row_factors
from ...quant import native, packed
from ...quant.fp8 import check_scale, dequantize_fp8, fp8_scratch_elements, merge_fp8_rows, quantize_fp8
from ...quant.layout import Fp8Layout, Fp8Scheme, PackedLayout, PackedWeight
from ...quant.rounding import Kept, Rounding, Subspace, quantize_values, round_subspace, subspace_of, uniforms
from ...stream.pipeline import QUEUE_BYTES, BackgroundWriter, BufferPool, Pieces, fault_in, stream, to_device, widen
from .check import RoundTripCheck, fp8_steps
from .plan import Term
from .quantized import FP8_BLOCK

PackedInputs = tuple[packed.Parts, packed.LowRank, int | None, Subspace | None]


@dataclass
class Stream:
    """One pass over a share of the checkpoint: read, add the terms in float32, cast once, write."""

    ckpt: Checkpoint
    replace: dict[str, torch.Tensor]
    terms: dict[str, list[Term]]
    bias_terms: dict[str, Term]
    device: torch.device
    out_dtype: torch.dtype | None
    reference: Checkpoint | None
    check: RoundTripCheck | None
    fp8: Fp8Layout | None = None
    dequantize: bool = False  # FP8 weights are written in out_dtype, their scales dropped
    rounding: Rounding = field(default_factory=Rounding)  # onto the FP8 grid, or out_dtype's when dequantizing
    pool: BufferPool = field(default_factory=BufferPool)
    low_bit: PackedLayout | None = None  # MXFP4 / NVFP4 / INT4 weights (by logical name)
    view: Checkpoint | None = None  # the base as the model holds it: packed weights dequantized on read
    _reference_model: Checkpoint | None = None  # --check's base, likewise
    to_fp8: set[str] = field(default_factory=set)  # packed weights written as FP8 blocks (merge --requantize fp8)
    requantized: list[tuple[str, Kept]] = field(default_factory=list)  # per quantized weight changed: what it kept
    _stash: dict[str, tuple[torch.Tensor, bool]] = field(default_factory=dict)  # an FP8 pair's other half (pooled?)
    _later: set[str] = field(default_factory=set)  # FP8 pair members that come after their partner
    # each packed weight requantized in place -> the one written after it; their inputs prepared ahead
    _packed_next: dict[str, str] = field(default_factory=dict)
    _prepared: dict[tuple[str, int | None], Future[PackedInputs]] = field(default_factory=dict)
    _ahead: ThreadPoolExecutor | None = None
    # pieces whose compiled requantization is under way (begun while the one before was computed), and
    # the codes buffer taken early for the weight whose first piece that is
    _started: dict[tuple[str, int | None], tuple[PackedInputs, packed.Started]] = field(default_factory=dict)
    _early_codes: dict[str, torch.Tensor] = field(default_factory=dict)
    _writer: BackgroundWriter | None = None  # while writing: results handed over as they are computed

    def __post_init__(self) -> None:
        # FP8 weights to rewrite (those with terms, or all when dequantizing), by weight and by scale key
        self._pair_of: dict[str, str] = {}
        for wkey, w in self.fp8.weights.items() if self.fp8 else []:
            if self.dequantize or wkey in self.terms:
                self._pair_of[wkey] = wkey
                self._pair_of[w.scale_key] = wkey
        # packed weights to requantize in place: each stored part -> the logical weight (computed at its first part)
        self._group_of: dict[str, str] = {}
        for wkey, pw in self.low_bit.weights.items() if self.low_bit and not self.dequantize else []:
            if wkey in self.to_fp8:  # written as an FP8 weight and its scale, named as compressed-tensors names them
                self._group_of.update({wkey: wkey, wkey + "_scale": wkey})
            elif wkey in self.terms:
                self._group_of.update({name: wkey for name in pw.parts.values()})
        if self.device.type == "cuda":  # the factors cross once (a small pageable copy per weight waits on the GPU)
            on_gpu: dict[int, LoraModule] = {}
            for m in {id(t.module): t.module for ts in self.terms.values() for t in ts}.values():
                a, b = m.lora_A.to(self.device, torch.float32), m.lora_B.to(self.device, torch.float32)
                on_gpu[id(m)] = dataclasses.replace(m, lora_A=a, lora_B=b)
            self.terms = {
                k: [dataclasses.replace(t, module=on_gpu[id(t.module)]) for t in ts] for k, ts in self.terms.items()
            }

    def write(self, root: Path, shards: list[tuple[str, list[TensorSpec]]], metadata: dict[str, str], show: bool,
              desc: str) -> None:  # fmt: skip
        # Three stages on three threads: read (prefetch), add the terms (here), and write
        # (BackgroundWriter, which also rounds to the output dtype where that is left to it). In each
        # shard the tensors written as read come first: the writer copies them while the rest is
        # computed, instead of after the last result (a single-file Llama ends with its head, a
        # quarter of a 4-bit checkpoint's bytes). The order of a file's data is the writer's to
        # choose; its header names every tensor's place, and each shard keeps its tensors.
        shards = [(f, [s for s in specs if not self._computed(s.name)] + [s for s in specs if self._computed(s.name)])
                  for f, specs in shards]  # fmt: skip
        # Likewise the shards with nothing to compute come first (a Llama's head alone in the last shard: a
        # sixth of a 4-bit checkpoint's bytes, which were written after the last result, bench_fp4).
        shards.sort(key=lambda shard: any(self._computed(s.name) for s in shard[1]))
        # Results requantized in place are slow to compute and small to write: while the writer copies the
        # tensors passed on as read, they queue past its depth (up to QUEUE_BYTES) instead of stalling
        # the computation behind it. Full-precision results are quick, large, and pooled: depth holds them.
        in_place = (self.fp8 is not None or self.low_bit is not None) and not self.dequantize
        writer = BackgroundWriter(CheckpointWriter(root, shards, metadata=metadata, index_name=None), pool=self.pool,
                                  queue_bytes=QUEUE_BYTES if in_place else 0)  # fmt: skip
        self._writer = writer
        keys = [s.name for _, specs in shards for s in specs]
        position = {k: i for i, k in enumerate(keys)}
        # the member of an FP8 pair that comes second is computed with the first: never read it
        self._later = {k for k, i in position.items() if k in self._pair_of and position.get(self._partner(k), i) < i}
        first: dict[str, int] = {}
        for k, i in position.items():
            if k in self._group_of:
                first.setdefault(self._group_of[k], i)
        self._later |= {k for k in self._group_of if position.get(k, -1) != first.get(self._group_of[k])}
        order = [g for g in sorted(first, key=first.__getitem__) if g not in self.to_fp8]
        self._packed_next = dict(zip(order, order[1:]))
        if order and self.device.type == "cpu":  # (its thread starts at the first piece prepared ahead)
            # one thread reads and prepares the next packed weight's inputs while the kernels requantize this one
            # (its reads, factors and product terms are interpreter work the kernels' cores would otherwise wait on)
            self._ahead = ThreadPoolExecutor(1, "loratool-ahead")
        threads = compute_threads() if self.device.type == "cpu" else contextlib.nullcontext()
        with threads:
            try:
                for key, w_in, w32 in stream(self._read, keys, desc=desc, show=show):
                    w, out_dtype, pooled = self._result(key, w_in, w32)
                    if w is not None:
                        borrowed = w is w_in and w_in.device.type == "cpu"
                        writer.write(key, w, out_dtype, recycle=pooled, borrowed=borrowed)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            finally:
                self._writer = None
                for _, started in self._started.values():  # (after an error: no core may still write)
                    started.cancel()
                self._started, self._early_codes = {}, {}
                if self._ahead is not None:
                    self._ahead.shutdown(wait=True, cancel_futures=True)
                    self._ahead, self._prepared = None, {}

    def _computed(self, key: str) -> bool:
        """Whether the merge computes ``key`` (else it writes the tensor as read, cast at most)."""
        return (
            key in self.terms
            or key in self.bias_terms
            or key in self.replace
            or key in self._pair_of
            or self._packed(key)
        )

    def _packed(self, key: str) -> bool:
        """Whether ``key`` is a packed weight's part computed here, or a packed weight dequantized."""
        return key in self._group_of or (self.dequantize and self.low_bit is not None and key in self.low_bit.weights)

    def _result(self, key: str, w_in: torch.Tensor,
                w32: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.dtype, bool]:  # fmt: skip
        """The result for ``key`` (the input where nothing changes; None where it was handed to the
        writer while computed), the dtype to write it in, and whether the tensor is the pool's (the
        writer hands it back once written)."""
        if key in self._pair_of:
            return self._fp8_result(key, w_in)
        if self._packed(key):
            return self._packed_result(key)
        out_dtype = self.out_dtype if (self.out_dtype is not None and w_in.is_floating_point()) else w_in.dtype
        stored = self.ckpt.info(key).dtype if key in self.replace else None
        if stored in ("F64", "F32", "F16", "BF16") and self.out_dtype is None and w_in.is_floating_point():
            # modules_to_save are saved as trained (float32 beside a bf16 base): PEFT loads them into the
            # model's parameters, in the base's dtype
            out_dtype = torch_dtype(stored)
        if w32 is None and self._blocked(key):
            merged = self._merge_blocked(key, w_in, out_dtype)
            if merged is None:  # handed to the writer while merged
                return None, out_dtype, True
            w, pooled = merged, True
        elif w32 is None:
            w, pooled = w_in, False
            _require_castable(w_in, out_dtype, key)
        else:
            w, pooled = self._add(key, w32, out_dtype, w_in), self.device.type == "cpu"
        if self.check is not None and self.reference is not None:
            w = w.to("cpu", out_dtype)
            self.check.add(w, _reference_tensor(self.reference, key), w_in, key)
        return w, out_dtype, pooled

    def _partner(self, key: str) -> str:
        """The other member of ``key``'s FP8 pair (a weight's scale, a scale's weight)."""
        assert self.fp8 is not None
        wkey = self._pair_of[key]
        return self.fp8.weights[wkey].scale_key if key == wkey else wkey

    def _fp8_result(self, key: str, w_in: torch.Tensor) -> tuple[torch.Tensor, torch.dtype, bool]:
        """An FP8 weight or its scale: dequantize, add the terms in float32, requantize to the same
        scheme (or keep float32 for a dequantized output). The pair is computed when its first
        member comes up; the other waits in ``_stash`` for its own turn in the file order."""
        if key in self._stash:
            t, pooled = self._stash.pop(key)
            return t, t.dtype, pooled
        assert self.fp8 is not None
        wkey = self._pair_of[key]
        info = self.fp8.weights[wkey]
        q = w_in if key == wkey else self.ckpt.get(wkey)
        scale = w_in if key == info.scale_key else self.ckpt.get(info.scale_key)
        check_scale(info.scale_key, scale)
        if self.dequantize and self.device.type == "cpu":
            written = self._fp8_dequantized(wkey, q, scale, info.scheme)
            return written, written.dtype, True  # the pool's, in out_dtype; its scale is not in the layout
        if self.dequantize or info.scheme.kind == "tensor" or self._has_dora(wkey):
            q_new, s_new = self._fp8_whole(wkey, q, scale, info.scheme)
            if self.dequantize:
                return q_new, q_new.dtype, False  # float, in out_dtype; its scale is not in the layout
        else:
            q_new, s_new = self._fp8_strips(wkey, q, scale, info.scheme)
        if self.check is not None and self.reference is not None:
            fp8_there = wkey in self.reference and self.reference.info(wkey).dtype.startswith("F8_")
            if fp8_there and info.scale_key in self.reference:  # the original in this FP8 layout too
                ref_q, ref_s = (
                    _reference_tensor(self.reference, wkey),
                    _reference_tensor(self.reference, info.scale_key),
                )
                self.check.add_fp8((q_new.cpu(), s_new.cpu()), (ref_q, ref_s), (q.cpu(), scale), info.scheme, wkey)
            else:  # stored otherwise (packed, say, before merge --requantize fp8): its values, in FP8 steps
                restored = dequantize_fp8(q_new.cpu(), s_new.cpu(), info.scheme)
                unit = fp8_steps(q_new.cpu(), s_new.cpu(), info.scheme)
                differing = restored.numel()  # other codes altogether
                ref = _reference_tensor(self._reference_view(), wkey).float()
                self.check.add_grid(restored, ref, unit, differing, wkey)
        pooled = q_new.device.type == "cpu"  # a new tensor of its own: the pool takes it back once written
        s_new = s_new.to(scale.dtype)  # both leave a GPU on the writer's thread
        mine, other = ((q_new, pooled), (s_new, False)) if key == wkey else ((s_new, False), (q_new, pooled))
        self._stash[info.scale_key if key == wkey else wkey] = other
        return mine[0], mine[0].dtype, mine[1]

    def _prefetched(self, key: str) -> bool:
        """Whether _read readies ``key`` for the device (an FP8 pair's first member): on CPU its pages
        faulted in, so that the strips never wait on the disk (a copy into a pool buffer, as before,
        costs a second pass over every byte on a core the strips share); to a GPU, sent, so that
        they never wait on the bus."""
        return key in self._pair_of and key not in self._later

    def _has_dora(self, key: str) -> bool:
        return any(t.module.magnitude is not None for t in self.terms.get(key, []))

    def _fp8_strips(
        self, key: str, q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge and requantize in steps of rows (:func:`merge_fp8_rows`): memory of a step on CPU,
        of the weight on a GPU."""
        # The subspace rule runs column by column: in the compiled kernels on the CPU even beside a GPU,
        # where torch would launch a few kernels per column.
        kernels = native.fp8_kernels()
        device = torch.device("cpu") if self.rounding.subspace and kernels is not None else self.device
        q_dev, s_dev = q.to(device), scale.to(device)
        q_new, s_new = self.pool.take(q.shape, q.dtype, device), torch.empty_like(s_dev)
        factors = [row_factors(t.module.lora_A.to(device), t.module.lora_B.to(device), t.factor, t.kind)
                   for t in self.terms[key]]  # fmt: skip
        stream, space = self._rule_for(key, [f.right for f in factors])

        def check(strip: torch.Tensor) -> None:
            if not is_finite(strip):  # the base is only dequantized whole to name the cause
                _require_finite(strip, torch.float32, key, dequantize_fp8(q_dev, s_dev, scheme))

        # One call over the whole weight. With the compiled kernels (loratool.quant.native) each step runs
        # whole on one core, on every core but one: the reader, writer and hasher keep the last, as
        # in the other streaming operations (compute_threads). Without them each step's passes run
        # on torch's threads, on every core (on 2 cores 4.5-5.6 s against 5.4-6.7 s with one core
        # left free: the reader and writer mostly wait in system calls).
        scratch = self.pool.take((fp8_scratch_elements(q.shape[0], q.shape[1], scheme, device),), torch.float32, device)
        if device.type != "cpu":
            threads: contextlib.AbstractContextManager[int] = contextlib.nullcontext(1)
        elif kernels is not None:
            threads = compute_threads(reserved=1)
        else:
            threads = torch_threads(available_cores())
        try:
            with threads:
                kept = merge_fp8_rows(q_dev, s_dev, scheme, factors, q_new, s_new, check, scratch, key=stream,
                                      space=space)  # fmt: skip
        finally:
            self.pool.give(scratch)
        self.requantized.append((key, kept))
        return q_new, s_new

    # -- packed low-bit weights (MXFP4, NVFP4, INT4/INT8) ------------------------------------------
    def _packed_result(self, key: str) -> tuple[torch.Tensor | None, torch.dtype, bool]:
        """A packed weight's part (requantized in place: the weight is computed at its first part, the
        others wait in ``_stash``), or the whole weight in the output dtype when dequantizing; None
        where it was handed to the writer while computed."""
        if key in self._stash:
            t, pooled = self._stash.pop(key)
            return t, t.dtype, pooled
        assert self.low_bit is not None
        if self.dequantize:
            w = self.low_bit.weights[key]
            whole = self._packed_each(w, key, self._packed_dequantized)
            return (None, self.out_dtype or torch.float32, True) if whole is None else (whole.cpu(), whole.dtype, False)
        w = self.low_bit.weights[self._group_of[key]]
        if w.name in self.to_fp8:
            q, scale = (t.cpu() for t in self._packed_to_fp8(w))
            mine, other = (q, (scale, False)) if key == w.name else (scale, (q, False))
            self._stash[w.name + "_scale" if key == w.name else w.name] = other
            return mine, mine.dtype, False
        codes = self._codes_buffer(w)
        early = None  # a mixture-of-experts weight's codes, written an expert at a time as they are computed
        if codes is not None and w.experts and key == w.parts["codes"]:
            early = self._hand_over(key, codes, w.experts)
        pieces = []
        for e in range(w.experts) if w.experts else [None]:
            into = None if codes is None else codes if e is None else codes[e]
            after = codes[e + 1] if codes is not None and e is not None and e + 1 < (w.experts or 0) else None
            pieces.append(self._packed_requantized(w, e, into, after))
            if early is not None and e is not None:
                early.ready(e + 1)
        new = {}
        for role in w.parts:
            if role == "codes" and codes is not None:
                new[role] = codes  # each piece's codes were written in their place
            elif w.experts and role in ("codes", "scale"):
                new[role] = torch.stack([p[role] for p in pieces]).cpu()
            else:
                new[role] = pieces[0][role].cpu()
        in_pool = {role: role == "codes" and codes is not None for role in w.parts}
        for role, name in w.parts.items():
            if name != key:
                self._stash[name] = (new[role], in_pool[role])
        own = next(role for role, name in w.parts.items() if name == key)
        return (None if early is not None else new[own]), new[own].dtype, in_pool[own]

    def _hand_over(self, key: str, tensor: torch.Tensor, count: int, ready: int = 0) -> Pieces | None:
        """``tensor`` (the pool's, on the CPU) to the writer as ``key`` before its ``count`` pieces (experts)
        are computed, the first ``ready`` of them already: the :class:`Pieces` to mark each done in, or
        None where no writer is open (the caller then hands the tensor over whole)."""
        if self._writer is None:
            return None
        pieces = Pieces(count)
        pieces.ready(ready)
        self._writer.write(key, tensor, recycle=True, pieces=pieces)
        return pieces

    def _codes_buffer(self, w: PackedWeight) -> torch.Tensor | None:
        """A pooled buffer for ``w``'s requantized codes as stored (each expert's in its place), which
        the writer hands back once written, where the compiled kernels write them (CPU, nearest or
        stochastic, no ``--check``): fresh pages for every weight cost a fault each 4 KiB, and a
        mixture-of-experts weight's codes need no stacking. None elsewhere."""
        if self.device.type != "cpu" or self.rounding.subspace or self.check is not None:
            return None
        if w.name in self._early_codes:
            return self._early_codes.pop(w.name)
        info = self.ckpt.info(w.parts["codes"])
        return self.pool.take(info.shape, torch_dtype(info.dtype), self.device)

    def _parts(self, w: PackedWeight, expert: int | None = None) -> packed.Parts:
        """``w``'s stored tensors (one expert's) on the merge's device."""
        assert isinstance(self.view, ModelView)
        return {role: t.to(self.device) for role, t in self.view.parts(w, expert).items()}

    def _packed_each(
        self, w: PackedWeight, key: str, one: Callable[[PackedWeight, int | None, torch.Tensor | None], torch.Tensor]
    ) -> torch.Tensor | None:
        """``one(w, expert, out)`` for each expert of a 3-D parameter, each written into its place in one
        tensor (no stacking of the pieces); a 2-D weight: ``one(w, None, None)``. On the CPU the tensor
        is the pool's and goes to the writer as ``key`` once its first expert is computed, each next one
        written as it comes (a gpt-oss gate_up_proj in bfloat16 is a GiB, which was written whole after its
        last expert): then None."""
        if w.experts is None:
            return one(w, None, None)
        first = one(w, 0, None)
        shape, handed = (w.experts, *first.shape), first.device.type == "cpu" and self._writer is not None
        out = self.pool.take(shape, first.dtype, first.device) if handed else first.new_empty(shape)
        out[0].copy_(first)
        early = self._hand_over(key, out, w.experts, ready=1) if handed else None
        for e in range(1, w.experts):
            one(w, e, out[e])
            if early is not None:
                early.ready(e + 1)
        return None if early is not None else out

    def _packed_dequantized(self, w: PackedWeight, expert: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """One weight (or expert) dequantized, the terms added, in the output dtype by the rounding rule
        (into ``out`` where given). Its float32 temporaries are buffers of the pool: fresh ones cost a
        page fault each 4 KiB, three a weight (bench_fp4's gpt-oss layer to bfloat16: 35-39 s, before)."""
        assert self.view is not None and self.out_dtype is not None
        rows, cols = w.rows_cols
        as_held = (cols, rows) if w.transposed else (rows, cols)
        before = self.pool.take(as_held, torch.float32, self.device)  # as the model holds it
        stored = self.pool.take((rows, cols), torch.float32, self.device) if w.transposed else None  # decoded
        merged: torch.Tensor | None = None
        try:
            parts = self._parts(w, expert)
            if stored is None:  # stored as held: decoded in place
                packed.dequantize(w, parts, out=before)
            else:
                packed.logical_into(w, packed.dequantize(w, parts, out=stored), before)
            name = w.name if expert is None else f"{w.name}.{expert}"
            if w.name not in self.terms:
                _require_finite(before, self.out_dtype, name, before)
                return before.to(self.out_dtype, copy=True) if out is None else out.copy_(before)
            merged = self.pool.take(as_held, torch.float32, self.device).copy_(before)
            factors = self._stored_factors(w, expert)
            view = merged.T if w.transposed else merged  # merged is as the model holds it: this is its stored view
            for left, right, factor, _ in factors:
                view.addmm_(left, right, alpha=factor)  # (rows, r) @ (r, cols), written through the view
            _require_finite(merged, self.out_dtype, name, before)
            # the rule rounds the model's rows: their right factors are the stored ones' left, transposed
            stream, space = self._rule_for(name, [f.left.T if w.transposed else f.right for f in factors])
            written = self._dequantized_out(name, merged, before, stream, space, out)
            if self.check is not None and self.reference is not None:
                ref = _reference_tensor(self._reference_view(), w.name)
                self.check.add(written.cpu(), ref[expert] if expert is not None else ref, merged.cpu(), w.name)
            return written
        finally:
            for t in (stored, before, merged):
                if t is not None:
                    self.pool.give(t)

    def _dequantized_out(self, key: str, merged: torch.Tensor, before: torch.Tensor, stream: int | None,
                         space: Subspace | None, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``merged`` in the output dtype by the rule (into ``out`` where given): the subspace rule onto the
        dtype's grid (a scale of 1), else :meth:`_rounded_in_strips`; what it kept of the delta from ``before``
        recorded under ``key``."""
        assert self.out_dtype is not None
        if space is not None and self.out_dtype != torch.float32:
            written = round_subspace(merged, torch.ones_like(merged), self.out_dtype, space).to(self.out_dtype)
            kept = Kept.of(merged - before, merged - written.float())
            written = written if out is None else out.copy_(written)
        else:
            written, kept = self._rounded_in_strips(merged, before, stream, out)
        self.requantized.append((key, kept))
        return written

    def _rounded_in_strips(self, merged: torch.Tensor, before: torch.Tensor, stream: int | None,
                           written: torch.Tensor | None = None) -> tuple[torch.Tensor, Kept]:  # fmt: skip
        """``merged`` in the output dtype, nearest or by the stochastic ``stream`` (each element's draw a
        function of its place), and the kept sums against ``before``: a strip of rows at a time, whose
        temporaries stay small and are reused (a weight's would be fresh pages, several a weight: a
        gpt-oss expert's rounding took seconds of the system's time)."""
        assert self.out_dtype is not None
        rows, cols = merged.shape
        if written is None:
            written = torch.empty(rows, cols, dtype=self.out_dtype, device=merged.device)
        fast = native.rounded_half(merged, before, written, stream)  # the same bits, on every core
        if fast is not None:
            return written, fast
        kept, step = Kept(), max(1, BLOCK_ELEMENTS // max(1, cols))
        for i in range(0, rows, step):
            m, n = merged[i : i + step], min(step, rows - i)
            u = uniforms(stream, i, n, cols, merged.device) if stream is not None else None
            out = written[i : i + n]
            out.copy_(quantize_values(m, self.out_dtype, u))
            kept = kept.add(Kept.of(m - before[i : i + n], m - out.float()))
        return written, kept

    def _packed_requantized(self, w: PackedWeight, expert: int | None, into: torch.Tensor | None,
                            after: torch.Tensor | None = None) -> packed.Parts:  # fmt: skip
        """One weight (or expert) dequantized, the terms added, requantized in its format by the rule:
        by the compiled kernels in one pass where they take it (they form the delta too, a chunk of a
        row at a time), else in torch passes a strip of rows at a time (rows round independently;
        temporaries of a strip's size, reused, where a weight's would cost more in fresh pages than
        in arithmetic); the whole weight at once where NVFP4 needs a new tensor scale. The codes are
        written into ``into`` where given (the kernels write there; the torch passes' are copied).
        ``after``: where the next expert's codes go, if it is one (:meth:`_start_next`)."""
        name = w.name if expert is None else f"{w.name}.{expert}"
        begun = self._started.pop((w.name, expert), None)
        started: packed.Started | None = None
        if begun is not None:
            (parts, terms, stream, space), started = begun
        else:
            prepared = self._prepared.pop((w.name, expert), None)
            parts, terms, stream, space = prepared.result() if prepared is not None else self._packed_inputs(w, expert)
            if into is not None and self._compiled(space):
                started = packed.start_native(w, parts, terms, key=stream, codes_into=into)
        rows = w.rows_cols[0]
        # strips of rows whose temporaries stay small; the subspace rule's column loop in torch passes
        # pays its overhead per strip, so without the compiled kernels it takes the weight whole
        step = rows if space is not None and not packed.subspace_compiled(self.device) else packed.strip_rows(w)
        compiled = self._compiled(space)
        try:
            self._prepare_after(w, expert)
            if started is not None:
                self._start_next(w, expert, after)
            try:
                if started is not None:
                    done = started.finish()
                else:
                    done = packed.requantize_native(w, parts, terms, key=stream, codes_into=into) if compiled else None
                pieces = [(done.parts, done.kept)] if done is not None else [
                    self._packed_strip(w, name, parts, terms, start, min(rows, start + step), stream, space)
                    for start in range(0, rows, step)]  # fmt: skip
            except packed.NeedsFreshScales:
                pieces = [self._packed_strip(w, name, parts, terms, 0, rows, stream, space, keep=False)]
        except BaseException:
            if started is not None:  # no core may still write its codes once the error is raised
                started.cancel()
            raise
        out = packed.join_rows(w, [p for p, _ in pieces])
        if into is not None and out["codes"].data_ptr() != into.data_ptr():  # (the kernels wrote them in place)
            out["codes"] = into.copy_(out["codes"])
        kept = Kept()
        for _, k in pieces:
            kept = kept.add(k)
        self.requantized.append((name, kept))
        return out

    def _compiled(self, space: Subspace | None) -> bool:
        """Whether a packed piece goes to the compiled encode pass (where the kernels take its weight):
        nearest or stochastic, not under ``--check`` (which compares the torch passes' strips)."""
        return space is None and self.check is None

    def _start_next(self, w: PackedWeight, expert: int | None, after: torch.Tensor | None) -> None:
        """Begin the compiled requantization of the piece after ``w`` (``expert``) on the kernel threads,
        its inputs as prepared ahead, while this one is computed: the cores go on to it as they finish
        this one, instead of waiting for the interpreter's work between the two (this piece's results,
        the next one's parts and factors, the writer's hand-over: 0.13-0.18 s of a 16-layer INT4
        merge's 1 s on 2 cores, one core idle, when the kernels were called in turn). ``after``: the
        next expert's place in this weight's codes; for the next weight's first piece, its codes
        buffer is taken now. Nothing is begun where the inputs raised (the error is raised where the
        piece is computed) or the kernels would not take them."""
        nxt = self._next_piece(w, expert)
        if nxt is None:
            return
        later, piece = nxt
        prepared = self._prepared.get((later.name, piece))
        if prepared is None or prepared.exception() is not None:  # (waits for the look-ahead thread)
            return
        inputs = prepared.result()
        parts, terms, stream, space = inputs
        if not self._compiled(space):
            return
        if after is None:
            if piece not in (None, 0) or later.name in self._early_codes:
                return
            codes = self._codes_buffer(later)
            if codes is None:
                return
            self._early_codes[later.name] = codes
            after = codes if piece is None else codes[0]
        started = packed.start_native(later, parts, terms, key=stream, codes_into=after)
        if started is not None:
            del self._prepared[(later.name, piece)]
            self._started[(later.name, piece)] = (inputs, started)
            self._prepare_after(later, piece)  # ready to begin when its turn comes here: small pieces go quickly

    def _packed_inputs(self, w: PackedWeight, expert: int | None) -> PackedInputs:
        """What requantizing ``w`` (``expert``) in place starts from: its stored parts, the terms' product
        (stored orientation), the stochastic stream's key and the subspace (:meth:`_rule_for`)."""
        name = w.name if expert is None else f"{w.name}.{expert}"
        factors = self._stored_factors(w, expert)
        terms = packed.LowRank.of(factors, *w.rows_cols, self.device)
        return (self._parts(w, expert), terms, *self._rule_for(name, [f.right for f in factors]))

    def _prepare_after(self, w: PackedWeight, expert: int | None) -> None:
        """Start preparing the inputs of the piece requantized after ``w`` (``expert``) on the look-ahead
        thread: its next expert, else the next packed weight's first (one piece ahead of those begun,
        so that a mixture-of-experts weight's experts are not all held at once). :meth:`_packed_requantized` takes
        them from there; an error raised there is raised when they are taken, as it would have been."""
        nxt = self._next_piece(w, expert) if self._ahead is not None else None
        if nxt is None:
            return
        after, piece = nxt
        if (after.name, piece) not in self._prepared and (after.name, piece) not in self._started:
            assert self._ahead is not None
            self._prepared[(after.name, piece)] = self._ahead.submit(self._packed_inputs, after, piece)

    def _next_piece(self, w: PackedWeight, expert: int | None) -> tuple[PackedWeight, int | None] | None:
        """The piece requantized in place after ``w`` (``expert``): its next expert, else the next packed
        weight's first (its expert 0, or None for a 2-D weight); None after the last."""
        if w.experts is not None and expert is not None and expert + 1 < w.experts:
            return w, expert + 1
        if w.name in self._packed_next:
            assert self.low_bit is not None
            after = self.low_bit.weights[self._packed_next[w.name]]
            return after, 0 if after.experts is not None else None
        return None

    def _packed_strip(self, w: PackedWeight, name: str, parts: packed.Parts, terms: packed.LowRank, start: int,
                      stop: int, stream: int | None, space: Subspace | None,
                      keep: bool = True) -> tuple[packed.Parts, Kept]:  # fmt: skip
        """Rows start:stop of a packed weight merged and requantized in torch passes: their parts and kept sums."""
        sub = packed.rows_of(w, parts, start, stop) if (start, stop) != (0, w.rows_cols[0]) else parts
        # the strip's delta in a pooled buffer: fresh pages for every strip cost more than reusing one
        delta = self.pool.take((stop - start, w.rows_cols[1]), torch.float32, self.device)
        try:
            terms.rows(start, stop).delta(out=delta)
            before = packed.dequantize(w, sub)  # (rows', cols) as stored
            merged = before + delta  # as the kernels add them
        finally:
            self.pool.give(delta)
        _require_finite(merged, torch.float32, name, before)
        out = packed.requantize(w, merged, sub, before=before, key=stream, space=space, keep_scales=keep, row0=start)
        if self.check is not None and self.reference is not None:
            ref = _reference_tensor(self._reference_view(), w.name)
            expert = int(name.rsplit(".", 1)[1]) if w.experts is not None else None
            ref = packed.to_stored(w, ref[expert] if expert is not None else ref)[start:stop]
            restored = packed.dequantize(w, out.parts)
            unit = torch.maximum(packed.steps(w, out.parts, restored), packed.steps(w, sub, before))
            differing = int((out.parts["codes"] != sub["codes"]).sum())
            self.check.add_grid(restored.cpu(), ref.float(), unit.cpu(), differing, w.name)
        return out.parts, out.kept

    def _stored_factors(self, w: PackedWeight, expert: int | None) -> list[RowFactors]:
        """The terms of ``w`` (of ``expert``) as factors of its stored orientation: delta = factor *
        left @ right, (rows, r) @ (r, cols), on the merge's device."""
        out = []
        for t in self.terms.get(w.name, []):
            if w.experts is not None and t.expert != expert:
                continue
            if t.module.magnitude is not None:
                raise UnsupportedCheckpointError(
                    "a DoRA adapter rescales whole rows of this packed low-bit weight; loratool merges DoRA into "
                    "plain and FP8 weights only", key=w.name, fix="pass --dtype bfloat16 for a dequantized output",
                )  # fmt: skip
            f = row_factors(t.module.lora_A.to(self.device), t.module.lora_B.to(self.device), t.factor, t.kind)
            out.append(RowFactors(f.right.T, f.left.T, f.factor) if w.transposed else f)  # stored = logical.T
        return out

    def _packed_to_fp8(self, w: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        """A packed 2-D weight dequantized, the terms added, and written as FP8 e4m3 in 128x128 blocks
        by the rounding rule: (weight, its block scales)."""
        assert w.experts is None
        before = packed.dequantize(w, self._parts(w))  # 2-D, not transposed: as the model holds it
        merged = before.clone()
        factors = self._stored_factors(w, None)
        for left, right, factor, _ in factors:
            merged.addmm_(left, right, alpha=factor)  # (rows, r) @ (r, cols)
        _require_finite(merged, torch.float32, w.name, before)
        stream, space = self._rule_for(w.name, [f.right for f in factors])
        rows, cols = merged.shape
        shape = (-(-rows // FP8_BLOCK[0]), -(-cols // FP8_BLOCK[1]))
        scheme = Fp8Scheme("block", FP8_BLOCK)
        q, scale = quantize_fp8(merged, scheme, torch.float8_e4m3fn, shape, key=stream, space=space)
        self.requantized.append((w.name, Kept.of(merged - before, merged - dequantize_fp8(q, scale, scheme))))
        return q, scale

    def _reference_view(self) -> Checkpoint:
        """--check's base with its packed weights dequantized, under the names its files hold (as the
        stream names them), opened once."""
        assert self.reference is not None
        if self._reference_model is None:
            self._reference_model = model_view(self.reference, live_names=False)
        return self._reference_model

    def _rule_for(self, key: str, rights: list[torch.Tensor]) -> tuple[int | None, Subspace | None]:
        """(the stochastic stream's key, the subspace) of tensor ``key``: at most one, none for nearest."""
        if self.rounding.subspace:
            return None, subspace_of(rights)
        return (self.rounding.key(key) if self.rounding.stochastic else None), None

    def _fp8_dequantized(self, key: str, q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme) -> torch.Tensor:
        """:meth:`_fp8_whole` for a dequantized output on the CPU: the weight decoded on every core into a
        buffer of the pool, the terms added in another, rounded into a third (fresh ones cost a page fault
        each 4 KiB, three a weight), which the writer hands back once written."""
        assert self.out_dtype is not None
        before = dequantize_fp8(q, scale, scheme, out=self.pool.take(q.shape, torch.float32, self.device))
        written = self.pool.take(q.shape, self.out_dtype, self.device)
        w32: torch.Tensor | None = None
        try:
            if key not in self.terms:  # dequantized only: nothing to keep, so no draws
                _require_finite(before, self.out_dtype, key, before)  # e.g. beyond float16's range
                return written.copy_(before)
            w32 = self._add(key, self.pool.take(q.shape, torch.float32, self.device).copy_(before), self.out_dtype,
                            before)  # fmt: skip
            rights = [row_factors(t.module.lora_A, t.module.lora_B, t.factor, t.kind).right
                      for t in self.terms[key]] if self.rounding.subspace else []  # fmt: skip
            stream, space = self._rule_for(key, rights)
            return self._dequantized_out(key, w32, before, stream, space, written)
        except BaseException:
            self.pool.give(written)
            raise
        finally:
            for t in (before, w32):
                if t is not None:
                    self.pool.give(t)

    def _fp8_whole(
        self, key: str, q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize the whole weight, add the terms (DoRA too), then requantize it, or, for a
        dequantized output, return it in the output dtype (and the old scale, unused)."""
        before = dequantize_fp8(q.to(self.device), scale, scheme)  # (out, in) float32
        out_dtype = self.out_dtype if self.dequantize and self.out_dtype is not None else torch.float32
        if key not in self.terms:  # dequantized only: nothing to keep, so no draws
            assert self.dequantize and self.out_dtype is not None
            _require_finite(before, self.out_dtype, key, before)  # e.g. beyond float16's range
            return quantize_values(before, self.out_dtype, None), scale
        w32 = self._add(key, before.clone(), out_dtype, before)
        rights = [row_factors(t.module.lora_A, t.module.lora_B, t.factor, t.kind).right.to(w32.device)
                  for t in self.terms[key]] if self.rounding.subspace else []  # fmt: skip
        stream, space = self._rule_for(key, rights)
        if self.dequantize:
            assert self.out_dtype is not None
            return self._dequantized_out(key, w32, before, stream, space), scale
        q_new, s_new = quantize_fp8(w32, scheme, q.dtype, tuple(scale.shape), key=stream, space=space)
        self.requantized.append((key, Kept.of(w32 - before, w32 - dequantize_fp8(q_new, s_new, scheme))))
        return q_new, s_new

    def _blocked(self, key: str) -> bool:
        """On CPU, plain LoRA terms on a matrix go through :func:`merge_rows`, a block of rows at a time
        (DoRA rescales whole rows of the result, and a ``lora_bias`` adds to a separate 1-D tensor;
        FP8 weights are dequantized whole)."""
        ts = self.terms.get(key)
        return (
            self.device.type == "cpu"
            and ts is not None
            and all(t.module.magnitude is None for t in ts)
            and key not in self._pair_of
        )

    def _read(self, key: str) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        if key in self._later:
            return key, torch.empty(0), None  # its result waits in _stash
        if self._packed(key):
            return key, torch.empty(0), None  # a packed weight: its parts are read where it is computed
        w = self.replace[key] if key in self.replace else self.ckpt.get(key)
        if self._prefetched(key) and self.device.type == "cuda":  # read and sent here, on the prefetch thread
            return key, to_device(w, self.device), None
        if self._prefetched(key):
            return key, fault_in(w), None
        changes = key in self.terms or key in self.bias_terms
        if not changes or self._blocked(key) or key in self._pair_of:
            return key, w, None
        return key, w, widen(w, self.device, self.pool)

    def _merge_blocked(self, key: str, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor | None:
        """``key`` merged a block of rows at a time into a buffer of the pool (:func:`merge_rows`). A 3-D
        experts parameter goes to the writer before it is merged and is written an expert at a time as
        each is done (:class:`Pieces`): then None."""
        out = self.pool.take(w.shape, out_dtype, self.device)
        experts = w.dim() == 3 and any(t.expert is not None for t in self.terms[key])
        rows = w.shape[-2] if w.dim() == 3 else 0  # 3-D experts: expert e is rows e*rows.. of (E*rows, cols)
        factors = [row_factors(t.module.lora_A, t.module.lora_B, t.factor, t.kind)._replace(row0=(t.expert or 0) * rows)
                   for t in self.terms[key]]  # fmt: skip
        cols = w[0].numel() if w.dim() == 4 else w.shape[-1]  # a Conv2d weight's row: (in, kh, kw) flattened
        scratch = self.pool.take((max(BLOCK_ELEMENTS, cols),), torch.float32, self.device)  # >= one row
        w2, out2 = w.reshape(-1, cols), out.view(-1, cols)
        early = self._hand_over(key, out, w.shape[0]) if experts and self.check is None else None  # (--check: whole)
        spans = [(e * rows, (e + 1) * rows) for e in range(w.shape[0])] if early is not None else [(0, w2.shape[0])]
        try:
            for i, (start, stop) in enumerate(spans):
                part = [f._replace(row0=f.row0 - start) for f in factors]  # merge_rows takes the rows it covers
                merge_rows(w2[start:stop], part, out2[start:stop], scratch,
                           check=lambda block: _require_finite(block, out_dtype, key, w))  # fmt: skip
                if early is not None:
                    early.ready(i + 1)
        except BaseException:
            if early is None:
                self.pool.give(out)  # (handed over, it is the writer's: the abort lets it go)
            raise
        finally:
            self.pool.give(scratch)
        return None if early is not None else out

    def _add(self, key: str, w32: torch.Tensor, out_dtype: torch.dtype, w_in: torch.Tensor) -> torch.Tensor:
        """w32 (float32, a private copy of ``w_in``) plus every term for ``key``; refuses a non-finite result."""
        if key in self.terms:
            for t in self.terms[key]:
                add_lora(w32 if t.expert is None else w32[t.expert], t.module.lora_A, t.module.lora_B, t.factor, t.kind)
            dora = next((t for t in self.terms[key] if t.module.magnitude is not None), None)
            if dora is not None and dora.module.magnitude is not None:
                dora_rescale(w32, dora.module.magnitude, dora.kind)
        bias = self.bias_terms.get(key)
        if bias is not None and bias.module.bias is not None:
            w32.add_(bias.module.bias.to(w32.device, torch.float32), alpha=bias.factor)
        _require_finite(w32, out_dtype, key, w_in)
        return w32


BLOCK_ELEMENTS = 1 << 20  # float32 scratch of 4 MiB: a block stays in cache through all its steps


def _require_finite(w32: torch.Tensor, out_dtype: torch.dtype, key: str, base: torch.Tensor) -> None:
    """Refuse NaN or Inf in a merged weight, and values that would round to Inf in float16, naming the
    cause: the base itself (adapters are checked when loaded), or a delta too large for the dtype."""
    if not is_finite(w32):
        if not is_finite(base):
            raise NonFiniteError(
                "the base checkpoint holds NaN or Inf in this tensor", key=key, fix="repair or download the base again"
            )
        raise NonFiniteError(
            "adding the adapter overflowed float32 (values beyond 3.4e38)",
            key=key,
            fix="the scale you gave or the adapter's factors are far too large: check them (loratool inspect ADAPTER)",
        )
    if out_dtype == torch.float16 and w32.numel() and float(w32.abs().max()) > torch.finfo(out_dtype).max:
        raise NonFiniteError(
            "the merged weight does not fit float16 (values beyond 65504)",
            key=key,
            fix="check the scale you gave and the adapter's factors, or write another --dtype",
        )


def _require_castable(w: torch.Tensor, out_dtype: torch.dtype, key: str) -> None:
    """Refuse a tensor written as read but cast to a dtype of smaller range (float16 from bfloat16 or
    float32) whose finite values that dtype cannot hold: the cast would write them as Inf. (NaN and Inf
    already there are the input's, passed on as read.)"""
    if not (w.is_floating_point() and out_dtype.is_floating_point and w.numel() and out_dtype != w.dtype):
        return
    top = torch.finfo(out_dtype).max
    if top >= torch.finfo(w.dtype).max:
        return
    lo, hi = (float(x) for x in torch.aminmax(w))  # one pass; the masks below only where it may not fit
    if -top <= lo and hi <= top:
        return
    beyond = torch.isfinite(w) & (w.abs() > top)
    if bool(beyond.any()):
        value, name = float(w[tuple(int(i) for i in beyond.nonzero()[0])]), str(out_dtype).removeprefix("torch.")
        raise NonFiniteError(
            f"holds {value:g}, beyond {name}'s range ({top:g}): the cast to it would write Inf",
            key=key, fix="write another --dtype (bfloat16 holds float32's range)",
        )  # fmt: skip


def _reference_tensor(reference: Checkpoint, key: str) -> torch.Tensor:
    if key not in reference:
        raise MissingKeyError("--check BASE lacks this tensor", path=str(reference.path), key=key)
    return reference.get(key)
