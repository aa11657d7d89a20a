"""pytest-benchmark: cost of the shared primitives on the embedded model's layer shapes.

Run with ``nox -s bench``. Speed goals live here, never in unit tests.
"""

from __future__ import annotations

import pytest
import torch

from suite.primitives import WeightFormat, pack_codes, quantize_tensor

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("group_size", [64, -1], ids=["g64", "pc"])
def test_rtn_layer(benchmark, shape, group_size):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    fmt = WeightFormat(bits=4, group_size=group_size)
    qs = benchmark(quantize_tensor, w, fmt)
    assert qs.codes_in_range()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_codes(benchmark, bits):
    codes = torch.randint(0, 2**bits, (1536, 576), dtype=torch.uint8)
    packed = benchmark(pack_codes, codes, bits)
    assert packed.numel() == 1536 * 576 * bits // 8
