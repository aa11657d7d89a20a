"""Methods that declare ``machine_independent`` give the same codes on any thread count.

A data-free method's codes must not depend on the machine: every declared method quantizes a
model in two processes, at 1 and at 2 threads, and the hash of its whole qstate (codes,
scales, zeros, outlier positions and values) must be equal. The default run uses a one-block
LLaMA at the embedded model's widths (576 / 1536, large enough for torch to split work over
threads) with weights on a 16-level grid per 32 columns, so ties are as common as in the
shipped GGUF weights; the slow run uses the embedded model itself (every layer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from suite.interface import METHODS

ROOT = Path(__file__).resolve().parent.parent
DECLARED = [n for n, c in METHODS.items() if c.machine_independent and c.kind != "reference"
            and "lm" in c.domains]
FORMATS = [(4, 64), (3, -1)]
SCRIPT = """
import hashlib, json, sys
import torch
threads, model_id, cases = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(threads)
from suite import models
from suite.interface import METHODS, MethodData, RunContext, Seeds
from suite.primitives import WeightFormat
src = models.resolve(model_id)
out = {"threads": torch.get_num_threads()}
for name, bits, group in cases:
    model = models.load_model(src)
    adapter = models.adapter_for(model.config.model_type)
    cls = METHODS.get(name)
    ctx = RunContext(torch.device("cpu"), Seeds.derive(0), adapter)
    res = cls(cls.Config(), WeightFormat(bits, group)).quantize(model, MethodData(), ctx)
    h = hashlib.sha256()
    for key in sorted(res.qstate):
        s = res.qstate[key]
        parts = [s.codes, s.scale, s.zero]
        if s.outliers is not None:
            o = s.outliers
            parts += [t for t in (o.idx, o.codes, o.values, o.scale, o.zero) if t is not None]
        for t in parts:
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    out[f"{name} w{bits} g{group}"] = h.hexdigest()
print(json.dumps(out))
"""


def _qstate_hashes(threads: int, model_id: str, cases: list[tuple[str, int, int]]
                   ) -> dict[str, str]:
    """The qstate hash of every (method, bits, group) case, quantized at ``threads``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(threads), model_id,
                           json.dumps(cases)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("threads") == threads
    return out


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One LLaMA block at SmolLM2's widths; weights on 16 levels per 32 columns (Q4_1-like)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers[0].modules():
            if isinstance(layer, torch.nn.Linear):
                w = layer.weight.view(layer.weight.shape[0], -1, 32)
                lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
                step = (hi - lo) / 15
                w.copy_(lo + torch.round((w - lo) / step) * step)
    path = tmp_path_factory.mktemp("wide-llama")
    model.save_pretrained(path)
    return path


def test_declared_methods_give_the_same_codes_on_1_and_2_threads(wide_llama: Path) -> None:
    cases = [(name, bits, group) for name in DECLARED for bits, group in FORMATS]
    one, two = (_qstate_hashes(t, f"hf:{wide_llama}", cases) for t in (1, 2))
    assert len(one) == len(cases) and one == two


def test_rtn_and_precalibration_are_declared() -> None:
    assert {"rtn", "precalibration"} <= set(DECLARED)


@pytest.mark.slow
def test_embedded_model_codes_are_thread_independent() -> None:
    cases = [("rtn", 4, 64), ("precalibration", 4, 64), ("precalibration", 3, -1)]
    model_id = "smollm2-135m-instruct@gguf-q4_1"
    assert _qstate_hashes(1, model_id, cases) == _qstate_hashes(2, model_id, cases)
