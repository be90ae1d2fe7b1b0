"""Packed low-bit weights (MXFP4, NVFP4, INT4/INT8 pack-quantized; GPTQ and AWQ read only): one
weight's stored tensors to its float32 values and back, by a rounding rule, with what the written
weight kept.

A :class:`~.layout.PackedWeight` names the tensors a checkpoint stores for one weight (its ``parts``) and the
weight as transformers' model holds it once dequantized (``name``, ``shape``: the *logical*
weight, which adapters address). Values are handled in the *stored orientation* (rows, cols),
scales grouped along the columns; gpt-oss stores its experts (E, out, in) and transformers
presents them as (E, in, out) (``transposed``), one expert at a time here.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import NonFiniteError
from ..math.linalg import RowFactors
from . import fp4, intpack, native
from .fp8 import check_scale
from .layout import READ_ONLY, PackedWeight
from .rounding import E2M1, GridLike, IntGrid, Kept, Subspace, round_subspace, round_to_grid, uniforms

Parts = dict[str, torch.Tensor]  # role -> tensor (one expert's slice for experts)


def dequantize(w: PackedWeight, parts: Parts, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (rows, cols) in the stored orientation of one weight (or expert); written into ``out``
    (a contiguous float32 tensor of that shape: a reused buffer) where given."""
    fast = _dequantize_native(w, parts, out)
    if fast is not None:
        return fast
    values = _torch_dequantize(w, parts)
    return values if out is None else out.copy_(values)


def _torch_dequantize(w: PackedWeight, parts: Parts) -> torch.Tensor:
    s = w.scheme
    rows, cols = (parts["codes"].shape[0], w.rows_cols[1]) if s.format not in READ_ONLY else w.rows_cols
    if s.format == "mxfp4":
        return fp4.dequantize_mxfp4(parts["codes"], parts["scale"])[:, :cols]
    if s.format == "nvfp4":
        return fp4.dequantize_nvfp4(parts["codes"], parts["scale"], parts["global"], s.divide)[:, :cols]
    if s.format in READ_ONLY:
        if s.format == "gptq":
            codes, zeros = intpack.gptq_codes(parts["codes"], parts["zero"], s.bits, rows, v1=s.v1)
        else:
            codes, zeros = intpack.awq_codes(parts["codes"], parts["zero"], rows)
        return intpack.dequantize_int(codes, parts["scale"].T, zeros, _groups(w, parts))
    codes = intpack.unpack_int32(parts["codes"], s.bits, cols)
    zero = parts.get("zero")
    zero_codes = _zero_codes(w, parts) if zero is not None else None
    groups = _groups(w, parts)
    return intpack.dequantize_int(codes, parts["scale"], zero_codes, groups)


_DAMAGED = "the checkpoint is damaged: re-download it, or re-export it with its producer's quantizer"


def check_scales(w: PackedWeight, parts: Parts) -> None:
    """Refuse a weight whose scales no producer writes and whose values would still decode: a negative
    scale (its groups' signs flipped), an E8M0 byte 0xFF (NaN in the OCP MX format), or an NVFP4
    tensor scale that is not finite and positive (ModelOpt's ``weight_scale_2`` of zero, or
    compressed-tensors' ``weight_global_scale`` of Inf, would make the whole weight zeros). NaN and Inf
    among block scales are named here too, before they would show as the weight's values.
    A zero block scale passes: it stands for a group of zeros, as FP8's does (:func:`.fp8.check_scale`)."""
    scale = parts["scale"]
    if scale.dtype not in (torch.uint8, torch.float8_e4m3fn):
        check_scale(w.parts["scale"], scale, "the packed weight's scale")
    elif scale.numel() and _bad_scale_bytes(scale.view(torch.uint8), e8m0=w.scheme.format == "mxfp4"):
        b = scale.view(torch.uint8)
        bad = b == 0xFF if w.scheme.format == "mxfp4" else ((b & 0x7F) == 0x7F) | (b > 0x80)
        at = [int(i) for i in bad.nonzero()[0]]
        value = "0xFF, NaN in the OCP MX format" if w.scheme.format == "mxfp4" else float(scale[tuple(at)].float())
        raise NonFiniteError(f"the packed weight's scale holds {value} at {at}: scales are finite and positive",
                             key=w.parts["scale"], fix=_DAMAGED)  # fmt: skip
    if "global" in parts:
        second = float(parts["global"].float().reshape(-1)[0])
        if not (math.isfinite(second) and second > 0.0):
            raise NonFiniteError(
                f"the NVFP4 tensor scale is {second}: it is finite and positive (a zero or Inf one would decode "
                "the whole weight as zeros or NaN)", key=w.parts["global"], fix=_DAMAGED,
            )  # fmt: skip


