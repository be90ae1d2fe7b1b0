"""FP8 weights (e4m3fn, e5m2) with per-tensor, per-channel or block scales: dequantize, quantize,
and the streaming merge step that dequantizes, adds the rank-r terms and requantizes a strip of
rows at a time, in torch passes or in the compiled kernels (:mod:`loratool.quant.native`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import torch

from ..errors import NonFiniteError
from ..host import torch_threads
from ..math.linalg import RowFactors
from . import native
from .layout import Fp8Scheme
from .rounding import Kept, Subspace, round_subspace, round_to_grid, uniforms


def _expand_scale(scale: torch.Tensor, shape: tuple[int, ...], scheme: Fp8Scheme) -> torch.Tensor:
    """``scale`` (float32) broadcastable to ``shape`` (out, in)."""
    s = scale.to(torch.float32)
    if scheme.kind == "tensor":
        return s.reshape(())
    if scheme.kind == "channel":
        return s.reshape(shape[0], 1)  # (out, 1)
    assert scheme.block is not None
    bo, bi = scheme.block
    full = s.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)  # (nb_o*bo, nb_i*bi)
    return full[: shape[0], : shape[1]]  # ragged last tiles cut back to the weight


def fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    """``q.to(float32)``, on CPU by :func:`fp8_to_float32_into`: torch converts e4m3 one element at
    a time there."""
    if q.device.type != "cpu" or q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return q.to(torch.float32)
    code = torch.empty(q.shape, dtype=torch.int16)
    return fp8_to_float32_into(q, torch.empty(q.shape, dtype=torch.float32), code)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme,
                   out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The float32 weight an FP8 ``q`` (out, in) and its ``scale`` stand for (written into ``out``, a
    contiguous float32 tensor of q's shape, where given). The compiled kernels decode it on every core."""
    kernels = native.fp8_kernels() if q.device.type == "cpu" and q.dim() == 2 and q.is_contiguous() else None
    if out is not None and not (out.shape == q.shape and out.dtype == torch.float32 and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(q.shape)}")
    if kernels is None or not kernels.handles(q.dtype) or (out is not None and out.device != q.device):
        values = fp8_to_float32(q).mul_(_expand_scale(scale.to(q.device), tuple(q.shape), scheme))
        return values if out is None else out.copy_(values)
    rows, cols = q.shape
    tile = {"block": scheme.block, "channel": (1, cols)}.get(scheme.kind) or (rows, cols)  # "tensor": one tile
    out = torch.empty(q.shape) if out is None else out
    tiles = scale.to(torch.float32).reshape(-(-rows // tile[0]), -1).contiguous()
    spans = native.row_spans(rows)  # (each row finds its tile from its own index: row0 is the span's first)
    if any(native.run_parts(lambda r: kernels.decode(q[r], out[r], r.start, tiles, tile), spans)):
        out[q.view(torch.uint8).bitwise_and(0x7F) == 0x7F] = float("nan")  # e4m3fn NaN codes came out as 480
    return out


def check_scale(key: str, scale: torch.Tensor, what: str = "the FP8 scale") -> None:
    """Refuse an FP8 scale tensor that holds NaN, Inf or a negative number, naming it and where.

    Zero passes: quantizers that do not clamp give an all-zero block a zero scale, and it
    dequantizes to the zeros it stands for.
    """
    if scale.numel() == 0:
        return
    lo, hi = (float(x) for x in torch.aminmax(scale))  # one pass, no temporaries; NaN makes both NaN
    if lo >= 0.0 and math.isfinite(hi):  # (-0 passes: it compares equal to 0)
        return
    s = scale.float()
    bad = ~torch.isfinite(s) | (s < 0)
    if bool(bad.any()):
        at = [int(i) for i in bad.nonzero()[0]]
        value = float(s[tuple(at)])
        raise NonFiniteError(
            f"{what} holds {value} at {at}: scales are finite and positive", key=key,
            fix="the checkpoint is damaged: re-download it, or re-export it with its producer's quantizer",
        )  # fmt: skip


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)  # 448 for e4m3fn, 57344 for e5m2


def quantize_fp8(
    w: torch.Tensor,
    scheme: Fp8Scheme,
    dtype: torch.dtype,
    scale_shape: tuple[int, ...],
    *,
    key: int | None = None,
    space: Subspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (float32, (out, in)) as FP8 ``dtype`` in ``scheme``: (q, scale), scale float32 of ``scale_shape``.

    Each scale is its group's absolute maximum over the format's largest value (the convention of
    DeepSeek's and compressed-tensors' quantizers), so every group uses the full FP8 range; an
    all-zero group gets scale 1. Values are rounded to nearest after clamping to the range, or with
    a stream ``key`` stochastically (:func:`.rounding.round_to_grid`, the draws of rows 0.. of the
    weight), or with a ``space`` by the subspace rule (:func:`.rounding.round_subspace`).
    """
    top = fp8_max(dtype)
    out_f, in_f = w.shape
    if scheme.kind == "tensor":
        amax = w.abs().amax().reshape(1, 1)
    elif scheme.kind == "channel":
        amax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
    else:
        assert scheme.block is not None
        bo, bi = scheme.block
        nb_o, nb_i = -(-out_f // bo), -(-in_f // bi)
        padded = torch.nn.functional.pad(w.abs(), (0, nb_i * bi - in_f, 0, nb_o * bo - out_f))  # zeros keep amax
        amax = padded.view(nb_o, bo, nb_i, bi).amax(dim=(1, 3))  # (nb_o, nb_i)
    scale = amax / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if space is not None:
        return _subspace_codes(w, scale, scheme, dtype, space), scale.reshape(scale_shape)
    full = _expand_scale(scale, (out_f, in_f), scheme)
    x = w / full
    if key is None:
        return x.clamp_(-top, top).to(dtype), scale.reshape(scale_shape)
    q = round_to_grid(x, dtype, uniforms(key, 0, out_f, in_f, w.device)).to(dtype)
    return q, scale.reshape(scale_shape)


def _subspace_codes(
    w: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme, dtype: torch.dtype, space: Subspace
) -> torch.Tensor:
    """``w`` over its ``scale`` (float32, (groups of rows, groups of columns)) as FP8 codes by the
    subspace rule: in the compiled kernels on the CPU where they are built (one tile per scale),
    else by torch's reference, on ``w``'s device."""
    rows, cols = w.shape
    kernels = native.fp8_kernels()
    if kernels is None or not kernels.handles(dtype):
        return round_subspace(w, _expand_scale(scale, (rows, cols), scheme).expand(rows, cols), dtype, space).to(dtype)
    tile = {"block": scheme.block, "channel": (1, cols)}.get(scheme.kind) or (rows, cols)
    tiles = scale.to("cpu", torch.float32).reshape(-(-rows // tile[0]), -1).contiguous()
    q = torch.empty(rows, cols, dtype=dtype)
    kernels.subspace(w.to("cpu", torch.float32).contiguous(), q, 0, tiles, tile, base=None, space=space, sums=None)
    return q.to(w.device)


def merge_fp8_rows(
    q: torch.Tensor,
    scale: torch.Tensor,
    scheme: Fp8Scheme,
    factors: list[RowFactors],
    q_out: torch.Tensor,
    scale_out: torch.Tensor,
    check: Callable[[torch.Tensor], None] | None = None,
    scratch: torch.Tensor | None = None,
    *,
    key: int | None = None,
    space: Subspace | None = None,
) -> Kept:
    """Dequantize ``q`` (out, in) a strip of rows at a time, add the rank-r terms in float32, and
    requantize each strip into ``q_out``/``scale_out`` (the same scheme, dtype and scale shape):
    to nearest, with a stream ``key`` stochastically (each element's draw is a function of its
    place in the weight), or with a ``space`` by the subspace rule (rows are independent): either
    way steps of any size give the same bytes (:mod:`.rounding`).

    A step is whole block rows (``block`` scheme) or any rows (``channel``), so every scale it needs
    lies inside it: at most about a million elements on CPU, so that nothing of the weight's size is
    widened at once, and the whole weight on a GPU (:data:`_GROUP_ELEMENTS`). ``tensor`` schemes need the
    whole weight's maximum first and are not taken here. Returns the :class:`.rounding.Kept` sums
    of the merge (delta = W' - W in float32, err = W' - stored).
    ``check`` is called with a merged strip (or the dequantized weight) that is not finite.
    ``scratch``: float32 working memory of at least :func:`fp8_scratch_elements` (else allocated).

    On CPU, where loratool's compiled kernels are built (:mod:`loratool.quant.native`), each step is three
    passes of them around ``addmm``, one step per torch thread (:class:`_NativeFp8Steps`), to the
    same bytes as the torch passes below, which run otherwise and for steps holding a NaN or Inf.
    The time of those is elementwise passes over each strip, so there are as few as the arithmetic
    allows (about a dozen): float8 is decoded through float16 bit patterns (:func:`_fp8_bits_into`; torch
    converts e4m3 one element at a time on CPU), the power of two that decoding leaves out rides on
    the scale, the terms are added by ``addmm``, and the tile maxima that set the new scales also
    reveal a NaN or Inf. Every strip reuses one set of buffers: on the development VM a fresh
    buffer per step costs more in page faults than the arithmetic.
    """
    if scheme.kind == "tensor":
        raise ValueError("per-tensor scales need the whole weight: use dequantize_fp8 and quantize_fp8")
    rows, cols = q.shape
    top = fp8_max(q_out.dtype)
    s_in, s_out = scale.reshape(scale.shape[0], -1), scale_out.view(scale_out.shape[0], -1)
    fast = _NativeFp8Steps.make(q, scale, scheme, factors, q_out, scale_out, key, space)
    per_step = fast.step_elements(rows * cols) if fast is not None else None
    groups = list(_strip_groups(rows, cols, scheme, q.device, per_step))
    size = max(stop - start for start, stop, _ in groups) * cols
    need = _scratch_for(size)
    if scratch is None:
        scratch = torch.empty(need, dtype=torch.float32, device=q.device)
    elif scratch.numel() < need:
        raise ValueError(f"scratch holds {scratch.numel()} elements, {need} are needed")
    strip_buf, work_buf, delta_buf = scratch[:size], scratch[size : 2 * size], scratch[2 * size : 3 * size]
    code_buf = scratch[3 * size : need].view(torch.int16)[:size]  # int16 codes in the last half-size
    sums = torch.zeros(3, dtype=torch.float64, device=q.device)  # Kept's, summed where computed: no sync per step
    with torch_threads(1) if fast is not None else contextlib.nullcontext():  # the steps are the parallelism
        if fast is not None:
            groups = fast.run(groups, strip_buf)  # what is left: steps with a NaN code, NaN or Inf
        if check is not None and groups and fp8_has_nan_codes(q):
            check(fp8_to_float32(q))  # e4m3fn's NaN codes decode to finite numbers below: settle them here
        for start, stop, g in groups:
            n = (stop - start) * cols
            strip, work = strip_buf[:n].view(-1, cols), work_buf[:n].view(-1, cols)
            code, delta = code_buf[:n].view(-1, cols), delta_buf[:n]
            unit = _fp8_bits_into(q[start:stop], strip, code)
            tiles = (g, -1, cols)  # (block rows, rows of each, cols): every tile's scale broadcasts over its rows
            strip.view(tiles).mul_(_group_scale(s_in, start, stop, g, cols, scheme) * unit)  # exact: unit is 2^k
            delta.view(-1, cols).copy_(strip)  # the base, for now
            for left, right, factor, _ in factors:
                strip.addmm_(left[start:stop], right, alpha=factor)  # (rows', r) @ (r, cols)
            delta.view(-1, cols).sub_(strip).neg_()  # W' - W
            torch.abs(strip, out=work)
            if scheme.kind == "block":
                assert scheme.block is not None
                bi = scheme.block[1]
                nb = -(-cols // bi)
                peak = work.view(tiles).amax(dim=1)  # (g, cols); amax keeps a NaN
                new = torch.nn.functional.pad(peak, (0, nb * bi - cols)).view(g, nb, bi).amax(dim=2) / top  # (g, nb)
                b0 = start // scheme.block[0]
                s_out[b0 : b0 + g] = torch.where(new > 0, new, torch.ones_like(new)).to(s_out.dtype)
            else:
                peak = work.amax(dim=1, keepdim=True)  # (rows', 1)
                new = peak / top
                s_out[start:stop] = torch.where(new > 0, new, torch.ones_like(new)).to(s_out.dtype)
            if check is not None and not bool(torch.isfinite(peak).all()):
                check(strip)
            new_scale = _group_scale(s_out, start, stop, g, cols, scheme)
            scaled = torch.div(strip.view(tiles), new_scale, out=work.view(tiles)).view(-1, cols)
            if bool((new < _TINY).any()):  # |W'| / (max|W'| / top) <= top (1 + 2^-22) unless a scale is subnormal
                scaled.clamp_(-top, top)
            if space is not None:  # from the merged values and each element's scale
                per_element = torch.broadcast_to(new_scale, strip.view(tiles).shape).reshape(-1, cols)
                q_out[start:stop] = round_subspace(strip, per_element, q_out.dtype, space)
            elif key is None:
                q_out[start:stop] = scaled
            else:
                draws = uniforms(key, start, stop - start, cols, q.device)  # this step's rows of the weight's stream
                q_out[start:stop] = round_to_grid(scaled, q_out.dtype, draws)
            unit = _fp8_bits_into(q_out[start:stop], strip, code)  # the stored values / unit
            residual = scaled.sub_(strip, alpha=unit).view(tiles).mul_(new_scale).view(-1)  # W' - stored
            sums += torch.stack([torch.dot(delta, delta), torch.dot(residual, delta), torch.dot(residual, residual)])
    dd, ed, ee = sums.tolist()
    return Kept(dd, ed, ee).add(fast.kept if fast is not None else Kept())


class _NativeFp8Steps:
    """Steps of :func:`merge_fp8_rows` in the compiled kernels (:mod:`loratool.quant.native`): decode and
    scale, torch's ``addmm`` for the terms, the new scales from the tile maxima, encode; the same
    bytes as the passes, in three passes over each step instead of a dozen. One step per torch thread at a time, each on
    one thread of its own (its strip stays in that core's cache; no OpenMP team spins between)."""

    def __init__(self, kernels: native.Fp8Kernels, q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme,
                 factors: list[RowFactors], q_out: torch.Tensor, scale_out: torch.Tensor,
                 key: int | None, space: Subspace | None) -> None:  # fmt: skip
        rows, cols = q.shape
        self.kernels, self.q, self.q_out, self.factors, self.key, self.space = kernels, q, q_out, factors, key, space
        self.block = scheme.block if scheme.kind == "block" and scheme.block is not None else (1, cols)
        self.s_in = scale.to(torch.float32).reshape(-(-rows // self.block[0]), -1).contiguous()
        self.s_out = scale_out.view(self.s_in.shape)
        self.parts = torch.get_num_threads()
        self.kept = Kept()

    @classmethod
    def make(cls, q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme, factors: list[RowFactors],
             q_out: torch.Tensor, scale_out: torch.Tensor, key: int | None,
             space: Subspace | None) -> _NativeFp8Steps | None:  # fmt: skip
        """The native steps where they apply (CPU, e4m3fn or e5m2, contiguous), else None."""
        kernels = native.fp8_kernels() if q.device.type == "cpu" else None
        if kernels is None or not (kernels.handles(q.dtype) and kernels.handles(q_out.dtype)):
            return None
        if not (q.is_contiguous() and q_out.is_contiguous() and scale_out.is_contiguous()):
            return None
        return cls(kernels, q, scale, scheme, factors, q_out, scale_out, key, space)

    def step_elements(self, total: int) -> int:
        """Elements per step for a weight of ``total``: at most :data:`_GROUP_ELEMENTS`, and few enough
        that every part gets a step (:func:`_strip_groups` keeps a step to whole block rows)."""
        return max(1, min(_GROUP_ELEMENTS["cpu"], -(-total // self.parts)))

    def run(self, steps: list[tuple[int, int, int]], strip: torch.Tensor) -> list[tuple[int, int, int]]:
        """Merge ``steps`` (whole block rows each) into q_out and scale_out, each part (up to
        :attr:`parts`, on threads of their own) taking the next step as it finishes one; ``strip``
        is float32 scratch of the largest. Returns the steps whose merged rows hold a NaN or an Inf
        or whose codes hold one of e4m3fn's NaNs, for the torch passes (nothing of theirs is written
        but their scales, which those passes write again)."""
        sums: list[torch.Tensor | None] = [None] * len(steps)
        todo, taking = iter(range(len(steps))), threading.Lock()

        def part(buf: torch.Tensor) -> None:
            while True:
                with taking:
                    i = next(todo, None)
                if i is None:
                    return
                sums[i] = self.step(steps[i][0], steps[i][1], buf)

        with _PART_STRIPS_LOCK:  # the first part works in the caller's scratch, the others in kept strips
            while len(_PART_STRIPS) < min(self.parts, len(steps)) - 1:
                _PART_STRIPS.append(torch.empty(0))
            for i, kept in enumerate(_PART_STRIPS):
                if kept.numel() < strip.numel():  # grown once, not per weight: fresh memory costs page faults
                    _PART_STRIPS[i] = torch.empty(strip.numel())
            native.run_parts(part, [strip, *_PART_STRIPS][: min(self.parts, len(steps))])
        for s in sums:  # in step order: the same sums every run
            if s is not None:
                self.kept = self.kept.add(Kept(*s.tolist()))
        return [step for step, s in zip(steps, sums) if s is None]

    def step(self, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor | None:
        """Rows start:stop merged; returns their kept sums (float64, 3), or None for a NaN or Inf (or
        a NaN code in ``q``, which decodes to a finite number)."""
        k, bo, cols = self.kernels, self.block[0], self.q.shape[1]
        b0, b1 = start // bo, -(-stop // bo)
        strip = buf[: (stop - start) * cols].view(-1, cols)
        s_in = self.s_in[b0:b1]
        if k.decode(self.q[start:stop], strip, 0, s_in, self.block):
            return None
        for left, right, factor, _ in self.factors:
            strip.addmm_(left[start:stop], right, alpha=factor)  # (rows', r) @ (r, cols)
        if self.s_out.dtype == torch.float32:
            s_new = self.s_out[b0:b1]
            if not k.scales(strip, 0, self.block, self.q_out.dtype, s_new):
                return None  # an Inf or a NaN: the torch passes write these scales again
        else:
            s_new = torch.empty(s_in.shape)
            if not k.scales(strip, 0, self.block, self.q_out.dtype, s_new):
                return None
            self.s_out[b0:b1] = s_new
            s_new = self.s_out[b0:b1].to(torch.float32)  # as stored: a bfloat16 scale is rounded
        sums = torch.zeros(3, dtype=torch.float64)
        if self.space is not None:
            k.subspace(strip, self.q_out[start:stop], 0, s_new, self.block, base=(self.q[start:stop], s_in),
                       space=self.space, sums=sums)  # fmt: skip
            return sums
        stream = (self.key, start) if self.key is not None else None
        k.encode(strip, self.q_out[start:stop], 0, s_new, self.block, stream=stream, base=(self.q[start:stop], s_in),
                 sums=sums)  # fmt: skip
        return sums


_PART_STRIPS: list[torch.Tensor] = []  # float32 strips of the native steps' parts but the first
_PART_STRIPS_LOCK = threading.Lock()


def fp8_scratch_elements(rows: int, cols: int, scheme: Fp8Scheme, device: torch.device) -> int:
    """How much float32 scratch :func:`merge_fp8_rows` works in for a (rows, cols) weight on ``device``."""
    return _scratch_for(max(stop - start for start, stop, _ in _strip_groups(rows, cols, scheme, device)) * cols)


def _scratch_for(size: int) -> int:
    """Three float32 buffers of ``size`` and one int16 buffer, in float32 elements."""
    return 3 * size + (size + 1) // 2


_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32
# Elements per step of merge_fp8_rows. On CPU a step stays in cache through its dozen passes; on a
# GPU each pass is a kernel launch (microseconds, against a microsecond per 4 MB moved), so a step
# takes a whole weight.
_GROUP_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 27}


def _strip_groups(
    rows: int, cols: int, scheme: Fp8Scheme, device: torch.device, per_step: int | None = None
) -> Iterator[tuple[int, int, int]]:
    """(start, stop, block rows) steps over the rows: whole block rows (a ragged last one alone), or
    for per-channel scales any rows, about ``per_step`` (:data:`_GROUP_ELEMENTS`) at a time."""
    per_step = per_step or _GROUP_ELEMENTS.get(device.type, _GROUP_ELEMENTS["cpu"])
    if scheme.kind == "block":
        assert scheme.block is not None
        bo = scheme.block[0]
        per, full = max(1, per_step // (bo * cols)), rows // bo
        for b0 in range(0, full, per):
            b1 = min(b0 + per, full)
            yield b0 * bo, b1 * bo, b1 - b0
        if rows % bo:
            yield full * bo, rows, 1
    else:  # steps of equal size (to a row): no short last one, which BLAS might take a matrix-vector path for
        n = -(-rows // max(1, per_step // cols))
        for k in range(n):
            yield rows * k // n, rows * (k + 1) // n, 1


def _group_scale(scale: torch.Tensor, start: int, stop: int, g: int, cols: int, scheme: Fp8Scheme) -> torch.Tensor:
    """The float32 scales of rows start:stop, broadcastable to their (g, rows / g, cols) view."""
    if scheme.kind == "block":
        assert scheme.block is not None
        b0 = start // scheme.block[0]
        per_col = scale[b0 : b0 + g].to(torch.float32).repeat_interleave(scheme.block[1], dim=1)[:, :cols]
        return per_col.view(g, 1, cols)
    return scale[start:stop].to(torch.float32).view(1, -1, 1)  # (1, rows', 1)


def _fp8_bits_into(q: torch.Tensor, out: torch.Tensor, code: torch.Tensor) -> float:
    """``out[:] = q / unit`` (float8 -> float32) for the returned power of two ``unit``, exactly, for
    every finite code, in three integer passes and one conversion through ``code``, an int16 buffer
    of ``q``'s shape. e4m3fn's NaN codes come out as +-480 / unit (see :func:`fp8_has_nan_codes`).

    A float8 byte read as int8 and widened to int16 keeps its sign in the top bits. e5m2 shifted
    left by 8 is a float16 (unit 1). e4m3fn shifted left by 7 has its 4 exponent and 3 mantissa
    bits where a float16 has them, the value times 2^-8 (exponent bias 15 against 7, subnormals
    included), once bit 14, a copy of the sign, is cleared.
    """
    if q.device.type != "cpu" or q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        out.copy_(q)
        return 1.0
    code.copy_(q.view(torch.int8))  # sign-extended
    if q.dtype == torch.float8_e5m2:
        out.copy_(code.bitwise_left_shift_(8).view(torch.float16))
        return 1.0
    out.copy_(code.bitwise_left_shift_(7).bitwise_and_(~0x4000).view(torch.float16))
    return 256.0


def fp8_has_nan_codes(q: torch.Tensor) -> bool:
    """Whether an e4m3fn tensor holds a NaN (0x7F or 0xFF, the largest byte as int8 and as uint8)."""
    if q.dtype != torch.float8_e4m3fn:
        return False  # e5m2's NaN and Inf codes decode as such
    return int(q.view(torch.int8).amax()) == 0x7F or int(q.view(torch.uint8).amax()) == 0xFF


def fp8_to_float32_into(q: torch.Tensor, out: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``out[:] = q`` (float8 -> float32), exactly for every code, NaN included, through float16 bit
    patterns in the int16 buffer ``code`` (torch's own conversion of e4m3 runs one element at a
    time on CPU)."""
    unit = _fp8_bits_into(q, out, code)
    if unit != 1.0:
        out.mul_(unit)
    if fp8_has_nan_codes(q):
        out[q.view(torch.uint8).bitwise_and(0x7F) == 0x7F] = float("nan")
    return out
