"""pytest-benchmark: GPTQ time per linear layer on CPU (issue 3's budget: seconds for 4096x4096).

The Hessian is built from random inputs with per-feature scales; the solve cost depends on the
layer shape, not on how many tokens were accumulated into H, which is benchmarked separately.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from baselines.gptq import GPTQConfig, gptq_layer
from suite.primitives import WeightFormat
from suite.sequential import HessianAccumulator

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]
_spec = importlib.util.spec_from_file_location("quant_cost",
                                               Path(__file__).with_name("quant_cost.py"))
quant_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quant_cost)  # type: ignore[union-attr]


def _hessian(cols: int, tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    acc = HessianAccumulator(cols, torch.device("cpu"))
    for _ in range(tokens // 2048):
        acc.add(torch.randn(1, 2048, cols, generator=gen) * torch.linspace(0.1, 2, cols))
    return acc.H


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_gptq_layer(benchmark, shape, act_order):
    rows, cols = shape
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    H = _hessian(cols, max(2 * cols, 4096))
    fmt = WeightFormat(4, 64 if cols % 64 == 0 else -1)
    qs, _ = benchmark.pedantic(gptq_layer, (W, H, fmt, GPTQConfig(act_order=act_order)),
                               rounds=3, iterations=1, warmup_rounds=0)
    assert qs.codes_in_range()


@pytest.mark.parametrize("cols", [576, 1536])
def test_hessian_accumulation_128x512_tokens(benchmark, cols):
    x = torch.randn(1, 512, cols)

    def accumulate() -> torch.Tensor:
        acc = HessianAccumulator(cols, torch.device("cpu"))
        for _ in range(128):
            acc.add(x)
        return acc.H

    H = benchmark.pedantic(accumulate, rounds=3, iterations=1)
    assert torch.isfinite(H).all()


@pytest.mark.parametrize("shape", [*SHAPES, (4096, 11008)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["qbench", "reference-loop"])
def test_gptq_against_the_reference_loop(benchmark, shape, impl):
    """Issue 29: qbench's sweep against the reference's loop order (benchmarks/quant_cost.py) on
    the same float32 H of 8,192 tokens, W4 act-order with dynamic groups; identical codes."""
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
    H = quant_cost.hessian(shape[1], 8192, torch.float32)
    fmt = WeightFormat(4, 128 if shape[1] % 128 == 0 else 64, scale_dtype="float32")
    if impl == "qbench":
        cfg = GPTQConfig(act_order=True, hessian_dtype="float32")
        codes = benchmark.pedantic(lambda: gptq_layer(W, H, fmt, cfg)[0].codes.float(),
                                   rounds=3, iterations=1)
    else:
        codes = benchmark.pedantic(quant_cost.reference_gptq, (W, H, fmt), rounds=3,
                                   iterations=1)
    assert codes.shape == W.shape
