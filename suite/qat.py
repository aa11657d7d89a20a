"""Shared QAT primitives: learnable-step fake quantizers and the layer wrapper that uses them.

Both quantization-aware training methods of the suite build on this module: the LSQ baseline
(research/methods.md section 4) and TR scheduling (section 5). Rounding is
``suite.primitives.round_ste`` (re-exported here); this module adds the two other
straight-through pieces LSQ needs, ``clip_ste`` and ``grad_scale``.

One quantizer covers both papers. With an integer grid [alpha, beta] and a denominator gamma:

    LSQ (Esser et al. 2020, Eq. 1-2):  v_hat = s * round(clip(v / s, -Q_N, Q_P))
    TR  (arXiv 2404.19248, Eq. 13):    x_q   = (1 / gamma) * round(clip(gamma * x / s, alpha, beta))

so LSQ is gamma = 1 with a post-scale s, and Eq. 13 has no post-scale (its output range is
fixed; a BN after every quantized layer absorbs the missing s). Grids, b bits:

    kind   signed (weights; signed inputs)          unsigned (post-ReLU inputs)
    lsq    [-2^(b-1), 2^(b-1)-1], gamma 1           [0, 2^b - 1], gamma 1
    eq13   [-2^(b-1), 2^(b-1)-1], gamma 2^(b-1)     [0, 2^b - 1], gamma 2^b

Q_P = beta in the gradient scale and the initialisation in both cases. An input-activation
quantizer picks its sign on the first batch: unsigned when the batch has no negative value
(post-ReLU inputs, the papers' case), else signed (the first layer's normalised image, a linear
bottleneck), so a signed input is never silently clipped at 0.

Step size s (one scalar per tensor as in both papers; per output channel as an LSQ extension):
  * gradient: LSQ's, that of autograd through the STEs (for a scalar s computed by
    ``suite/kernels/fakequant.cpp`` with the same float operations, bit for bit, in one pass;
    ``_ScalarStepQuant``): d v_hat / d v = 1 strictly inside
    (alpha, beta) and 0 outside; d v_hat / d s = -v/s + round(v/s) inside, alpha or beta
    outside (for Eq. 13 the clipped outputs are constants, so only the inside term -x/s^2
    remains). It is multiplied by g = 1 / sqrt(N * Q_P) (``grad_scale``), N = numel of the
    weight tensor (per-channel: the weights of one channel, those sharing the step size) or
    the features of one sample of the activation.
  * kept positive by a clamp in the forward pass, max(s, s_min), whose gradient is the
    identity: the parameter itself may be pushed below s_min by a huge step, the quantizer
    then uses s_min and the loss gradient can still pull the parameter back.
  * initialised from data: LSQ s0 = 2 mean|v| / sqrt(Q_P); Eq. 13 uses the same step
    expressed in its units, s0 = gamma * 2 mean|v| / sqrt(Q_P) (gamma x / s = x / (s / gamma),
    so s / gamma is the LSQ step; research/methods.md 5.1, INFERRED: the paper does not give
    its init). Weights are initialised when wrapped, activations on the first batch seen.

Unwrapping writes the fake-quantized weight back into a plain layer and returns its integer
codes q and its scale: w_hat = scale * q with scale = s for LSQ and scale = 1 / gamma for
Eq. 13 (the weight's s then only decided the codes). ``UnwrappedLayer.qstate`` expresses that
exactly as a ``LayerQState`` (symmetric grid, float32 scale). Input-activation quantizers stay
on the plain layer (a forward pre-hook): the model was trained with them, and for Eq. 13
the following BN statistics depend on their 1/gamma scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from suite.errors import ConfigError
from suite.kernels import fakequant
from suite.primitives import (
    PER_CHANNEL,
    PER_TENSOR,
    LayerQState,
    WeightFormat,
    round_ste,
    signed_grid,
)

__all__ = ["FakeQuantizer", "QuantWrap", "UnwrappedLayer", "check_nonnegative", "clip_ste",
           "cosine_factor", "grad_scale", "integer_grid", "layer_plan", "quantizable_layers",
           "round_ste", "ste_quant", "unwrap_layers", "wrap_layers"]

Kind = Literal["lsq", "eq13"]
KINDS = ("lsq", "eq13")


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by a constant backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: float) -> torch.Tensor:  # noqa: ANN001
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad * ctx.g, None


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward ``x`` exactly, backward ``grad * g`` (LSQ's step-size gradient scale)."""
    return _GradScale.apply(x, g)


