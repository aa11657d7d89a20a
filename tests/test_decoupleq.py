"""decoupleQ: the layer objective only goes down, the float step is the exact least-squares
minimiser, the final objective matches the reference implementation's, codes stay in range,
and the block-wise stage trains only the floats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from methods.decoupleq import (
    DecoupleQConfig,
    decoupleq_layer,
    make_grid,
    minimize_block,
    minmax_floats,
    rtn_codes,
    shrink_errors,
    shrink_search,
    solve_floats,
    solve_layer,
    to_state,
)
from suite.errors import ConfigError
from suite.primitives import LayerQState, WeightFormat, round_half_up, signed_grid
from suite.sequential import collect_hessians

GOLDEN = Path(__file__).parent / "golden" / "decoupleq_reference_loss.json"


def problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The golden file's problem: W = 0.02 randn, H = X^T X / n with per-feature scales."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen) * 0.02
    X = torch.randn(4 * cols, cols, generator=gen) * torch.linspace(0.1, 2, cols)
    return W, (X.T.double() @ X.double()) / len(X)


def test_round_half_up_breaks_ties_upwards_only():
    x = torch.tensor([0.5, 1.5, -0.5, -1.5, 2.5, 0.49999997, -2.4, 1.2])
    assert round_half_up(x).tolist() == [1, 2, 0, -1, 3, 0, -2, 1]
    assert signed_grid(2) == (-2, 1) and signed_grid(3) == (-4, 3)


@pytest.mark.parametrize("bits,g", [(2, 16), (3, -1), (4, 8)])
def test_incremental_shrink_errors_equal_direct_evaluation(bits, g):
    W, H = problem(24, 64, seed=1)
    grid = make_grid(W, H, WeightFormat(bits, g), DecoupleQConfig())
    ps = [1 - i / 200 for i in range(160)]
    direct = []
    for p in ps:
        s, z = minmax_floats(grid, p)
        direct.append(grid.error(grid.dequant(rtn_codes(grid, s, z), s, z)).double())
    direct = torch.stack(direct)  # (n_p, rows)
    fast = shrink_errors(grid, ps)
    assert torch.allclose(fast, direct, rtol=1e-5)
    assert torch.equal(fast.argmin(0), direct.argmin(0))
    assert (direct.argmin(0) > 0).any()  # shrinking pays off for some rows


@pytest.mark.parametrize("g,round_fn", [(-1, "gptq"), (16, "gptq"), (16, "train")])
def test_row_error_never_increases_and_beats_gptq_init(g, round_fn):
    W, H = problem(40, 64)
    cfg = DecoupleQConfig(round_fn=round_fn, iters_before_round=10)
    sol = solve_layer(make_grid(W, H, WeightFormat(2, g), cfg), cfg)
    names = [n for n, _ in sol.trace]
    assert names[:2] == ["minmax", "gptq-init"] and len(names) >= 4
    errs = torch.stack([e for _, e in sol.trace])  # (stages, rows)
    assert (errs[1:] <= errs[:-1]).all()  # per row, stage after stage
    assert (sol.err <= errs[1]).all()
    assert sol.err.sum() < 0.9 * errs[1].sum()  # the alternation does real work here


@pytest.mark.parametrize("g,sym", [(-1, False), (16, False), (16, True)])
def test_float_step_is_the_exact_weighted_least_squares_minimiser(g, sym):
    W, H = problem(12, 64, seed=3)
    fmt = WeightFormat(3, g, sym=sym)
    grid = make_grid(W, H, fmt, DecoupleQConfig())
    s0, z0 = shrink_search(grid, 200, 0.8)
    Q = rtn_codes(grid, s0, z0)
    s, z = solve_floats(grid, Q, chunk_mb=1)  # several row chunks
    L = torch.linalg.cholesky(grid.H64)  # H = L L^T: ||(M x - w) L||^2 is the objective
    G, gs = grid.groups, grid.g
    for r in range(W.shape[0]):
        mask = torch.zeros(G, W.shape[1], dtype=torch.float64)
        for k in range(G):
            mask[k, k * gs : (k + 1) * gs] = 1
        M = torch.cat([mask * Q[r].double(), mask] if not sym else [mask * Q[r].double()])
        x = torch.linalg.lstsq((M @ L).T, (W[r].double() @ L)[:, None]).solution[:, 0]
        assert torch.allclose(s[r].double(), x[:G], rtol=1e-4, atol=1e-7)
        if not sym:
            assert torch.allclose(z[r].double(), x[G:], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", json.loads(GOLDEN.read_text())["cases"],
                         ids=lambda c: f"{c['rows']}x{c['cols']}-w{c['bits']}g{c['group_size']}"
                                       f"-{c['round_fn']}")
def test_final_objective_matches_reference_implementation(case):
    tol = json.loads(GOLDEN.read_text())["rel_tol"]
    W, H = problem(case["rows"], case["cols"])
    fmt = WeightFormat(case["bits"], case["group_size"], scale_dtype="float32")
    cfg = DecoupleQConfig(round_fn=case["round_fn"], iters_before_round=case["iters_before_round"])
    _, stats = decoupleq_layer(W, H, fmt, cfg)
    assert stats["loss"] == pytest.approx(case["loss"], rel=tol)


def test_state_codes_in_range_and_dequantize_to_the_solution():
    W, H = problem(16, 64)
    fmt = WeightFormat(2, 16)
    grid = make_grid(W, H, fmt, DecoupleQConfig())
    sol = solve_layer(grid, DecoupleQConfig())
    state = to_state(grid, sol.Q, sol.s, sol.z, fmt)
    assert state.codes.dtype == torch.uint8 and state.codes_in_range()
    assert state.zero_kind == "float"
    expected = state.scale.repeat_interleave(16, 1) * sol.Q + state.zero.repeat_interleave(16, 1)
    assert torch.equal(state.dequantize(), expected)
    assert state.effective_bits() == pytest.approx(2 + 32 / 16)  # fp16 scale and offset


def test_config_rejects_unknown_choices_in_one_line():
    with pytest.raises(ConfigError, match=r"^round_fn: got 'adam'; accepted: gptq, train$"):
        DecoupleQConfig(round_fn="adam")
    with pytest.raises(ConfigError, match="rounding"):
        DecoupleQConfig.from_dict({"rounding": "stochastic"}, "methods.decoupleq")


def test_conv_layer_uses_im2col_hessian():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 8, 8)
    H = collect_hessians(conv, {"c": conv}, [x[:1], x[1:]], {}, dtype=torch.float64)["c"]
    cols = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 36).double()
    assert torch.allclose(H, 2 / 2 * cols.T @ cols, rtol=1e-6)  # 2/n_images * sum x x^T
    state, stats = decoupleq_layer(conv.weight.flatten(1), H, WeightFormat(2, 9), DecoupleQConfig())
    assert state.codes.shape == (6, 36) and state.codes_in_range()
    assert stats["loss_trace"][-1][1] <= stats["loss_trace"][1][1] * (1 + 1e-6)


class _Block(nn.Module):
    """A residual MLP block with a LayerNorm, the shape of a decoder block's MLP half."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


