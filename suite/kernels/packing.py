"""Dense packing of integer codes and the kernel view of a quantized layer.

Kernel view: for row r and group j (``group`` consecutive input columns after the optional
column permutation ``perm``), the weight is

    w[r, c] = scale[r, j] * q[r, c] + offset[r, j],      q in [0, 2^b - 1]

which covers qbench's integer zero points (offset = -scale * zero) and decoupleQ's float
offsets (offset = scale * alpha + z). Per-channel is one group of ``cols`` columns; per-tensor
repeats the one (scale, offset) over the rows. GPTQ's act-order without static groups stores a
group index per column; sorting the columns by it makes the groups contiguous (``perm``), and
the kernel then reads ``x[:, perm]``. Outlier side channels (pre-calibration) become a sparse
CSR matrix added to the product.

Codes are packed per row, least significant bit first, densely for every b: a row of ``cols``
b-bit codes takes ``ceil(cols * b / 8)`` bytes (3-bit: 3 bytes per 8 codes).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from suite.primitives import PER_TENSOR, LayerQState, expand_to_columns, signed_grid

_CHUNK_ELEMENTS = 1 << 22  # rows are packed in chunks of about this many codes


@dataclass
class KernelWeight:
    """One quantized weight in packed storage.

    Attributes:
        packed: uint8 (rows, ceil(cols * bits / 8)), codes per row, LSB first.
        scale / offset: float32 (rows, cols // group).
        bits / group / rows / cols: the format and shape.
        perm: int64 (cols,) column order of the packed codes (None: natural order).
        outliers: float32 sparse CSR (rows, cols) of corrections in natural column order, or
            None: the kernel adds ``x @ outliers.T``.
        zero: uint8 (rows, cols // group) integer zero points, when the state has them (then
            ``offset == -scale * zero`` and a kernel may read one byte instead of four).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    bits: int
    group: int
    rows: int
    cols: int
    perm: torch.Tensor | None = None
    outliers: torch.Tensor | None = None
    zero: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes of the packed storage: codes, float32 scales, uint8 zero points (or float32
        offsets where the zeros are not integers), permutation and outlier channel. What one
        backend reads is ``cpu.Kernel.nbytes()`` (its own layout)."""
        total = self.packed.numel() + 4 * self.scale.numel()
        total += self.zero.numel() if self.zero is not None else 4 * self.offset.numel()
        return total + self.side_nbytes()

    def side_nbytes(self) -> int:
        """Bytes of the permutation (int32) and the sparse outlier channel (CSR, 32-bit)."""
        return side_nbytes(self.perm, self.outliers)

    def codes(self) -> torch.Tensor:
        """The unpacked codes (rows, cols), uint8, in packed (permuted) column order."""
        return unpack_rows(self.packed, self.bits, self.cols)

    def dequantize(self) -> torch.Tensor:
        """The weight (rows, cols) float32 in natural column order (the reference)."""
        q = self.codes().float().reshape(self.rows, -1, self.group)  # (rows, groups, group)
        w = (q * self.scale[..., None] + self.offset[..., None]).reshape(self.rows, self.cols)
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        if self.outliers is not None:
            w = w + self.outliers.to_dense()
        return w


def side_nbytes(perm: torch.Tensor | None, outliers: torch.Tensor | None) -> int:
    """Bytes a kernel reads besides the weight proper: an int32 column permutation and a CSR
    outlier matrix (float32 values, 32-bit indices)."""
    total = 4 * perm.numel() if perm is not None else 0
    if outliers is not None:
        total += 4 * (outliers.values().numel() + outliers.col_indices().numel()
                      + outliers.crow_indices().numel())
    return total


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (rows, cols) unsigned codes < 2^bits densely per row, LSB first -> uint8."""
    rows, cols = codes.shape
    nbytes = math.ceil(cols * bits / 8)
    out = torch.empty(rows, nbytes, dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    shifts = torch.arange(bits, dtype=torch.uint8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.int32)
    for r0 in range(0, rows, step):
        c = codes[r0:r0 + step].to(torch.uint8)
        bitstream = ((c[..., None] >> shifts) & 1).reshape(len(c), -1)  # (r, cols*bits)
        pad = nbytes * 8 - bitstream.shape[1]
        if pad:
            bitstream = torch.cat([bitstream, bitstream.new_zeros(len(c), pad)], dim=1)
        byte_bits = bitstream.reshape(len(c), nbytes, 8).to(torch.int32)  # (r, bytes, 8)
        out[r0:r0 + step] = (byte_bits * weights).sum(-1).to(torch.uint8)
    return out


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: uint8 codes (rows, cols)."""
    rows = packed.shape[0]
    out = torch.empty(rows, cols, dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    shifts8 = torch.arange(8, dtype=torch.uint8)
    weights = (2 ** torch.arange(bits, dtype=torch.int32)).to(torch.int32)
    for r0 in range(0, rows, step):
        p = packed[r0:r0 + step]
        bitstream = ((p[..., None] >> shifts8) & 1).reshape(len(p), -1)[:, : cols * bits]
        out[r0:r0 + step] = (bitstream.reshape(len(p), cols, bits).to(torch.int32)
                             * weights).sum(-1).to(torch.uint8)
    return out


def from_qstate(qs: LayerQState) -> KernelWeight:
    """The kernel view of a layer state (exactly the same weight; see the module docstring)."""
    rows, cols = qs.codes.shape
    codes, perm = qs.codes, None
    if qs.g_idx is not None:  # act-order groups: sort the columns so each group is contiguous
        perm = torch.argsort(qs.g_idx, stable=True)
        codes = codes[:, perm]
        group = cols // qs.scale.shape[1]
        scale, zero = qs.scale, qs.zero
    else:
        group = cols if qs.fmt.group_size <= 0 else qs.fmt.group_size
        scale, zero = (_per_row(t, qs, rows) for t in (qs.scale, qs.zero))
    scale, zero = scale.float(), zero.float()
    int_zero = None
    if qs.zero_kind == "float":
        offset = scale * signed_grid(qs.fmt.bits)[0] + zero
    else:
        offset = -scale * zero
        if bool(((zero == zero.round()) & (zero >= 0) & (zero <= 255)).all()):
            int_zero = zero.to(torch.uint8).contiguous()
    return KernelWeight(pack_rows(codes, qs.fmt.bits), scale.contiguous(), offset.contiguous(),
                        qs.fmt.bits, group, rows, cols, perm, _outlier_matrix(qs), int_zero)


def _per_row(t: torch.Tensor, qs: LayerQState, rows: int) -> torch.Tensor:
    """(rows, groups): a per-tensor parameter repeated over the rows."""
    return t.expand(rows, 1) if qs.fmt.group_size == PER_TENSOR else t


def _outlier_matrix(qs: LayerQState) -> torch.Tensor | None:
    """Sparse CSR corrections so that grid + corrections = the state's weight."""
    if qs.outliers is None:
        return None
    rows, cols = qs.codes.shape
    idx = qs.outliers.idx
    s = expand_to_columns(qs.scale, qs.codes.shape, qs.fmt).reshape(-1)[idx]
    z = expand_to_columns(qs.zero, qs.codes.shape, qs.fmt).reshape(-1)[idx]
    q = qs.codes.reshape(-1)[idx].float()
    on_grid = s * (q + signed_grid(qs.fmt.bits)[0]) + z if qs.zero_kind == "float" else s * (q - z)
    delta = qs.outliers.dequantized(qs.fmt, (rows, cols)) - on_grid  # (n,)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta; the use here is basic
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(torch.stack([idx // cols, idx % cols]), delta,
                                      (rows, cols), check_invariants=True)
        return coo.coalesce().to_sparse_csr()
