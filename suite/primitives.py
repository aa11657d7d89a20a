"""Shared quantization primitives: the only place in qbench where rounding happens.

A weight matrix W has shape (rows, cols) = (out features, in features); conv weights are
flattened to (C_out, C_in*k*k) by the caller. A *group* is ``g`` contiguous input columns
within one row (per-channel = one group per row, per-tensor = one group for the matrix).

Quantizer (research/methods.md section 1, the `--nearest` path of IST-DASLab/gptq):
    asymmetric: xmin = min(0, min x), xmax = max(0, max x); if both are 0 use [-1, 1];
                scale = (xmax - xmin) / maxq;  zero = round(-xmin / scale)
    symmetric:  xmax = max(|xmin|, xmax); xmin = -xmax (when xmin < 0);
                scale = 2 xmax / maxq;      zero = (maxq + 1) / 2
    q = clamp(round(x / scale) + zero, 0, maxq);   x_hat = scale * (q - zero)
``torch.round`` rounds half to even. Codes are unsigned integers in [0, 2^b - 1].

Float-offset grid (decoupleQ, research/methods.md 3.2): signed integers q in
[alpha, beta] = [-2^(b-1), 2^(b-1) - 1] with a float scale s and a float offset z per group,
x_hat = s * q + z. Such a layer stores the unsigned code u = q - alpha (so every packed kernel
reads the same [0, 2^b - 1] codes) and ``zero_kind = "float"``; the offset is stored in
``scale_dtype`` like the scale and counted as such in the effective bits.

Scales are rounded to ``WeightFormat.scale_dtype`` (float16 by default, as in a deployed
fp16 checkpoint) *before* quantizing, so ``dequantize(qstate)`` is exactly the evaluated weight
and the effective-bits count (16 bits per scale) is honest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from suite.errors import ConfigError, NumericalFailure

PER_CHANNEL = -1
PER_TENSOR = 0
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SCALE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}


@dataclass(frozen=True)
class WeightFormat:
    """A uniform integer weight format.

    Attributes:
        bits: bit width b of the integer codes, 2..8.
        group_size: g > 0 contiguous input columns per group; -1 per-channel; 0 per-tensor.
        sym: symmetric grid (zero fixed at 2^(b-1)) instead of asymmetric min-max.
        scale_dtype: storage dtype of scales ("float16", "bfloat16" or "float32").
    """

    bits: int
    group_size: int = PER_CHANNEL
    sym: bool = False
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"wbits: got {self.bits!r}; accepted: integers 2..8")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < -1:
            raise ConfigError(
                f"group_size: got {gs!r}; accepted: a positive integer (input columns per "
                "group), per-channel or per-tensor"
            )
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ConfigError(
                f"scale_dtype: got {self.scale_dtype!r}; accepted: {', '.join(_SCALE_DTYPES)}"
            )

    @property
    def maxq(self) -> int:
        """Largest integer code, 2^b - 1."""
        return 2**self.bits - 1

    @property
    def scale_bits(self) -> int:
        """Bits used to store one scale."""
        return _SCALE_BITS[self.scale_dtype]

    def group_cols(self, cols: int) -> int:
        """Columns per group for a matrix with ``cols`` input columns."""
        return cols if self.group_size in (PER_CHANNEL, PER_TENSOR) else self.group_size

    def label(self) -> str:
        """Short human label, e.g. ``w4g64`` / ``w3pc-sym``."""
        g = {PER_CHANNEL: "pc", PER_TENSOR: "pt"}.get(self.group_size, f"g{self.group_size}")
        return f"w{self.bits}{g}{'-sym' if self.sym else ''}"


def group_size_label(group_size: int) -> str:
    """Render a group size for tables: ``per-channel``, ``per-tensor`` or the integer."""
    return {PER_CHANNEL: "per-channel", PER_TENSOR: "per-tensor"}.get(group_size, str(group_size))


def check_divides(fmt: WeightFormat, cols: int, layer: str) -> None:
    """Raise a ConfigError naming ``layer`` when the group size does not divide its width."""
    if fmt.group_size > 0 and cols % fmt.group_size:
        raise ConfigError(
            f"group_size: {fmt.group_size} does not divide the input width {cols} of layer "
            f"{layer!r}; accepted: a divisor of every quantized layer's width, per-channel "
            "or per-tensor"
        )


def _grouped(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """View ``w`` (rows, cols) as (n_rows_of_groups, n_groups, g) for per-group statistics."""
    rows, cols = w.shape
    if fmt.group_size == PER_TENSOR:
        return w.reshape(1, 1, rows * cols)  # (1, 1, rows*cols)
    check_divides(fmt, cols, "<tensor>")
    g = fmt.group_cols(cols)
    return w.reshape(rows, cols // g, g)  # (rows, groups, g)


def group_view(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """``w`` (rows, cols) as (rows, n_groups, g); per-tensor (1, 1, rows*cols)."""
    return _grouped(w, fmt)


def choose_qparams(w: torch.Tensor, fmt: WeightFormat, mask: torch.Tensor | None = None,
                   shrink: torch.Tensor | float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and integer zero point per group.

    Args:
        w: weight (rows, cols); any float dtype (statistics are taken in float32).
        fmt: the target format.
        mask: optional bool (rows, cols): statistics over the True entries only (a group with
            none gets the dead-group range [-1, 1]).
        shrink: optional factor (scalar or (rows, n_groups)) applied to the range (clipping).

    Returns:
        ``(scale, zero)``, both float32 of shape (rows, n_groups) ((1, 1) per-tensor); ``zero``
        holds integers and ``scale`` values representable in ``fmt.scale_dtype``.
    """
    return qparams_from_range(*group_range(w, fmt, mask), fmt, shrink)