def test_blockwise_minimisation_trains_floats_only_and_lowers_block_loss():
    torch.manual_seed(0)
    block = _Block()
    inps = [torch.randn(1, 16, 32) for _ in range(8)]
    with torch.no_grad():
        targets = [block(x) for x in inps]
    layers = {"up": block.up, "down": block.down}
    fmt = WeightFormat(2, -1, scale_dtype="float32")
    states: dict[str, LayerQState] = {}
    for name, layer in layers.items():
        H = collect_hessians(block, {name: layer}, inps, {}, dtype=torch.float64)[name]
        states[name], _ = decoupleq_layer(layer.weight, H, fmt, DecoupleQConfig())
        with torch.no_grad():
            layer.weight.copy_(states[name].dequantize())
    codes = {n: s.codes.clone() for n, s in states.items()}
    bias = block.up.bias.detach().clone()
    cfg = DecoupleQConfig(blockwise_lr=1e-3, blockwise_epochs=5)
    losses = minimize_block(block, layers, states, inps, targets, {}, ("norm",), cfg)
    assert losses[-1] < losses[0]
    for name, layer in layers.items():
        assert torch.equal(states[name].codes, codes[name])
        assert torch.equal(layer.weight, states[name].dequantize())
        assert not hasattr(layer, "parametrizations")
    assert torch.equal(block.up.bias, bias)  # train_bias off
    assert all(p.requires_grad for p in block.parameters())  # flags restored
