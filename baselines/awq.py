"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", MLSys 2024), faithful to mit-han-lab/llm-awq ``run_awq`` (research/methods.md).

Per decoder block, on the FP model's activations (the reference computes each block's outputs
before it touches the block, so no quantization error propagates):

1. Activation-aware scaling (Sec. 3.2, Eq. 5). For each place where a per-input-channel scale
   folds away (the adapter's ``scale_edges``: norm -> q/k/v, v -> o, norm -> gate/up,
   up -> down), with X the input of its linears and s_X the mean |X| per input channel,
       s = s_X^alpha,  s <- s / sqrt(max(s) min(s)),
       alpha* = argmin_{alpha in {0, 1/n, ..., (n-1)/n}}
                || f(X; Q(W diag(s)) diag(s)^-1) - f(X; W) ||^2
   where f is the module that reads the linears (attention for q/k/v, the MLP for gate/up, the
   linear itself otherwise) and Q is the format's RTN. Every edge of a block is searched on
   the block's original weights; the scales are then folded together: W <- W diag(s), and the
   preceding norm's weight (and bias) or linear's output rows divided by s. Folding is exact in
   real arithmetic, so the model's function is unchanged before quantization.
2. Weight clipping (``auto_clip``). Per linear (not q / k, whose error passes q k^T), per row
   and group, the clip max_val = (1 - i/n) * max|w|, i < max_shrink * n, minimising the group's
   output error || (Q(clamp(w, +-max_val)) - w) x ||^2 averaged over a token subsample of the
   scaled inputs.
3. The folded, clipped weights are quantized by RTN of the format: the qstate's codes are
   what is evaluated (and exported with the folded norms).

Differences from the reference, each without effect on what is optimised:
- Q is the suite's shared min-max quantizer (range widened to hold 0, scales stored in the
  format's dtype), the grid every method here is evaluated on; the reference's
  ``pseudo_quantize_tensor`` does not widen the range and keeps float32 scales.
- For an edge whose f is a single linear, the loss is the identical quadratic form
  tr(D G D^T) / (tokens * rows) with D = Q(W diag(s)) diag(s)^-1 - W and G = X^T X in float64
  (``gram_loss``, default): the same objective without a forward pass per candidate.
- Blocks are run over the calibration windows in chunks (speed only); the losses are summed
  over chunks before dividing by the element count, as the reference's one big batch does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from suite.errors import ConfigError
from suite.interface import METHODS, MethodConfig, MethodData, QuantMethod, QuantResult, RunContext
from suite.models import ModelAdapter, ScaleEdge
from suite.primitives import (
    LayerQState,
    WeightFormat,
    group_range,
    group_view,
    qparams_from_range,
    quantize,
    quantize_dequantize,
    quantize_tensor,
    write_weight,
)
from suite.sequential import block_output, run_sequential


@dataclass(frozen=True)
class AWQConfig(MethodConfig):
    """Defaults are the reference's (``auto_scale`` n_grid, ``auto_clip_layer`` arguments)."""

    n_grid: int = 20           # alpha in {0, 1/20, ..., 19/20}
    clip: bool = True          # the reference's ``mse_range``
    clip_grid: int = 20        # clip factors 1 - i / clip_grid
    max_shrink: float = 0.5    # clip factors 1, 0.95, ..., 0.55
    clip_tokens: int = 512     # n_sample_token: every (tokens // 512)-th token
    gram_loss: bool = True     # single-linear edges: the same loss through X^T X
    batch: int = 8             # calibration windows per forward (speed only)

    def __post_init__(self) -> None:
        for name in ("n_grid", "clip_grid", "clip_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"methods.awq.{name}: got {getattr(self, name)}; "
                                  "accepted: a positive integer")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"methods.awq.max_shrink: got {self.max_shrink}; accepted: "
                              "0 <= max_shrink < 1")


# --------------------------------------------------------------------------- the scale search


def act_scale(xs: list[torch.Tensor]) -> torch.Tensor:
    """s_X: the mean |x| of each input channel over every calibration token, (cols,)."""
    total = sum(x.abs().reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64) for x in xs)
    n = sum(x.reshape(-1, x.shape[-1]).shape[0] for x in xs)
    return (total / n).float()