def group_range(w: torch.Tensor, fmt: WeightFormat, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(min, max)`` of ``w`` (over ``mask`` entries), float32 (rows, n_groups); a
    group with no entries gets ``(inf, -inf)``."""
    wg = _grouped(w.float(), fmt)
    if mask is None:
        return wg.amin(dim=-1), wg.amax(dim=-1)
    mg = _grouped(mask, fmt)
    return (torch.where(mg, wg, torch.inf).amin(dim=-1),
            torch.where(mg, wg, -torch.inf).amax(dim=-1))


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, fmt: WeightFormat,
                       shrink: torch.Tensor | float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``choose_qparams`` from per-group ranges (see ``group_range``): the range is widened to
    hold 0, made symmetric for ``fmt.sym``, a dead group gets [-1, 1], then ``shrink`` scales it."""
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    if fmt.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    if shrink is not None:
        xmin, xmax = xmin * shrink, xmax * shrink
    scale = round_scale((xmax - xmin) / fmt.maxq, fmt)
    # symmetric: zero fixed at (maxq + 1) / 2; asymmetric: integer zero point round(-xmin / s)
    zero = torch.full_like(scale, (fmt.maxq + 1) / 2) if fmt.sym else torch.round(-xmin / scale)
    return scale, zero


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with ties towards +inf (decoupleQ's ``my_round``).

    Exact: non-ties are ``torch.round``; only values exactly halfway are moved up, so no
    ``floor(x + 0.5)`` float error can flip a code.
    """
    y = torch.round(x)
    ties = (y - x).abs() == 0.5
    return torch.where(ties, torch.round(x + 0.5), y)


def signed_grid(bits: int) -> tuple[int, int]:
    """The signed integer grid [alpha, beta] = [-2^(b-1), 2^(b-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def quantize_signed(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                    half_up: bool = True) -> torch.Tensor:
    """Signed codes q = clamp(round((w - z) / s), alpha, beta) of the float-offset grid.

    ``scale`` and ``offset`` broadcast against ``w`` (per column, already expanded); |s| is
    clamped to 1e-15 with its sign kept (0 counts positive), as decoupleQ's ``safe_div``.
    Returns float codes (integer-valued) so solvers can mix them with real weights.
    """
    alpha, beta = signed_grid(bits)
    s = torch.where(scale < 0, scale.clamp(max=-1e-15), scale.clamp(min=1e-15))
    x = (w - offset) / s
    return (round_half_up(x) if half_up else torch.round(x)).clamp(alpha, beta)


def to_storage(x: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Round float parameters (any sign) to ``fmt.scale_dtype``, kept in float32."""
    return x.to(_SCALE_DTYPES[fmt.scale_dtype]).float()


def round_scale(scale: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Round scales to their storage dtype (kept in float32); a zero scale becomes the tiniest."""
    dt = _SCALE_DTYPES[fmt.scale_dtype]
    s = scale.to(dt).float()
    return torch.where(s > 0, s, torch.full_like(s, torch.finfo(dt).tiny))


def expand_to_columns(p: torch.Tensor, shape: torch.Size, fmt: WeightFormat) -> torch.Tensor:
    """Broadcast per-group parameters (rows, groups) to the full weight shape (rows, cols)."""
    rows, cols = shape
    if fmt.group_size == PER_TENSOR:
        return p.reshape(1, 1).expand(rows, cols)
    g = fmt.group_cols(cols)
    return p.repeat_interleave(g, dim=1)  # (rows, cols)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat
) -> torch.Tensor:
    """Integer codes q = clamp(round(w/scale) + zero, 0, maxq) as uint8, shape (rows, cols)."""
    s = expand_to_columns(scale, w.shape, fmt)
    z = expand_to_columns(zero, w.shape, fmt)
    q = torch.clamp(torch.round(w.float() / s) + z, 0, fmt.maxq)
    return q.to(torch.uint8)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat
) -> torch.Tensor:
    """x_hat = scale * (q - zero) in float32, shape (rows, cols)."""
    s = expand_to_columns(scale, codes.shape, fmt)
    z = expand_to_columns(zero, codes.shape, fmt)
    return s * (codes.float() - z)


def quantize_dequantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat
) -> torch.Tensor:
    """Round trip through the integer grid (no gradient); float32 result."""
    return dequantize(quantize(w, scale, zero, fmt), scale, zero, fmt)


class _RoundSTE(torch.autograd.Function):
    """round() forward (exact integers), identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass.

    A custom autograd function rather than ``x + (round(x) - x).detach()``: the latter is off
    the integer grid by float error, which would break the exact honesty check.
    """
    return _RoundSTE.apply(x)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat
) -> torch.Tensor:
    """Differentiable fake quantization with a straight-through estimator.

    Gradients flow to ``w`` (identity inside the clamp range, zero outside, as in QAT practice)
    and to ``scale`` through ``scale * (q - zero)`` (the LSQ-style path).
    """
    s = expand_to_columns(scale, w.shape, fmt)
    z = expand_to_columns(zero, w.shape, fmt)
    x = w / s
    unclipped = torch.round(x.detach()) + z
    q_exact = torch.clamp(unclipped, 0, fmt.maxq)  # the same codes as quantize()
    inside = (unclipped >= 0) & (unclipped <= fmt.maxq)  # STE passes where nothing is clipped
    q = q_exact + (x - x.detach()) * inside  # forward: exactly q_exact; d q / d x = inside
    return s * (q - z)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned b-bit codes densely (LSB first) into a flat uint8 tensor.

    Works for any b in 1..8: the code stream is laid out bit by bit, so 3-bit codes take
    exactly ``ceil(3 n / 8)`` bytes.
    """
    flat = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64)
    bitstream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # (n*bits,)
    pad = (-bitstream.numel()) % 8
    bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)]).reshape(-1, 8)  # (bytes, 8)
    return (bitstream << torch.arange(8, dtype=torch.int64)).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; returns uint8 codes of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    bytes_ = packed.to(torch.int64)
    bitstream = ((bytes_[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)
    bitstream = bitstream[: n * bits].reshape(n, bits)  # (n, bits)
    codes = (bitstream << torch.arange(bits, dtype=torch.int64)).sum(dim=1)
    return codes.to(torch.uint8).reshape(shape)


@dataclass
class OutlierChannel:
    """Weights stored apart from the layer's main grid (a sparse side channel).

    Positions are row-major flat indices into (rows, cols), stored as CSR (per row a count, per
    outlier its column). Values are either codes on a *second* grid of the same format, with its
    own (scale, zero) per group (AdpQ-style), or float16 numbers (SpQR-style).

    Attributes:
        idx: int64 (n,) sorted flat positions.
        codes: uint8 (n,) codes on the second grid, or None for float values.
        scale / zero: the second grid, shaped like the main grid's (rows, groups).
        values: float32 (n,) values representable in ``scale_dtype``, when ``codes`` is None.
        index: how positions are counted in the bits: ``csr`` (a count per row and
            ceil(log2 cols) bits per outlier, enough to decode them) or ``group`` (AdpQ's count:
            ceil(log2 g) bits per outlier, its column within its group, and nothing else).
    """

    idx: torch.Tensor
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    values: torch.Tensor | None = None
    index: Literal["csr", "group"] = "csr"

    def dequantized(self, fmt: WeightFormat, shape: tuple[int, int]) -> torch.Tensor:
        """The outliers' values (n,), float32."""
        if self.codes is None:
            assert self.values is not None
            return self.values
        assert self.scale is not None and self.zero is not None
        r, gi = self._grid_of(fmt, shape)
        return self.scale[r, gi] * (self.codes.float() - self.zero[r, gi])

    def _grid_of(self, fmt: WeightFormat, shape: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, group) of each outlier's second grid (both 0 per-tensor)."""
        cols = shape[1]
        r, c = self.idx // cols, self.idx % cols
        if fmt.group_size == PER_TENSOR:
            return torch.zeros_like(r), torch.zeros_like(c)
        return r, c // fmt.group_cols(cols)

    def bits(self, fmt: WeightFormat, shape: tuple[int, int]) -> int:
        """Storage: positions (``index``) + payload."""
        rows, cols = shape
        n = int(self.idx.numel())
        position = rows * math.ceil(math.log2(cols + 1)) + n * math.ceil(math.log2(cols)) \
            if self.index == "csr" else n * math.ceil(math.log2(fmt.group_cols(cols)))
        if self.codes is None:
            return position + n * fmt.scale_bits
        assert self.scale is not None
        used = torch.zeros_like(self.scale, dtype=torch.bool)
        used[self._grid_of(fmt, shape)] = True  # second grids actually needed
        per_grid = fmt.scale_bits + (0 if fmt.sym else fmt.bits)
        return position + n * fmt.bits + int(used.sum()) * per_grid


@dataclass
class LayerQState:
    """Everything needed to rebuild one quantized layer's weight, and to count its bits.

    Attributes:
        codes: uint8 integer codes (rows, cols), in the *original* column order.
        scale: float32 (rows, groups) or (1, 1) per-tensor.
        zero: float32 integer-valued, same shape as ``scale``.
        fmt: the format the codes were produced for.
        g_idx: optional int64 (cols,) group index per input column (act-order without static
            groups); when set, scale/zero columns are looked up through it.
        extra_bits: side-channel bits (e.g. outliers) counted into the effective bits.
        zero_kind: ``"int"``: x_hat = scale * (codes - zero) with integer zero points stored in
            b bits; ``"float"``: x_hat = scale * (codes + alpha) + zero with a float offset
            stored in ``fmt.scale_dtype`` (the signed grid of :func:`signed_grid`).
        outliers: optional sparse side channel whose values replace the main grid's at their
            positions (their main-grid codes are then ignored).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    fmt: WeightFormat
    g_idx: torch.Tensor | None = None
    extra_bits: int = 0
    meta: dict = field(default_factory=dict)
    zero_kind: Literal["int", "float"] = "int"
    outliers: OutlierChannel | None = None

    def dequantize(self) -> torch.Tensor:
        """The weight this state represents, float32 (rows, cols)."""
        w = self._dequantize_grid()
        if self.outliers is not None:
            shape = tuple(self.codes.shape)
            w.view(-1)[self.outliers.idx] = self.outliers.dequantized(self.fmt, shape)  # type: ignore[arg-type]
        return w

    def _dequantize_grid(self) -> torch.Tensor:
        if self.g_idx is None:
            s = expand_to_columns(self.scale, self.codes.shape, self.fmt)  # (rows, cols)
            z = expand_to_columns(self.zero, self.codes.shape, self.fmt)
        else:
            s = self.scale[:, self.g_idx]  # (rows, cols)
            z = self.zero[:, self.g_idx]
        if self.zero_kind == "float":
            alpha, _ = signed_grid(self.fmt.bits)
            return s * (self.codes.float() + alpha) + z
        return s * (self.codes.float() - z)

    def codes_in_range(self) -> bool:
        """Whether every code lies in [0, 2^b - 1] and is integral."""
        parts = [self.codes]
        if self.outliers is not None and self.outliers.codes is not None:
            parts.append(self.outliers.codes)
        for c in parts:
            if c.numel() == 0:
                continue
            if c.dtype.is_floating_point and not torch.equal(c, c.round()):
                return False
            if bool(c.min() < 0) or bool(c.max() > self.fmt.maxq):
                return False
        return True

    def effective_bits(self) -> float:
        """Bits per weight: codes + scales + zero points (b bits each, or ``scale_dtype`` bits
        for float offsets) + side channels."""
        n = self.codes.numel()
        per_zero = self.fmt.scale_bits if self.zero_kind == "float" else self.fmt.bits
        zero_bits = 0 if self.fmt.sym else per_zero * self.zero.numel()
        total = n * self.fmt.bits + self.scale.numel() * self.fmt.scale_bits + zero_bits
        if self.outliers is not None:
            total += self.outliers.bits(self.fmt, tuple(self.codes.shape))  # type: ignore[arg-type]
        return (total + self.extra_bits) / n


def quantize_tensor(w: torch.Tensor, fmt: WeightFormat) -> LayerQState:
    """Round-to-nearest of a whole matrix with min-max qparams: the RTN building block."""
    scale, zero = choose_qparams(w, fmt)
    return LayerQState(quantize(w, scale, zero, fmt), scale, zero, fmt)


def write_weight(layer: torch.nn.Module, state: LayerQState) -> None:
    """Replace ``layer.weight`` by the weight ``state`` represents (cast to the layer dtype)."""
    with torch.no_grad():
        w = state.dequantize().reshape(layer.weight.shape)
        layer.weight.copy_(w.to(layer.weight.dtype))


# --- linear algebra shared by the Hessian-based solvers (GPTQ, decoupleQ) --------------------


class CholeskyError(NumericalFailure):
    """H + lambda I stayed non positive-definite after every damping escalation."""


def inverse_cholesky(H: torch.Tensor, percdamp: float, max_escalations: int
                     ) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + lambda I)^-1, escalating lambda x10 on failure.

    Returns:
        ``(U, percdamp_used, escalations)``.
    """
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    mean_diag = torch.mean(torch.diag(H))
    for k in range(max_escalations + 1):
        damp = percdamp * 10**k
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp, k
    raise CholeskyError(f"H + lambda I not positive definite up to percdamp "
                        f"{percdamp * 10**max_escalations:g}")
