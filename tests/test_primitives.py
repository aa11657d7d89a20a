"""Shared primitives against hand-computed cases (exact equality)."""

from __future__ import annotations

import pytest
import torch

from suite.errors import ConfigError
from suite.primitives import (
    LayerQState,
    WeightFormat,
    choose_qparams,
    dequantize,
    fake_quantize,
    pack_codes,
    quantize,
    quantize_tensor,
    unpack_codes,
)

F32 = WeightFormat(bits=2, group_size=-1, scale_dtype="float32")


def test_asym_per_channel_hand_computed():
    # Row 0: min 0 (forced), max 3 -> scale 1, zero 0.  Row 1: [-3, 0] -> scale 1, zero 3.
    w = torch.tensor([[0.4, 1.5, 2.5, 3.0], [-3.0, -1.5, -0.5, 0.0]])
    scale, zero = choose_qparams(w, F32)
    assert torch.equal(scale, torch.tensor([[1.0], [1.0]]))
    assert torch.equal(zero, torch.tensor([[0.0], [3.0]]))
    q = quantize(w, scale, zero, F32)
    # round half to even: 1.5 -> 2, 2.5 -> 2, -1.5 -> -2, -0.5 -> -0
    assert torch.equal(q, torch.tensor([[0, 2, 2, 3], [0, 1, 3, 3]], dtype=torch.uint8))
    assert torch.equal(dequantize(q, scale, zero, F32),
                       torch.tensor([[0.0, 2.0, 2.0, 3.0], [-3.0, -2.0, 0.0, 0.0]]))


def test_range_forced_to_contain_zero_and_dead_rows():
    fmt = WeightFormat(bits=3, group_size=-1, scale_dtype="float32")
    w = torch.tensor([[1.0, 2.0, 7.0], [0.0, 0.0, 0.0]])
    scale, zero = choose_qparams(w, fmt)
    assert scale[0, 0] == 1.0 and zero[0, 0] == 0.0  # xmin clamped to 0 -> [0, 7] / 7
    # dead row: [-1, 1]; zero = round(1 / (2/7)) = round(3.4999999 in float32) = 3
    assert scale[1, 0] == pytest.approx(2 / 7) and zero[1, 0] == 3.0


def test_symmetric_grid():
    fmt = WeightFormat(bits=4, group_size=-1, sym=True, scale_dtype="float32")
    w = torch.tensor([[-1.5, 0.5, 0.75, 3.0]])
    scale, zero = choose_qparams(w, fmt)
    assert scale[0, 0] == pytest.approx(6.0 / 15) and zero[0, 0] == 8.0  # (maxq+1)/2
    q = quantize(w, scale, zero, fmt)
    assert q.max() <= 15 and q.min() >= 0
    assert torch.equal(q, torch.clamp(torch.round(w / scale) + 8, 0, 15).to(torch.uint8))


def test_groups_are_contiguous_input_columns():
    fmt = WeightFormat(bits=2, group_size=2, scale_dtype="float32")
    w = torch.tensor([[0.0, 3.0, 0.0, 30.0]])
    scale, zero = choose_qparams(w, fmt)
    assert torch.equal(scale, torch.tensor([[1.0, 10.0]]))
    assert torch.equal(zero, torch.tensor([[0.0, 0.0]]))
    assert torch.equal(quantize_tensor(w, fmt).dequantize(), w)


def test_per_tensor():
    fmt = WeightFormat(bits=2, group_size=0, scale_dtype="float32")
    w = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    scale, zero = choose_qparams(w, fmt)
    assert scale.shape == (1, 1) and scale.item() == 1.0
    assert torch.equal(quantize_tensor(w, fmt).dequantize(), w)


def test_scale_rounded_to_float16_and_dequant_exact():
    fmt = WeightFormat(bits=4, group_size=8)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    qs = quantize_tensor(w, fmt)
    assert torch.equal(qs.scale, qs.scale.half().float())
    assert torch.equal(qs.dequantize(), dequantize(qs.codes, qs.scale, qs.zero, fmt))
    assert qs.codes_in_range()
    err = (qs.dequantize() - w).abs()
    assert float(err.max()) <= float(qs.scale.max()) * 0.5 + 1e-6


@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_span_full_range_each_bit_width(bits):
    fmt = WeightFormat(bits=bits, group_size=-1, scale_dtype="float32")
    w = torch.linspace(-1, 1, 1024).reshape(2, 512)
    qs = quantize_tensor(w, fmt)
    assert int(qs.codes.min()) == 0 and int(qs.codes.max()) == 2**bits - 1


def test_fake_quantize_forward_equals_quant_dequant_and_grad_is_ste():
    fmt = WeightFormat(bits=3, group_size=4, scale_dtype="float32")
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    scale, zero = choose_qparams(w.detach(), fmt)
    out = fake_quantize(w, scale, zero, fmt)
    assert torch.equal(out.detach(), quantize_tensor(w.detach(), fmt).dequantize())
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # min-max range: nothing clipped


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_unpack_roundtrip_and_density(bits):
    codes = torch.randint(0, 2**bits, (7, 13), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes.to(torch.uint8), bits)
    assert packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, (7, 13)), codes.to(torch.uint8))


def test_pack_hand_computed_lsb_first():
    packed = pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2)
    assert packed.tolist() == [0b00111001]


def test_effective_bits_formula():
    fmt = WeightFormat(bits=4, group_size=64)
    qs = quantize_tensor(torch.randn(8, 128), fmt)
    assert qs.effective_bits() == pytest.approx(4 + (16 + 4) / 64)
    sym = quantize_tensor(torch.randn(8, 128), WeightFormat(bits=4, group_size=-1, sym=True))
    assert sym.effective_bits() == pytest.approx(4 + 16 / 128)


def test_codes_out_of_range_detected():
    qs = quantize_tensor(torch.randn(2, 4), WeightFormat(bits=2, group_size=-1))
    bad = LayerQState(qs.codes + 4, qs.scale, qs.zero, qs.fmt)
    assert not bad.codes_in_range()


@pytest.mark.parametrize("kw", [{"bits": 1}, {"bits": 9}, {"bits": 4, "group_size": -2},
                                {"bits": 4, "scale_dtype": "float8"}, {"bits": True}])
def test_bad_formats_rejected(kw):
    with pytest.raises(ConfigError):
        WeightFormat(**kw)


def test_group_size_must_divide():
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_tensor(torch.randn(2, 576), WeightFormat(bits=4, group_size=128))
