"""Grouped (depthwise) convolutions in the shared calibration pipeline: one Hessian per group,
each group's rows solved with its own H, the results stacked (suite.sequential)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.gptq import GPTQConfig, gptq_layer
from methods.decoupleq import DecoupleQConfig, decoupleq_layer
from suite.primitives import WeightFormat
from suite.sequential import HessianAccumulator, collect_hessians, solve_per_group

PC2 = WeightFormat(bits=2, group_size=-1, sym=False)


def _depthwise(channels: int = 6) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)


def test_collect_hessians_gives_one_matrix_per_group():
    conv = _depthwise()
    x = torch.randn(4, 6, 5, 5)
    H = collect_hessians(conv, {"dw": conv}, [x], {}, batch=1)["dw"]
    assert H.shape == (6, 9, 9)
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 6, 9)  # (N, groups, 9)
    for g in range(6):
        Xg = cols[:, g]  # the 9 inputs of channel g's filter at every position
        assert torch.allclose(H[g], 2 * Xg.t() @ Xg / 4, rtol=1e-5, atol=1e-5)
    dense = HessianAccumulator(54, torch.device("cpu"))
    dense.add(cols.reshape(4, -1, 54))
    assert torch.allclose(torch.block_diag(*H), dense.H * torch.block_diag(
        *[torch.ones(9, 9)] * 6), atol=1e-5)  # the diagonal blocks of the dense H


@pytest.mark.parametrize("solver", ["gptq", "decoupleq"])
def test_per_group_solves_equal_separate_solves(solver):
    conv = _depthwise()
    x = torch.randn(8, 6, 5, 5)
    H = collect_hessians(conv, {"dw": conv}, [x], {}, batch=1)["dw"]
    W = conv.weight.detach().flatten(1)  # (6, 9)

    def solve(w, h):
        if solver == "gptq":
            return gptq_layer(w, h, PC2, GPTQConfig(act_order=False))
        return decoupleq_layer(w, h, PC2, DecoupleQConfig(max_iter_num=2))

    state, stats = solve_per_group(W, H, solve)
    assert state.codes.shape == (6, 9) and stats["groups"] == 6
    for g in range(6):
        alone, alone_stats = solve(W[g:g + 1], H[g])
        assert torch.equal(state.codes[g:g + 1], alone.codes)
        assert torch.equal(state.scale[g:g + 1], alone.scale)
    parts = [solve(W[g:g + 1], H[g])[1]["loss"] for g in range(6)]
    assert stats["loss"] == pytest.approx(sum(parts))
    if solver == "decoupleq":
        assert stats["loss_trace"][-1] == ("stored", pytest.approx(stats["loss"]))


def test_a_dense_layer_goes_straight_to_the_solver():
    W, H = torch.randn(4, 8), torch.eye(8)
    state, stats = solve_per_group(W, H, lambda w, h: gptq_layer(w, h, PC2, GPTQConfig()))
    assert state.codes.shape == (4, 8) and "groups" not in stats
