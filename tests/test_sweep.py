"""The compiled GPTQ block sweep (suite/kernels/sweep.cpp) against the same arithmetic as torch
ops: codes, errors, losses and the updated block bit for bit, on both grids and both roundings,
with values placed exactly on rounding ties; skipped where no compiler is present."""

from __future__ import annotations

import pytest
import torch

from suite.kernels import sweep
from suite.kernels.sweep import SweepGrid, sweep_block, sweep_block_torch

needs_kernel = pytest.mark.skipif(sweep.module() is None, reason="no C++ compiler here")


def _problem(rows: int, B: int, seed: int, float_offset: bool):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, B, generator=gen)
    X = torch.randn(4 * B, B, generator=gen)
    H = X.T @ X / len(X) + 0.01 * torch.eye(B)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    S = torch.rand(rows, B, generator=gen) * 0.5 + 0.05
    Z = (torch.randn(rows, B, generator=gen) * 0.3) if float_offset else \
        torch.randint(0, 16, (rows, B), generator=gen).float()
    if float_offset:  # put some weights exactly on ties (w - z) / s = k + 0.5
        W[:, ::7] = Z[:, ::7] + S[:, ::7] * (torch.randint(-3, 3, (rows, 1), generator=gen) + 0.5)
        S[0, 0] = 0.0  # the |s| >= 1e-15 guard
    else:
        W[:, ::7] = S[:, ::7] * (torch.randint(-3, 3, (rows, 1), generator=gen) + 0.5)
    return W, S, Z, U


GRIDS = [SweepGrid(0, 15), SweepGrid(-2, 1, True, True), SweepGrid(-4, 3, True, False)]


@needs_kernel
@pytest.mark.parametrize("grid", GRIDS, ids=["gptq", "decoupleq-half-up", "half-even"])
@pytest.mark.parametrize(("rows", "B"), [(37, 128), (64, 5), (1, 1)])
def test_kernel_is_bit_identical_to_torch(grid: SweepGrid, rows: int, B: int) -> None:
    for seed in range(3):
        W, S, Z, U = _problem(rows, B, seed, grid.float_offset)
        Wk, Wt = W.clone(), W.clone()
        got, want = sweep_block(Wk, S, Z, U, grid), sweep_block_torch(Wt, S, Z, U, grid)
        for a, b, name in zip((*got, Wk), (*want, Wt), ("Q", "E", "loss", "W1"), strict=True):
            assert torch.equal(a, b), f"{name} differs (seed {seed})"
        assert ((got[0] >= grid.lo) & (got[0] <= grid.hi)).all()


@needs_kernel
def test_a_different_rounding_is_caught() -> None:
    """The comparison can fail: ties rounded half-even instead of half-up change codes."""
    W, S, Z, U = _problem(37, 128, 0, True)
    up = sweep_block(W.clone(), S, Z, U, GRIDS[1])[0]
    even = sweep_block_torch(W.clone(), S, Z, U, SweepGrid(-2, 1, True, False))[0]
    assert not torch.equal(up, even)


def test_the_torch_path_runs_without_the_kernel() -> None:
    W, S, Z, U = _problem(8, 16, 0, False)
    a = sweep_block(W.clone(), S, Z, U, GRIDS[0], use_kernel=False)
    b = sweep_block_torch(W.clone(), S, Z, U, GRIDS[0])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
