"""The quantization-cost benchmark's GPTQ reference loop (benchmarks/quant_cost.py, issue 29):
written from the paper's Algorithm 1 in the reference's loop order, it must give the same codes
as qbench's GPTQ (compiled block sweep) with a float32 Hessian and float32 scales, or the
timing comparison would compare two different computations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from baselines.gptq import GPTQConfig, gptq_layer
from suite.primitives import WeightFormat

_spec = importlib.util.spec_from_file_location(
    "quant_cost", Path(__file__).parent.parent / "benchmarks" / "quant_cost.py")
quant_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quant_cost)  # type: ignore[union-attr]


@pytest.mark.parametrize(("shape", "bits", "g"), [((48, 256), 4, 64), ((33, 320), 3, 32),
                                                  ((40, 192), 2, 64)],
                         ids=["w4g64", "w3g32", "w2g64"])
def test_reference_loop_gives_qbench_codes(shape: tuple[int, int], bits: int, g: int) -> None:
    fmt = WeightFormat(bits, g, scale_dtype="float32")
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
    H = quant_cost.hessian(shape[1], 1024, torch.float32)
    H[5, :] = H[:, 5] = 0.0  # a dead input
    ref = quant_cost.reference_gptq(W, H, fmt)
    state, _ = gptq_layer(W, H, fmt, GPTQConfig(act_order=True, hessian_dtype="float32"))
    assert torch.equal(state.codes.float(), ref)
    plain, _ = gptq_layer(W, H, fmt, GPTQConfig(act_order=False, hessian_dtype="float32"))
    assert not torch.equal(plain.codes.float(), ref)  # the comparison can fail
