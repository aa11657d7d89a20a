"""pytest-benchmark: the GPTQ sequential pipeline on the embedded LLM, time and peak memory.

Each round runs in a fresh subprocess (so ``ru_maxrss`` is this pipeline's own peak): load
SmolLM2-135M, draw N x 512 calibration tokens from the news corpus, quantize every decoder
linear with GPTQ (W4 g64, act-order). Peak RSS, the RSS after loading and the quantization time
are attached to the benchmark's ``extra_info`` (see them with ``--benchmark-json``).
The pipeline holds one block's activations at a time, so the peak should grow with N only by
the (N x 512 x 576) block inputs/outputs, not with the number of blocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, resource, sys, time
import torch
from suite import data, models
from suite.interface import METHODS, MethodData, RunContext, Seeds
from suite.primitives import WeightFormat

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

windows = int(sys.argv[1])
src = models.resolve("smollm2-135m-instruct@gguf-q4_1")
tok = models.load_tokenizer(src)
ids = data.token_stream("abcnews-lee", tok, models.tokenizer_key(src))
calib = data.calibration_windows(ids, windows, 512, seed=0)
model = models.load_model(src)
loaded = rss_mb()
adapter = models.adapter_for(model.config.model_type)
cls = METHODS.get("gptq")
method = cls(cls.Config(act_order=True), WeightFormat(4, 64))
ctx = RunContext(torch.device("cpu"), Seeds.derive(0), adapter)
t0 = time.perf_counter()
method.quantize(model, MethodData(calib=calib), ctx)
print(json.dumps({"windows": windows, "rss_after_load_mb": loaded, "peak_rss_mb": rss_mb(),
                  "quant_s": time.perf_counter() - t0}))
"""


@pytest.mark.parametrize("windows", [16, 64])
def test_gptq_pipeline_peak_memory_embedded_llm(benchmark, windows):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def run() -> dict:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(windows)], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    out = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(out)
    print(f"\n{windows} x 512 calibration tokens: {out}")
    assert out["peak_rss_mb"] >= out["rss_after_load_mb"]
