"""Plumbing shared by the QAT methods (LSQ, TR scheduling) when they run as grid cells.

A QAT method builds its quantizers and its optimizer (what the paper is about); everything
else is here and identical for both: which layers are quantized (the adapter's targets at b
bits, its first and last layers at ``first_last_bits``), training on the train split with the
grid's budget through the suite's one loop (``suite.vision.train.train``), divergence as an
error the runner turns into a ``diverged`` record, and unwrapping into honest layer states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from suite.errors import ConfigError, QbenchError
from suite.interface import MethodConfig, MethodData, QuantMethod, RunContext
from suite.primitives import PER_CHANNEL, PER_TENSOR, LayerQState, WeightFormat
from suite.qat import unwrap_layers

MAX_TRACE_POINTS = 400  # trajectories longer than this are subsampled in records


class TrainingDiverged(QbenchError):
    """A loss or parameter became NaN/inf during training (the cell is ``diverged``)."""


def check_qat_format(fmt: WeightFormat | None, per_channel: bool, method: str) -> WeightFormat:
    """QAT weights are symmetric, one step size per tensor (per channel as an extension)."""
    want = PER_CHANNEL if per_channel else PER_TENSOR
    if fmt is None or fmt.group_size != want or not fmt.sym:
        label = "per-channel" if per_channel else "per-tensor"
        raise ConfigError(f"axes.group_size / axes.sym: {method} trains symmetric {label} step "
                          f"sizes; got {fmt.label() if fmt else 'none'}; accepted: group_size "
                          f"{label}, sym true")
    return fmt


class QATMethod(QuantMethod):
    """Base of the QAT methods: kind ``qat``, CNNs only, symmetric weight step sizes per
    tensor (per output channel when the config sets ``per_channel``)."""

    kind = "qat"
    domains = ("vision",)

    @classmethod
    def check_format(cls, fmt: WeightFormat, config: MethodConfig) -> None:
        """Symmetric per-tensor weights (per-channel with ``per_channel``)."""
        check_qat_format(fmt, bool(getattr(config, "per_channel", False)), cls.name)

    def qat_bits(self) -> int:
        """The cell's weight (and activation) bits, after checking its format."""
        assert self.fmt is not None
        self.check_format(self.fmt, self.config)
        return self.fmt.bits


def layer_names(model: nn.Module, ctx: RunContext) -> list[str]:
    """The adapter's first layer, its targets and its last layer, in forward order."""
    adapter: Any = ctx.adapter
    return [adapter.first, *adapter.target_layers(model), adapter.last]


@dataclass
class QATOutcome:
    """What a trained model yields: honest states of the targets and the run's statistics."""

    qstate: dict[str, LayerQState]
    stats: dict[str, Any]


def train_and_unwrap(model: nn.Module, names: list[str], data: MethodData, ctx: RunContext,
                     optimizer: torch.optim.Optimizer, schedule: str,
                     on_step: Callable[[int, float], None] | None = None) -> QATOutcome:
    """Train the wrapped ``model`` with the grid's budget, then unwrap it.

    Args:
        names: :func:`layer_names` of the model before wrapping (first, targets, last).
        optimizer: the method's optimizer; groups flagged ``fixed_lr`` are steered by the
            method, the others follow ``schedule`` (cosine / step / constant).
        on_step: called after every optimizer step.

    Raises:
        TrainingDiverged: a loss or parameter went non-finite.
    """
    from suite.vision.train import train

    if data.train_data is None or data.train_budget is None:
        raise ConfigError("fixed.vision.train: a QAT method needs the training split and budget "
                          "(vision grids only)")
    spec = data.train_budget.train_spec(schedule=schedule)
    ctx.progress("training")
    history = train(model, data.train_data, spec, ctx.seeds.train, optimizer=optimizer,
                    on_step=on_step, progress=ctx.progress, eval_each_epoch=False)
    if history.diverged:
        raise TrainingDiverged(f"training diverged at step {history.diverged_step}")
    model.eval()
    targets = set(names[1:-1])
    units = unwrap_layers(model)
    qstate = {n: u.qstate() for n, u in units.items() if n in targets}
    edges = {n: f"W{u.bits}A{u.act_bits or 'fp'}" for n, u in units.items() if n not in targets}
    return QATOutcome(qstate, {"train": history.to_dict(), "edge_layers": edges,
                               "train_steps": history.steps})


def moving_mean(values: list[float], width: int) -> list[float]:
    """Centred moving mean over ``width`` points (the window shrinks at both ends)."""
    csum = [0.0]
    for v in values:
        csum.append(csum[-1] + v)
    half, n = width // 2, len(values)
    out = []
    for t in range(n):
        lo, hi = max(0, t - half), min(n, t - half + width)
        out.append((csum[hi] - csum[lo]) / (hi - lo))
    return out


def subsample(trace: list[float], n: int = MAX_TRACE_POINTS) -> list[float]:
    """At most ``n`` evenly spaced points of ``trace`` (first and last kept)."""
    if len(trace) <= n:
        return list(trace)
    idx = torch.linspace(0, len(trace) - 1, n).round().long().tolist()
    return [trace[i] for i in idx]
