"""TR scheduling: "Scheduling Weight Transitions for Quantization-Aware Training" (Lee, Jeon,
Kim, Ham; arXiv 2404.19248, ICCV 2025); research/methods.md section 5.

Instead of a learning-rate schedule for the latent (full-precision) weights, the *transition
rate* of their integer codes w_d = round(clip(gamma w / s, alpha, beta)) (Eq. 13, weight step
sizes s frozen) is scheduled:

    k^t = (1/N) sum_i 1[w_d^t(i) != w_d^(t-1)(i)]          (Eq. 5, N quantized weights)
    K^t = m K^(t-1) + (1 - m) k^t                          (Eq. 10, m = 0.99)
    U^t = max(0, U^(t-1) + eta (R^t - K^t))                (Eq. 11, the TALR)
    w^(t+1) = w^t - U^t g^t                                (Eq. 12)

with g^t the base optimizer's update direction (SGD: the momentum buffer; Adam: the
bias-corrected m_hat / (sqrt(v_hat) + eps)) and the target R^t decayed like an LR from
R^0 = lambda sqrt(b). Parameters that are not quantized weights (BN, biases, FP first/last
layers, activation step sizes) keep a conventional cosine-decayed LR.

The registered method ``tr_scheduling`` (kind ``qat``) runs ``prepare_tr`` and
``TRState.after_step`` inside the suite's training loop on the grid's budget
(``fixed.vision.train``), then unwraps (weights become q / gamma, so the per-layer scale is
1/gamma). Its record carries the k / K / R / U trajectories (``stats.tr_history``), plotted by
``qbench table`` next to the leaderboard.

Faithful (methods.md 5.1-5.2, PAPER): Eq. 13 quantizers, frozen weight step sizes, trained
activation step sizes, Eqs. 5 and 10-12, TALR clamped at 0, no extra LR schedule on top of
U^t. k^t and N run over the b-bit quantized weights only, the paper's setting: its first and
last layers are full precision, so every weight it counts is a b-bit one. Here they may be
quantized at ``first_last_bits`` (an extension); such edge layers are neither counted in k nor
driven by the TALR: they train with the conventional cosine LR. (Counted, an 8-bit classifier
flips far more often than the 2-bit layers and alone drove K above R.) From summaries (3P,
UNVERIFIED against the PDF): m = 0.99, U^0 = the base optimizer's usual LR (0.1 SGD, 1e-3
Adam), eta = U^0, lambda = 5e-3, cosine target to 0, first and last layers FP, one global
TALR, K^0 = 0 (Eq. 10 as a plain running average: K starts below any rate, so U rises at
first, as in the paper's trajectory figure).

Time constants scaled to the budget (when ``tr_momentum`` / ``eta`` are not given). The
paper's constants are tuned for 80K-600K iterations: K averages over 1/(1-m) = 100 steps and,
with eta = U^0, U moves by its own size only every ~1/R^0 (100-140) steps, i.e. half of a
200-step CPU run. The rule keeps the paper's ratios of time constant to run length in reach:

    1 / (1 - m) <= T / 20           m   = min(0.99, 1 - 20 / T)            (K's lag)
    eta R^0 (T / 10) >= 10 U^0       eta = max(U^0, 100 U^0 / (R^0 T))      (U can move by
                                                                          10 U^0 within 10%
                                                                          of T)

Why 10 U^0: the flip rate grows only about as sqrt(U) (measured on cnn-small W2A2: k from
3e-3 to 5e-3 as U goes from 0.01 to 0.03), and reaching the target took U = 3-7 U^0, so the
loop's time constant, about (U / U^0) / (10 x 0.5) x T/10, stays near T/10 only if U can move
by several U^0 per T/10. Measured on cnn-small W2A2 (200 steps, seed 0): with 1 U^0 the median
windowed k / R was 1.03 but its quartiles 0.54-2.03 (k stayed near 4e-3 while R swept past
it); with 5 / 10 / 20 U^0: 1.39 [0.96, 1.80] / 1.18 [1.01, 1.35] / 1.01 [0.90, 1.11], U rising
first to 0.065 / 0.074 / 0.096 (20 U^0 overshoots early). At the paper's T = 80K both bounds
hold with the paper's values (m = 0.99, eta = U^0), so the rule returns them
(``budget_constants``; tests/test_tr_scheduling.py checks it). The paper-scale configs set
them explicitly.

Tracking is published: ``tracking`` turns the k and R trajectories into the windowed rate (a
centred moving mean of k over T/50 steps) and the median and quartiles of windowed k / R over
steps 10%-90% of T; the record keeps them (``stats.tr_tracking``), the leaderboard shows the
median as the row's signal (``k/R``), and the trajectory plot draws windowed k against R.

Our choices, all config fields:
  * K^0 (``K0``): ``zero`` (default, above), ``first`` (K^1 = k^1) or ``target`` (K^0 = R^0:
    U stays at U^0 until the rate leaves the target; the previous default);
  * U^t is computed after the update it measures: the update at iteration t uses the U
    computed from the transitions of the previous update (U^0 for the first);
  * weight decay on latent weights is decoupled and scaled by U^t: w <- w (1 - U^t wd) before
    the update (methods.md 5.5 recommendation; ``coupled`` adds wd w to the gradient instead);
  * step target decay: x0.1 at 50% and 75% of the steps;
  * global scope: one TALR over all b-bit layers; per-layer scope: each b-bit layer its own
    TALR with N = its weights;
  * first/last layers at ``first_last_bits`` > 0 use LSQ's post-scaled quantizer with a frozen
    step, since Eq. 13 relies on a following BN, and the conventional LR (above);
  * conventional parameters: LR ``lr`` (default U^0), cosine to 0, coupled weight decay;
    activation step sizes: ``act_scale_lr`` (default ``lr``), no weight decay.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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
from suite.qat_train import QATMethod, layer_names, moving_mean, subsample, train_and_unwrap

_CHOICES = {"optimizer": ("sgdt", "adamt"), "target_schedule": ("cosine", "step"),
            "scope": ("global", "per-layer"), "weight_decay_mode": ("decoupled", "coupled"),
            "K0": ("zero", "first", "target")}
_BASE_LR = {"sgdt": 0.1, "adamt": 1e-3}
STEP_MILESTONES = (0.5, 0.75)  # fractions of the steps where a step target drops x0.1
GLOBAL = "global"
PAPER_M = 0.99  # m of Eq. 10 in the paper
LAG_STEPS = 20  # budget rule: 1 / (1 - m) <= T / LAG_STEPS
MOVE_FRACTION = 0.1  # budget rule: U can move by MOVE_MULTIPLE U^0 within this fraction of T
MOVE_MULTIPLE = 10
WINDOW_FRACTION = 1 / 50  # windowed k: centred moving mean over T / 50 steps
TRACK_SPAN = (0.1, 0.9)  # tracking statistics over steps 10%-90% of T


def budget_constants(U0: float, R0: float, total_steps: int) -> tuple[float, float]:
    """(m, eta) scaled to a run of ``total_steps`` = T (module docstring):
    m = min(0.99, 1 - 20 / T) (at least 0), eta = max(U^0, 10 U^0 / (R^0 0.1 T))."""
    T = max(1, total_steps)
    m = max(0.0, min(PAPER_M, 1 - LAG_STEPS / T))
    eta = U0 if R0 <= 0 else max(U0, MOVE_MULTIPLE * U0 / (R0 * MOVE_FRACTION * T))
    return m, eta


def tracking(k: list[float], R: list[float], window: int | None = None) -> dict[str, object]:
    """How closely the transition rate followed its target.

    The windowed rate is the centred moving mean of k^t over ``window`` steps (default T/50,
    at least 1); the ratio windowed k / R^t is summarised by its median and quartiles over
    steps 10%-90% of T (steps with R^t = 0 left out).

    Returns:
        ``{"window", "from_step", "to_step", "median", "q25", "q75", "k_window"}``
        (``k_window`` the whole windowed trajectory; ratios NaN when no step qualifies).
    """
    T = len(k)
    w = window or max(1, round(T * WINDOW_FRACTION))
    k_window = moving_mean(k, w)
    first, last = int(TRACK_SPAN[0] * T), int(TRACK_SPAN[1] * T)
    ratios = [k_window[t] / R[t] for t in range(first, last) if R[t] > 0]
    if len(ratios) >= 2:
        q25, median, q75 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q25 = median = q75 = ratios[0] if ratios else math.nan
    return {"window": w, "from_step": first, "to_step": last, "median": median,
            "q25": q25, "q75": q75, "k_window": k_window}


@dataclass(frozen=True)
class TRConfig(MethodConfig):
    """Attributes:
        optimizer: base optimizer, ``sgdt`` (SGD + momentum) or ``adamt`` (Adam).
        U0: initial TALR U^0; None: the base optimizer's usual LR (0.1 / 1e-3).
        eta: TALR step eta of Eq. 11; None: scaled to the budget, max(U^0, 100 U^0 / (R^0 T))
            (U^0, the paper's, at paper-scale T).
        tr_factor: lambda, R^0 = lambda sqrt(b).
        tr_momentum: m of the running transition rate (Eq. 10); None: scaled to the budget,
            min(0.99, 1 - 20 / T) (0.99, the paper's, for T >= 2000).
        K0: initial running rate: ``zero`` (K^0 = 0, the paper), ``first`` (K^1 = k^1) or
            ``target`` (K^0 = R^0).
        target_schedule: R^t decays by ``cosine`` to 0 or by ``step`` (x0.1 at 50%, 75%).
        scope: one TALR for all quantized weights (``global``) or one per layer.
        momentum: SGD momentum (sgdt).
        weight_decay: decay of weights (never of step sizes).
        weight_decay_mode: on latent weights ``decoupled`` (scaled by U^t) or ``coupled``.
        lr: initial LR of the conventional parameters; None: U^0.
        act_scale_lr: initial LR of the activation step sizes; None: ``lr``.
        first_last_bits: bits of the first and last layers (0: kept FP, the paper). Quantized
            edges use LSQ's post-scaled form (frozen step), not Eq. 13: the classifier has no
            BN after it to absorb Eq. 13's missing post-scale.
        quantize_activations: quantize every quantized layer's input (W=A bits).
    """

    # 2: quantized first/last layers use the post-scaled (LSQ) form; 3: k, N and the TALR over
    # the b-bit layers only, K^0 = 0 by default, m and eta scaled to the budget by default
    version = 3

    optimizer: str = "sgdt"
    U0: float | None = None
    eta: float | None = None
    tr_factor: float = 5e-3
    tr_momentum: float | None = None
    K0: str = "zero"
    target_schedule: str = "cosine"
    scope: str = "global"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_mode: str = "decoupled"
    lr: float | None = None
    act_scale_lr: float | None = None
    first_last_bits: int = 0
    quantize_activations: bool = True

    def __post_init__(self) -> None:
        self.check_choices(_CHOICES)
        check_nonnegative(self, ("U0", "eta", "lr", "act_scale_lr", "tr_factor", "weight_decay"))
        m = 0.0 if self.tr_momentum is None else self.tr_momentum
        if not (0 <= m < 1 and 0 <= self.momentum < 1):
            raise ConfigError(f"tr_momentum / momentum: got {self.tr_momentum!r} / "
                              f"{self.momentum!r}; accepted: numbers in [0, 1)")
        if self.first_last_bits not in (0, *range(2, 9)):
            raise ConfigError(f"first_last_bits: got {self.first_last_bits!r}; "
                              "accepted: 0 (FP) or 2..8")

    @property
    def initial_U(self) -> float:
        """U^0."""
        return self.U0 if self.U0 is not None else _BASE_LR[self.optimizer]

    def constants(self, R0: float, total_steps: int) -> tuple[float, float]:
        """(m, eta) for a run of ``total_steps``: the given ones, else the budget rule's."""
        m, eta = budget_constants(self.initial_U, R0, total_steps)
        return (self.tr_momentum if self.tr_momentum is not None else m,
                self.eta if self.eta is not None else eta)

    @property
    def base_lr(self) -> float:
        """Initial LR of the conventional parameters."""
        return self.lr if self.lr is not None else self.initial_U

    @property
    def scale_lr(self) -> float:
        """Initial LR of the activation step sizes."""
        return self.act_scale_lr if self.act_scale_lr is not None else self.base_lr


class TransitionCounter:
    """The transition rate k^t of Eq. 5, exact, over the given quantized layers.

    Keeps w_d^(t-1), one int8 per weight; :meth:`update` compares it with w_d^t.
    """

    def __init__(self, wraps: dict[str, QuantWrap]) -> None:
        self.wraps = wraps
        self.prev = {n: w.weight_codes().to(torch.int8) for n, w in wraps.items()}  # w_d^(t-1)
        self.sizes = {n: w.layer.weight.numel() for n, w in wraps.items()}
        self.N = sum(self.sizes.values())
        self.layer_rates: dict[str, float] = {}

    def update(self) -> float:
        """k^t = (1/N) #{i: w_d^t(i) != w_d^(t-1)(i)} after an optimizer step; per-layer rates
        go to ``layer_rates``."""
        changed = []
        for name, wrap in self.wraps.items():
            w_d = wrap.weight_codes()  # w_d^t, weight shape
            changed.append((w_d != self.prev[name]).sum())
            self.prev[name].copy_(w_d)
        counts = torch.stack(changed).tolist()  # one device sync per step
        self.layer_rates = {n: c / self.sizes[n] for n, c in zip(self.wraps, counts, strict=True)}
        return sum(counts) / self.N


@dataclass
class TALR:
    """Transition-adaptive learning rate (Eqs. 10-11) and its target schedule R^t.

    Attributes:
        U: U^t, starts at U^0.
        eta: step of Eq. 11.
        R0: R^0 = lambda sqrt(b).
        total_steps: steps over which R^t decays.
        schedule: ``cosine`` (to 0) or ``step`` (x0.1 at 50% and 75%).
        m: momentum of the running rate K^t.
        K0: ``zero`` (K^0 = 0), ``first`` (K^1 = k^1) or ``target`` (K^0 = R^0).
        K: K^t (None before the first step under ``first``).
    """

    U: float
    eta: float
    R0: float
    total_steps: int
    schedule: str = "cosine"
    m: float = PAPER_M
    K0: str = "zero"
    K: float | None = None

    def __post_init__(self) -> None:
        if self.K is None and self.K0 != "first":
            self.K = self.R0 if self.K0 == "target" else 0.0

    def target(self, t: int) -> float:
        """R^t."""
        if self.schedule == "cosine":
            return self.R0 * cosine_factor(t, self.total_steps)
        return self.R0 * 0.1 ** sum(t >= f * self.total_steps for f in STEP_MILESTONES)

    def step(self, k_t: float, R_t: float) -> float:
        """Fold in k^t and return U^t."""
        self.K = k_t if self.K is None else self.m * self.K + (1 - self.m) * k_t  # Eq. 10
        self.U = max(0.0, self.U + self.eta * (R_t - self.K))  # Eq. 11
        return self.U


class _TALRMixin:
    """Param groups with ``latent: True`` step with ``talr`` (U^t) as their LR.

    A latent group may also carry ``talr_weight_decay``: decoupled decay w <- w (1 - U^t wd)
    before the update. Every other group is the plain base optimizer.
    """

    param_groups: list[dict]

    def set_talr(self, U: float, group: int = 0) -> None:
        """Set U^t of the latent param group with index ``group``."""
        if not self.param_groups[group].get("latent", False):
            raise ValueError(f"param group {group} is not a latent-weight group")
        self.param_groups[group]["talr"] = U

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """The base optimizer's step with lr = U^t on latent groups (Eq. 12)."""
        loss = None
        if closure is not None:  # gradients at the weights before the decay
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                if group.get("latent", False):
                    group["lr"] = group.setdefault("talr", group["lr"])
                    _decoupled_decay(group)
        super().step()  # type: ignore[misc]
        return loss


def _decoupled_decay(group: dict) -> None:
    """w <- w (1 - U^t wd) on the parameters with a gradient."""
    wd = group.get("talr_weight_decay", 0.0)
    if wd:
        for p in group["params"]:
            if p.grad is not None:
                p.mul_(1 - group["talr"] * wd)


class SGDT(_TALRMixin, torch.optim.SGD):
    """SGD with momentum whose latent groups use the TALR.

    torch's SGD moves p by -lr * buf (buf the momentum buffer), so lr = U^t gives exactly
    w^(t+1) = w^t - U^t g^t with g^t = buf (Eq. 12 with SGD's direction).
    """


class AdamT(_TALRMixin, torch.optim.Adam):
    """Adam whose latent groups use the TALR.

    torch's Adam moves p by -lr * m_hat / (sqrt(v_hat) + eps), and lr multiplies nothing else
    (the moments do not depend on it), so lr = U^t is exactly Eq. 12 with Adam's direction.
    """


@dataclass
class TRState:
    """Everything the training loop needs for TR scheduling.

    Call ``optimizer.step()`` then :meth:`after_step` every iteration.

    Attributes:
        cfg: the config.
        wraps: the quantized layers (b-bit layers and quantized edges, forward order).
        optimizer: SGDT or AdamT.
        counter: the transition counter over the b-bit layers.
        talrs: one TALR per unit (``"global"`` or a layer name).
        groups: unit -> index of its latent param group.
        total_steps: training iterations.
        t: optimizer steps taken.
        history: unit -> {"k", "K", "R", "U"} trajectories, one entry per step.
    """

    cfg: TRConfig
    wraps: dict[str, QuantWrap]
    optimizer: SGDT | AdamT
    counter: TransitionCounter
    talrs: dict[str, TALR]
    groups: dict[str, int]
    total_steps: int
    t: int = 0
    history: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def after_step(self) -> None:
        """Count the transitions of the step just taken and set U for the next one."""
        self.t += 1
        k_global = self.counter.update()  # Eq. 5
        for unit, talr in self.talrs.items():
            k_t = k_global if unit == GLOBAL else self.counter.layer_rates[unit]
            R_t = talr.target(self.t)
            U_t = talr.step(k_t, R_t)  # Eqs. 10-11
            self.optimizer.set_talr(U_t, self.groups[unit])
            trace = self.history.setdefault(unit, {"k": [], "K": [], "R": [], "U": []})
            for key, value in (("k", k_t), ("K", talr.K), ("R", R_t), ("U", U_t)):
                trace[key].append(value)
        for group in self.optimizer.param_groups:  # conventional parameters: cosine LR
            if "base_lr" in group:
                group["lr"] = group["base_lr"] * cosine_factor(self.t, self.total_steps)


    def tracking(self) -> dict[str, dict[str, object]]:
        """:func:`tracking` of every unit's trajectory."""
        return {unit: tracking(h["k"], h["R"]) for unit, h in self.history.items()}


def prepare_tr(model: nn.Module, bits: int, cfg: TRConfig, total_steps: int,
               layer_names: list[str] | None = None) -> TRState:
    """Wrap ``model`` with Eq. 13 quantizers (weight scales frozen) and build the optimizer,
    counter and TALRs over the b-bit layers (quantized edges: LSQ form, conventional LR).

    Args:
        model: the pretrained FP model (modified in place).
        bits: weight (and input-activation) bits b of the quantized layers.
        cfg: the TR config.
        total_steps: training iterations (the target schedule's horizon).
        layer_names: Conv2d / Linear layers in forward order (first and last get
            ``cfg.first_last_bits``, 0 = FP); None: every Conv2d / Linear.

    Returns:
        The TR state; call ``state.optimizer.step()`` then ``state.after_step()``.

    Example:
        >>> state = prepare_tr(resnet, 2, TRConfig(optimizer="adamt"), 80_000)  # doctest: +SKIP
        >>> loss.backward(); state.optimizer.step(); state.after_step()  # doctest: +SKIP
    """
    names = layer_names if layer_names is not None else quantizable_layers(model)
    abits = bits if cfg.quantize_activations else None
    plan = layer_plan(names, bits, abits, cfg.first_last_bits)
    edges = {n: plan.pop(n) for n in {names[0], names[-1]} if n in plan}
    wraps = wrap_layers(model, plan, "eq13", train_weight_scale=False)
    # Eq. 13 has no post-scale: the BN after every quantized layer absorbs it. The classifier
    # has no BN after it, so quantized edge layers use LSQ's form s * round(clip(w / s)) (step
    # still frozen): with Eq. 13 there, W4A4 cnn-small lost 4.5 points of top-1 against LSQ.
    core = {n: wraps[n] for n in names if n in wraps}  # the b-bit layers, forward order
    wraps.update(wrap_layers(model, edges, "lsq", train_weight_scale=False))
    wraps = {n: wraps[n] for n in names if n in wraps}  # forward order
    units = {GLOBAL: list(core)} if cfg.scope == GLOBAL else {n: [n] for n in core}
    groups = _latent_groups(core, units, cfg) + _conventional_groups(model, core, cfg)
    optimizer = _make_optimizer(groups, cfg)
    R0 = cfg.tr_factor * math.sqrt(bits)  # every unit holds b-bit weights only
    m, eta = cfg.constants(R0, total_steps)
    talrs = {unit: TALR(cfg.initial_U, eta, R0, total_steps, cfg.target_schedule, m, cfg.K0)
             for unit in units}
    return TRState(cfg, wraps, optimizer, TransitionCounter(core), talrs,
                   {unit: i for i, unit in enumerate(units)}, total_steps)


def _latent_groups(wraps: dict[str, QuantWrap], units: dict[str, list[str]], cfg: TRConfig
                   ) -> list[dict]:
    """One latent param group per TALR unit, in ``units`` order."""
    decoupled = cfg.weight_decay_mode == "decoupled"
    return [{"params": [wraps[n].layer.weight for n in layers], "latent": True,
             "lr": cfg.initial_U, "talr": cfg.initial_U,
             "weight_decay": 0.0 if decoupled else cfg.weight_decay,
             "talr_weight_decay": cfg.weight_decay if decoupled else 0.0}
            for layers in units.values()]


def _conventional_groups(model: nn.Module, wraps: dict[str, QuantWrap], cfg: TRConfig
                         ) -> list[dict]:
    """Activation step sizes (no decay) and every other trainable parameter (coupled decay;
    quantized edge layers' weights included), both with a cosine-decayed LR; empty groups are
    left out. ``wraps``: the b-bit layers, whose weights are latent."""
    latent = {id(w.layer.weight) for w in wraps.values()}
    scales = [m.s for m in model.modules()
              if isinstance(m, FakeQuantizer) and m.s.requires_grad]
    scale_ids = {id(p) for p in scales}
    others = [p for p in model.parameters()
              if p.requires_grad and id(p) not in latent and id(p) not in scale_ids]
    groups = [{"params": scales, "lr": cfg.scale_lr, "base_lr": cfg.scale_lr,
               "weight_decay": 0.0},
              {"params": others, "lr": cfg.base_lr, "base_lr": cfg.base_lr,
               "weight_decay": cfg.weight_decay}]
    return [g for g in groups if g["params"]]


def _make_optimizer(groups: list[dict], cfg: TRConfig) -> SGDT | AdamT:
    """SGDT (momentum ``cfg.momentum``) or AdamT (torch's default betas and eps)."""
    if cfg.optimizer == "sgdt":
        return SGDT(groups, lr=cfg.base_lr, momentum=cfg.momentum)
    return AdamT(groups, lr=cfg.base_lr)


def _signal(tracked: dict[str, dict[str, object]]) -> dict[str, object]:
    """The leaderboard's signal: median windowed k / R (over the units' medians, per-layer)."""
    medians = [float(t["median"]) for t in tracked.values()]  # type: ignore[arg-type]
    value = statistics.median(medians) if medians else math.nan
    return {"name": "k/R", "value": value,
            "about": "median windowed transition rate over its target, steps 10%-90%"}


@METHODS.register("tr_scheduling")
class TRScheduling(QATMethod):
    """TR scheduling: QAT whose latent weights follow a transition-rate target (TALR)."""

    name = "tr_scheduling"
    Config = TRConfig

    def quantize(self, model: nn.Module, data: MethodData, ctx: RunContext) -> QuantResult:
        """Eq. 13 quantizers, SGDT/AdamT with the TALR updated after every step, unwrap."""
        cfg: TRConfig = self.config  # type: ignore[assignment]
        b = self.qat_bits()
        t0 = time.perf_counter()
        budget = data.train_budget
        steps = budget.train_spec().total_steps(len(data.train_data.train)) if budget else 0
        names = layer_names(model, ctx)
        state = prepare_tr(model, b, cfg, steps, names)
        for group in state.optimizer.param_groups:
            group["fixed_lr"] = True  # latent: U^t (Eq. 11); others: after_step's cosine
        out = train_and_unwrap(model, names, data, ctx, state.optimizer, "constant",
                               on_step=lambda _step, _loss: state.after_step())
        tracked = state.tracking()
        history = {unit: {k: subsample(v) for k, v in
                          {**trace, "k_window": tracked[unit].pop("k_window")}.items()}
                   for unit, trace in state.history.items()}
        talr = next(iter(state.talrs.values()), None)
        stats = {"quant_time_s": time.perf_counter() - t0, **out.stats, "tr_history": history,
                 "tr_R0": {u: t.R0 for u, t in state.talrs.items()},
                 "tr_constants": {"m": talr.m, "eta": talr.eta, "K0": cfg.K0} if talr else {},
                 "tr_tracking": tracked, "signal": _signal(tracked)}
        return QuantResult(model, out.qstate, stats=stats,
                           abits=b if cfg.quantize_activations else None)