CHUNK = 16384  # below ATen's parallel grain size (32768): one chunk is summed by one thread


def fixed_order_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of all elements in an order that does not depend on the thread count: fixed-size
    chunks, each summed by one thread, then the chunk sums. (A plain ``sum`` over more than
    32768 elements splits the work by thread count, and so rounds differently.)"""
    flat = t.reshape(-1)
    pad = (-flat.numel()) % CHUNK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, CHUNK).sum(1).sum()


class _BroadcastScalar(torch.autograd.Function):
    """A 0-dim step size broadcast to x's shape; its gradient summed by ``fixed_order_sum``
    (autograd's own broadcast reduction depends on the thread count)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, shape: torch.Size) -> torch.Tensor:  # noqa: ANN001
        return s.expand(shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return fixed_order_sum(grad), None


class _FloorSTE(torch.autograd.Function):
    """max(x, floor) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, floor: float) -> torch.Tensor:  # noqa: ANN001
        return x.clamp(min=floor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad, None


def clip_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clip(x, lo, hi) forward; gradient 1 strictly inside (lo, hi), 0 elsewhere (LSQ's mask).

    Unlike ``torch.clamp`` (which passes the gradient at the bounds), a value exactly on a bound
    counts as clipped, as in the paper's d v_hat / d s = Q_P for v/s >= Q_P.
    """
    inside = (x > lo) & (x < hi)
    return x.detach().clamp(lo, hi) + (x - x.detach()) * inside  # forward: exactly the clamp


def ste_quant(x: torch.Tensor, s: torch.Tensor, grid: tuple[int, int, int], kind: Kind
              ) -> torch.Tensor:
    """The quantizer through autograd's STEs (``s`` broadcast against x)."""
    alpha, beta, gamma = grid
    v_bar = round_ste(clip_ste(gamma * x / s, alpha, beta))  # integers, STE gradients
    return s * v_bar if kind == "lsq" else v_bar / gamma


def _fused_ok(x: torch.Tensor) -> bool:
    """Whether ``suite.kernels.fakequant`` can take x (a CPU float32 tensor, built extension)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and fakequant.module() is not None


class _ScalarStepQuant(torch.autograd.Function):
    """:func:`ste_quant` for one 0-dim step size, in ``suite/kernels/fakequant.cpp``: the same
    IEEE operations per element as autograd's graph, so bit-identical values and gradients
    (tests/test_qat.py), in one pass each way instead of a chain of full-size temporaries (the
    activation fake-quant of a small CNN is memory bound on CPU). The per-element gradient of
    s is summed by ``fixed_order_sum``, as ``_BroadcastScalar`` sums it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, grid: tuple[int, int, int],  # noqa: ANN001
                lsq: bool) -> torch.Tensor:
        ctx.save_for_backward(x, s)
        ctx.grid, ctx.lsq = grid, lsq
        return fakequant.module().forward(x, float(s), *grid, lsq)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Any, ...]:  # noqa: ANN001
        x, s = ctx.saved_tensors
        need_x, need_s = ctx.needs_input_grad[:2]
        dx, ds = fakequant.module().backward(grad.contiguous(), x, float(s), *ctx.grid,
                                             ctx.lsq, need_x, need_s)
        return (dx if need_x else None, fixed_order_sum(ds).reshape(s.shape) if need_s else None,
                None, None)


def integer_grid(bits: int, signed: bool, kind: Kind) -> tuple[int, int, int]:
    """(alpha, beta, gamma) of the module docstring's table."""
    alpha, beta = signed_grid(bits) if signed else (0, 2**bits - 1)
    if kind == "lsq":
        return alpha, beta, 1
    return alpha, beta, 2 ** (bits - 1) if signed else 2**bits


