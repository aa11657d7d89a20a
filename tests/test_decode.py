"""Packed-model decoding (issue 7): every quantized linear of a real (tiny) Llama is swapped
for a PackedLinear of its state, and the packed model computes what the fake-quant model
computes: logits within the kernels' error, the same greedy continuation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from suite import models
from suite.kernels import cpu, decode
from suite.primitives import WeightFormat


@pytest.fixture(scope="module")
def llama(tiny_llama: Path):  # noqa: ANN201 - a transformers model
    return models.load_model(models.resolve(f"hf:{tiny_llama}"))


@pytest.mark.parametrize("fmt", [WeightFormat(4, 32), WeightFormat(2, 64),
                                 WeightFormat(8, -1)], ids=lambda f: f.label())
def test_packed_model_follows_the_fake_quant_model(llama, fmt: WeightFormat) -> None:
    layers = models.adapter_for(llama.config.model_type).target_layers(llama)
    qstate = decode.rtn_qstate(layers, fmt)
    fake, packed = copy.deepcopy(llama), copy.deepcopy(llama)
    decode.dequantize_model(fake, qstate)
    assert decode.pack_model(packed, qstate) == len(layers) == 14  # 7 linears x 2 blocks
    swapped = [m for m in packed.modules() if isinstance(m, cpu.PackedLinear)]
    assert len(swapped) == len(layers)
    assert all(m.backend == cpu.select(m.weight_packed) for m in swapped)
    assert cpu.cpp_module() is None or all(m.backend.startswith("cpp") for m in swapped)
    prompt = torch.tensor([[1, 17, 40, 99, 5, 230, 7, 12]])
    agree = decode.agreement(packed, fake, prompt, new_tokens=8)
    assert agree.logits_rel_err < 1e-3
    assert agree.same_tokens == 1.0
    assert decode.decode_rate(packed, prompt, new_tokens=4, reps=1) > 0
    rates = decode.interleaved_rates({"fp": fake, "packed": packed}, prompt, new_tokens=2, rounds=2)
    assert list(rates) == ["fp", "packed"]
    assert all(len(v) == 2 and min(v) > 0 for v in rates.values())


def test_pack_model_names_a_non_linear(llama) -> None:
    qs = decode.rtn_qstate({"model.norm": torch.nn.Linear(64, 64)}, WeightFormat(4, 32))
    with pytest.raises(TypeError, match="'model.norm' is a LlamaRMSNorm, not a Linear"):
        decode.pack_model(copy.deepcopy(llama), qs)
