"""CPU kernels over ``KernelWeight`` storage, and ``PackedLinear``.

Backends (``x`` float32 (M, cols) -> (M, rows)):
  * ``cpp-vnni`` (first choice for 2/3/4-bit where the machine has AVX-512 VNNI):
    ``qgemm.cpp``'s vpdpbusd kernel. Activations rounded exactly as ``cpp-lut`` rounds them
    (to |X| <= ``LUT_LEVELS`` per ``lut_segment``), split once per call into two signed bytes
    (X = 128 h + l), and multiplied with the unsigned code bytes, 64 products per instruction:
    the same exact integer sums as ``cpp-lut``, so the same output bit for bit and the same
    bound, at a cost per product rather than per weight bit (twice the instructions of a
    plain int8 product, which would round activations to 8 bits: not offered, it is W4A8,
    another format). Needs ``rows % 16 == 0``, ``cols % 64 == 0``, ``group % 32 == 0``;
    every M (tiles of 4 activation rows share one decode of the codes).
  * ``cpp-lut`` (first choice for 2/3/4-bit on AVX2 machines without AVX-512 VNNI):
    ``qgemm.cpp``'s bit-plane table-lookup kernel.
    Per call, each 4-column group of an activation row (rounded per sub-block of
    ``lut_segment`` columns to |X| <= ``LUT_LEVELS``) gets the 16 sums of its subsets; a
    b-bit weight is b planes of 4-bit indices into those tables (vpshufb), so its cost is per
    weight bit, not per product. Codes exact, integer sums exact; the deviation from the
    fake-quant product is bounded by ``lut_error_bound``. Needs AVX2, ``rows % 16 == 0``,
    ``cols % 64 == 0`` and ``group % 32 == 0``; every M (its cost is linear in M, and at
    M = 128 it ties torch's float32 GEMM on 4096 x 4096, so there is no dense path).
  * ``cpp-i16``: ``qgemm.cpp``'s integer kernel (8-bit, and the shapes ``cpp-lut`` does not
    take). Codes exact, activations rounded per call to 16-bit fixed point per segment
    (``i16_segment``), integer products (``vpmaddwd``), float32 scaling per segment; the
    deviation from the fake-quant product is bounded by ``i16_error_bound``. Needs AVX2,
    ``cols % 64 == 0`` and ``group % 32 == 0``.
    From ``DENSE_FROM_M`` activation rows on (prefill, batches) the same storage is
    dequantized tile by tile into float32 (``dequant_int``, about 1 MiB per tile) and
    multiplied with torch's float32 GEMM: exact up to float summation, and the decode is paid
    once per weight element rather than once per activation row.
  * ``torch-int4``: ``aten._weight_int4pack_mm_for_cpu`` (torch's tinygemm CPU kernel). Its
    dequantisation is ``(q - 8) * s + z`` per (group, row), so ``z = offset + 8 s`` converts
    our ``s q + offset`` exactly. Used for 4-bit codes with a group that is a multiple of 32
    up to 256, rows a multiple of 16 and columns a multiple of 64; other shapes go to the
    next backend (nothing is padded).
  * ``torch-int8``: ``aten._weight_int8pack_mm`` (per-channel scale, signed int8 codes): 8-bit
    symmetric per-channel layers (q - 128 fits int8, offset = -128 s).
  * ``cpp``: ``qgemm.cpp``'s exact float32 kernel, compiled once per machine with
    ``torch.utils.cpp_extension`` (-O3 -march=native); every bit width 2..8 and any group;
    multi-threaded over rows.
  * ``reference``: unpack, dequantize, matmul in torch: always available, the correctness
    yardstick and the fallback when no compiler is present.
  * ``cpp-a8``: NOT weight-only, never chosen by ``select``'s ``auto``: the activations
    rounded to int8 per 32 columns at every call (a W4A8-style product, as llama.cpp's CPU
    dot products; vpmaddubsw, AVX2) times ``cpp-i16``'s units with rows in blocks of 4
    (``to_a8``). Its deviation from the weight-only product is bounded by ``a8_error_bound``
    (the accuracy it trades for speed); tables name it. 2/3/4-bit, ``rows % 4 == 0``,
    ``cols % 64 == 0``, ``group % 32 == 0``.

``select`` picks, for a weight, the first backend of ``PREFERENCE`` that supports it;
``prepare`` builds the backend's storage once (a ``Kernel``, whose ``nbytes`` the benchmarks
report). Outlier channels add a sparse product and a column permutation gathers ``x`` first,
whatever the backend. ``allowed_error`` is each backend's correctness gate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suite.kernels.build import load_cpp
from suite.kernels.packing import KernelWeight, side_nbytes, unpack_rows

log = logging.getLogger("qbench.kernels")
BACKENDS = ("cpp-vnni", "cpp-lut", "cpp-i16", "torch-int4", "torch-int8", "cpp", "reference",
            "cpp-a8")
PREFERENCE = ("cpp-vnni", "cpp-lut", "cpp-i16", "cpp", "torch-int4", "torch-int8",
              "reference")  # select()
X_LEVELS = 32639  # cpp-i16 rounds activations to int16: X = round(x / d), d = max|x| / 32639
A8_LEVELS, A8_SEGMENT = 127, 32  # cpp-a8: int8 activations per 32 columns (llama.cpp's Q8_0)
LUT_LEVELS = 8191  # cpp-lut / cpp-vnni: |X| <= 8191, so a table entry (a sum of 4) fits int16
# cpp-i16 from this many activation rows on: float32 tiles of the dequantized weight times x
# (torch's GEMM); the measured crossover: 4096 x 4096 ties near 48 rows, 576-wide layers near 32
DENSE_FROM_M = 48
# float32 GEMM of a dequantized weight vs a kernel's own summation order, relative to the
# output's scale (max |y|): 1e-5 covers every backend (measured worst case ~2e-6)
RTOL = 1e-5
_SOURCE = Path(__file__).with_name("qgemm.cpp")


CFLAGS = ["-O3", "-march=native", "-fopenmp"]


@cache
def cpp_module(defines: tuple[str, ...] = ()) -> Any | None:
    """The compiled ``qgemm`` extension, or None (logged once: the reference backend is used)
    when it cannot be built. ``defines``: extra preprocessor names, for A/B builds of one
    source (``QBENCH_A8_NO_VNNI``); the backends use the plain build."""
    return load_cpp("qgemm", _SOURCE, CFLAGS + [f"-D{d}" for d in defines], ["-fopenmp"])


@dataclass(frozen=True)
class _IntBackend:
    """What a compiled integer backend needs: an instruction set, code widths, 16-row blocks."""

    isa: str          # the module's has_<isa>()
    bits: tuple[int, ...]
    row_block: int  # rows in blocks of this many (16: cpp-lut / cpp-vnni; 4: cpp-a8)


# every compiled integer backend reads 64-column units of groups that are multiples of 32
_INT_BACKENDS = {
    "cpp-vnni": _IntBackend("vnni", (2, 3, 4), row_block=16),
    "cpp-lut": _IntBackend("avx2", (2, 3, 4), row_block=16),
    "cpp-i16": _IntBackend("avx2", (2, 3, 4, 8), row_block=1),
    "cpp-a8": _IntBackend("avx2", (2, 3, 4), row_block=4),
}


def supports(backend: str, w: KernelWeight) -> bool:
    """Whether ``backend`` can compute with ``w`` (exactly, up to float summation order)."""
    if backend == "torch-int4":
        return (w.bits == 4 and w.group % 32 == 0 and w.group <= 256 and w.rows % 16 == 0
                and w.cols % w.group == 0 and w.cols % 64 == 0)
    if backend == "torch-int8":
        return (w.bits == 8 and w.group == w.cols
                and bool(torch.equal(w.offset, -128 * w.scale)))
    if backend == "cpp":
        return cpp_module() is not None
    if backend in _INT_BACKENDS:
        need, mod = _INT_BACKENDS[backend], cpp_module()
        return (mod is not None and getattr(mod, f"has_{need.isa}")() and w.bits in need.bits
                and w.cols % 64 == 0 and w.group % 32 == 0
                and w.rows % need.row_block == 0)
    return backend == "reference"


def select(w: KernelWeight, backend: str = "auto") -> str:
    """The backend to use: ``backend`` itself (checked), or the first supporting one."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend: got {backend!r}; accepted: auto, {', '.join(BACKENDS)}")
        if not supports(backend, w):
            raise ValueError(f"backend {backend!r} does not support {w.bits}-bit group "
                             f"{w.group} ({w.rows}x{w.cols})")
        return backend
    return next(b for b in PREFERENCE if supports(b, w))