def _bad_scale_bytes(b: torch.Tensor, e8m0: bool) -> bool:
    """Whether scale bytes hold a NaN code (E8M0: 0xFF; E4M3: 0x7F, 0xFF) or a negative E4M3 scale (above
    0x80; 0x80 is -0), told by the bytes' maxima as unsigned and signed: reductions without the masks'
    temporaries, or float8's slow widening (either cost a tenth of a merge's arithmetic at NVFP4's scales)."""
    top = int(b.max())
    return top == 0xFF if e8m0 else top > 0x80 or int(b.view(torch.int8).max()) == 0x7F


def logical(w: PackedWeight, stored: torch.Tensor) -> torch.Tensor:
    """A stored-orientation weight as the model holds it (a view)."""
    return stored.T if w.transposed else stored


def logical_into(w: PackedWeight, stored: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = :func:`logical` of ``stored`` (values in the stored orientation), a copy. A transposed
    weight's goes in tiles of rows on every core: torch copies a transposed view on one, striding
    through memory (a gpt-oss expert's took 35 ms so, 13 ms in tiles on two cores)."""
    if not w.transposed or out.device.type != "cpu":
        return out.copy_(logical(w, stored))
    src, width = stored.T, 256

    def part(rows: slice) -> None:
        for j in range(0, src.shape[1], width):
            out[rows, j : j + width].copy_(src[rows, j : j + width])

    native.run_parts(part, native.row_spans(out.shape[0]))
    return out


def to_stored(w: PackedWeight, values: torch.Tensor) -> torch.Tensor:
    """A logical weight (one expert's) in the stored orientation, contiguous."""
    return (values.T if w.transposed else values).contiguous()


@dataclass(frozen=True)
class LowRank:
    """A weight's terms as one product, delta = ``left @ right``: (rows, k) @ (k, cols), float32, the
    terms' factors folded into ``left``. :meth:`delta` sums each element's k products in their order,
    each rounded, from zero, as the compiled kernels do when they form the delta themselves (its
    rounding is a sum's, as a matrix product's is, but fixed: both paths give the same bytes)."""

    left: torch.Tensor
    right: torch.Tensor

    @classmethod
    def of(cls, factors: Sequence[RowFactors], rows: int, cols: int, device: torch.device) -> LowRank:
        """The terms ``factor * left @ right`` (each (rows, r) @ (r, cols)) as one product; none (an
        expert no term reaches), a product of rank 0: a delta of zeros."""
        left = [f.left.float() * f.factor for f in factors] or [torch.zeros(rows, 0, device=device)]
        right = [f.right.float() for f in factors] or [torch.zeros(0, cols, device=device)]
        return cls(torch.cat(left, dim=1).contiguous(), torch.cat(right, dim=0).contiguous())

    def rows(self, start: int, stop: int) -> LowRank:
        """The terms of rows ``start:stop``."""
        return LowRank(self.left[start:stop], self.right)

    def delta(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 (rows, cols): by the compiled kernels on the CPU (rows split across the cores), else
        in torch passes, one a term."""
        if out is None:
            out = self.left.new_empty(self.left.shape[0], self.right.shape[1])
        fit = all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                  for t in (self.left, self.right, out))  # fmt: skip
        kernels = _kernels() if fit else None
        if kernels is None:
            return _torch_delta(self.left, self.right, out)
        spans = native.row_spans(out.shape[0])
        native.run_parts(lambda r: kernels.lowbit_delta(self.left[r], self.right, out[r]), spans)
        return out


def _torch_delta(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """LowRank.delta's sum in torch passes: each term's products (rounded) added in order, from zero."""
    out.zero_()
    for t in range(left.shape[1]):
        out.add_(left[:, t : t + 1] * right[t])
    return out


@dataclass
class Requantized:
    """The stored tensors of a requantized weight and what they carry of the delta."""

    parts: Parts
    kept: Kept = field(default_factory=Kept)


def requantize(
    w: PackedWeight,
    merged: torch.Tensor,
    like: Parts,
    *,
    before: torch.Tensor | None = None,
    key: int | None = None,
    space: Subspace | None = None,
    keep_scales: bool = True,
    row0: int = 0,
) -> Requantized:
    """``merged`` (float32, stored orientation) in ``w``'s format, rounded to nearest, or with a stream
    ``key`` stochastically, or with a ``space`` by the subspace rule (:mod:`.rounding`). ``like``: the
    tensors it was read from (their dtypes are kept). ``before``: the dequantized base, for the
    :class:`Kept` sums.

    Scales: with ``keep_scales`` (a merge), each group keeps ``like``'s scale wherever its merged
    values still round onto that grid (within half a step past its ends), and takes the format's
    quantizer's scale only where they do not: a 4-bit grid is coarse, and a scale that moves re-rounds
    its whole group, which on bench_fp4's pairs cost more at the output than a small adapter gives
    (a block of MXFP4 whose maximum grows past a power of two doubles its step). Without it (a fresh
    quantization), the quantizer's scales everywhere.

    ``merged`` may be rows ``row0..`` of the weight (``like`` those rows' parts: see :func:`rows_of`):
    every row is rounded on its own, and the stochastic stream draws by the row's place.

    Raises:
        NeedsFreshScales: keeping NVFP4's tensor scale would overflow a block scale (only the whole
            weight can set a new one).
    """
    s = w.scheme
    if s.format in READ_ONLY:
        raise ValueError(f"{s.format} weights are read only: their quantizer needs calibration data")
    rows, cols = merged.shape
    u = uniforms(key, row0, rows, cols, merged.device) if key is not None and space is None else None
    out: Parts = {}
    zero_el: torch.Tensor | None = None
    grid: GridLike
    if s.format == "mxfp4":
        exponents = fp4.mxfp4_exponents(merged)
        if keep_scales:
            fits = fp4.group_amax(merged, fp4.MXFP4_GROUP) <= _E2M1_REACH * fp4.mxfp4_scale_values(like["scale"])
            exponents = torch.where(fits, like["scale"], exponents)
        scales = fp4.group_scales(fp4.mxfp4_scale_values(exponents), cols, fp4.MXFP4_GROUP)
        out["scale"], grid = exponents, E2M1
    elif s.format == "nvfp4":
        block, second = _nvfp4_scales(merged, like, s.divide, keep_scales)
        scales = fp4.nvfp4_element_scales(block, second, cols, s.divide)
        out["scale"], out["global"], grid = block, second.to(like["global"].dtype).reshape(like["global"].shape), E2M1
    else:
        groups = _groups(w, like)
        n_groups = like["scale"].shape[-1]
        scale, zero = intpack.int_qparams(merged, groups, n_groups, s.bits, s.symmetric, like["scale"].dtype)
        grid = intpack.grid_of(s.bits)
        if keep_scales:
            old_zero = _zero_codes(w, like) if zero is not None else None
            fits = _int_fits(merged, groups, n_groups, like["scale"], old_zero, grid)
            scale = torch.where(fits, like["scale"], scale)
            zero = torch.where(fits, old_zero, zero) if zero is not None and old_zero is not None else zero
        scales = intpack.per_column(scale.to(torch.float32), groups, cols)
        out["scale"] = scale
        if zero is not None:
            zero_el = intpack.per_column(zero.to(torch.float32), groups, cols)
            out["zero"] = intpack.pack_int32(zero.T.contiguous(), s.bits).T.contiguous()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: codes 0
    if space is not None:
        codes = _subspace_native(merged, safe, grid, space, zero_el)
        if codes is None:
            codes = round_subspace(merged, safe, grid, space, zero_el)
    else:
        scaled = merged / safe if zero_el is None else merged / safe + zero_el
        codes = round_to_grid(scaled, grid, u)
    if s.format == "int":
        out["codes"] = intpack.pack_int32(codes.to(torch.int32), s.bits)
        written = (codes - zero_el if zero_el is not None else codes).mul_(scales)
    else:
        codes = torch.where(scales > 0, codes, torch.zeros_like(codes))
        width = like["codes"].numel() // rows * 2  # values a row holds, the last group padded
        padded = torch.nn.functional.pad(codes, (0, width - cols))
        out["codes"] = fp4.encode_e2m1(padded).reshape(like["codes"].shape)
        written = codes * scales
    for role in ("shape", "g_idx"):
        if role in like:
            out[role] = like[role]
    kept = Kept.of(merged - before, merged - written) if before is not None else Kept()
    return Requantized(out, kept)


def requantize_native(
    w: PackedWeight, like: Parts, terms: LowRank, *, key: int | None, row0: int = 0,
    codes_into: torch.Tensor | None = None,
) -> Requantized | None:  # fmt: skip
    """:func:`requantize` with ``keep_scales`` of ``dequantize(w, like) + terms.delta()`` (stored
    orientation), nearest or with the stream ``key``, by the compiled kernels in one pass that forms
    the delta too (csrc/lowbit.c: the same bytes; the kept sums in another order), the rows split
    across the cores. None where the kernels are not built or do not take this weight (GPTQ and AWQ,
    activation order, a float16 scale, a tensor not on the CPU), or where a merged value is not
    finite: then the torch passes, which say where. ``codes_into``: a contiguous tensor of
    ``like["codes"]``'s shape and dtype that the codes are written into and returned as (a reused
    buffer: fresh pages for every weight's codes cost the kernel a fault each); else a new one.

    Raises:
        NeedsFreshScales: as :func:`requantize`.
    """
    kernels, spec = _kernels(), _native_spec(w, like)
    if kernels is None or spec is None or not _native_terms(terms):
        return None
    return _requantize_with(kernels, spec, w, like, terms, key, row0, codes_into)


def _native_terms(terms: LowRank) -> bool:
    """Whether the kernels take these factors as they are (contiguous float32 on the CPU)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               for t in (terms.left, terms.right))  # fmt: skip


def _requantize_with(kernels: native.Fp8Kernels, spec: native.LowBitSpec, w: PackedWeight, like: Parts,
                     terms: LowRank, key: int | None, row0: int,
                     codes_into: torch.Tensor | None = None) -> Requantized | None:  # fmt: skip
    job = _EncodeJob.of(w, like, spec, codes_into)
    answers = kernels.lowbit_encode(spec, (terms.left, terms.right), row0, job.inputs, job.outputs, stream=key,
                                    sums=job.sums, block=ENCODE_BLOCK_ROWS)  # fmt: skip
    return job.result(answers)


def start_native(w: PackedWeight, like: Parts, terms: LowRank, *, key: int | None,
                 codes_into: torch.Tensor) -> Started | None:  # fmt: skip
    """:func:`requantize_native` begun on the kernel threads (native.on_every_core), which go on to it
    once they finish the work begun before it; :meth:`Started.finish` waits for it and gives what
    requantize_native would have. None where the kernels do not take the weight (nothing begun)."""
    kernels, spec = _kernels(), _native_spec(w, like)
    if kernels is None or spec is None or not _native_terms(terms):
        return None
    job = _EncodeJob.of(w, like, spec, codes_into)
    running = kernels.lowbit_encode_later(spec, (terms.left, terms.right), 0, job.inputs, job.outputs, stream=key,
                                          sums=job.sums, block=ENCODE_BLOCK_ROWS)  # fmt: skip
    return Started(job, running)


@dataclass
class Started:
    """A requantization under way on the kernel threads (:func:`start_native`)."""

    job: _EncodeJob
    running: native.Running

    def finish(self) -> Requantized | None:
        """Wait for it: :func:`requantize_native`'s result (None where a merged value is not finite).

        Raises:
            NeedsFreshScales: as :func:`requantize`.
        """
        return self.job.result(self.running.answers())

    def cancel(self) -> None:
        """Stop it, and wait until no core works on it (its buffers are then the caller's again)."""
        self.running.cancel()


@dataclass
class _EncodeJob:
    """The compiled encode pass's inputs and outputs for one weight (or expert), and what it reports."""

    w: PackedWeight
    like: Parts
    codes_into: torch.Tensor
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes (rows, row_bytes), scale, zero codes
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    sums: torch.Tensor  # float64 (blocks, 3): each block's kept sums

    @classmethod
    def of(cls, w: PackedWeight, like: Parts, spec: native.LowBitSpec, codes_into: torch.Tensor | None) -> _EncodeJob:
        like_codes = like["codes"]
        if codes_into is None:
            codes_into = torch.empty(like_codes.shape, dtype=like_codes.dtype)
        elif (codes_into.shape != like_codes.shape or codes_into.dtype != like_codes.dtype
              or not codes_into.is_contiguous()):  # fmt: skip
            raise ValueError(f"codes_into must be contiguous, {like_codes.dtype}, of shape {tuple(like_codes.shape)}")
        codes, scale, zero, _ = _native_inputs(w, like, spec)
        codes_out = codes_into.view(torch.uint8).reshape(codes.shape)  # the same memory, as the kernels address it
        outputs = (codes_out, torch.empty_like(scale), torch.empty_like(zero))
        sums = torch.zeros(-(-codes.shape[0] // ENCODE_BLOCK_ROWS), 3, dtype=torch.float64)
        return cls(w, like, codes_into, (codes, scale, zero), outputs, sums)

    def result(self, answers: list[int]) -> Requantized | None:
        """The weight's parts and kept sums once the cores gave ``answers``; None where a merged value is
        not finite (the torch passes then say where)."""
        if native.LOWBIT_NOMEM in answers:
            raise MemoryError("the packed low-bit kernels could not allocate their row buffers")
        if native.LOWBIT_NONFINITE in answers:
            return None
        if native.LOWBIT_FRESH in answers:
            raise NeedsFreshScales
        w, like, (_, scale_out, zero_out) = self.w, self.like, self.outputs
        out: Parts = {"codes": self.codes_into}
        like_scale = like["scale"]
        out["scale"] = scale_out.to(like_scale.dtype) if w.scheme.format == "int" else scale_out.view(like_scale.dtype)
        if "zero" in like:
            out["zero"] = intpack.pack_int32(zero_out.T.contiguous(), w.scheme.bits).T.contiguous()
        for role in ("global", "shape", "g_idx"):
            if role in like:
                out[role] = like[role]
        dd, ed, ee = self.sums.sum(0).tolist()
        return Requantized(out, Kept(dd, ed, ee))


def subspace_compiled(device: torch.device) -> bool:
    """Whether :func:`requantize` rounds by the subspace rule in the compiled kernels on ``device``."""
    return device.type == "cpu" and _subspace_kernels() is not None


def _subspace_native(merged: torch.Tensor, scales: torch.Tensor, grid: GridLike, space: Subspace,
                     zero: torch.Tensor | None) -> torch.Tensor | None:  # fmt: skip
    """:func:`.rounding.round_subspace` by the compiled kernels (the same values; the rows split across
    the cores), or None where they do not take it (not built, not on the CPU, another grid)."""
    kernels = _subspace_kernels()
    if kernels is None or not (grid is E2M1 or isinstance(grid, IntGrid)):
        return None
    tensors = [merged, scales, space.basis, space.gain, *([zero] if zero is not None else [])]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    merged, scales = merged.contiguous(), scales.contiguous()
    zero = zero.contiguous() if zero is not None else None
    bounds = (float(grid.lo), float(grid.hi)) if isinstance(grid, IntGrid) else None
    out = torch.empty_like(merged)

    def part(rows: slice) -> int:
        z = zero[rows] if zero is not None else None
        return kernels.lowbit_subspace(merged[rows], scales[rows], z, bounds, space, out[rows])

    if native.LOWBIT_NOMEM in native.run_parts(part, native.row_spans(merged.shape[0])):
        raise MemoryError("the packed low-bit kernels could not allocate their row buffers")
    return out


def _dequantize_native(w: PackedWeight, parts: Parts, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`dequantize` by the compiled kernels (the same values), or None where they do not take it."""
    kernels, spec = _kernels(), _native_spec(w, parts)
    if kernels is None or spec is None:
        return None
    codes, scale, zero, spans = _native_inputs(w, parts, spec)
    shape = (codes.shape[0], int(spec.cols))
    if out is None:
        out = torch.empty(shape)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous, float32, of shape {shape}")

    def part(rows: slice) -> int:
        return kernels.lowbit_decode(spec, codes[rows], scale[rows], zero[rows] if zero.numel() else None, out[rows])

    answers = native.run_parts(part, spans)
    return out if not any(answers) else None


def _kernels() -> native.Fp8Kernels | None:
    """The compiled kernels where they are built and their packed passes agree with the torch passes
    (checked once, on small weights of every format: a miscompiled build is not used, and says so)."""
    kernels = native.library()
    if kernels is None:
        return None
    why = "the compiled packed low-bit kernels disagree with the torch passes (a miscompiled build?); 4-bit merges"
    return _vetted(kernels, _agrees, why + " use the torch passes")


def _subspace_kernels() -> native.Fp8Kernels | None:
    """:func:`_kernels`, where their subspace loop also agrees with :func:`.rounding.round_subspace`
    (checked once, when a merge first asks for the rule: the other merges do not pay for the check)."""
    kernels = _kernels()
    if kernels is None:
        return None
    why = "the compiled subspace rounding disagrees with the torch passes (a miscompiled build?); --rounding subspace"
    return _vetted(kernels, _subspace_agrees, why + " into 4-bit layouts uses the torch passes")


_checked: dict[tuple[str, int], bool] = {}  # (check, id of the loaded kernels) -> whether they agree


def _vetted(kernels: native.Fp8Kernels, agrees: Callable[[native.Fp8Kernels], bool],
            why: str) -> native.Fp8Kernels | None:  # fmt: skip
    """``kernels`` where ``agrees(kernels)``, run once per loaded library; else None, warned of once."""
    key = (agrees.__name__, id(kernels))
    if key not in _checked:
        _checked[key] = agrees(kernels)
        if not _checked[key]:
            warnings.warn(f"{why}. Reinstall loratool, or set LORATOOL_NATIVE=0 to silence this.", RuntimeWarning,
                          stacklevel=4)  # fmt: skip
    return kernels if _checked[key] else None


def _subspace_agrees(kernels: native.Fp8Kernels) -> bool:
    """The subspace rule's column loop by the kernels against :func:`.rounding.round_subspace`, on
    E2M1's grid and on integers with zero points, a 9 x 80 weight."""
    from .rounding import subspace_of

    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 80, generator=g) * 0.02
    space = subspace_of([torch.randn(5, 80, generator=g)])
    scales = torch.rand(9, 80, generator=g) * 0.01 + 0.002
    zero = torch.randint(-3, 4, (9, 80), generator=g).float()
    for grid, z in ((E2M1, None), (IntGrid(-8, 7), zero)):
        bounds = (float(grid.lo), float(grid.hi)) if isinstance(grid, IntGrid) else None
        rounded = torch.empty(9, 80)
        if kernels.lowbit_subspace(w, scales, z, bounds, space, rounded) or not torch.equal(
            rounded, round_subspace(w, scales, grid, space, z)
        ):
            return False
    return True


def _agrees(kernels: native.Fp8Kernels) -> bool:
    """Each format's decode and requantization (nearest and stochastic, scales kept and anew) by the
    kernels, against the torch passes, on a 9 x 80 weight with a short last group."""
    from .layout import PackedScheme

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(9, 80, generator=g) * 0.02
    terms = LowRank(torch.randn(9, 5, generator=g) * 0.002, torch.randn(5, 80, generator=g))
    delta = _torch_delta(terms.left, terms.right, torch.empty(9, 80))
    fast_delta = torch.empty(9, 80)
    kernels.lowbit_delta(terms.left, terms.right, fast_delta)
    if not torch.equal(fast_delta, delta):
        return False
    cases = [
        ("mxfp4", {"codes": torch.empty(9, 3, 16, dtype=torch.uint8), "scale": torch.empty(9, 3, dtype=torch.uint8)}),
        ("nvfp4", {"codes": torch.empty(9, 40, dtype=torch.uint8),
                   "scale": torch.empty(9, 5, dtype=torch.float8_e4m3fn), "global": torch.empty(1)}),
        ("int", {"codes": torch.empty(9, 10, dtype=torch.int32), "scale": torch.empty(9, 3, dtype=torch.bfloat16)}),
    ]  # fmt: skip
    for fmt, like in cases:
        scheme = PackedScheme(fmt, {"mxfp4": 32, "nvfp4": 16}.get(fmt, 32), 4, symmetric=False, divide=True)
        w = PackedWeight("check", (9, 80), {role: role for role in like}, scheme)
        parts = requantize(w, w0, like, keep_scales=False).parts
        spec = _native_spec(w, parts)
        if spec is None:
            return False
        before, out = _torch_dequantize(w, parts), torch.empty(9, 80)
        codes, scale, zero, _ = _native_inputs(w, parts, spec)
        if kernels.lowbit_decode(spec, codes, scale, zero, out) or not torch.equal(out, before):
            return False
        for key in (None, 0x5EED):
            fast = _requantize_with(kernels, spec, w, parts, terms, key, 3)
            slow = requantize(w, before + delta, parts, before=before, key=key, row0=3)
            same = fast is not None and all(torch.equal(fast.parts[r].view(torch.uint8), t.view(torch.uint8))
                                            for r, t in slow.parts.items())  # fmt: skip
            if not same:
                return False
    return True


def _native_inputs(
    w: PackedWeight, parts: Parts, spec: native.LowBitSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[slice]]:
    """The kernels' views of a strip's parts: codes as bytes (rows, row_bytes), scales as bytes
    (E2M1 formats) or float32, zero points as int32 codes (an empty tensor without), and the row
    spans the cores take."""
    rows = parts["codes"].shape[0]
    codes = parts["codes"].contiguous().view(torch.uint8).reshape(rows, -1)
    scale = parts["scale"].contiguous()
    scale = scale.float() if w.scheme.format == "int" else scale.view(torch.uint8)
    zero = _zero_codes(w, parts) if "zero" in parts else torch.empty(0, dtype=torch.int32)
    return codes, scale, zero, native.row_spans(rows)


def _native_spec(w: PackedWeight, like: Parts) -> native.LowBitSpec | None:
    """csrc/lowbit.c's layout of ``w`` (its strip ``like``), or None where the kernels do not take it."""
    s = w.scheme
    if s.format not in native.LOWBIT_FORMATS or sys.byteorder != "little":
        return None
    if any(t.device.type != "cpu" for t in like.values()):
        return None
    if s.format == "int" and (s.bits not in (4, 8) or "g_idx" in like or ("zero" in like) == s.symmetric
                              or like["scale"].dtype not in native.LOWBIT_SCALE_KINDS):  # fmt: skip
        return None  # (zero points where the scheme says symmetric, or none where it says not: the torch passes)
    group = {"mxfp4": fp4.MXFP4_GROUP, "nvfp4": fp4.NVFP4_GROUP}.get(s.format, s.group)
    rows, cols, groups = like["codes"].shape[0], w.rows_cols[1], like["scale"].shape[-1]
    row_bytes = like["codes"].numel() * like["codes"].element_size() // max(rows, 1)
    if rows == 0 or groups * group < cols or row_bytes * 8 < cols * (s.bits if s.format == "int" else 4):
        return None
    second = float(like["global"].float().reshape(())) if s.format == "nvfp4" else 0.0
    kind = native.LOWBIT_SCALE_KINDS.get(like["scale"].dtype, 0)
    return native.LowBitSpec(cols, row_bytes, group, groups, native.LOWBIT_FORMATS[s.format], s.bits or 4,
                             int(bool(s.divide)), kind, second, 0)  # fmt: skip


# rows a core takes at a time in the compiled encode pass (native.Fp8Kernels.lowbit_encode): small
# enough that the cores finish a weight together, large enough that the factors' chunk serves many rows
ENCODE_BLOCK_ROWS = 64

_E2M1_REACH = 7.0  # past 6 (the top), half of the top step (4 to 6): values up to 7 scales round to 6


def _nvfp4_scales(merged: torch.Tensor, like: Parts, divide: bool, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4's (block scales, tensor scale) for ``merged``: ``like``'s where the blocks still fit them
    (and the new blocks' scales fit e4m3 under ``like``'s tensor scale), else the quantizer's anew."""
    if not keep:
        return fp4.nvfp4_scales(merged, divide)
    second = like["global"].float().reshape(1)
    multiply = 1.0 / second if divide else second
    amax = fp4.group_amax(merged, fp4.NVFP4_GROUP)
    old = like["scale"].to(torch.float32) * multiply
    needed = (amax / 6.0) / multiply  # the block scales the quantizer would set under the old tensor scale
    fits = amax <= _E2M1_REACH * old
    if bool((needed[~fits] > 448.0).any()):
        raise NeedsFreshScales  # the tensor's range grew past what its tensor scale serves: every scale anew
    return torch.where(fits, like["scale"], needed.to(torch.float8_e4m3fn)), second


def _zero_codes(w: PackedWeight, parts: Parts) -> torch.Tensor:
    """The zero points (rows, groups) of a pack-quantized weight's parts, as int32 codes."""
    rows = parts["codes"].shape[0]
    return intpack.unpack_int32(parts["zero"].T.contiguous(), w.scheme.bits, rows).T.contiguous()


class NeedsFreshScales(Exception):
    """A strip cannot keep the weight's NVFP4 tensor scale: requantize the whole weight afresh."""


def strip_rows(w: PackedWeight, elements: int = 1 << 20) -> int:
    """Rows per strip of about ``elements`` values, a multiple of 32 (packed zero points split on words)."""
    return max(32, elements // max(w.rows_cols[1], 1) // 32 * 32)


def rows_of(w: PackedWeight, parts: Parts, start: int, stop: int) -> Parts:
    """The parts of rows ``start:stop`` (``start`` a multiple of 32): codes, scales and zero points
    sliced, the rest (tensor scale, shape, g_idx) whole."""
    out = dict(parts)
    out["codes"], out["scale"] = parts["codes"][start:stop], parts["scale"][start:stop]
    if "zero" in parts:  # packed along the rows, 32 / bits a word
        per = 32 // w.scheme.bits
        out["zero"] = parts["zero"][start // per : -(-stop // per)]
    return out


def join_rows(w: PackedWeight, strips: list[Parts]) -> Parts:
    """The parts of a whole weight from its strips' (in row order)."""
    out = dict(strips[0])
    for role in ("codes", "scale", "zero"):
        if role in out:
            out[role] = torch.cat([p[role] for p in strips]) if len(strips) > 1 else strips[0][role]
    return out


def _int_fits(merged: torch.Tensor, groups: torch.Tensor | int, n_groups: int, scale: torch.Tensor,
              zero: torch.Tensor | None, grid: intpack.IntGrid) -> torch.Tensor:  # fmt: skip
    """Whether each group's merged values round into ``grid`` under ``scale`` (and ``zero``), (rows, groups):
    its range over the (positive) scale, shifted by the zero point, within the grid's reach."""
    lo, hi = intpack.group_range(merged, groups, n_groups)
    s = torch.where(scale > 0, scale.float(), torch.ones_like(scale.float()))
    lo, hi = lo / s, hi / s
    if zero is not None:
        lo, hi = lo + zero.float(), hi + zero.float()
    return (lo >= grid.lo - 0.5) & (hi <= grid.hi + 0.5) & (scale > 0)


def _groups(w: PackedWeight, parts: Parts) -> torch.Tensor | int:
    """Each stored column's scale group (activation order), or the size of consecutive groups."""
    return intpack.column_groups(w.scheme.group, parts.get("g_idx"), parts["scale"].device)


def steps(w: PackedWeight, parts: Parts, values: torch.Tensor) -> torch.Tensor:
    """Each element's grid step (float32, stored orientation) at ``values`` (its magnitude, real
    units), on the grid ``parts`` set: the unit a rounding error is counted in."""
    s = w.scheme
    rows, cols = values.shape
    if s.format == "mxfp4":
        scales = fp4.group_scales(fp4.mxfp4_scale_values(parts["scale"]), cols, fp4.MXFP4_GROUP)
    elif s.format == "nvfp4":
        scales = fp4.nvfp4_element_scales(parts["scale"], parts["global"], cols, s.divide)
    else:
        return intpack.per_column(parts["scale"].to(torch.float32), _groups(w, parts), cols)
    x = torch.where(scales > 0, values.abs() / scales, torch.zeros_like(values))
    spacing = torch.where(x < 2, 0.5, torch.where(x < 4, 1.0, 2.0))  # E2M1's steps: 0.5 below 2, 1 below 4, then 2
    return spacing * scales
