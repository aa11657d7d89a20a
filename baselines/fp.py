"""The unquantized reference row (``fp``): returns the model untouched.

Every target layer is declared as kept in floating point, so the honesty check and the records
say plainly that nothing was quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from suite.interface import METHODS, MethodConfig, MethodData, QuantMethod, QuantResult, RunContext


@dataclass(frozen=True)
class FPConfig(MethodConfig):
    """No parameters."""


@METHODS.register("fp")
class FP(QuantMethod):
    """Floating-point reference (the weights as loaded)."""

    name = "fp"
    machine_independent = True  # no quantization: the weights as loaded
    seed_free = True  # no random draws, no calibration sample
    kind = "reference"
    Config = FPConfig

    def quantize(self, model: nn.Module, data: MethodData, ctx: RunContext) -> QuantResult:
        """Return ``model`` unchanged; all targets are declared FP."""
        fp_layers = {n: "reference row" for n in ctx.adapter.target_layers(model)}
        return QuantResult(model, qstate={}, fp_layers=fp_layers)