Fn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    """A weight prepared for one backend: the storage it reads and its product.

    Attributes:
        backend: the backend id.
        tensors: the backend's own weight storage (what ``nbytes`` counts).
        fn: ``fn(tensors, x)`` -> (M, rows), x float32 (M, cols) in packed column order.
        perm / outliers: as in ``KernelWeight``.
    """

    backend: str
    tensors: dict[str, torch.Tensor]
    fn: Fn
    perm: torch.Tensor | None = None
    outliers: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, cols) float32 -> (M, rows) float32."""
        y = self.fn(self.tensors, x if self.perm is None else x[:, self.perm])
        if self.outliers is not None:
            y = y + (self.outliers @ x.t()).t()
        return y

    def nbytes(self) -> int:
        """Bytes the backend reads for the weight, from its storage tensors (plus the int32
        permutation and the sparse outlier channel)."""
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return total + side_nbytes(self.perm, self.outliers)

    def clone(self) -> Kernel:
        """The same kernel on copied storage (other memory: cold-cache timing rotates these)."""
        return replace(self, tensors={k: v.clone() for k, v in self.tensors.items()})


def prepare(w: KernelWeight, backend: str) -> Kernel:
    """``w`` prepared for ``backend``: its own weight layout is built once here."""
    tensors, fn = _CORES[backend](w)
    return Kernel(backend, tensors, fn, w.perm, w.outliers)


Core = tuple[dict[str, torch.Tensor], Fn]


def _int4_core(w: KernelWeight) -> Core:
    q = w.codes().to(torch.int32)  # (rows, cols)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    zero = w.offset + 8 * w.scale  # (q - 8) s + zero = s q + offset
    sz = torch.stack([w.scale.t(), zero.t()], dim=-1).contiguous()  # (groups, rows, 2)
    group = w.group
    return ({"packed": packed, "sz": sz},
            lambda t, x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, t["packed"], group, t["sz"]))


def _int8_core(w: KernelWeight) -> Core:
    q = (w.codes().to(torch.int16) - 128).to(torch.int8)  # (rows, cols) signed
    return ({"q": q, "scale": w.scale[:, 0].contiguous()},
            lambda t, x: torch.ops.aten._weight_int8pack_mm(x, t["q"], t["scale"]))


def _cpp_core(w: KernelWeight) -> Core:
    mod = cpp_module()
    assert mod is not None
    bits, group = w.bits, w.group
    if w.cols % 8 == 0 and w.bits in (2, 3, 4, 8):  # the fast path: row-planar layout
        return ({"planar": to_planar(w.codes(), bits), "scale": w.scale, "offset": w.offset},
                lambda t, x: mod.qgemm_planar(x, t["planar"], t["scale"], t["offset"], bits,
                                              group))
    return ({"packed": w.packed, "scale": w.scale, "offset": w.offset},
            lambda t, x: mod.qgemm(x, t["packed"], t["scale"], t["offset"], bits, group))


def _cpp_i16_core(w: KernelWeight) -> Core:
    """Integer zero points as uint8 where the state has them, else float32 offsets."""
    mod = cpp_module()
    assert mod is not None
    bits, group = w.bits, w.group
    zero = w.zero if w.zero is not None else w.offset

    def run(t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if len(x) < DENSE_FROM_M:
            return mod.qgemm_int(x, t["units"], t["scale"], t["zero"], bits, group)
        rows, tile = len(t["units"]), dense_tile_rows(w.cols)
        return torch.cat([x @ mod.dequant_int(t["units"], t["scale"], t["zero"], bits, group,
                                              r0, min(r0 + tile, rows)).t()
                          for r0 in range(0, rows, tile)], dim=1)
    return {"units": to_units(w.codes(), bits), "scale": w.scale, "zero": zero}, run


def _cpp_a8_core(w: KernelWeight) -> Core:
    """``to_a8`` storage, activations rounded to int8 per 32 columns at every M."""
    mod = cpp_module()
    assert mod is not None
    bits, group = w.bits, w.group
    zero = w.zero if w.zero is not None else w.offset
    return ({"units": to_a8(w.codes(), bits), "scale": by_four_rows(w.scale),
             "zero": by_four_rows(zero)},
            lambda t, x: mod.qgemm_a8(x, t["units"], t["scale"], t["zero"], bits, group))


def _blocked_core(storage: str, w: KernelWeight) -> Core:
    """The 16-row-block kernels, ``cpp-lut`` (``storage`` "lut", ``to_lut``) and ``cpp-vnni``
    ("vnni", ``to_vnni``): codes in their layout, parameters ``by_row_block``, uint8 zero
    points where the state has them."""
    mod = cpp_module()
    assert mod is not None
    bits, group = w.bits, w.group
    pack, op = (to_lut, mod.qgemm_lut) if storage == "lut" else (to_vnni, mod.qgemm_vnni)
    zero = w.zero if w.zero is not None else w.offset
    tensors = {storage: pack(w.codes(), bits), "scale": by_row_block(w.scale),
               "zero": by_row_block(zero)}
    return tensors, lambda t, x: op(x, t[storage], t["scale"], t["zero"], bits, group)


def by_row_block(p: torch.Tensor) -> torch.Tensor:
    """(rows, groups) per-group parameters -> (rows / 16, groups, 16): a row block's 16 rows
    of one group side by side (``cpp-lut`` loads them as two vectors of 8)."""
    rows, groups = p.shape
    return p.reshape(rows // 16, 16, groups).transpose(1, 2).contiguous()


def to_lut(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) codes -> the ``cpp-lut`` layout, uint8 (rows / 16, cols / 8 * pair bytes):
    per block of 16 rows and pair of 4-column groups, each row's bit-plane indices as nibbles
    (layout in qgemm.cpp). b bits per code, as dense packing."""
    rows, cols = codes.shape
    c = codes.to(torch.uint8).reshape(rows, cols // 4, 4)  # (rows, groups, 4 columns)
    place = torch.tensor([1, 2, 4, 8], dtype=torch.uint8)
    idx = torch.stack([(((c >> p) & 1) * place).sum(-1, dtype=torch.uint8)
                       for p in range(bits)], -1)  # (rows, groups, planes): 4-bit indices
    idx = idx.reshape(rows // 16, 16, cols // 8, 2, bits)  # (blocks, row, pair, g/g+1, plane)
    nib = (idx[:, :, :, 0] | (idx[:, :, :, 1] << 4)).transpose(1, 2)  # (blocks, pair, row, p)
    if bits == 4:  # two registers of 8 rows x 4 planes
        return nib.reshape(rows // 16, -1).contiguous()
    low = nib[..., :2].reshape(rows // 16, cols // 8, 32)  # byte 2 j + p
    if bits == 3:  # per two pairs (A, B): A's planes 0-1, B's, then plane 2 by row, (A, B)
        p2 = nib[..., 2].reshape(rows // 16, cols // 16, 2, 16).transpose(2, 3)  # (.., row, A/B)
        low = torch.cat([low.reshape(rows // 16, cols // 16, 64),
                         p2.reshape(rows // 16, cols // 16, 32)], dim=-1)
    return low.reshape(rows // 16, -1).contiguous()


def to_vnni(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) codes -> the ``cpp-vnni`` layout, uint8 (rows / 16, cols * bits * 2): per
    block of 16 rows and chunk of columns, each row's 4 bytes of codes (layout in qgemm.cpp).
    b bits per code, as dense packing."""
    rows, cols = codes.shape
    c = codes.to(torch.uint8).reshape(rows // 16, 16, cols)  # (blocks, row, cols)
    if bits == 4:
        h = c.reshape(rows // 16, 16, cols // 8, 2, 4)  # (blocks, row, chunk, half, byte i)
        return _by_chunk(h[..., 0, :] | (h[..., 1, :] << 4), rows)
    if bits == 2:
        return _by_chunk(_crumbs(c), rows)
    q = c.reshape(rows // 16, 16, cols // 32, 8, 4)  # (blocks, row, chunk, k, byte i)
    k = [q[..., j, :] for j in range(8)]  # codes of columns 4 j + i
    r = [k[0] | (k[1] << 3) | ((k[6] & 3) << 6), k[2] | (k[3] << 3) | ((k[7] & 3) << 6),
         k[4] | (k[5] << 3) | ((k[6] >> 2) << 6) | ((k[7] >> 2) << 7)]
    regs = torch.stack(r, 2).transpose(1, 3)  # (blocks, chunk, register, row, i)
    return regs.reshape(rows // 16, -1).contiguous()


def _crumbs(c: torch.Tensor) -> torch.Tensor:
    """(blocks, 16, cols) 2-bit codes -> (blocks, 16, cols / 16, 4) bytes: byte i of a
    16-column chunk holds columns 4 k + i in bits 2 k, 2 k + 1."""
    f = c.reshape(*c.shape[:2], -1, 4, 4)  # (blocks, row, chunk, k, i)
    return f[..., 0, :] | (f[..., 1, :] << 2) | (f[..., 2, :] << 4) | (f[..., 3, :] << 6)


def _by_chunk(b: torch.Tensor, rows: int) -> torch.Tensor:
    """(blocks, 16, chunks, 4) bytes -> (blocks, chunks * 64): a chunk's 16 rows x 4 bytes."""
    return b.transpose(1, 2).reshape(rows // 16, -1).contiguous()


def dense_tile_rows(cols: int) -> int:
    """Rows per float32 tile of the large-M path: about 1 MiB (an L2-sized tile), at least 16."""
    return max(16, (1 << 18) // cols // 16 * 16)


def i16_segment(group: int) -> int:
    """Columns per activation-rounding segment of ``cpp-i16`` (as qgemm.cpp's int_segment):
    the group if it is at most 256 columns, else the largest power-of-two divisor <= 256."""
    if group <= 256:
        return group
    s = 256
    while group % s:
        s //= 2
    return s


def lut_segment(group: int) -> int:
    """Columns per activation-rounding sub-block of ``cpp-lut`` and ``cpp-vnni``: min(group, 64)."""
    return min(group, 64)


def i16_error_bound(w: KernelWeight, x: torch.Tensor, wabs: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(M, rows) bound on |cpp-i16 - exact product| from activation rounding (see
    ``rounding_error_bound``)."""
    return rounding_error_bound(w, x, i16_segment(w.group), X_LEVELS, wabs)


def a8_error_bound(w: KernelWeight, x: torch.Tensor, wabs: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """(M, rows) bound on |cpp-a8 - weight-only product| from rounding x to int8 per 32
    columns (``rounding_error_bound``): the accuracy cost of the int8 activations."""
    return rounding_error_bound(w, x, A8_SEGMENT, A8_LEVELS, wabs)


def lut_error_bound(w: KernelWeight, x: torch.Tensor, wabs: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(M, rows) bound on |cpp-lut (or cpp-vnni) - exact product| (``rounding_error_bound``)."""
    return rounding_error_bound(w, x, lut_segment(w.group), LUT_LEVELS, wabs)


def rounding_error_bound(w: KernelWeight, x: torch.Tensor, seg: int, levels: int,
                         wabs: torch.Tensor | None = None) -> torch.Tensor:
    """(M, rows) bound on |kernel - exact product| when activations are rounded to integers
    X = round(x / d), d = max |x| / ``levels`` over segments of ``seg`` columns: each x is off by
    at most d / 2 and the kernel computes exactly w . (d X), so row r is off by at most
    sum_c |w[r, c]| d(c) / 2 (plus float32 summation error, which callers add). ``wabs``: |w|
    in packed column order, if already at hand."""
    xp = x if w.perm is None else x[:, w.perm]
    d = xp.abs().reshape(len(x), -1, seg).amax(-1) / levels  # (M, segments)
    dcol = d.repeat_interleave(seg, dim=1)  # (M, cols)
    if wabs is None:
        wabs = w.dequantize()
        wabs = (wabs if w.perm is None else wabs[:, w.perm]).abs()
    return dcol @ wabs.t() / 2


def allowed_error(w: KernelWeight, backend: str, x: torch.Tensor, ref: torch.Tensor,
                  wabs: torch.Tensor | None = None) -> torch.Tensor:
    """(M, rows) the largest |y - ref| a correct ``backend`` may show against the fake-quant
    product ``ref`` = x @ dequantized w^T: float32 summation order (``RTOL`` of max |ref|),
    plus, for ``cpp-i16``, ``cpp-lut`` and ``cpp-vnni``, the activation-rounding bound
    (``i16_error_bound``, ``lut_error_bound``; ``wabs``, the |weight| in packed column order,
    saves recomputing it)."""
    base = RTOL * ref.abs().max().clamp_min(1e-30)
    if backend == "cpp-i16":  # x / d is itself rounded in float32: <= 32639 * 2^-24 of a step
        return base + i16_error_bound(w, x, wabs) * (1 + 1e-2)
    if backend in ("cpp-lut", "cpp-vnni"):  # the same rounding and integer sums
        return base + lut_error_bound(w, x, wabs) * (1 + 1e-2)
    if backend == "cpp-a8":
        return base + a8_error_bound(w, x, wabs) * (1 + 1e-2)
    return base.expand_as(ref)


def to_units(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) codes -> the ``cpp-i16`` unit layout, uint8 (rows, cols / 64 * unit bytes):
    64 columns per unit, dense (b bits per code; layout in qgemm.cpp)."""
    rows, cols = codes.shape
    c = codes.to(torch.uint8).reshape(rows, cols // 64, 64)  # (rows, units, 64)
    if bits == 8:
        return c.reshape(rows, cols).contiguous()
    if bits == 4:
        out = c[..., :32] | (c[..., 32:] << 4)  # (rows, units, 32)
    else:
        f = (c & 3).unflatten(2, (4, 16))  # (rows, units, 4, 16): field s = columns 16s + p
        out = f[..., 0, :] | (f[..., 1, :] << 2) | (f[..., 2, :] << 4) | (f[..., 3, :] << 6)
        if bits == 3:
            hb = (c >> 2).unflatten(2, (8, 8)).to(torch.int32)  # (rows, units, 8 bits, 8 bytes)
            word = (hb << torch.arange(8, dtype=torch.int32)[:, None]).sum(2)  # (.., 8 bytes)
            out = torch.cat([out, word.to(torch.uint8)], dim=2)
    return out.reshape(rows, -1).contiguous()


def to_a8(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) codes -> the ``cpp-a8`` layout: ``to_units`` with rows in blocks of 4 and
    the block's 4 units of each 64 columns side by side, so that a block is one sequential
    stream. Shaped (rows, cols / 64 * unit bytes) like ``to_units`` (the same bytes, reordered
    within each block of 4 rows)."""
    u = to_units(codes, bits)
    rows, nbytes = u.shape
    return by_four_rows(u.reshape(rows, -1, 8 * bits)).reshape(rows, nbytes)  # 8b bytes a unit


def by_four_rows(p: torch.Tensor) -> torch.Tensor:
    """(rows, n, ...) -> the ``cpp-a8`` order, same shape: the 4 rows of a block side by side
    per entry of the second axis ((rows / 4, n, 4, ...)). Per-group parameters (rows, groups)
    and the units of ``to_a8``."""
    rows, n = p.shape[:2]
    blocked = p.reshape(rows // 4, 4, n, *p.shape[2:]).transpose(1, 2)
    return blocked.reshape(p.shape).contiguous()


def to_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) codes -> the C++ fast path's row-planar layout, uint8 (rows, cols * bits
    / 8): the same bytes per code as dense packing (layout in qgemm.cpp)."""
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    if bits == 4:
        h = c.shape[1] // 2
        return (c[:, :h] | (c[:, h:] << 4)).contiguous()
    low = (c & 3).unflatten(1, (4, -1))  # (rows, 4, Q): plane s holds columns s*Q ..
    out = low[:, 0] | (low[:, 1] << 2) | (low[:, 2] << 4) | (low[:, 3] << 6)  # (rows, Q)
    if bits == 3:
        high = (c >> 2).unflatten(1, (8, -1)).to(torch.int32)  # (rows, 8, E)
        word = (high << torch.arange(8, dtype=torch.int32)[:, None]).sum(1)  # (rows, E)
        out = torch.cat([out, word.to(torch.uint8)], dim=1)
    return out.contiguous()


def _reference_core(w: KernelWeight) -> Core:
    rows, cols, bits, group = w.rows, w.cols, w.bits, w.group

    def run(t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        q = unpack_rows(t["packed"], bits, cols).float().reshape(rows, -1, group)
        dq = (q * t["scale"][..., None] + t["offset"][..., None]).reshape(rows, cols)
        return x @ dq.t()
    return {"packed": w.packed, "scale": w.scale, "offset": w.offset}, run


_CORES = {"cpp-vnni": partial(_blocked_core, "vnni"), "cpp-lut": partial(_blocked_core, "lut"),
          "cpp-i16": _cpp_i16_core, "cpp-a8": _cpp_a8_core,
          "torch-int4": _int4_core, "torch-int8": _int8_core, "cpp": _cpp_core,
          "reference": _reference_core}


class PackedLinear(nn.Module):
    """A Linear computed from packed low-bit storage (float32 activations in and out).

    Args:
        weight: the packed weight (``packing.from_qstate``).
        bias: the layer's bias or None.
        backend: ``auto`` or one of ``BACKENDS``.
    """

    def __init__(self, weight: KernelWeight, bias: torch.Tensor | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        self.weight_packed = weight
        self.backend = select(weight, backend)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.in_features, self.out_features = weight.cols, weight.rows
        self.kernel = prepare(weight, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        lead = x.shape[:-1]
        y = self.kernel(x.reshape(-1, self.in_features).float().contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        w = self.weight_packed
        return (f"in={w.cols}, out={w.rows}, bits={w.bits}, group={w.group}, "
                f"backend={self.backend}, bytes={w.nbytes()}")