def candidate_scale(s_x: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_X^alpha (floored at 1e-4), normalised by sqrt(max * min), (cols,)."""
    s = s_x.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quant(W: torch.Tensor, s: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1: the weight the block sees when W is quantized after scaling."""
    Ws = W.float() * s[None, :]
    return (quantize_dequantize(Ws, *_minmax(Ws, fmt), fmt) / s[None, :]).to(W.dtype)


def _minmax(W: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    return qparams_from_range(*group_range(W, fmt), fmt)


@dataclass
class _Edge:
    """One scale edge of a block with what its search reads: the inputs X of its linears and
    the inspected module's calls (positional input, keyword arguments) as the block made them."""

    spec: ScaleEdge
    prev: nn.Module
    layers: list[nn.Linear]
    inspect: nn.Module
    xs: list[torch.Tensor] = field(default_factory=list)
    calls: list[tuple[torch.Tensor, dict[str, Any]]] = field(default_factory=list)


def block_edges(block: nn.Module, adapter: ModelAdapter) -> tuple[list[_Edge], list[ScaleEdge]]:
    """The adapter's scale edges in ``block``: those that fold, and those skipped (a linear
    ``prev`` narrower than its layers' input, as v -> o under grouped-query attention)."""
    if not adapter.scale_edges:
        raise ConfigError(f"method awq: the {adapter.family!r} adapter declares no scale "
                          "edges; accepted: a family whose adapter has scale_edges")
    edges, skipped = [], []
    for spec in adapter.scale_edges:
        layers = [block.get_submodule(n) for n in spec.layers]
        prev = block.get_submodule(spec.prev)
        if isinstance(prev, nn.Linear) and prev.out_features < layers[0].in_features:
            skipped.append(spec)
            continue
        inspect = block.get_submodule(spec.inspect) if spec.inspect else layers[0]
        edges.append(_Edge(spec, prev, layers, inspect))
    return edges, skipped


@torch.no_grad()
def _loss_forward(e: _Edge, org: list[torch.Tensor]) -> float:
    """Mean squared difference of the inspected module's outputs from ``org`` over all calls."""
    sq, n = 0.0, 0
    for (x, kw), o in zip(e.calls, org, strict=True):
        d = block_output(e.inspect, x, kw).float() - o.float()
        sq += float(d.pow(2).sum(dtype=torch.float64))
        n += d.numel()
    return sq / n


@torch.no_grad()
def search_scale(e: _Edge, fmt: WeightFormat, cfg: AWQConfig) -> tuple[float, torch.Tensor,
                                                                        list[float]]:
    """Eq. 5's grid search for one edge: (alpha*, s*, loss per alpha)."""
    s_x = act_scale(e.xs)
    originals = [lay.weight.data.clone() for lay in e.layers]
    gram = cfg.gram_loss and e.inspect is e.layers[0]
    if gram:
        G = _gram(e.xs)  # (cols, cols) float64
        tokens = sum(x.reshape(-1, x.shape[-1]).shape[0] for x in e.xs)
    else:
        org = [block_output(e.inspect, x, kw) for x, kw in e.calls]
    losses: list[float] = []
    try:
        for k in range(cfg.n_grid):
            s = candidate_scale(s_x, k / cfg.n_grid)
            for lay, W in zip(e.layers, originals, strict=True):
                lay.weight.data = scaled_fake_quant(W, s, fmt)
            losses.append(_loss_gram(e.layers[0].weight.data, originals[0], G, tokens)
                          if gram else _loss_forward(e, org))
    finally:
        for lay, W in zip(e.layers, originals, strict=True):
            lay.weight.data = W
    best = min(range(cfg.n_grid), key=lambda k: (losses[k], k))  # first minimum, as `<`
    return best / cfg.n_grid, candidate_scale(s_x, best / cfg.n_grid), losses


def _gram(xs: list[torch.Tensor]) -> torch.Tensor:
    """G = X^T X over every token, float64 (cols, cols)."""
    cols = xs[0].shape[-1]
    G = torch.zeros(cols, cols, dtype=torch.float64)
    for x in xs:
        X = x.reshape(-1, cols).double()
        G += X.t() @ X
    return G


def _loss_gram(Wq: torch.Tensor, W: torch.Tensor, G: torch.Tensor, tokens: int) -> float:
    """|| (Wq - W) X^T ||^2 / (tokens * rows) = tr(D G D^T) / (tokens * rows)."""
    D = Wq.double() - W.double()  # (rows, cols)
    return float(((D @ G) * D).sum()) / (tokens * D.shape[0])


def fold_scale(e: _Edge, s: torch.Tensor, norm_offset: float) -> None:
    """W <- W diag(s) for the edge's linears; the preceding norm or linear rows divided by s."""
    with torch.no_grad():
        for lay in e.layers:
            lay.weight.mul_(s[None, :].to(lay.weight.dtype))
        prev = e.prev
        if isinstance(prev, nn.Linear):
            rows = slice(prev.out_features - s.numel(), None)  # the last in_features rows
            prev.weight[rows].div_(s[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias[rows].div_(s.to(prev.bias.dtype))
            return
        w = prev.weight
        w.copy_((w + norm_offset) / s.to(w.dtype) - norm_offset)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))


def _call(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(input, other keyword arguments) of a module call; decoder blocks pass attention its
    input as ``hidden_states=``."""
    kw = dict(kwargs)
    return (args[0] if args else kw.pop("hidden_states")), kw


# --------------------------------------------------------------------------- the clip search


@torch.no_grad()
def search_clip(W: torch.Tensor, X: torch.Tensor, fmt: WeightFormat, cfg: AWQConfig
                ) -> torch.Tensor:
    """Per (row, group) max_val minimising the group's output error on tokens X (n, cols);
    returns (rows, groups)."""
    Wg = group_view(W.float(), fmt)  # (rows, groups, g)
    Xg = X.float().reshape(X.shape[0], Wg.shape[1], Wg.shape[2])  # (n, groups, g)
    org_max = Wg.abs().amax(-1)  # (rows, groups)
    best, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(int(cfg.max_shrink * cfg.clip_grid)):
        max_val = org_max * (1 - i / cfg.clip_grid)
        Q = clipped_fake_quant(W, max_val, fmt)
        D = group_view(Q, fmt) - Wg  # (rows, groups, g)
        err = torch.einsum("rgk,ngk->rgn", D, Xg).pow(2).mean(-1)  # (rows, groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, max_val, best)
    return best


def _clipped_qparams(W: torch.Tensor, max_val: torch.Tensor, fmt: WeightFormat
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams of clamp(W, -max_val, max_val) per group."""
    lo, hi = group_range(W, fmt)
    return qparams_from_range(torch.maximum(lo, -max_val), torch.minimum(hi, max_val), fmt)


def clipped_fake_quant(W: torch.Tensor, max_val: torch.Tensor, fmt: WeightFormat
                       ) -> torch.Tensor:
    """Q(clamp(W, +-max_val)): codes of values beyond the clip saturate at the grid's ends."""
    return quantize_dequantize(W.float(), *_clipped_qparams(W, max_val, fmt), fmt)


def quantize_clipped(W: torch.Tensor, max_val: torch.Tensor | None, fmt: WeightFormat
                     ) -> LayerQState:
    """The layer's final state: RTN on the clipped range (plain RTN without a clip)."""
    if max_val is None:
        return quantize_tensor(W, fmt)
    scale, zero = _clipped_qparams(W, max_val, fmt)
    return LayerQState(quantize(W, scale, zero, fmt), scale, zero, fmt)


def clip_tokens(xs: list[torch.Tensor], n_sample: int) -> torch.Tensor:
    """Every (tokens // n_sample)-th token of the inputs, (n, cols), as the reference samples."""
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    return X[:: max(1, X.shape[0] // n_sample)]


@torch.no_grad()
def awq_linear(W: torch.Tensor, X: torch.Tensor, fmt: WeightFormat, cfg: AWQConfig
               ) -> tuple[LayerQState, torch.Tensor]:
    """AWQ of one linear that nothing else reads (f = the linear, as the o / down edges): the
    scale search on inputs X (tokens, cols), the fold W diag(s), the clip search on the scaled
    inputs X diag(s)^-1 and the final quantization. Returns (qstate of W diag(s), s); the
    caller divides whatever produces X by s."""
    lay = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lay.weight.data = W.clone()
    e = _Edge(ScaleEdge("prev", ("lay",)), nn.Identity(), [lay], lay)
    e.xs = list(X[None].split(cfg.batch * 512, dim=1))
    e.calls = [(x, {}) for x in e.xs]
    _, s, _ = search_scale(e, fmt, cfg)
    Ws = W * s[None, :]
    clip = search_clip(Ws, clip_tokens(e.xs, cfg.clip_tokens) / s, fmt, cfg) if cfg.clip else None
    return quantize_clipped(Ws, clip, fmt), s


# --------------------------------------------------------------------------- one block


class _BlockAWQ:
    """AWQ for one block: capture, search every edge, fold, search clips (Sec. 3)."""

    def __init__(self, adapter: ModelAdapter, fmt: WeightFormat, cfg: AWQConfig) -> None:
        self.adapter, self.fmt, self.cfg = adapter, fmt, cfg
        self.clips: dict[str, torch.Tensor | None] = {}
        self.stats: dict[str, dict[str, Any]] = {}

    def __call__(self, i: int, block: nn.Module, inps: list[torch.Tensor],
                 kwargs: dict[str, Any]) -> None:
        prefix = f"{self.adapter.blocks}.{i}."
        edges = self._edges(block, prefix)
        feats = self._capture(block, edges, inps, kwargs)
        searched = [(e, *search_scale(e, self.fmt, self.cfg)) for e in edges]
        scale_of: dict[str, torch.Tensor] = {}
        for e, alpha, s, losses in searched:
            fold_scale(e, s, self.adapter.norm_offset)
            scale_of.update({n: s for n in e.spec.layers})
            self.stats[prefix + e.spec.prev] = {
                "alpha": alpha, "loss_alpha0": losses[0], "loss": min(losses)}
        self._clip(block, prefix, feats, scale_of)

    def _edges(self, block: nn.Module, prefix: str) -> list[_Edge]:
        """The block's foldable edges; the skipped ones are noted in the stats."""
        edges, skipped = block_edges(block, self.adapter)
        for spec in skipped:
            self.stats[prefix + spec.prev] = {"skipped": f"narrower than {spec.layers[0]}'s input"}
        return edges

    def _capture(self, block: nn.Module, edges: list[_Edge], inps: list[torch.Tensor],
                 kwargs: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """One FP forward over the calibration chunks: every target linear's inputs, and each
        edge's inspected module calls (input and keyword arguments)."""
        targets = {n: block.get_submodule(n) for g in self.adapter.linears for n in g}
        feats: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
        hooks = [m.register_forward_hook(lambda _m, a, _o, n=n: feats[n].append(a[0]))
                 for n, m in targets.items()]
        for e in edges:
            if e.inspect is not e.layers[0]:
                hooks.append(e.inspect.register_forward_pre_hook(
                    lambda _m, a, kw, e=e: e.calls.append(_call(a, kw)), with_kwargs=True))
        try:
            with torch.no_grad():
                for c in range(0, len(inps), self.cfg.batch):
                    block_output(block, torch.cat(inps[c : c + self.cfg.batch]), kwargs)
        finally:
            for h in hooks:
                h.remove()
        for e in edges:
            e.xs = feats[e.spec.layers[0]]
            if e.inspect is e.layers[0]:
                e.calls = [(x, {}) for x in e.xs]
        return feats

    def _clip(self, block: nn.Module, prefix: str, feats: dict[str, list[torch.Tensor]],
              scale_of: dict[str, torch.Tensor]) -> None:
        """The clip search of every target linear on its scaled inputs (X diag(s)^-1)."""
        for name, xs in feats.items():
            if not self.cfg.clip or name in self.adapter.no_clip:
                self.clips[prefix + name] = None
                continue
            X = clip_tokens(xs, self.cfg.clip_tokens)
            if name in scale_of:
                X = X / scale_of[name][None, :]
            W = block.get_submodule(name).weight.data
            max_val = search_clip(W, X, self.fmt, self.cfg)
            self.clips[prefix + name] = max_val
            shrink = max_val / group_view(W.float(), self.fmt).abs().amax(-1)
            self.stats.setdefault(prefix + name, {})["clip_mean"] = float(shrink.mean())


# --------------------------------------------------------------------------- the method


@METHODS.register("awq")
class AWQ(QuantMethod):
    """AWQ: activation-aware per-channel scaling folded into the model, then clipped RTN."""

    name = "awq"
    kind = "ptq"
    Config = AWQConfig
    needs_calibration = True
    domains = ("lm",)

    @classmethod
    def check_format(cls, fmt: WeightFormat, config: MethodConfig) -> None:
        """Groups or per-channel: the scales and clips are per input channel and group."""
        if fmt.group_size == 0:
            raise ConfigError("group_size: per-tensor with method awq; accepted: a group "
                              "size or per-channel")

    def quantize(self, model: nn.Module, data: MethodData, ctx: RunContext) -> QuantResult:
        """Search and fold every block's scales and clips on FP activations, then quantize."""
        assert self.fmt is not None and data.calib is not None
        cfg: AWQConfig = self.config  # type: ignore[assignment]
        t0 = time.perf_counter()
        awq = _BlockAWQ(ctx.adapter, self.fmt, cfg)
        run_sequential(model, ctx.adapter, data.calib.to(ctx.device),
                       lambda *_: None, progress=ctx.progress, batch=cfg.batch,
                       before_block=awq, hessians=False)
        qstate: dict[str, LayerQState] = {}
        for name, layer in ctx.adapter.target_layers(model).items():
            qstate[name] = quantize_clipped(layer.weight.data, awq.clips.get(name), self.fmt)
            write_weight(layer, qstate[name])
        searched = [s for s in awq.stats.values() if "alpha" in s]
        alphas = [s["alpha"] for s in searched]
        stats = {"quant_time_s": time.perf_counter() - t0,
                 "calib_tokens": int(data.calib.numel()),
                 "awq": awq.stats,
                 # the scale search's gain: chosen loss / RTN's (alpha = 0), median over edges
                 "loss_ratio_median": float(torch.tensor(
                     [s["loss"] / s["loss_alpha0"] for s in searched if s["loss_alpha0"] > 0]
                 ).median()) if searched else None,
                 "signal": {"name": "alpha (median)",
                            "value": float(torch.tensor(alphas).median()) if alphas else None}}
        return QuantResult(model, qstate, stats=stats)
