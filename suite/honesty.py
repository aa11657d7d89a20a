"""The honesty invariant, checked on every cell (DESIGN.md).

For every quantized layer the evaluated weight must equal ``dequantize(qstate)`` exactly, every
code must lie in the declared integer range, and the layer's format must be the cell's format.
Every adapter target must be either quantized or declared FP by the method. Effective bits are
computed from ``qstate`` only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from suite.interface import QuantResult
from suite.primitives import WeightFormat


def weight_fingerprints(targets: dict[str, nn.Module]) -> dict[str, tuple[float, float, float]]:
    """Cheap on-device fingerprints of the target weights, to detect layers a method left as is."""
    out = {}
    for name, layer in targets.items():
        w = layer.weight.detach().double().reshape(-1)
        ramp = torch.arange(w.numel(), device=w.device, dtype=torch.float64).remainder_(9973)
        out[name] = (float(w.sum()), float((w * w).sum()), float((w * ramp).sum()))
    return out


def check(
    result: QuantResult,
    targets: dict[str, nn.Module],
    fmt: WeightFormat | None,
    before: dict[str, tuple[float, float, float]] | None = None,
) -> dict[str, Any]:
    """Run the honesty check; returns the JSON-able block stored in the record.

    Args:
        result: what the method returned (its model must own ``targets``).
        targets: the adapter's target layers of the evaluated model.
        fmt: the cell's declared format (None for the reference row).
        before: fingerprints of the weights before quantization (optional).
    """
    layers: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, layer in targets.items():
        if name in result.qstate:
            layers[name] = _check_layer(name, layer, result.qstate[name], fmt, problems)
        elif name in result.fp_layers:
            layers[name] = {"status": "fp", "reason": result.fp_layers[name]}
        else:
            problems.append(f"{name}: left in floating point without being declared")
            layers[name] = {"status": "undeclared-fp"}
    for name in sorted(set(result.qstate) - set(targets)):
        problems.append(f"{name}: qstate names a layer that is not a quantization target")
    summary = _summary(layers, result, before, targets)
    return {"passed": not problems, "problems": problems[:20], "n_problems": len(problems),
            **summary, "layers": layers}


def _check_layer(name: str, layer: nn.Module, qs: Any, fmt: WeightFormat | None,
                 problems: list[str]) -> dict[str, Any]:
    w_eval = layer.weight.detach()
    w_q = qs.dequantize().reshape(w_eval.shape).to(device=w_eval.device, dtype=w_eval.dtype)
    equal = bool(torch.equal(w_q, w_eval))
    in_range = qs.codes_in_range()
    fmt_ok = fmt is not None and (qs.fmt.bits, qs.fmt.group_size, qs.fmt.sym) == (
        fmt.bits, fmt.group_size, fmt.sym)
    if not equal:
        diff = float((w_q.float() - w_eval.float()).abs().max())
        problems.append(f"{name}: evaluated weight != dequantize(qstate) (max |diff| {diff:.3g})")
    if not in_range:
        problems.append(f"{name}: codes outside [0, {qs.fmt.maxq}]")
    if not fmt_ok:
        problems.append(f"{name}: layer format {qs.fmt.label()} != cell format "
                        f"{fmt.label() if fmt else 'fp'}")
    return {"status": "quantized", "weight_equals_dequant": equal, "codes_in_range": in_range,
            "format_matches": fmt_ok, "effective_bits": qs.effective_bits(),
            "numel": int(qs.codes.numel())}


def _summary(layers: dict[str, dict[str, Any]], result: QuantResult,
             before: dict[str, tuple[float, float, float]] | None,
             targets: dict[str, nn.Module]) -> dict[str, Any]:
    quantized = [v for v in layers.values() if v["status"] == "quantized"]
    n = sum(v["numel"] for v in quantized)
    eff = sum(v["effective_bits"] * v["numel"] for v in quantized) / n if n else None
    unchanged = None
    if before is not None and quantized:
        after = weight_fingerprints({k: targets[k] for k in result.qstate if k in targets})
        unchanged = sum(after[k] == before[k] for k in after)
    return {"n_targets": len(layers), "n_quantized": len(quantized),
            "n_fp": sum(v["status"] == "fp" for v in layers.values()),
            "effective_bits": eff, "quantized_layers_unchanged": unchanged}
