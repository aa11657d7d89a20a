"""The fused scalar-step fake quantizer of ``suite.qat`` (``fakequant.cpp``), compiled once per
machine; None where it cannot be built, and ``suite.qat`` then runs the same arithmetic
through autograd (bit-identical, slower: tests/test_qat.py checks both against each other).

``-ffp-contract=off`` is what keeps it bit-identical: no a*b+c may become an FMA.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from suite.kernels.build import load_cpp

_SOURCE = Path(__file__).with_name("fakequant.cpp")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


@lru_cache(maxsize=1)
def module() -> Any | None:
    """The compiled extension (``forward``, ``backward``), or None."""
    return load_cpp("fakequant", _SOURCE, CFLAGS, ["-fopenmp"])
