"""The shared sequential pipeline: faithful block inputs, Hessians, GPTQ end to end."""

from __future__ import annotations

import pytest
import torch

from suite import honesty, models
from suite.interface import METHODS, MethodData, RunContext, Seeds
from suite.primitives import WeightFormat
from suite.sequential import collect_hessians, run_sequential


def _load(path):  # noqa: ANN001, ANN202
    model = models.load_model(models.resolve(f"hf:{path}"))
    return model, models.adapter_for(model.config.model_type)


def _calib(n: int = 6, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(2, 500, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_unquantized_pipeline_reproduces_the_model_forward(fixture, request):
    model, adapter = _load(request.getfixturevalue(fixture))
    calib = _calib()
    captured = []
    hook = adapter.block_list(model)[-1].register_forward_hook(
        lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    hook.remove()
    outs = run_sequential(model, adapter, calib, lambda *a: None, batch=4)
    assert torch.allclose(torch.cat(outs), captured[0], atol=1e-4, rtol=1e-4)


def test_pipeline_times_its_own_stages(tiny_llama):
    """``timings`` splits the pipeline's cost (recorded by GPTQ and decoupleQ): the Hessian
    forwards once per layer group, the next-input forward once per block."""
    model, adapter = _load(tiny_llama)
    groups = []
    timings: dict[str, float] = {}
    run_sequential(model, adapter, _calib(), lambda i, layers, H: groups.append(set(H)),
                   batch=4, timings=timings)
    assert set(timings) == {"hessian_time_s", "forward_time_s"}
    assert all(v > 0 for v in timings.values()) and all(groups)
    untimed: dict[str, float] = {}
    run_sequential(model, adapter, _calib(), lambda *a: None, hessians=False, timings=untimed)
    assert untimed["forward_time_s"] > 0 and untimed["hessian_time_s"] < timings["hessian_time_s"]


def test_batched_hessian_equals_sequence_by_sequence(tiny_llama):
    model, adapter = _load(tiny_llama)
    inps, kws = adapter.catch_inputs(model, _calib())
    kw = kws[0]  # block 0's keyword arguments
    block = adapter.block_list(model)[0]
    layers = {"q": block.get_submodule("self_attn.q_proj")}
    h1 = collect_hessians(block, layers, inps, kw, batch=1)["q"]
    h4 = collect_hessians(block, layers, inps, kw, batch=4)["q"]
    assert torch.allclose(h1, h4, rtol=1e-4, atol=1e-5)
    x = torch.cat(inps)
    hidden = block.input_layernorm(x).reshape(-1, x.shape[-1])
    assert torch.allclose(h1, 2 * hidden.t() @ hidden / len(inps), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
@pytest.mark.parametrize("params", [{}, {"true_sequential": True, "act_order": True}])
def test_gptq_end_to_end_is_honest_and_beats_rtn(fixture, params, request):
    fmt = WeightFormat(2, 32)
    calib = _calib(16, 64)
    errs = {}
    for name in ("gptq", "rtn"):
        model, adapter = _load(request.getfixturevalue(fixture))
        cls = METHODS.get(name)
        cfg = cls.Config(**params) if name == "gptq" else cls.Config()
        ctx = RunContext(torch.device("cpu"), Seeds.derive(0), adapter)
        res = cls(cfg, fmt).quantize(model, MethodData(calib=calib), ctx)
        assert honesty.check(res, adapter.target_layers(model), fmt)["passed"]
        fresh, _ = _load(request.getfixturevalue(fixture))
        with torch.no_grad():
            ref = fresh(input_ids=calib, use_cache=False).logits
            out = res.model(input_ids=calib, use_cache=False).logits
        errs[name] = float((out - ref).pow(2).mean())
        if name == "gptq":
            assert res.stats["hessian_time_s"] > 0 and res.stats["forward_time_s"] > 0
    if name == "rtn":
        assert res.stats["calib_tokens"] == 0
    assert errs["gptq"] < errs["rtn"]
