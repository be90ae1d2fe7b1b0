"""loratool's compiled kernels (``loratool/quant/csrc``), loaded with ctypes where the build made them.

Installing loratool compiles ``csrc/fp8.c`` and ``csrc/lowbit.c`` into ``loratool/quant/_fp8kernel.*``
when a C compiler is present (``hatch_build.py``); without one, or with ``LORATOOL_NATIVE=0`` in the
environment, every caller runs the same arithmetic as torch passes, to the same bytes. The library
is a plain C shared object (no Python or torch headers, so no ABI to match), and it is checked
against torch's own passes before first use, each family of passes apart (the FP8 ones by
:func:`fp8_kernels`, the packed low-bit ones by ``packed._kernels``): a build that disagrees is not used.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import itertools
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from .._version import __version__
from ..host import available_cores
from . import rounding

T = TypeVar("T")
R = TypeVar("R")

_NAMES = ("_fp8kernel.so", "_fp8kernel.dylib", "_fp8kernel.dll")
_FORMATS = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}  # the C enum


class LowBitSpec(ctypes.Structure):
    """One packed weight's layout, as csrc/lowbit.c's ``Spec``."""

    _fields_ = [("cols", ctypes.c_int64), ("row_bytes", ctypes.c_int64), ("group", ctypes.c_int64),
                ("groups", ctypes.c_int64), ("fmt", ctypes.c_int32), ("bits", ctypes.c_int32),
                ("divide", ctypes.c_int32), ("scale_kind", ctypes.c_int32), ("second", ctypes.c_float),
                ("unused", ctypes.c_int32)]  # fmt: skip


LOWBIT_FORMATS = {"mxfp4": 0, "nvfp4": 1, "int": 2}  # the C enum
LOWBIT_SCALE_KINDS = {torch.float32: 0, torch.bfloat16: 1}  # the integers' scale dtypes the kernel rounds to
LOWBIT_FRESH, LOWBIT_NONFINITE, LOWBIT_NOMEM = 1, 2, 3  # lt_lowbit_encode_blocks's answers besides 0
SIMD_BEST = 2  # Fp8Kernels.simd_level's highest level
HALF_KINDS = {torch.bfloat16: 0, torch.float16: 1}  # lt_round_half's kinds


class Fp8Kernels:
    """The FP8 decode / new scales / encode passes (see csrc/fp8.c) over CPU tensors.

    Scales come as a float32 (block rows, tiles per row) array for tiles of ``block`` = (rows,
    cols); per-channel scales are tiles of (1, cols). ``row0`` is where the tensors' first row lies
    below the first row the scale array covers. Every tensor is 2-D, contiguous, on the CPU.
    """

    ABI = 11  # csrc/fp8.c's lt_fp8_abi(): the entry points below (lowbit.c's too) as declared

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.agreement: dict[str, bool] = {}  # each check's answer (by its method's name), once asked
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        lib.lt_fp8_abi.restype = i32
        if lib.lt_fp8_abi() != self.ABI:
            raise OSError(f"it is a build of another version (ABI {lib.lt_fp8_abi()}, not {self.ABI})")
        lib.lt_fp8_decode.argtypes = [p, p, i64, i64, i64, p, i64, i64, i32]
        lib.lt_fp8_decode.restype = i32
        lib.lt_fp8_scales.argtypes = [p, i64, i64, i64, i64, i64, i32, p]
        lib.lt_fp8_scales.restype = i32
        lib.lt_fp8_encode.argtypes = [p, p, i64, i64, i64, p, i64, i64, i32, p, p, ctypes.c_uint32, i64, i32, p]
        lib.lt_fp8_encode.restype = ctypes.c_double
        lib.lt_fp8_subspace.argtypes = [p, p, i64, i64, i64, p, i64, i64, i32, p, p, p, p, i64, i64, p]
        lib.lt_fp8_subspace.restype = i32
        lib.lt_fp8_simd.argtypes = [i32]
        lib.lt_fp8_simd.restype = i32
        lib.lt_check_bf16.argtypes = [p, p, p, i64, p]
        lib.lt_check_bf16.restype = i64
        spec = ctypes.POINTER(LowBitSpec)
        lib.lt_lowbit_decode.argtypes = [spec, p, p, p, i64, p]
        lib.lt_lowbit_decode.restype = i32
        lib.lt_lowbit_encode_blocks.argtypes = [spec, p, p, i64, i64, i64, p, p, p, p, p, p, i32, i32, ctypes.c_uint32,
                                                p, i64, p, p]  # fmt: skip
        lib.lt_lowbit_encode_blocks.restype = i32
        lib.lt_lowbit_delta.argtypes = [p, p, i64, i64, i64, p]
        lib.lt_lowbit_delta.restype = None
        f32 = ctypes.c_float
        lib.lt_lowbit_subspace.argtypes = [p, p, p, i64, i64, i32, f32, f32, p, p, i64, i64, p]
        lib.lt_lowbit_subspace.restype = i32
        lib.lt_round_half.argtypes = [p, p, p, i64, i64, i64, ctypes.c_uint32, i32, i32, p]
        lib.lt_round_half.restype = None
        self._lib = lib

    def simd(self, allow: bool = True) -> bool:
        """Allow (the default) or forbid the SIMD paths (where the CPU has them); returns whether they
        are in use. Forbidden, every element takes the portable C, as on other CPUs."""
        return self.simd_level(SIMD_BEST if allow else 0) > 0

    def simd_level(self, level: int = 2) -> int:
        """Use SIMD paths up to ``level`` (0: the portable C; 1: AVX2 and F16C; 2: also AVX-512 F, BW,
        DQ and VL, which the packed passes have) where the CPU has them; returns the level in use."""
        return int(self._lib.lt_fp8_simd(level))

    def check_bf16(self, out: torch.Tensor, ref: torch.Tensor, merged: torch.Tensor, sums: torch.Tensor) -> int:
        """``unmerge --check`` over bfloat16 tensors of one size in one pass: ``sums`` (float64[4]) gets the
        original's squared norm and the squared difference added, and the largest difference and
        difference in units of rounding (bfloat16's spacing at the larger of the original and merged
        value) maxed in; returns how many elements differ (see csrc/fp8.c)."""
        _check(out, ref, merged, sums)
        assert out.dtype == ref.dtype == merged.dtype == torch.bfloat16 and sums.dtype == torch.float64
        assert out.numel() == ref.numel() == merged.numel() and sums.numel() == 4
        return int(self._lib.lt_check_bf16(out.data_ptr(), ref.data_ptr(), merged.data_ptr(), out.numel(),
                                           sums.data_ptr()))  # fmt: skip

    def lowbit_decode(self, spec: LowBitSpec, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      out: torch.Tensor) -> int:  # fmt: skip
        """``out`` (float32 (rows, cols)) = a packed strip's values (csrc/lowbit.c: ``codes`` uint8 (rows,
        row_bytes), ``scale`` uint8 or float32 (rows, groups), ``zero`` int32 or None); returns 0,
        :data:`LOWBIT_NONFINITE` (an NVFP4 scale that is a NaN code) or :data:`LOWBIT_NOMEM`."""
        _check(codes, scale, out, *([zero] if zero is not None else []))
        z = zero.data_ptr() if zero is not None else None
        return int(self._lib.lt_lowbit_decode(ctypes.byref(spec), codes.data_ptr(), scale.data_ptr(), z,
                                              out.shape[0], out.data_ptr()))  # fmt: skip

    def lowbit_encode(self, spec: LowBitSpec, terms: tuple[torch.Tensor, torch.Tensor], row0: int,
                      base: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...], *, stream: int | None,
                      sums: torch.Tensor, block: int) -> list[int]:  # fmt: skip
        """A weight's base (``base`` = (codes, scale, zero or an empty tensor), rows ``row0``.. of it) plus
        the delta ``left @ right`` (``terms`` = (left, right), float32 (rows, k) and (k, cols), summed as
        :meth:`lowbit_delta` sums) requantized with the base's scales kept where they fit, into ``out``
        (alike), nearest or stochastically with the key ``stream``, on every core (:func:`run_parts`):
        blocks of ``block`` rows, each taken by whichever core comes free (csrc/lowbit.c's
        ``lt_lowbit_encode_blocks``). Block ``b``'s kept sums are added to ``sums[b]`` (float64 (blocks,
        3)), so that they add up alike on any number of cores. Returns each core's answer: 0,
        :data:`LOWBIT_FRESH`, :data:`LOWBIT_NONFINITE` or :data:`LOWBIT_NOMEM`; after any but 0 the
        cores stop taking blocks, and ``out`` is incomplete."""
        call, _ = self._encode_call(spec, terms, row0, base, out, stream, sums, block)
        return run_parts(lambda _: call(), range(available_cores()))

    def lowbit_encode_later(self, spec: LowBitSpec, terms: tuple[torch.Tensor, torch.Tensor], row0: int,
                            base: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...], *, stream: int | None,
                            sums: torch.Tensor, block: int) -> Running:  # fmt: skip
        """:meth:`lowbit_encode` on the kernel threads (:func:`on_every_core`), returning at once: the
        cores go on to it as they finish the work queued before it. The tensors must stay as they are
        until :meth:`Running.answers` has returned."""
        call, stop = self._encode_call(spec, terms, row0, base, out, stream, sums, block)
        return Running(on_every_core(call), stop)

    def _encode_call(self, spec: LowBitSpec, terms: tuple[torch.Tensor, torch.Tensor], row0: int,
                     base: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...], stream: int | None,
                     sums: torch.Tensor, block: int) -> tuple[Callable[[], int], ctypes.c_int32]:  # fmt: skip
        """What each core calls for :meth:`lowbit_encode` (the call holds the tensors), and the flag that
        stops the cores taking blocks."""
        (left, right), (codes, scale, zero), (codes_out, scale_out, zero_out) = terms, base, out
        _check(left, right, *base, *out, sums)
        rows = codes.shape[0]
        assert left.dtype == right.dtype == torch.float32 and left.shape == (rows, right.shape[0])
        assert scale.shape[0] == rows and tuple(sums.shape) == (-(-rows // block), 3) and sums.dtype == torch.float64
        z, z_out = (zero.data_ptr(), zero_out.data_ptr()) if zero.numel() else (None, None)
        taken, stop = ctypes.c_int64(0), ctypes.c_int32(0)  # the blocks' counter, and the cores' signal to stop
        args = (ctypes.byref(spec), left.data_ptr(), right.data_ptr(), left.shape[1], rows, row0, codes.data_ptr(),
                scale.data_ptr(), z, codes_out.data_ptr(), scale_out.data_ptr(), z_out, 1, int(stream is not None),
                stream or 0, sums.data_ptr(), block, ctypes.byref(taken), ctypes.byref(stop))  # fmt: skip

        def call(_held: object = (spec, terms, base, out, sums, taken)) -> int:  # alive while a core may use them
            return int(self._lib.lt_lowbit_encode_blocks(*args))

        return call, stop

    def lowbit_subspace(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        grid: tuple[float, float] | None, space: rounding.Subspace,
                        out: torch.Tensor) -> int:  # fmt: skip
        """``out`` = ``w / scale`` (``+ zero``) rounded by the subspace rule
        (:func:`.rounding.round_subspace`, the same bytes) on E2M1's grid (``grid`` None) or the
        integers ``grid`` = (lo, hi); every tensor float32 (rows, cols) but the space's. Returns 0 or
        :data:`LOWBIT_NOMEM`."""
        _check(w, scale, out, space.basis, space.gain, *([zero] if zero is not None else []))
        assert w.dtype == scale.dtype == out.dtype == torch.float32 and w.shape == scale.shape == out.shape
        rows, cols = w.shape
        lo, hi = grid if grid is not None else (0.0, 0.0)
        z = zero.data_ptr() if zero is not None else None
        return int(self._lib.lt_lowbit_subspace(w.data_ptr(), scale.data_ptr(), z, rows, cols, int(grid is not None),
                                                lo, hi, space.basis.data_ptr(), space.gain.data_ptr(), space.width,
                                                space.rank, out.data_ptr()))  # fmt: skip

    def lowbit_delta(self, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` (float32 (rows, cols)) = ``left @ right`` ((rows, k) @ (k, cols)), each element the
        sum of its k products, each rounded, added in order from zero: the encode pass's delta."""
        _check(left, right, out)
        assert left.dtype == right.dtype == out.dtype == torch.float32
        assert left.shape[1] == right.shape[0] and out.shape == (left.shape[0], right.shape[1])
        self._lib.lt_lowbit_delta(left.data_ptr(), right.data_ptr(), left.shape[1], *out.shape, out.data_ptr())

    def round_half(self, x: torch.Tensor, before: torch.Tensor, out: torch.Tensor, row0: int, stream: int | None,
                   sums: torch.Tensor) -> None:  # fmt: skip
        """``out`` (bfloat16 or float16 (rows, cols)) = ``x`` (float32, finite; within float16's range for
        float16) on that grid as :func:`.rounding.quantize_values` puts it: nearest, or stochastically with
        the key ``stream`` (the draws of rows ``row0``..); the kept sums against ``before`` (float32, x's
        shape) added to ``sums`` (float64[3]) in float runs, then double (csrc/lowbit.c)."""
        _check(x, before, out, sums)
        assert x.dtype == before.dtype == torch.float32 and out.dtype in HALF_KINDS
        assert x.shape == before.shape == out.shape and x.dim() == 2 and sums.dtype == torch.float64
        self._lib.lt_round_half(x.data_ptr(), before.data_ptr(), out.data_ptr(), *x.shape, row0, stream or 0,
                                int(stream is not None), HALF_KINDS[out.dtype], sums.data_ptr())  # fmt: skip

    def half_agrees_with_torch(self) -> bool:
        """:meth:`round_half` against :func:`.rounding.quantize_values`, nearest and stochastic, into each
        dtype, on values across its range: its subnormals, its ties, its largest value (and for bfloat16
        beyond it), zeros of both signs."""
        g = torch.Generator().manual_seed(0)
        for dtype, top in ((torch.bfloat16, 3.4e38), (torch.float16, 65504.0)):
            x = (torch.randn(7, 150, generator=g) * torch.logspace(-45, 39, 150)).clamp(-top, top)
            ends = [0.0, -0.0, top, -top, 1e-39, -3e-45, 6.1e-5, -5.96e-8, 2.9e-8]  # subnormals, the tops
            ties = [1.00390625, 1.01171875, 1.00048828125, -1.00146484375]  # bfloat16's, then float16's
            x[0, : len(ends) + len(ties)] = torch.tensor(ends + ties)
            before = torch.randn(7, 150, generator=g)
            for stream in (None, 0x5EED):
                out, sums = torch.empty(7, 150, dtype=dtype), torch.zeros(3, dtype=torch.float64)
                self.round_half(x, before, out, 3, stream, sums)
                u = rounding.uniforms(stream, 3, 7, 150) if stream is not None else None
                if not torch.equal(out.view(torch.int16), rounding.quantize_values(x, dtype, u).view(torch.int16)):
                    return False
        return True

    @staticmethod
    def handles(dtype: torch.dtype) -> bool:
        return dtype in _FORMATS

    def decode(
        self, q: torch.Tensor, out: torch.Tensor, row0: int, scale: torch.Tensor, block: tuple[int, int]
    ) -> bool:
        """``out[:] = q * scale`` (float8 (rows, cols) -> float32); returns whether ``q`` holds an
        e4m3fn NaN code (those come out as +-480 times the scale)."""
        _check(q, out, scale)
        rows, cols = q.shape
        tiles = (row0, scale.data_ptr(), *block, _FORMATS[q.dtype])
        return bool(self._lib.lt_fp8_decode(q.data_ptr(), out.data_ptr(), rows, cols, *tiles))

    def scales(
        self, w: torch.Tensor, row0: int, block: tuple[int, int], dtype: torch.dtype, scale: torch.Tensor
    ) -> bool:
        """``scale`` (float32) = each tile's max |w| over ``dtype``'s largest value, 1 for a tile of
        zeros; returns False where a tile holds an Inf or a NaN (``scale`` then holds garbage)."""
        _check(w, scale)
        assert scale.dtype == torch.float32
        rows, cols = w.shape
        return not self._lib.lt_fp8_scales(w.data_ptr(), rows, cols, row0, *block, _FORMATS[dtype], scale.data_ptr())

    def encode(
        self,
        w: torch.Tensor,
        q: torch.Tensor,
        row0: int,
        scale: torch.Tensor,
        block: tuple[int, int],
        *,
        stream: tuple[int, int] | None = None,
        base: tuple[torch.Tensor, torch.Tensor] | None = None,
        sums: torch.Tensor | None = None,
    ) -> float:
        """``q[:] = fp8(w / scale)``, saturating: nearest (ties to even), or stochastic where ``stream``
        = (key, the first row's index in the whole weight) says whose draws (:mod:`.rounding`).
        Returns ||w - q * scale||^2. With ``base`` = (codes of w's shape, scales tiled as ``scale``)
        it adds the kept sums <delta, delta>, <err, delta>, <err, err> (delta = w - base, err = w -
        stored) to ``sums`` (float64, 3)."""
        _check(w, q, scale)
        rows, cols = w.shape
        tiles = (row0, scale.data_ptr(), *block, _FORMATS[q.dtype])
        key, first = stream if stream is not None else (0, 0)
        codes, scales, out = _kept_pointers(base, sums)
        return float(self._lib.lt_fp8_encode(w.data_ptr(), q.data_ptr(), rows, cols, *tiles, codes, scales, key,
                                             first, int(stream is not None), out))  # fmt: skip

    def subspace(
        self,
        w: torch.Tensor,
        q: torch.Tensor,
        row0: int,
        scale: torch.Tensor,
        block: tuple[int, int],
        *,
        base: tuple[torch.Tensor, torch.Tensor] | None,
        space: rounding.Subspace,
        sums: torch.Tensor | None,
    ) -> None:
        """``q[:] = fp8(w / scale)`` by the subspace rule (:func:`.rounding.round_subspace`, the same
        bytes), adding the kept sums to ``sums`` as :meth:`encode` does where ``base`` is given."""
        _check(w, q, scale, space.basis, space.gain)
        rows, cols = w.shape
        tiles = (row0, scale.data_ptr(), *block, _FORMATS[q.dtype])
        codes, scales, out = _kept_pointers(base, sums)
        failed = self._lib.lt_fp8_subspace(w.data_ptr(), q.data_ptr(), rows, cols, *tiles, codes, scales,
                                           space.basis.data_ptr(), space.gain.data_ptr(), space.width, space.rank,
                                           out)  # fmt: skip
        if failed:
            raise MemoryError("the FP8 kernels could not allocate their working memory")

    def agrees_with_torch(self) -> bool:
        """Every code decodes, and values around every code's rounding boundary encode, as torch's
        conversions do (e4m3fn's NaN codes aside, which decode to +-480 by design), and as
        :func:`.rounding.round_to_grid` rounds stochastically, with a scale of 1 and with one whose
        multiplications and divisions round."""
        if not self._subspace_agrees():
            return False
        for dtype in _FORMATS:
            codes = torch.arange(256, dtype=torch.uint8).view(dtype)
            values = codes.to(torch.float32)
            if dtype == torch.float8_e4m3fn:
                values = torch.where(values.isnan(), torch.where(values.signbit(), -480.0, 480.0), values)
            top = float(torch.finfo(dtype).max)
            grid = values[values.isfinite() & (values.abs() <= top)].sort().values  # -0 and 0 both, either order
            mids = (grid[1:] + grid[:-1]) / 2
            up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
            beyond = torch.tensor([-top * 1.001, top * 1.001])
            x = torch.cat([grid, mids, mids.nextafter(up), mids.nextafter(down), beyond])
            for scale in (1.0, 0.7):
                s = torch.full((1, 1), scale)
                got = torch.empty(1, 256)
                self.decode(codes.view(1, -1), got, 0, s, (1, 256))
                if not torch.equal(got.view(torch.int32).flatten(), (values * scale).view(torch.int32)):
                    return False
                w = (x * scale).view(1, -1)
                q = torch.empty(1, x.numel(), dtype=torch.uint8).view(dtype)
                self.encode(w, q, 0, s, (1, x.numel()))
                want = (w / scale).clamp(-top, top).to(dtype)
                if not torch.equal(q.view(torch.uint8), want.view(torch.uint8)):
                    return False
                self.encode(w, q, 0, s, (1, x.numel()), stream=(0x5EED, 3))  # the draws of row 3
                want = rounding.round_to_grid(w / scale, dtype, rounding.uniforms(0x5EED, 3, 1, x.numel())).to(dtype)
                if not torch.equal(q.view(torch.uint8), want.view(torch.uint8)):
                    return False
        return True

    def _subspace_agrees(self) -> bool:
        """The subspace rule on 43 rows (4 groups of 8 in SIMD lanes where the CPU has them, then one
        group, then 3 rows portable) with ragged tiles and a rank-3 subspace (padded to 4), as torch's
        reference writes them."""
        g = torch.Generator().manual_seed(0)
        w = torch.randn(43, 40, generator=g)
        space = rounding.subspace_of([torch.randn(3, 40, generator=g)])
        block, s = (4, 16), torch.rand(11, 3, generator=g) * 0.01 + 0.002
        full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:43, :40].contiguous()
        for dtype in _FORMATS:
            q = torch.empty(43, 40, dtype=torch.uint8).view(dtype)
            base = (torch.zeros(43, 40, dtype=torch.uint8).view(dtype), s)
            self.subspace(w, q, 0, s, block, base=base, space=space, sums=torch.zeros(3, dtype=torch.float64))
            want = rounding.round_subspace(w, full, dtype, space).to(dtype)
            if not torch.equal(q.view(torch.uint8), want.view(torch.uint8)):
                return False
        return True