class FakeQuantizer(nn.Module):
    """A learnable-step fake quantizer (LSQ, or TR's Eq. 13 without post-scale).

    Args:
        bits: code width b, 2..8.
        kind: ``"lsq"`` or ``"eq13"``.
        role: ``"weight"`` (signed grid, N = numel) or ``"activation"`` (N = numel / batch).
        signed: activation grid sign; None decides it on the first batch (signed iff it
            holds a negative value, e.g. a normalised image or a linear bottleneck).
        trainable_scale: whether s is a trained parameter (TR freezes weight scales).
        channels: per-output-channel step sizes for a weight with this many rows (LSQ
            extension); None is the papers' one step size per tensor.
        s_min: the floor of the step size used in the forward pass.
        device: where s lives.
    """

    def __init__(self, bits: int, kind: Kind = "lsq", *, role: str = "weight",
                 signed: bool | None = None, trainable_scale: bool = True,
                 channels: int | None = None, s_min: float = 1e-8,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_quantizer_args(bits, kind, role, signed, channels)
        self.bits, self.kind, self.role, self.s_min = bits, kind, role, s_min
        self.signed = True if role == "weight" else signed
        self.s = nn.Parameter(torch.ones(channels or (), device=device),
                              requires_grad=trainable_scale)
        self.initialized = False

    @property
    def grid(self) -> tuple[int, int, int]:
        """(alpha, beta, gamma); needs the sign decided (after initialisation)."""
        if self.signed is None:
            raise RuntimeError("activation quantizer used before its first batch")
        return integer_grid(self.bits, self.signed, self.kind)

    def expand_scale(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``s`` broadcast against x: a scalar, or (C, 1, ..., 1) per channel."""
        return s if s.dim() == 0 else s.reshape(-1, *([1] * (x.dim() - 1)))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """s0 = gamma * 2 mean|x| / sqrt(Q_P) (LSQ's init; gamma = 1 for LSQ)."""
        if self.signed is None:
            self.signed = bool((x < 0).any())
        _, beta, gamma = self.grid
        xa = x.detach().abs().float()
        mean_abs = xa.mean(dim=tuple(range(1, x.dim()))) if self.s.dim() else \
            fixed_order_sum(xa) / xa.numel()  # (C,) or (): the latter thread-independent
        self.s.copy_((gamma * 2 * mean_abs / math.sqrt(beta)).clamp(min=self.s_min))
        self.initialized = True

    def n_per_scale(self, x: torch.Tensor) -> int:
        """N of the gradient scale: elements sharing one step size (weights) or features per
        sample (activations)."""
        if self.role == "activation":
            return x[0].numel()
        return x.numel() // self.s.numel()

    def scaled_step(self, x: torch.Tensor) -> torch.Tensor:
        """s floored at s_min, its gradient scaled by 1 / sqrt(N Q_P); s's own shape."""
        g = 1.0 / math.sqrt(self.n_per_scale(x) * self.grid[1])
        return grad_scale(_FloorSTE.apply(self.s, self.s_min), g)

    def step_size(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`scaled_step` broadcast against ``x``."""
        s = self.scaled_step(x)
        return _BroadcastScalar.apply(s, x.shape) if s.dim() == 0 else self.expand_scale(s, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ: s * v_bar; Eq. 13: v_bar / gamma, v_bar = round(clip(gamma x / s, alpha, beta))."""
        if not self.initialized:
            self.initialize(x)
        if self.s.dim() == 0 and _fused_ok(x):  # the same arithmetic in one C++ pass
            return _ScalarStepQuant.apply(x.contiguous(), self.scaled_step(x), self.grid,
                                          self.kind == "lsq")
        return ste_quant(x, self.step_size(x), self.grid, self.kind)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes round(clip(gamma x / s, alpha, beta)) the forward pass uses, int8
        (int16 for 8-bit unsigned grids)."""
        alpha, beta, gamma = self.grid
        s = self.expand_scale(self.s.clamp(min=self.s_min), x)
        dtype = torch.int8 if beta <= 127 else torch.int16
        return torch.round(torch.clamp(gamma * x / s, alpha, beta)).to(dtype)

    def output_scale(self) -> torch.Tensor:
        """The factor turning codes into outputs: s (LSQ) or 1 / gamma (Eq. 13), float32."""
        s = self.s.detach().clamp(min=self.s_min).float()
        return s if self.kind == "lsq" else torch.full_like(s, 1.0 / self.grid[2])

    def get_extra_state(self) -> dict[str, Any]:
        """Initialisation flag and decided sign travel with the state dict."""
        return {"initialized": self.initialized, "signed": self.signed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`get_extra_state`."""
        self.initialized, self.signed = state["initialized"], state["signed"]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kind={self.kind}, role={self.role}, signed={self.signed}"


def _check_quantizer_args(bits: int, kind: str, role: str, signed: bool | None,
                          channels: int | None) -> None:
    """One-line ConfigErrors for the quantizer's arguments."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"bits: got {bits!r}; accepted: integers 2..8")
    if kind not in KINDS:
        raise ConfigError(f"kind: got {kind!r}; accepted: {', '.join(KINDS)}")
    if role not in ("weight", "activation"):
        raise ConfigError(f"role: got {role!r}; accepted: weight, activation")
    if role == "weight" and signed is False:
        raise ConfigError("signed: got False for a weight quantizer; accepted: True or None")
    if role == "activation" and channels is not None:
        raise ConfigError(f"channels: got {channels!r} for an activation; accepted: None")


class QuantWrap(nn.Module):
    """A Conv2d or Linear whose weight and input activation are fake-quantized.

    The wrapped layer keeps its parameters (``<name>.layer.weight``); the forward pass is
    ``layer(act_quant(x))`` with ``weight_quant(layer.weight)`` as the weight.

    Args:
        layer: the layer to wrap (``padding_mode`` must be ``"zeros"`` for a conv).
        wbits: weight code width.
        abits: input-activation code width, or None to leave inputs in floating point.
        kind: ``"lsq"`` or ``"eq13"``.
        per_channel: one weight step size per output channel (LSQ extension).
        train_weight_scale: whether the weight step size is trained.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, wbits: int, abits: int | None,
                 kind: Kind = "lsq", *, per_channel: bool = False,
                 train_weight_scale: bool = True) -> None:
        super().__init__()
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise ConfigError(f"padding_mode: got {layer.padding_mode!r}; accepted: zeros")
        self.layer = layer
        W = layer.weight
        self.weight_quant = FakeQuantizer(
            wbits, kind, role="weight", trainable_scale=train_weight_scale,
            channels=W.shape[0] if per_channel else None, device=W.device)
        self.weight_quant.initialize(W)
        self.act_quant = None if abits is None else FakeQuantizer(
            abits, kind, role="activation", device=W.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's functional op on quantized input and weight."""
        if self.act_quant is not None:
            x = self.act_quant(x)
        return _layer_op(self.layer, x, self.weight_quant(self.layer.weight))

    def weight_codes(self) -> torch.Tensor:
        """Integer codes of the current latent weight (weight shape, int8)."""
        return self.weight_quant.codes(self.layer.weight)


def _layer_op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """conv2d / linear of ``layer`` with weight ``w``."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, layer.bias)
    return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d / Linear modules in registration order (first ~ input layer)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_plan(names: list[str], bits: int, abits: int | None, first_last_bits: int
               ) -> dict[str, tuple[int, int | None]]:
    """(wbits, abits) per layer: ``names[0]`` and ``names[-1]`` at ``first_last_bits`` for
    weights and inputs (0: left out, i.e. kept in floating point), the others at
    ``(bits, abits)``."""
    plan: dict[str, tuple[int, int | None]] = {n: (bits, abits) for n in names}
    for edge in {names[0], names[-1]}:
        if first_last_bits:
            plan[edge] = (first_last_bits, first_last_bits if abits is not None else None)
        else:
            del plan[edge]
    return plan


def wrap_layers(model: nn.Module, names: dict[str, tuple[int, int | None]], kind: Kind,
                *, per_channel: bool = False, train_weight_scale: bool = True
                ) -> dict[str, QuantWrap]:
    """Replace each named Conv2d / Linear by a :class:`QuantWrap`, in place.

    Args:
        model: the model to modify.
        names: layer name -> (wbits, abits); abits None leaves that layer's input in FP.
        kind: ``"lsq"`` or ``"eq13"`` quantizers.
        per_channel / train_weight_scale: see :class:`QuantWrap`.

    Returns:
        The wrappers by layer name.

    Example:
        >>> wraps = wrap_layers(net, {"conv2": (4, 4)}, "lsq")  # doctest: +SKIP
    """
    wraps = {}
    for name, (wbits, abits) in names.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise ConfigError(f"layers: {name!r} is a {type(layer).__name__}; "
                              "accepted: Conv2d or Linear modules")
        wraps[name] = QuantWrap(layer, wbits, abits, kind, per_channel=per_channel,
                                train_weight_scale=train_weight_scale)
        model.set_submodule(name, wraps[name])
    return wraps


@dataclass
class UnwrappedLayer:
    """One layer after QAT: its weight is exactly ``scale * codes``.

    Attributes:
        codes: signed integer codes q in [-2^(b-1), 2^(b-1) - 1], weight shape, int8.
        scale: float32, () per tensor or (C_out,) per channel: s (LSQ) or 1/gamma (Eq. 13).
        step_size: the learned/frozen s (for Eq. 13 it only chose the codes).
        bits / kind: the weight grid.
        act_bits / act_signed: the input quantizer left on the layer (None: FP inputs).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    step_size: torch.Tensor
    bits: int
    kind: Kind
    act_bits: int | None = None
    act_signed: bool | None = None

    def qstate(self) -> LayerQState:
        """The same weight as an honest ``LayerQState``: unsigned codes u = q + 2^(b-1) on a
        symmetric grid (zero 2^(b-1)), scale in float32, so ``dequantize()`` is exact."""
        rows = self.codes.shape[0]
        per_channel = self.scale.dim() > 0
        fmt = WeightFormat(self.bits, PER_CHANNEL if per_channel else PER_TENSOR, sym=True,
                           scale_dtype="float32")
        u = (self.codes.to(torch.int16) + 2 ** (self.bits - 1)).to(torch.uint8)
        scale = self.scale.reshape(rows if per_channel else 1, 1)  # (rows, 1) or (1, 1)
        zero = torch.full_like(scale, 2 ** (self.bits - 1))
        return LayerQState(u.reshape(rows, -1), scale, zero, fmt,  # codes (rows, cols)
                           meta={"qat_kind": self.kind, "act_bits": self.act_bits})


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of an unwrapped layer: fake-quantize its input."""
    return (module.input_quant(args[0]), *args[1:])


def unwrap_layers(model: nn.Module) -> dict[str, UnwrappedLayer]:
    """Put plain layers back, weights replaced by their fake-quantized values, in place.

    An input-activation quantizer is kept as the layer's ``input_quant`` submodule, applied by
    a forward pre-hook, so the model evaluates exactly as it trained.
    """
    out = {}
    wraps = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantWrap)]
    for name, wrap in wraps:
        out[name] = _unwrap_one(wrap)
        model.set_submodule(name, wrap.layer)
    return out


@torch.no_grad()
def _unwrap_one(wrap: QuantWrap) -> UnwrappedLayer:
    """Write ``scale * codes`` into the wrapped layer and describe it."""
    wq, layer = wrap.weight_quant, wrap.layer
    q = wq.codes(layer.weight)
    scale = wq.output_scale()
    layer.weight.copy_(wq.expand_scale(scale, q) * q.float())  # w_hat = scale * q, weight shape
    act = wrap.act_quant
    if act is not None:
        layer.input_quant = act
        layer.register_forward_pre_hook(_quantize_input)
    return UnwrappedLayer(q, scale, wq.s.detach().clone(), wq.bits, wq.kind,
                          act.bits if act is not None else None,
                          act.signed if act is not None else None)


def check_nonnegative(config: object, names: tuple[str, ...]) -> None:
    """One-line ConfigError for a config field that is set but not a number >= 0."""
    for name in names:
        value = getattr(config, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and value >= 0):
            raise ConfigError(f"{name}: got {value!r}; accepted: a number >= 0 or null")


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay without restarts, 1 at step 0 and 0 at ``total``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
