"""RTN: round-to-nearest with min-max qparams, layer by layer (research/methods.md section 1).

Reference behaviour: the ``--nearest`` path of IST-DASLab/gptq. Asymmetric min-max with the
range forced to contain 0 and an integer zero point (symmetric via ``sym`` in the format),
per-channel or groups of g contiguous input columns, round-half-to-even. Only the decoder
linears named by the model adapter are quantized; embeddings, lm_head and norms stay FP (the
adapter's ``fp_modules``, written into every record). No data is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from suite.interface import METHODS, MethodConfig, MethodData, QuantMethod, QuantResult, RunContext
from suite.primitives import quantize_tensor, write_weight


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """RTN has no parameters beyond the weight format (bits, group size, symmetry)."""


@METHODS.register("rtn")
class RTN(QuantMethod):
    """Round-to-nearest baseline."""

    name = "rtn"
    machine_independent = True  # codes from elementwise ops and exact sums only
    seed_free = True  # no random draws, no calibration sample
    kind = "ptq"
    Config = RTNConfig

    def quantize(self, model: nn.Module, data: MethodData, ctx: RunContext) -> QuantResult:
        """Quantize every target linear independently: W_hat = s * (clamp(round(W/s) + z) - z)."""
        assert self.fmt is not None
        t0 = time.perf_counter()
        qstate = {}
        for name, layer in ctx.adapter.target_layers(model).items():
            W = layer.weight.detach().flatten(1)  # (rows, cols); conv: (C_out, C_in*kh*kw)
            qstate[name] = quantize_tensor(W, self.fmt)
            write_weight(layer, qstate[name])
        stats = {"quant_time_s": time.perf_counter() - t0, "calib_tokens": 0}
        return QuantResult(model, qstate, stats=stats)