def _kept_pointers(
    base: tuple[torch.Tensor, torch.Tensor] | None, sums: torch.Tensor | None
) -> tuple[int | None, int | None, int | None]:
    """The C arguments for the kept sums: the base's codes and float32 scales, and float64[3] sums
    to add to; all NULL without a base."""
    if base is None:
        return None, None, None
    _check(*base)
    assert sums is not None and sums.dtype == torch.float64 and sums.numel() == 3 and base[1].dtype == torch.float32
    return base[0].data_ptr(), base[1].data_ptr(), sums.data_ptr()


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("the native kernels take contiguous CPU tensors")


_loaded: list[Fp8Kernels | None] = []
_checking = threading.Lock()  # _agreeing's checks, once each for callers on several threads


def library() -> Fp8Kernels | None:
    """The compiled kernels as loaded, or None: not built, ``LORATOOL_NATIVE=0``, or a build of
    another version. Each family of passes is checked against torch's before its first use, by
    whoever uses it: :func:`fp8_kernels` for the FP8 passes, ``packed._kernels`` for the packed
    low-bit ones (so a 4-bit merge does not pay for the FP8 checks, nor an FP8 merge for the 4-bit ones)."""
    if os.environ.get("LORATOOL_NATIVE", "1") == "0":
        return None
    if not _loaded:
        _loaded.append(_load())
    return _loaded[0]


