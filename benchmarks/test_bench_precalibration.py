"""pytest-benchmark: statistical pre-calibration needs no forward pass, so its cost is one pass
over the weights: the whole embedded LLM, and single 4096x4096 / 4096x11008 layers (the
Llama-2-7B attention and MLP shapes), W3 g64 with the default outlier split and KL search."""

from __future__ import annotations

import pytest
import torch

from methods.precalibration import PreCalibration, PreCalibrationConfig, precalibrate_layer
from suite import models
from suite.interface import MethodData, RunContext, Seeds
from suite.primitives import WeightFormat


@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 11008)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_precalibration_layer(benchmark, shape):
    W = torch.distributions.StudentT(3.0).sample(shape) * 0.02
    state, stats = benchmark.pedantic(precalibrate_layer,
                                      (W, WeightFormat(3, 64), PreCalibrationConfig()),
                                      rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(stats, effective_bits=state.effective_bits())
    assert state.codes_in_range()


def test_precalibration_embedded_llm(benchmark):
    src = models.resolve("smollm2-135m-instruct@gguf-q4_1")
    fmt = WeightFormat(3, 64)

    def run() -> float:
        model = models.load_model(src)
        ctx = RunContext(torch.device("cpu"), Seeds.derive(0),
                         models.adapter_for(model.config.model_type))
        res = PreCalibration(PreCalibrationConfig(), fmt).quantize(model, MethodData(), ctx)
        return res.stats["quant_time_s"]

    quant_s = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["quant_s"] = quant_s  # excludes model loading
    print(f"\npre-calibration of SmolLM2-135M (W3 g64): {quant_s:.1f} s")
