"""One lazy block of the GPTQ column sweep, shared by GPTQ and decoupleQ's integer solver.

``sweep_block`` rounds the block's columns in order on a fixed per-column grid and feeds each
column's error into the columns after it through the upper Cholesky factor of H^-1
(Frantar et al. 2023, Algorithm 1, lines 4-8). The compiled kernel (``sweep.cpp``) runs it row
by row in one call; :func:`sweep_block_torch` is the same arithmetic as torch ops, one column
at a time (the methods' loop before the kernel existed), and runs where no compiler is
present. Both give bit-identical codes, errors and losses (tests/test_sweep.py), so records
and run keys do not depend on which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from suite.kernels.build import load_cpp
from suite.primitives import round_half_up

_SOURCE = Path(__file__).with_name("sweep.cpp")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


@lru_cache(maxsize=1)
def module() -> Any | None:
    """The compiled extension (``sweep_block``), or None."""
    return load_cpp("sweep", _SOURCE, CFLAGS, ["-fopenmp"])


@dataclass(frozen=True)
class SweepGrid:
    """How a column is rounded. ``float_offset`` False: GPTQ's integer-zero grid
    q = clamp(round(w / s) + z, lo, hi), w_hat = s (q - z); True: decoupleQ's float-offset grid
    q = clamp(round((w - z) / s), lo, hi), w_hat = s q + z (|s| kept >= 1e-15), rounding
    half-up when ``half_up`` (else half-even)."""

    lo: float
    hi: float
    float_offset: bool = False
    half_up: bool = False


def sweep_block(W1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, U1: torch.Tensor,
                grid: SweepGrid, loss: torch.Tensor | None = None, use_kernel: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sweep the block W1 (rows, B) in place on the per-column grid S, Z (rows, B) with U1
    (B, B), the block's part of the upper Cholesky factor of H^-1.

    Args:
        loss: a running per-row loss (rows,) to add to in place, column by column (so a sum
            over several blocks is the same float as one loop over all columns).

    Returns:
        Q (rows, B) float codes, E (rows, B) the scaled errors (w - w_hat) / U1[j, j] that the
        caller spreads over the later columns, and the loss: each row's sum_j (w - w_hat)^2 /
        U1[j, j]^2 / 2 added to ``loss`` (or to zeros).
    """
    if loss is None:
        loss = torch.zeros(W1.shape[0], dtype=W1.dtype, device=W1.device)
    mod = module() if use_kernel and W1.device.type == "cpu" else None
    if mod is None or not loss.is_contiguous():
        return sweep_block_torch(W1, S, Z, U1, grid, loss)
    W1c = W1.contiguous()
    Q, E = torch.empty_like(W1c), torch.empty_like(W1c)
    mod.sweep_block(W1c, S.contiguous(), Z.contiguous(), U1.contiguous(), Q, E, loss,
                    grid.float_offset, grid.half_up, grid.lo, grid.hi)
    if W1c.data_ptr() != W1.data_ptr():
        W1.copy_(W1c)
    return Q, E, loss


def sweep_block_torch(W1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, U1: torch.Tensor,
                      grid: SweepGrid, loss: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sweep_block` as torch ops, a column at a time (any device)."""
    Q, E = torch.empty_like(W1), torch.empty_like(W1)
    if loss is None:
        loss = torch.zeros(W1.shape[0], dtype=W1.dtype, device=W1.device)
    for j in range(W1.shape[1]):
        w = W1[:, j]
        Q[:, j] = q = _code(w, S[:, j], Z[:, j], grid)
        what = S[:, j] * q + Z[:, j] if grid.float_offset else S[:, j] * (q - Z[:, j])
        d = U1[j, j]
        loss += (w - what) ** 2 / d**2 / 2
        err = (w - what) / d
        W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
        E[:, j] = err
    return Q, E, loss


def _code(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, grid: SweepGrid) -> torch.Tensor:
    if not grid.float_offset:
        return torch.clamp(torch.round(w / s) + z, grid.lo, grid.hi)
    s = torch.where(s < 0, s.clamp(max=-1e-15), s.clamp(min=1e-15))
    x = (w - z) / s
    return (round_half_up(x) if grid.half_up else torch.round(x)).clamp(grid.lo, grid.hi)