def fp8_kernels() -> Fp8Kernels | None:
    """The FP8 kernels, or None: not built, ``LORATOOL_NATIVE=0``, or not agreeing with torch
    (checked once per loaded library, at the first call; a build that disagrees says so, once)."""
    return _agreeing("agrees_with_torch", "torch's FP8 conversions", "FP8 merges use torch's passes")


def half_kernels() -> Fp8Kernels | None:
    """The kernels where their bfloat16 and float16 rounding agrees with torch's passes (checked as
    :func:`fp8_kernels` checks the FP8 passes), else None."""
    return _agreeing("half_agrees_with_torch", "torch's bfloat16 and float16 rounding",
                     "merges written in 16 bits from a quantized base use torch's passes")  # fmt: skip


def _agreeing(check: str, what: str, instead: str) -> Fp8Kernels | None:
    """The loaded kernels where their method ``check`` answers that they agree with torch (asked once
    per loaded library); a build that disagrees says so, once: with ``what``, and what runs ``instead``."""
    kernels = library()
    if kernels is None:
        return None
    with _checking:
        if check not in kernels.agreement:
            kernels.agreement[check] = getattr(kernels, check)()
            if not kernels.agreement[check]:
                why = f"{_library_name()} disagrees with {what} (a miscompiled build?); {instead}"
                warnings.warn(f"{why}. Reinstall loratool, or set LORATOOL_NATIVE=0 to silence this.", RuntimeWarning,
                              stacklevel=3)  # fmt: skip
    return kernels if kernels.agreement[check] else None


