"""The sequential block-wise calibration pipeline shared by calibration-based PTQ methods.

Following IST-DASLab/gptq (``opt_sequential`` / ``llama_sequential``, research/methods.md 2.3):
capture the inputs of block 0 for every calibration window (the model family's adapter does
it: ``catch_inputs``; for decoder LMs a catcher replaces block 0 and stops the forward pass,
``suite.models.block_inputs``), then for each block: hook the block's target linears, run the block
on all inputs to accumulate per-linear Hessians H = 2/n * sum x x^T, let the method quantize
them, and re-run the now quantized block to produce the next block's inputs, so the error of
earlier blocks shows in later Hessians. ``true_sequential`` re-collects H after each of the
adapter's sub-groups ([q,k,v] -> [o] -> [gate,up] -> [down] for LLaMA). One block's
activations are held at a time. The pipeline knows nothing about how a layer is quantized;
methods that also tune a whole block (decoupleQ's block-wise minimisation) get callbacks before
a block's first group and after its last one. Conv layers contribute im2col columns, so the
same Hessian code serves CNNs: a ``VisionAdapter`` feeds the pipeline with chunks of
calibration images and the CNN's blocks (``BlockwiseAdapter`` is the interface both adapters
implement).

Grouped convolutions (depthwise ones included: MobileNetV2's) are ``groups`` independent layer
problems: output channels of group g see only the input channels of group g, so each group has
its own H over its C_in / groups * kh * kw columns. ``collect_hessians`` returns them stacked,
(groups, cols, cols), and :func:`solve_per_group` runs a method's per-layer solver on each
group's rows with its H and joins the results (codes, scales and zeros stacked by rows), so
GPTQ and decoupleQ solve exactly the per-group problems with no change of their own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from suite.primitives import LayerQState

QuantizeGroup = Callable[[int, dict[str, nn.Linear], dict[str, torch.Tensor]], None]
BlockCallback = Callable[[int, nn.Module, list[torch.Tensor], dict[str, Any]], None]


class HessianAccumulator:
    """Running H = 2/n * sum_i x_i x_i^T over calibration sequences, as in GPTQ's
    ``add_batch``: n counts sequences, each contributing all of its tokens. ``dtype`` is the
    accumulation precision (GPTQ: float32; decoupleQ: float64). With ``groups`` > 1 (a grouped
    conv) the columns split into that many equal groups and H is one matrix per group,
    (groups, cols / groups, cols / groups)."""

    def __init__(self, cols: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, groups: int = 1) -> None:
        shape = (cols, cols) if groups == 1 else (groups, cols // groups, cols // groups)
        self.H = torch.zeros(shape, device=device, dtype=dtype)
        self.groups = groups
        self.n = 0

    def add(self, x: torch.Tensor, shared: SharedProduct | None = None,
            source: torch.Tensor | None = None) -> None:
        """Add a batch of inputs shaped (batch, tokens, cols) or (tokens, cols). With ``shared``
        and ``source`` (the layer's raw input tensor), the product is computed once for every
        layer reading that same tensor (q/k/v, gate/up) and reused, bit for bit."""
        m = x.shape[0] if x.dim() == 3 else 1
        self.H *= self.n / (self.n + m)
        self.n += m
        if shared is None or source is None or self.groups != 1:
            self.H += self._product(x)
        else:
            self.H += shared.get((source, source._version, self.n, self.H.dtype),
                                 lambda: self._product(x))

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """2/n X X^T of the batch (per group for a grouped conv), in the accumulation dtype."""
        X = x.reshape(-1, x.shape[-1]).t().to(self.H.dtype)  # (cols, batch*tokens)
        X = math.sqrt(2 / self.n) * X
        if self.groups == 1:
            return X @ X.t()
        Xg = X.reshape(self.groups, -1, X.shape[1])  # (groups, cols_g, batch*tokens)
        return Xg @ Xg.transpose(1, 2)  # (groups, cols_g, cols_g)


class SharedProduct:
    """The last batch product X X^T and what it was computed from: the raw input tensor (held,
    so its identity cannot be reused by another tensor), its in-place version counter, the
    sequence count n and the dtype. Linears that read one tensor (LLaMA's q/k/v and gate/up)
    get the same product instead of recomputing it: the accumulated H are bit-identical to
    one product per layer, at a third (q/k/v) or half (gate/up) of the cost."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    def get(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The product for ``key`` (source tensor, version, n, dtype): cached or computed."""
        same = self.key is not None and self.key[0] is key[0] and self.key[1:] == key[1:]
        if not same:
            self.key, self.value = key, compute()
        assert self.value is not None
        return self.value


def solve_per_group(W: torch.Tensor, H: torch.Tensor,
                    solve: Callable[[torch.Tensor, torch.Tensor],
                                    tuple[LayerQState, dict[str, Any]]]
                    ) -> tuple[LayerQState, dict[str, Any]]:
    """``solve(W, H)``, or, for a grouped layer's stacked H (groups, cols, cols), ``solve`` on
    each group's rows of W (rows, cols) with its H, joined: the states stacked by rows, the
    stats merged by :func:`merge_group_stats` (per-group stats under ``groups``)."""
    if H.dim() == 2:
        return solve(W, H)
    G = H.shape[0]
    rows_g = W.shape[0] // G
    parts = [solve(W[g * rows_g:(g + 1) * rows_g], H[g]) for g in range(G)]
    return stack_rows([p[0] for p in parts]), merge_group_stats([p[1] for p in parts])


def stack_rows(states: list[LayerQState]) -> LayerQState:
    """One state from row blocks with one column grid (no act-order g_idx, no outliers)."""
    first = states[0]
    if any(s.g_idx is not None or s.outliers is not None for s in states):
        raise ValueError("grouped layers: per-group act-order column orders or outlier channels "
                         "cannot be stacked; use per-channel or static groups")
    return LayerQState(torch.cat([s.codes for s in states]), torch.cat([s.scale for s in states]),
                       torch.cat([s.zero for s in states]), first.fmt,
                       extra_bits=sum(s.extra_bits for s in states), meta=dict(first.meta),
                       zero_kind=first.zero_kind)


def merge_group_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer stats of a grouped layer: ``loss`` summed over groups; the damping actually
    used, the largest; an objective trace ``loss_trace`` [(stage, value)] summed per stage, a
    group that stopped before a stage counting its last value; acceptance rates ``accept``
    averaged over the groups that reached the stage; ``groups``: how many."""
    out: dict[str, Any] = {"groups": len(stats), "loss": sum(s["loss"] for s in stats)}
    for key in ("percdamp_used", "damp_escalations"):
        if key in stats[0]:
            out[key] = max(s[key] for s in stats)
    if "loss_trace" in stats[0]:
        order = max((s["loss_trace"] for s in stats), key=len)
        out["loss_trace"] = [(name, sum(_value_at(s["loss_trace"], name) for s in stats))
                             for name, _ in order]
    if "accept" in stats[0]:
        rates: dict[str, list[float]] = {}
        for s in stats:
            for name, rate in s["accept"]:
                rates.setdefault(name, []).append(rate)
        out["accept"] = [(name, sum(r) / len(r)) for name, r in rates.items()]
    return out


def _value_at(trace: list[tuple[str, float]], name: str) -> float:
    """The value of stage ``name`` in ``trace``; for a group that stopped before it, its last
    stage's value (the one before ``stored``, which is always last)."""
    for stage, value in trace:
        if stage == name:
            return value
    return trace[-2][1] if len(trace) > 1 and trace[-1][0] == "stored" else trace[-1][1]


def input_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The columns the layer's flattened weight (rows, cols) multiplies, (batch, n, cols).

    Linear: the inputs themselves. Conv2d: the im2col patches, cols = C_in * kh * kw in the
    order of ``weight.flatten(1)``.
    """
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation,
                           padding=layer.padding, stride=layer.stride)  # (B, C_in*kh*kw, L)
        return patches.transpose(1, 2)  # (B, L, cols)
    return x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x


def block_output(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The block's hidden-state output (decoder blocks may return a tuple)."""
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def forward_all(block: nn.Module, inps: list[torch.Tensor], kwargs: dict[str, Any],
                batch: int) -> list[torch.Tensor]:
    """Run ``block`` over every input chunk, ``batch`` chunks per call; returns one output per
    chunk (a (1, seqlen, d) window, or a batch of image feature maps)."""
    outs = []
    for i in range(0, len(inps), batch):
        chunk = inps[i : i + batch]
        x = torch.cat(chunk)  # (sum of chunk sizes, ...)
        outs.extend(block_output(block, x, kwargs).split([len(c) for c in chunk]))
    return outs


@torch.no_grad()
def collect_hessians(block: nn.Module, layers: dict[str, nn.Module], inps: list[torch.Tensor],
                     kwargs: dict[str, Any], batch: int = 8,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Run ``block`` on every input with hooks on ``layers``; return each layer's H
    ((cols, cols), or (groups, cols / groups, cols / groups) for a grouped conv).

    Sequences are batched for speed; H is still the average over sequences of GPTQ's
    ``add_batch`` (each batch adds its sequences with weight m / (n + m)).
    """
    acc = {n: HessianAccumulator(m.weight[0].numel() * getattr(m, "groups", 1), m.weight.device,
                                 dtype, getattr(m, "groups", 1))
           for n, m in layers.items()}
    shared = SharedProduct()  # linears reading one input tensor share its product

    def hook(mod: nn.Module, args: tuple, _out: Any, a: HessianAccumulator) -> None:
        a.add(input_columns(mod, args[0]), shared if isinstance(mod, nn.Linear) else None,
              args[0])

    hooks = [m.register_forward_hook(lambda mod, args, o, a=acc[n]: hook(mod, args, o, a))
             for n, m in layers.items()]
    try:
        forward_all(block, inps, kwargs, batch)
    finally:
        for h in hooks:
            h.remove()
        shared.key = shared.value = None
    return {n: a.H for n, a in acc.items()}


BlockKwargs = dict[str, Any] | list[dict[str, Any]]


class BlockwiseAdapter(Protocol):
    """What the pipeline needs from a model family (``suite.models.ModelAdapter`` for decoder
    LMs, ``suite.vision.models.VisionAdapter`` for CNNs). ``catch_inputs`` returns block 0's
    inputs and the blocks' keyword arguments: one dict for all blocks, or one per block (Gemma
    2/3 alternate sliding-window and global attention, each with its own mask and rotary
    table)."""

    def catch_inputs(self, model: nn.Module, calib: torch.Tensor
                     ) -> tuple[list[torch.Tensor], BlockKwargs]: ...

    def pipeline(self, model: nn.Module, true_sequential: bool
                 ) -> list[tuple[nn.Module, list[dict[str, nn.Module]]]]: ...

    def block_norms(self, block: nn.Module) -> list[nn.Module]: ...


@torch.no_grad()
def run_sequential(model: nn.Module, adapter: BlockwiseAdapter, calib: torch.Tensor,
                   quantize_group: QuantizeGroup, true_sequential: bool = False,
                   progress: Callable[[str], None] = lambda s: None, batch: int = 8,
                   hessian_dtype: torch.dtype = torch.float32,
                   before_block: BlockCallback | None = None,
                   after_block: BlockCallback | None = None,
                   hessians: bool = True,
                   timings: dict[str, float] | None = None) -> list[torch.Tensor]:
    """Quantize every block of ``model`` in order through ``quantize_group``.

    Args:
        model: the model (modified in place by ``quantize_group``).
        adapter: where the blocks and their target layers are.
        calib: calibration windows (n, seqlen) or images (n, C, H, W).
        quantize_group: called as ``(block_index, {name: layer}, {name: H})``; must write the
            quantized weights into the layers. Names are the model-level dotted names.
        true_sequential: re-collect H after each of the adapter's sub-groups.
        progress: stage reporting.
        batch: calibration sequences per block forward (speed only; 1 = the reference's loop).
        hessian_dtype: accumulation dtype of H.
        before_block / after_block: called as ``(block_index, block, inputs, kwargs)`` before
            the block's first group is quantized / after its last one (before the block's
            outputs become the next inputs); not called for blocks without targets.
        hessians: collect each group's H (False: ``quantize_group`` gets ``{}``, for methods
            such as AWQ that read activations, not Hessians).
        timings: when given, accumulates the pipeline's own seconds into it:
            ``hessian_time_s`` (the hooked block forwards that build H) and
            ``forward_time_s`` (the quantized block's forward that makes the next inputs).

    Returns:
        The outputs of the last (quantized) block, one tensor per calibration chunk.
    """
    inps, block_kwargs = adapter.catch_inputs(model, calib)
    blocks = adapter.pipeline(model, true_sequential)
    for i, (block, groups) in enumerate(blocks):
        progress(f"block {i + 1}/{len(blocks)}")
        kwargs = block_kwargs[i] if isinstance(block_kwargs, list) else block_kwargs
        if groups and before_block is not None:
            before_block(i, block, inps, kwargs)
        for layers in groups:
            with timed(timings, "hessian_time_s"):
                H = collect_hessians(block, layers, inps, kwargs, batch, hessian_dtype) \
                    if hessians else {}
            quantize_group(i, layers, H)
        if groups and after_block is not None:
            after_block(i, block, inps, kwargs)
        with timed(timings, "forward_time_s"):
            inps = forward_all(block, inps, kwargs, batch)
    return inps


@contextmanager
def timed(timings: dict[str, float] | None, key: str) -> Iterator[None]:
    """Add the seconds of the ``with`` body to ``timings[key]`` (nothing when None)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
