"""decoupleQ's compiled shrink-search step (suite/kernels/shrink.cpp) against the torch ops it
replaces: the per-row errors of every shrink p, and hence the chosen ranges, bit for bit;
skipped where no compiler is present."""

from __future__ import annotations

import pytest
import torch

from methods import decoupleq
from methods.decoupleq import DecoupleQConfig, make_grid, shrink_errors, shrink_search
from suite.kernels import shrink
from suite.primitives import WeightFormat

needs_kernel = pytest.mark.skipif(shrink.module() is None, reason="no C++ compiler here")


def _grid(rows: int, cols: int, fmt: WeightFormat, rounding: str = "half-up"):
    gen = torch.Generator().manual_seed(rows + cols)
    W = torch.randn(rows, cols, generator=gen) * 0.02
    W[0] = 0.0  # a dead row: the +-1 range
    X = torch.randn(2 * cols, cols, generator=gen) * torch.linspace(0.1, 2, cols)
    return make_grid(W, X.T.double() @ X.double() / len(X), fmt,
                     DecoupleQConfig(rounding=rounding))


CASES = [(WeightFormat(2, 64), "half-up"), (WeightFormat(3, -1), "half-even"),
         (WeightFormat(4, 32, sym=True), "half-up")]


@needs_kernel
@pytest.mark.parametrize(("fmt", "rounding"), CASES, ids=lambda c: str(c))
def test_kernel_errors_equal_torch_errors(monkeypatch: pytest.MonkeyPatch, fmt: WeightFormat,
                                          rounding: str) -> None:
    grid = _grid(48, 128, fmt, rounding)
    ps = [1 - i / 50 for i in range(40)]
    fast = shrink_errors(grid, ps)
    monkeypatch.setattr(decoupleq.shrink_kernel, "step", lambda *a: None)
    slow = shrink_errors(grid, ps)
    assert torch.equal(fast, slow)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(shrink_search(grid, 50, 0.8),
                                                 _torch_search(monkeypatch, grid), strict=True))


def _torch_search(monkeypatch: pytest.MonkeyPatch, grid: decoupleq.Grid):
    monkeypatch.setattr(decoupleq.shrink_kernel, "step", lambda *a: None)
    return shrink_search(grid, 50, 0.8)


@needs_kernel
def test_a_wrong_clip_bound_in_the_step_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: the kernel clipping codes at beta - 1."""
    grid = _grid(48, 128, WeightFormat(2, 64))
    ps = [1 - i / 50 for i in range(40)]
    real = shrink.step
    monkeypatch.setattr(decoupleq.shrink_kernel, "step",
                        lambda W, s, z, g, lo, hi, *rest: real(W, s, z, g, lo, hi - 1, *rest))
    wrong = shrink_errors(grid, ps)
    monkeypatch.setattr(decoupleq.shrink_kernel, "step", lambda *a: None)
    assert not torch.equal(wrong, shrink_errors(grid, ps))
