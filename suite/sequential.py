"""The sequential block-wise calibration pipeline shared by calibration-based PTQ methods.

Following IST-DASLab/gptq (``opt_sequential`` / ``llama_sequential``, research/methods.md 2.3):
capture the inputs of decoder block 0 for every calibration window (a catcher replaces block 0
and stops the forward pass), then for each block: hook the block's target linears, run the block
on all inputs to accumulate per-linear Hessians H = 2/n * sum x x^T, let the method quantize
them, and re-run the now quantized block to produce the next block's inputs, so the error of
earlier blocks shows in later Hessians. ``true_sequential`` re-collects H after each of the
adapter's sub-groups ([q,k,v] -> [o] -> [gate,up] -> [down] for LLaMA). One block's
activations are held at a time. The pipeline knows nothing about how a layer is quantized.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from suite.models import ModelAdapter

QuantizeGroup = Callable[[int, dict[str, nn.Linear], dict[str, torch.Tensor]], None]


class _Stop(Exception):
    """Raised by the catcher once block 0's inputs are stored."""


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module, store: list) -> None:
        super().__init__()
        self.block = block
        self.store = store

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.store.append((hidden_states, kwargs))
        raise _Stop


@torch.no_grad()
def block_inputs(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor
                 ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Inputs of decoder block 0 for each calibration window, and the block's keyword arguments
    (attention mask, position ids / embeddings), which are the same for equal-length windows."""
    blocks = adapter.block_list(model)
    store: list = []
    first = blocks[0]
    blocks[0] = _Catcher(first, store)
    device = next(model.parameters()).device
    try:
        for window in calib:
            with contextlib.suppress(_Stop):
                model(input_ids=window[None].to(device), use_cache=False)
    finally:
        blocks[0] = first
    kwargs = {k: v for k, v in store[0][1].items() if "past_key_value" not in k}
    kwargs["use_cache"] = False
    return [h for h, _ in store], kwargs


class HessianAccumulator:
    """Running H = 2/n * sum_i x_i x_i^T over calibration sequences (float32), as in GPTQ's
    ``add_batch``: n counts sequences, each contributing all of its tokens."""

    def __init__(self, cols: int, device: torch.device) -> None:
        self.H = torch.zeros(cols, cols, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs shaped (batch, tokens, cols) or (tokens, cols)."""
        m = x.shape[0] if x.dim() == 3 else 1
        X = x.reshape(-1, x.shape[-1]).t().float()  # (cols, batch*tokens)
        self.H *= self.n / (self.n + m)
        self.n += m
        X = math.sqrt(2 / self.n) * X
        self.H += X @ X.t()


def _block_out(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _forward_all(block: nn.Module, inps: list[torch.Tensor], kwargs: dict[str, Any],
                 batch: int) -> list[torch.Tensor]:
    """Run ``block`` over every (1, seqlen, d) input, ``batch`` sequences per call."""
    outs = []
    for i in range(0, len(inps), batch):
        x = torch.cat(inps[i : i + batch])  # (b, seqlen, d)
        outs.extend(_block_out(block, x, kwargs).split(1))
    return outs


@torch.no_grad()
def collect_hessians(block: nn.Module, layers: dict[str, nn.Linear], inps: list[torch.Tensor],
                     kwargs: dict[str, Any], batch: int = 8) -> dict[str, torch.Tensor]:
    """Run ``block`` on every input with hooks on ``layers``; return each layer's H.

    Sequences are batched for speed; H is still the average over sequences of GPTQ's
    ``add_batch`` (each batch adds its sequences with weight m / (n + m)).
    """
    acc = {n: HessianAccumulator(m.in_features, m.weight.device) for n, m in layers.items()}
    hooks = [m.register_forward_hook(lambda _m, args, _o, a=acc[n]: a.add(args[0]))
             for n, m in layers.items()]
    try:
        _forward_all(block, inps, kwargs, batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: a.H for n, a in acc.items()}


@torch.no_grad()
def run_sequential(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor,
                   quantize_group: QuantizeGroup, true_sequential: bool = False,
                   progress: Callable[[str], None] = lambda s: None, batch: int = 8
                   ) -> list[torch.Tensor]:
    """Quantize every block of ``model`` in order through ``quantize_group``.

    Args:
        model: the model (modified in place by ``quantize_group``).
        adapter: where the blocks and their target linears are.
        calib: calibration windows (n, seqlen).
        quantize_group: called as ``(block_index, {name: linear}, {name: H})``; must write the
            quantized weights into the linears. Names are the model-level dotted names.
        true_sequential: re-collect H after each of the adapter's sub-groups.
        progress: stage reporting.
        batch: calibration sequences per block forward (speed only; 1 = the reference's loop).

    Returns:
        The outputs of the last (quantized) block, one (1, seqlen, d) tensor per window.
    """
    inps, kwargs = block_inputs(model, adapter, calib)
    blocks = adapter.block_list(model)
    groups = adapter.linears if true_sequential else (tuple(n for g in adapter.linears for n in g),)
    for i, block in enumerate(blocks):
        progress(f"block {i + 1}/{len(blocks)}")
        for group in groups:
            layers = {f"{adapter.blocks}.{i}.{n}": block.get_submodule(n) for n in group}
            quantize_group(i, layers, collect_hessians(block, layers, inps, kwargs, batch))
        inps = _forward_all(block, inps, kwargs, batch)
    return inps
