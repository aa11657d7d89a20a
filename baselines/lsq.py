"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020, arXiv 1902.08153 v3);
research/methods.md section 4.

The registered method ``lsq`` (kind ``qat``): wrap the pretrained model's layers with LSQ
quantizers, train with the suite's loop on the grid's budget (``fixed.vision.train``), unwrap
(weights become s * q, q in [-2^(b-1), 2^(b-1) - 1]). The building blocks are public for use
in other training loops: ``prepare_lsq``, ``make_lsq_optimizer``, ``make_lsq_scheduler``.

Faithful to the paper (as transcribed in methods.md 4.1-4.2):
  * quantizer v_hat = s * round(clip(v/s, -Q_N, Q_P)), signed weights, unsigned post-ReLU
    activations, one step size per weight tensor and per activation tensor;
  * STE with the clip mask on d v_hat / d v, the paper's d v_hat / d s, gradient scale
    1 / sqrt(N Q_P) (``suite.qat.FakeQuantizer``);
  * init s0 = 2 mean|v| / sqrt(Q_P) from the pretrained weights and the first batch;
  * first and last layers at 8-bit weights and input activations, the others at b-bit;
    BN and biases stay FP32;
  * SGD with momentum 0.9, cosine decay without restarts, LR 0.01 (0.001 at 8-bit), 90
    epochs (1 at 8-bit), weight decay 1e-4 (4/8-bit), 0.5e-4 (3-bit), 0.25e-4 (2-bit). The
    epochs and batch size are the grid's (``fixed.vision.train``), the same for every QAT
    method of a grid; ``configs/paper/`` sets the paper's.

