"""Statistical pre-calibration (Ghaffari et al., "Statistical Pre-Calibration: a weight-adaptive,
calibration-free PTQ", arXiv 2501.09107, ICPRAM 2025) with the adaptive-LASSO outlier split of
the same group's AdpQ (arXiv 2405.13358); research/methods.md section 6.

Neither paper has public code; every choice the papers leave open is a config field (defaults
below, all documented in the README). Per weight matrix W (rows, cols), without data:

  1. Outliers (adaptive LASSO). With an orthonormal design the adaptive-LASSO estimate
     min_w^ a_j^2 (w - w^)^2 + lambda |w^| / |w| is the soft threshold
     w^ = sign(w) max(0, |w| - lambda' / (a_j^2 |w|)), non-zero iff a_j |w| > sqrt(lambda');
     choosing lambda' so that a fraction ``alpha`` is non-zero makes the outlier set the top
     ``alpha`` of the scores a_j |w_ij| (per matrix: one lambda'; or per group). ``a_j`` are the
     "pseudo activations" (``salience``): 1 (AdpQ), or the column norm of W (data-free).
  2. Grids. The remaining weights are quantized per group on a min-max grid over the
     non-outliers only; the outliers go to a sparse side channel: codes on a second grid of the
     same format per group (``outlier_storage: second-grid``, AdpQ) or float16 values
     (``float16``, SpQR-style). Both are counted in the effective bits.
  3. KL-guided range (``kl_search``). Per group, the clip factor p of the non-outlier range
     (p = 1, 1 - 1/100, ..., ``clip_min``) minimising KL(P || Q): P is the histogram of the
     group's non-outlier weights over ``kl_bins_per_level * 2^b`` equal bins spanning their
     [min, max]; each bin is assigned to the code its centre rounds to, and Q spreads each
     code's total P mass uniformly over the non-empty bins assigned to it (the "expanded
     quantized distribution" of entropy calibration; ``kl_spread: cell`` spreads it over all
     the cell's bins instead); KL sums over non-empty P bins, so no smoothing constant is
     needed. p = 1 (plain min-max) is a candidate, so the chosen grid's KL is never above
     min-max's. P is built once per group; each candidate then costs O(2^b) per group through
     cumulative bin counts (``KeptHistogram``), so the whole search is a few passes over W.
     The objective is summed in exact fixed-point integers from a table of logs
     (``log_table``), so the chosen clip does not depend on the CPU, the thread count or the
     library build (the float32 sum it replaces let machines break near-ties differently).
  4. Ties. Outliers are the top alpha with equal scores taken in index order
     (``top_k_stable``); clip candidates with equal objective go to the first (p = 1 first).

Defaults were chosen on a development text (ABC news, the calibration corpus, never the
evaluation corpus); the README gives that ablation.

Chaining (``precalibration+gptq``): the result is the next method's starting qstate (grid and
outlier split); see ``MethodData.init_qstate``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from suite.errors import ConfigError
from suite.interface import METHODS, MethodConfig, MethodData, QuantMethod, QuantResult, RunContext
from suite.primitives import (
    LayerQState,
    OutlierChannel,
    WeightFormat,
    check_divides,
    choose_qparams,
    group_range,
    group_view,
    qparams_from_range,
    quantize,
    to_storage,
    write_weight,
)

_CHOICES = {"outlier_scope": ("matrix", "group"),
            "outlier_storage": ("second-grid", "float16"),
            "salience": ("none", "column-norm", "norm-gamma"),
            "kl_spread": ("filled", "cell"),
            "index_bits": ("csr", "group")}


@dataclass(frozen=True)
class PreCalibrationConfig(MethodConfig):
    """Attributes:
        alpha: outlier fraction (0 disables the split).
        outlier_scope: one threshold per ``matrix`` (AdpQ's single lambda) or top-alpha per
            ``group``.
        outlier_storage: ``second-grid`` (codes + a second scale/zero per group) or ``float16``.
        salience: pseudo activations a_j weighting the outlier score a_j |w_ij|: ``none``
            (a_j = 1, AdpQ), ``column-norm`` (||W_:j||) or ``norm-gamma`` (|gamma_j| of the
            norm the layer reads, with the family's offset, for q/k/v and gate/up; 1 for layers
            that read no norm). All are data-free.
        index_bits: how the outlier positions are counted in the effective bits: ``csr`` (a
            count per row plus ceil(log2 cols) bits per outlier, enough to decode) or ``group``
            (AdpQ's count, ceil(log2 g) bits per outlier), to compare at AdpQ's memory.
        kl_search: choose each group's clip factor by the KL objective (else plain min-max).
        clip_min / clip_step: the candidate clip factors 1, 1 - step, ..., >= clip_min.
        kl_bins_per_level: histogram resolution, bins per quantization level.
        kl_spread: how Q spreads a code's mass over the bins its cell covers: over the
            ``filled`` (non-empty) ones only (entropy calibration's expanded distribution) or
            over the whole ``cell`` (the piecewise-uniform density the quantizer implies).
    """

    version = 2  # 2: exact integer KL sums and index-order ties (machine-independent codes)

    alpha: float = 0.01
    outlier_scope: str = "matrix"
    outlier_storage: str = "second-grid"
    salience: str = "none"
    # off since issue 30: the AdpQ split alone is the method the papers describe; the search
    # is this project's extension (the labelled variant ``precalibration:kl``)
    kl_search: bool = False
    clip_min: float = 0.8
    clip_step: float = 0.01
    kl_bins_per_level: int = 8
    kl_spread: str = "filled"
    index_bits: str = "csr"

    added_later = ("index_bits",)

    def __post_init__(self) -> None:
        self.check_choices(_CHOICES)
        if not 0 <= self.alpha < 0.5:
            raise ConfigError(f"alpha: got {self.alpha!r}; accepted: a fraction in [0, 0.5)")
        if not (0 < self.clip_min <= 1 and self.clip_step > 0 and self.kl_bins_per_level > 0):
            raise ConfigError("clip_min / clip_step / kl_bins_per_level: got "
                              f"{self.clip_min!r} / {self.clip_step!r} / "
                              f"{self.kl_bins_per_level!r}; accepted: 0 < clip_min <= 1, "
                              "clip_step > 0, kl_bins_per_level > 0")

    def clip_factors(self) -> list[float]:
        """The candidate clip factors, 1 first."""
        n = int(round((1 - self.clip_min) / self.clip_step))
        return [1 - i * self.clip_step for i in range(n + 1)] if self.kl_search else [1.0]


def outlier_mask(W: torch.Tensor, fmt: WeightFormat, cfg: PreCalibrationConfig,
                 gain: torch.Tensor | None = None) -> torch.Tensor:
    """The adaptive-LASSO non-zeros: top ``alpha`` of a_j |w_ij|, bool (rows, cols). ``gain``
    is the preceding norm's |gamma| (cols,) for ``salience: norm-gamma``."""
    score = W.abs()
    a = W.norm(dim=0) if cfg.salience == "column-norm" else \
        gain if cfg.salience == "norm-gamma" else None  # (cols,): data-free pseudo activations
    if a is not None:
        score = score * (a / a.mean().clamp(min=1e-12))
    mask = torch.zeros_like(W, dtype=torch.bool)
    if cfg.alpha == 0:
        return mask
    if cfg.outlier_scope == "matrix":
        k = int(round(cfg.alpha * W.numel()))
        mask.view(-1)[top_k_stable(score.reshape(-1), k)] = True
        return mask
    sg = group_view(score, fmt)  # (rows, G, g)
    k = int(round(cfg.alpha * sg.shape[-1]))
    group_view(mask, fmt).scatter_(-1, top_k_stable(sg, k), True)
    return mask


def top_k_stable(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dim; equal scores are taken in index
    order. ``torch.topk`` leaves the choice among ties to its implementation (the shipped
    weights lie on a 16-level grid per group, so ties at the threshold are the rule here), and
    a choice that depends on the library build or CPU makes a data-free method machine-bound."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]


def kl_objective(W: torch.Tensor, keep: torch.Tensor, fmt: WeightFormat, shrink: float,
                 bins_per_level: int, spread: str = "filled") -> torch.Tensor:
    """KL(P || Q) per group (rows, G) of the kept weights for the grid clipped by ``shrink``
    (the estimator of the module docstring)."""
    scale, zero = choose_qparams(W, fmt, keep, shrink)
    wg, kg = group_view(W.float(), fmt), group_view(keep, fmt)  # (rows, G, g)
    B = bins_per_level * (fmt.maxq + 1)
    lo = torch.where(kg, wg, torch.inf).amin(-1, keepdim=True)  # (rows, G, 1)
    hi = torch.where(kg, wg, -torch.inf).amax(-1, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, 0.0)
    width = torch.where(hi > lo, hi - lo, 1.0) / B
    k = ((wg - lo) / width).floor().clamp(0, B - 1).long()  # (rows, G, g): bin of each weight
    P = torch.zeros(*wg.shape[:2], B).scatter_add_(-1, k, kg.float())  # (rows, G, B)
    centres = lo + (torch.arange(B) + 0.5) * width  # (rows, G, B)
    code = torch.clamp(torch.round(centres / scale[..., None]) + zero[..., None], 0, fmt.maxq)
    code = code.long()  # (rows, G, B): the cell of each bin
    L = fmt.maxq + 1
    mass = torch.zeros(*wg.shape[:2], L).scatter_add_(-1, code, P)  # (rows, G, L)
    over = (P > 0).float() if spread == "filled" else torch.ones_like(P)
    filled = torch.zeros(*wg.shape[:2], L).scatter_add_(-1, code, over)
    Q = mass.gather(-1, code) / filled.gather(-1, code).clamp(min=1)  # (rows, G, B)
    terms = torch.where(P > 0, P * (P.clamp(min=1e-30).log() - Q.clamp(min=1e-30).log()), 0.0)
    return terms.sum(-1) / P.sum(-1).clamp(min=1)


@dataclass(frozen=True)
class KeptHistogram:
    """The KL estimator's P for every group, built once and shared by all clip candidates.

    Attributes:
        lo, width: (rows, G, 1) left edge and bin width of each group's histogram.
        mass, filled: (rows, G, B + 1) cumulative P counts and cumulative non-empty bins
            (int64).
        plogp, n: (rows, G) sum of P log P over non-empty bins (fixed point, ``log_table``),
            and the kept count (int64).
        xmin, xmax: (rows, G) the kept range (``group_range``) the grids are built from.
    """

    lo: torch.Tensor
    width: torch.Tensor
    mass: torch.Tensor
    filled: torch.Tensor
    plogp: torch.Tensor
    n: torch.Tensor
    xmin: torch.Tensor
    xmax: torch.Tensor

    @classmethod
    def build(cls, W: torch.Tensor, keep: torch.Tensor, fmt: WeightFormat, bins_per_level: int
              ) -> KeptHistogram:
        """Histogram the kept weights of every group (same edges as ``kl_objective``)."""
        wg, kg = group_view(W.float(), fmt), group_view(keep, fmt)  # (rows, G, g)
        B = bins_per_level * (fmt.maxq + 1)
        xmin, xmax = group_range(W, fmt, keep)
        lo = torch.where(torch.isfinite(xmin), xmin, 0.0)[..., None]  # (rows, G, 1)
        width = torch.where(xmax[..., None] > lo, xmax[..., None] - lo, 1.0) / B
        k = ((wg - lo) / width).floor().clamp(0, B - 1).long()  # (rows, G, g): bin of each weight
        P = torch.zeros(*wg.shape[:2], B, dtype=torch.int64).scatter_add_(
            -1, k, kg.long())  # (rows, G, B): counts
        cum = torch.nn.functional.pad(P.cumsum(-1), (1, 0))  # (rows, G, B + 1)
        nz = torch.nn.functional.pad((P > 0).long().cumsum(-1), (1, 0))
        plogp = log_table(int(P.max()))[0][P].sum(-1)  # (rows, G): fixed point
        return cls(lo, width, cum, nz, plogp, cum[..., -1], xmin, xmax)

    def kl(self, fmt: WeightFormat, shrink: float, spread: str = "filled") -> torch.Tensor:
        """KL(P || Q) per group (rows, G) for the kept-range grid clipped by ``shrink``."""
        return self.kl_fixed(fmt, shrink, spread).double() / FIXED_ONE / self.n.clamp(min=1)

    def kl_fixed(self, fmt: WeightFormat, shrink: float, spread: str = "filled"
                 ) -> torch.Tensor:
        """n KL(P || Q) per group (rows, G) in fixed point (int64, units of 2^-FIXED_BITS).

        Code c takes the bins whose centre rounds to it: centre >= (c - 1/2 - z) s, the
        first such bin being ceil((t_c - lo) / width - 1/2); with P in counts,
        n KL = sum_b P_b log P_b - sum_c mass_c log(mass_c / filled_c), where filled_c counts
        the cell's non-empty bins (``spread="filled"``) or all its bins (``"cell"``). Every
        count is an integer and every log a term of ``log_table``, so the sum is exact and
        independent of summation order, thread count and CPU: candidates that are equal
        mathematically tie exactly, and the first wins everywhere.
        """
        scale, zero = qparams_from_range(self.xmin, self.xmax, fmt, shrink)  # (rows, G)
        c = torch.arange(1, fmt.maxq + 1) - 0.5
        t = (c - zero[..., None]) * scale[..., None]  # (rows, G, L - 1): code boundaries
        B = self.mass.shape[-1] - 1
        first = torch.ceil((t - self.lo) / self.width - 0.5).clamp(0, B).long()
        edges = torch.nn.functional.pad(first, (1, 0), value=0)
        edges = torch.nn.functional.pad(edges, (0, 1), value=B)  # (rows, G, L + 1)
        mass = self.mass.gather(-1, edges).diff(dim=-1)  # (rows, G, L): int64 counts
        filled = self.filled.gather(-1, edges).diff(dim=-1) if spread == "filled" \
            else edges.diff(dim=-1)
        nlogn, logn = log_table(int(max(int(mass.max()), int(filled.max()), 1)))
        qlogq = nlogn[mass] - mass * logn[filled.clamp(min=1)]  # 0 where mass = 0
        return self.plogp - qlogq.sum(-1)


FIXED_BITS = 32
FIXED_ONE = float(2**FIXED_BITS)
_LOG_TABLE: list[torch.Tensor] = []


def log_table(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-point n log n and log n for n = 0..N >= ``n`` (int64, units of 2^-FIXED_BITS).

    The logs come from ``decimal`` (correctly rounded ln), not from a vectorised float log
    whose last bit depends on the CPU's instruction set, so every machine builds the same
    table. Grown on demand (by doubling) and cached."""
    if not _LOG_TABLE or len(_LOG_TABLE[1]) <= n:
        import decimal

        size = max(2 * n, 1024)
        ctx = decimal.Context(prec=40)
        one = decimal.Decimal(2**FIXED_BITS)
        logs = [0] + [int((ctx.ln(decimal.Decimal(i)) * one).to_integral_value(
            decimal.ROUND_HALF_EVEN)) for i in range(1, size + 1)]
        nlogs = [0] + [int((i * ctx.ln(decimal.Decimal(i)) * one).to_integral_value(
            decimal.ROUND_HALF_EVEN)) for i in range(1, size + 1)]
        _LOG_TABLE[:] = [torch.tensor(nlogs, dtype=torch.int64),
                         torch.tensor(logs, dtype=torch.int64)]
    return _LOG_TABLE[0], _LOG_TABLE[1]


def kl_clip(W: torch.Tensor, keep: torch.Tensor, fmt: WeightFormat, cfg: PreCalibrationConfig
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the candidate clip factor with the smallest KL (the first on ties, p = 1
    first), and its KL: both (rows, G)."""
    ps = cfg.clip_factors()
    hist = KeptHistogram.build(W, keep, fmt, cfg.kl_bins_per_level)
    kls = torch.stack([hist.kl_fixed(fmt, p, cfg.kl_spread) for p in ps])  # (cand., rows, G)
    best = kls.argmin(0)  # (rows, G): exact integers, the first candidate on ties
    kl = kls.gather(0, best[None])[0].double() / FIXED_ONE / hist.n.clamp(min=1)
    return torch.tensor(ps)[best], kl


def precalibrate_layer(W: torch.Tensor, fmt: WeightFormat, cfg: PreCalibrationConfig,
                       gain: torch.Tensor | None = None) -> tuple[LayerQState, dict[str, Any]]:
    """Outlier split, KL-chosen grid and side channel for one weight (rows, cols); ``gain``:
    the preceding norm's |gamma| for ``salience: norm-gamma`` (None: a_j = 1)."""
    W = W.detach().float()
    check_divides(fmt, W.shape[1], "<precalibration layer>")
    out = outlier_mask(W, fmt, cfg, gain)
    keep = ~out
    shrink, kl = kl_clip(W, keep, fmt, cfg)
    scale, zero = choose_qparams(W, fmt, keep, shrink)
    state = LayerQState(quantize(W, scale, zero, fmt), scale, zero, fmt)
    if out.any():
        state.outliers = outlier_channel(W, out, fmt, cfg.outlier_storage)
        state.outliers.index = cfg.index_bits  # type: ignore[assignment]
    kl_mean = math.fsum(kl.reshape(-1).tolist()) / max(kl.numel(), 1)  # exact, order-free
    stats = {"outliers": int(out.sum()), "kl": kl_mean,
             "clipped_groups": float((shrink < 1).float().mean())}
    return state, stats


def outlier_channel(W: torch.Tensor, out: torch.Tensor, fmt: WeightFormat, storage: str
                    ) -> OutlierChannel:
    """The side channel holding W's entries at ``out``."""
    idx = out.reshape(-1).nonzero()[:, 0]  # sorted flat positions
    if storage == "float16":
        return OutlierChannel(idx, values=to_storage(W.reshape(-1)[idx], fmt))
    scale, zero = choose_qparams(W, fmt, out)  # a second min-max grid over the outliers
    codes = quantize(W, scale, zero, fmt).reshape(-1)[idx]
    return OutlierChannel(idx, codes=codes, scale=scale, zero=zero)


@METHODS.register("precalibration")
class PreCalibration(QuantMethod):
    """Calibration-free, weight-adaptive PTQ: outlier split + KL-chosen grids, per layer."""

    name = "precalibration"
    machine_independent = True  # codes from elementwise ops and exact sums only
    seed_free = True  # no random draws, no calibration sample
    kind = "ptq"
    Config = PreCalibrationConfig

    def quantize(self, model: nn.Module, data: MethodData, ctx: RunContext) -> QuantResult:
        """Quantize every target layer from its weights alone (``data`` is not used)."""
        assert self.fmt is not None
        cfg: PreCalibrationConfig = self.config  # type: ignore[assignment]
        t0 = time.perf_counter()
        qstate: dict[str, LayerQState] = {}
        n_out = 0
        gains = _norm_gains(model, ctx) if cfg.salience == "norm-gamma" else {}
        for name, layer in ctx.adapter.target_layers(model).items():
            qstate[name], st = precalibrate_layer(layer.weight.flatten(1), self.fmt, cfg,
                                                  gains.get(name))
            write_weight(layer, qstate[name])
            n_out += st["outliers"]
        n = sum(s.codes.numel() for s in qstate.values())
        return QuantResult(model, qstate, stats={"quant_time_s": time.perf_counter() - t0,
                                                 "outlier_fraction": n_out / max(n, 1)})



def _norm_gains(model: nn.Module, ctx: RunContext) -> dict[str, torch.Tensor]:
    """The preceding norms' |gamma| per target (``salience: norm-gamma``)."""
    gains = getattr(ctx.adapter, "norm_gains", None)
    if gains is None or not getattr(ctx.adapter, "scale_edges", ()):
        raise ConfigError("methods.precalibration.salience: norm-gamma needs a family adapter "
                          "that declares which norm each layer reads (scale_edges); accepted "
                          "here: none, column-norm")
    return gains(model)
