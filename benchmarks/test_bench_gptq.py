"""pytest-benchmark: GPTQ time per linear layer on CPU (issue 3's budget: seconds for 4096x4096).

The Hessian is built from random inputs with per-feature scales; the solve cost depends on the
layer shape, not on how many tokens were accumulated into H, which is benchmarked separately.
"""

from __future__ import annotations

import pytest
import torch

from baselines.gptq import GPTQConfig, gptq_layer
from suite.primitives import WeightFormat
from suite.sequential import HessianAccumulator

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]


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