Our choices (the paper is silent or this is an extension):
  * no weight decay on step sizes (methods.md 4.4, UNVERIFIED in the paper);
  * weight decay 1e-4 for 5-7 bits (the paper sweeps 2/3/4/8 only);
  * the cosine decay is stepped per iteration;
  * a step size is floored at 1e-8 in the forward pass (pitfall ZouJiu1/LSQplus#12);
  * an input with negative values (the first layer's image) gets a signed grid, chosen on the
    first batch (the paper does not say how it quantizes the first layer's input);
  * ``per_channel`` (off by default) gives each output channel its own weight step size with N
    = the weights of that channel in the gradient scale (zhutmost/lsq-net uses the
    per-tensor N there; methods.md 4.4);
  * ``optimizer: adam`` is offered for comparison with AdamT; the paper uses SGD. Its default
    LR is Adam's customary 1e-3 (1e-4 at 8-bit), not SGD's 0.01.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from suite.errors import ConfigError
from suite.interface import METHODS, MethodConfig, MethodData, QuantResult, RunContext
from suite.qat import (
    FakeQuantizer,
    QuantWrap,
    check_nonnegative,
    cosine_factor,
    layer_plan,
    quantizable_layers,
    wrap_layers,
)
from suite.qat_train import QATMethod, layer_names, train_and_unwrap

_CHOICES = {"optimizer": ("sgd", "adam"), "schedule": ("cosine", "constant")}
_PAPER_WEIGHT_DECAY = {2: 0.25e-4, 3: 0.5e-4, 4: 1e-4, 8: 1e-4}


@dataclass(frozen=True)
class LSQConfig(MethodConfig):
    """Attributes:
        optimizer: ``sgd`` (the paper) or ``adam``.
        lr: initial learning rate; None: the paper's 0.01 (0.001 at 8-bit) for SGD, 1e-3
            (1e-4 at 8-bit) for Adam.
        momentum: SGD momentum.
        weight_decay: None: the paper's per-bit value (module docstring); never on step sizes.
        schedule: ``cosine`` decay to 0 without restarts (the paper) or ``constant``.
        first_last_bits: bits of the first and last layers' weights and inputs (0: keep FP).
        quantize_activations: quantize every quantized layer's input (W=A bits, the paper).
        per_channel: one weight step size per output channel (extension).
    """

    version = 2  # 2: no epochs/batch_size (the grid budget); Adam default LR 1e-3

    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "cosine"
    first_last_bits: int = 8
    quantize_activations: bool = True
    per_channel: bool = False

    def __post_init__(self) -> None:
        self.check_choices(_CHOICES)
        if self.first_last_bits not in (0, *range(2, 9)):
            raise ConfigError(f"first_last_bits: got {self.first_last_bits!r}; "
                              "accepted: 0 (FP) or 2..8")
        check_nonnegative(self, ("lr", "weight_decay"))
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: got {self.momentum!r}; accepted: 0 <= momentum < 1")

    def lr_for(self, bits: int) -> float:
        """The initial learning rate at ``bits`` (the paper's SGD: 0.01, 0.001 at 8-bit; Adam:
        1e-3, 1e-4 at 8-bit)."""
        if self.lr is not None:
            return self.lr
        base = 0.01 if self.optimizer == "sgd" else 1e-3
        return base / 10 if bits >= 8 else base

    def weight_decay_for(self, bits: int) -> float:
        """The weight decay at ``bits`` (the paper's ResNet-18 sweep; 1e-4 elsewhere)."""
        return self.weight_decay if self.weight_decay is not None else (
            _PAPER_WEIGHT_DECAY.get(bits, 1e-4))


def prepare_lsq(model: nn.Module, bits: int, cfg: LSQConfig,
                layer_names: list[str] | None = None) -> dict[str, QuantWrap]:
    """Wrap ``model`` for LSQ training, in place.

    Args:
        model: the pretrained FP model.
        bits: b, the weight (and input-activation) bits of all but the first and last layers.
        cfg: the LSQ config.
        layer_names: the Conv2d / Linear layers to quantize, in forward order (first and last
            get ``cfg.first_last_bits``); None: every Conv2d / Linear in registration order.

    Returns:
        The wrappers by layer name.

    Example:
        >>> wraps = prepare_lsq(resnet, 2, LSQConfig())  # doctest: +SKIP
        >>> opt = make_lsq_optimizer(resnet, 2, LSQConfig())  # doctest: +SKIP
    """
    names = layer_names if layer_names is not None else quantizable_layers(model)
    abits = bits if cfg.quantize_activations else None
    plan = layer_plan(names, bits, abits, cfg.first_last_bits)
    return wrap_layers(model, plan, "lsq", per_channel=cfg.per_channel)


def step_size_params(model: nn.Module) -> list[nn.Parameter]:
    """The step sizes s of every quantizer in ``model`` (trainable ones only)."""
    return [m.s for m in model.modules() if isinstance(m, FakeQuantizer) and m.s.requires_grad]


def lsq_param_groups(model: nn.Module, bits: int, cfg: LSQConfig) -> list[dict]:
    """Two groups: every other trainable parameter with weight decay, step sizes without."""
    scales = step_size_params(model)
    ids = {id(p) for p in scales}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": others, "weight_decay": cfg.weight_decay_for(bits)},
            {"params": scales, "weight_decay": 0.0}]


def make_lsq_optimizer(model: nn.Module, bits: int, cfg: LSQConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or Adam over :func:`lsq_param_groups`, LR ``cfg.lr_for``."""
    groups = lsq_param_groups(model, bits, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr_for(bits), momentum=cfg.momentum)
    return torch.optim.Adam(groups, lr=cfg.lr_for(bits))


def make_lsq_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: LSQConfig
                       ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration cosine decay to 0 over ``total_steps`` (or a constant LR)."""
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: cosine_factor(t, total_steps))


@METHODS.register("lsq")
class LSQ(QATMethod):
    """LSQ: learned step size QAT of weights and input activations (the QAT baseline)."""

    name = "lsq"
    Config = LSQConfig

    def quantize(self, model: nn.Module, data: MethodData, ctx: RunContext) -> QuantResult:
        """Wrap (first/last at ``first_last_bits``), train with SGD/Adam, unwrap."""
        cfg: LSQConfig = self.config  # type: ignore[assignment]
        b = self.qat_bits()
        t0 = time.perf_counter()
        names = layer_names(model, ctx)
        prepare_lsq(model, b, cfg, names)
        optimizer = make_lsq_optimizer(model, b, cfg)
        out = train_and_unwrap(model, names, data, ctx, optimizer, cfg.schedule)
        stats = {"quant_time_s": time.perf_counter() - t0, **out.stats}
        return QuantResult(model, out.qstate, stats=stats,
                           abits=b if cfg.quantize_activations else None)
