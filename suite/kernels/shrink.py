"""One step of decoupleQ's range-shrink search (``shrink.cpp``): the RTN codes of a layer on a
shrunk grid, the change since the previous step applied to V, and that change as CSR arrays.
Compiled once per machine; where it cannot be built, :func:`step` returns None and decoupleQ
computes the same numbers with torch ops (bit-identical: tests/test_shrink.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from suite.kernels.build import load_cpp

_SOURCE = Path(__file__).with_name("shrink.cpp")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


@lru_cache(maxsize=1)
def module() -> Any | None:
    """The compiled extension (``shrink_step``), or None."""
    return load_cpp("shrink", _SOURCE, CFLAGS, ["-fopenmp"])


def step(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g: int, lo: int, hi: int,
         half_up: bool, Q: torch.Tensor, S1: torch.Tensor, V: torch.Tensor, dV: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Codes of W (rows, cols) on the grid s, z (rows, cols / g) written into Q (float64), with
    dV = S1 (Q_new - Q_old) into ``dV`` and added to V, all in place; returns dV's CSR arrays
    (crow, col, val), or None where the kernel is unavailable (nothing is touched then)."""
    mod = module() if W.device.type == "cpu" else None
    if mod is None:
        return None
    crow, col, val = mod.shrink_step(W.contiguous(), s.contiguous(), z.contiguous(), g,
                                     float(lo), float(hi), half_up, Q, S1, V, dV)
    return crow, col, val
