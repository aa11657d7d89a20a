"""End-to-end decode tokens/s of the embedded LLM with packed low-bit linears vs float32
(issue 7). Needs the embedded model in the cache (``qbench fetch`` or a reproduce run);
skipped otherwise. ``QBENCH_KERNEL_TABLE=1`` also writes ``results/decode-cpu.csv``: per
weight format and backend, tokens/s, speedup over fp32, and the packed model's agreement with
the fake-quant model (max relative logit error, fraction of identical greedy tokens).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from suite import models
from suite.kernels import cpu, decode
from suite.primitives import PER_CHANNEL, WeightFormat

MODEL = "smollm2-135m-instruct@gguf-q4_1"
PROMPT = "The history of the city begins in the early"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def lm():  # noqa: ANN201 - (model, prompt ids)
    try:
        src = models.resolve(MODEL)
        model = models.load_model(src)
    except Exception as e:  # noqa: BLE001 - no cached model, no hub: skip, say why
        pytest.skip(f"{MODEL} unavailable: {e}")
    return model, models.load_tokenizer(src)(PROMPT, return_tensors="pt").input_ids


def _packed(model, fmt: WeightFormat, backend: str = "auto"):  # noqa: ANN001, ANN202
    layers = models.adapter_for(model.config.model_type).target_layers(model)
    qstate = decode.rtn_qstate(layers, fmt)
    packed = copy.deepcopy(model)
    decode.pack_model(packed, qstate, backend)
    return packed, qstate


def test_decode_fp32(benchmark, lm):
    model, prompt = lm
    benchmark.pedantic(decode.greedy, args=(model, prompt, NEW_TOKENS), rounds=3,
                       warmup_rounds=1)


@pytest.mark.parametrize("fmt", [WeightFormat(4, 64), WeightFormat(2, 64)],
                         ids=lambda f: f.label())
def test_decode_packed(benchmark, lm, fmt):
    model, prompt = lm
    packed, _ = _packed(model, fmt)
    benchmark.pedantic(decode.greedy, args=(packed, prompt, NEW_TOKENS), rounds=3,
                       warmup_rounds=1)


CASES = [(WeightFormat(b, g), "auto") for b in (4, 3, 2) for g in (64, PER_CHANNEL)] + [
    (WeightFormat(8, PER_CHANNEL), "auto"), (WeightFormat(4, 64), "cpp-lut"),
    (WeightFormat(4, 64), "cpp-i16"),
    (WeightFormat(4, 64), "cpp"), (WeightFormat(4, 64), "torch-int4")]


ROUNDS = 5


@pytest.mark.skipif(not os.environ.get("QBENCH_KERNEL_TABLE"), reason="QBENCH_KERNEL_TABLE=1")
def test_write_decode_table(lm):
    """Every case packed first, then timed with fp32 in interleaved rounds (a slow stretch of
    the machine hits a whole round): tokens/s is the median over rounds, the speedup the
    median of per-round ratios to fp32."""
    import pandas as pd
    from tqdm import tqdm

    model, prompt = lm
    runs, info = {"fp32/dense": model}, {}
    for fmt, backend in tqdm(CASES, desc="decode cases (pack, agreement)", unit="case"):
        packed, qstate = _packed(model, fmt, backend)
        fake = copy.deepcopy(model)
        decode.dequantize_model(fake, qstate)
        agree = decode.agreement(packed, fake, prompt, NEW_TOKENS)
        used = "+".join(sorted({m.backend for m in packed.modules()
                                if isinstance(m, cpu.PackedLinear)}))
        runs[f"{fmt.label()}/{used}"] = packed
        info[f"{fmt.label()}/{used}"] = {"logits_rel_err": agree.logits_rel_err,
                                         "same_tokens": agree.same_tokens}
        del fake
    rates = decode.interleaved_rates(runs, prompt, NEW_TOKENS, ROUNDS)
    rows = [{**row, "rounds": ROUNDS, **info.get(f"{row['format']}/{row['backend']}", {})}
            for row in decode.rate_rows(rates)]
    df = pd.DataFrame(rows)
    df.insert(0, "model", MODEL)
    df["new_tokens"], df["threads"] = NEW_TOKENS, torch.get_num_threads()
    out = Path(__file__).resolve().parent.parent / "results" / "decode-cpu.csv"
    df.to_csv(out, index=False, float_format="%.6g")
    assert (df["tokens_per_s"] > 0).all()