def row_spans(rows: int, per_core: int = 4, least: int = 64) -> list[slice]:
    """Rows split into about ``per_core`` spans a core (none under ``least`` rows but one), which
    :func:`run_parts` hands out as the cores come free: an even finish where a core is also busy with
    reading or writing."""
    step = max(least, -(-rows // (available_cores() * per_core)))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)] or [slice(0, 0)]


def rounded_half(x: torch.Tensor, before: torch.Tensor, out: torch.Tensor, stream: int | None,
                 row0: int = 0) -> rounding.Kept | None:  # fmt: skip
    """``out`` = ``x`` in bfloat16 or float16 (out's dtype) by :func:`.rounding.quantize_values`'s rule
    (nearest, or the draws of ``stream`` for rows ``row0``..), and the kept sums against ``before``, by
    the compiled kernels, the rows split across the cores; None where they do not take it (not built, not
    agreeing, not CPU tensors of that layout), and nothing written. ``x`` must be finite, and within
    float16's range for float16 (merges refuse more first)."""
    takes = x.dim() == 2 and x.shape == before.shape == out.shape and out.dtype in HALF_KINDS
    takes &= x.dtype == before.dtype == torch.float32
    if not takes or any(t.device.type != "cpu" or not t.is_contiguous() for t in (x, before, out)):
        return None
    kernels = half_kernels()
    if kernels is None:
        return None
    spans = row_spans(x.shape[0])
    sums = torch.zeros(len(spans), 3, dtype=torch.float64)
    run_parts(lambda i: kernels.round_half(x[spans[i]], before[spans[i]], out[spans[i]], row0 + spans[i].start,
                                           stream, sums[i]), range(len(spans)))  # fmt: skip
    dd, ed, ee = sums.sum(0).tolist()
    return rounding.Kept(dd, ed, ee)


def _library() -> Path | None:
    """The built library: beside this module (an installed or editable loratool), else in the
    installed loratool of this same version (this module imported from a source tree, as tests are)."""
    here = Path(__file__).parent
    places = [here / name for name in _NAMES]
    try:
        dist = importlib.metadata.distribution("loratool")
        if dist.version == __version__:
            places += [Path(str(dist.locate_file(f"loratool/quant/{name}"))) for name in _NAMES]
    except importlib.metadata.PackageNotFoundError:
        pass
    return next((p for p in places if p.is_file()), None)


def _library_name() -> str:
    path = _library()
    return path.name if path is not None else _NAMES[0]


def _load() -> Fp8Kernels | None:
    path = _library()
    if path is None:
        return None
    try:
        return Fp8Kernels(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as e:
        warnings.warn(f"{path.name} did not load ({e}); FP8 and 4-bit merges use torch's passes", RuntimeWarning,
                      stacklevel=4)  # fmt: skip
        return None


_pool: list[ThreadPoolExecutor] = []
_PART_THREADS = "loratool-part"  # the pool's threads' names begin so


@dataclass
class Running:
    """A kernel's calls on every core, on the kernel threads (:func:`on_every_core`)."""

    futures: list[Future[int]]
    stop: ctypes.c_int32  # set: the cores take no more of its blocks

    def answers(self) -> list[int]:
        """Each core's answer, once all have returned."""
        return [f.result() for f in self.futures]

    def cancel(self) -> None:
        """Stop the cores taking its blocks, and wait until none works on it."""
        self.stop.value = 1
        wait(self.futures)


_kernel_pool: list[ThreadPoolExecutor] = []
_KERNEL_THREADS = "loratool-kernel"


def _forget_pools() -> None:
    """In a forked child, which has none of its parent's threads: the pools start anew when next used."""
    _pool.clear()
    _kernel_pool.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def on_every_core(call: Callable[[], int]) -> list[Future[int]]:
    """``call()`` once for each core, on threads of their own that take work in the order given, so
    that the cores go on from one kernel's calls to the next one's without waiting for the caller
    (who prepares the next while they work). For kernels whose calls share out their work among
    themselves (``lt_lowbit_encode_blocks``)."""
    if not _kernel_pool:
        _kernel_pool.append(ThreadPoolExecutor(available_cores(), _KERNEL_THREADS))
    return [_kernel_pool[0].submit(call) for _ in range(available_cores())]


def run_parts(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` on this thread and a shared pool's (one a core besides this one),
    each taking the next item as it finishes one, so that more items than cores balance the load
    (ctypes and torch let go of the GIL in their calls, so the parts run on separate cores)."""
    todo = list(items)
    helpers = min(available_cores() - 1, len(todo) - 1)
    if helpers <= 0 or threading.current_thread().name.startswith(_PART_THREADS):
        return [fn(x) for x in todo]  # (called from a part, on the pool: its helpers could wait behind it)
    if not _pool:  # torch on one thread in each worker: the parts are the parallelism
        workers = max(1, available_cores() - 1)
        _pool.append(ThreadPoolExecutor(workers, _PART_THREADS, initializer=torch.set_num_threads, initargs=(1,)))
    results: list[R | None] = [None] * len(todo)
    order = itertools.count()  # next() on it is atomic under the GIL
    failed = threading.Event()

    def work() -> None:
        while not failed.is_set() and (i := next(order)) < len(todo):
            try:
                results[i] = fn(todo[i])
            except BaseException:
                failed.set()
                raise

    futures = [_pool[0].submit(work) for _ in range(helpers)]
    try:
        work()
    finally:  # the parts share the caller's buffers: none may still run once this returns or raises
        wait(futures)
    for f in futures:
        f.result()  # a worker's exception
    return results  # type: ignore[return-value]
