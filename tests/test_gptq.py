"""GPTQ against a slow, obviously-correct OBQ-style reference, and against RTN."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import baselines.gptq
from baselines.gptq import GPTQConfig, gptq_layer
from suite import honesty, models, runner
from suite.errors import ConfigError
from suite.interface import MethodData, RunContext, Seeds
from suite.primitives import (
    PER_CHANNEL,
    WeightFormat,
    choose_qparams,
    inverse_cholesky,
    quantize_tensor,
)


def _problem(rows: int = 12, cols: int = 64, tokens: int = 256, seed: int = 0):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(cols, tokens, generator=gen) * torch.linspace(0.2, 3, cols)[:, None]
    return W, 2 * X @ X.t() / tokens, X


def obq_reference(W, H, fmt, percdamp=0.01, perm=None):  # noqa: ANN001, ANN201
    """Column by column in float64 with an explicit inverse and its rank-one downdate:
    err = (w_c - q_c) / Hinv_cc;  W[:, c:] -= err Hinv[c, c:];
    Hinv -= Hinv[:, c] Hinv[c, :] / Hinv_cc.
    Groups are fitted at their first column on the current (updated) weights."""
    rows, cols = W.shape
    fmt_col = dataclasses.replace(fmt, group_size=PER_CHANNEL)
    if fmt.group_size <= 0:
        s, z = choose_qparams(W, fmt)
    perm = torch.arange(cols) if perm is None else perm
    W = W[:, perm].double().clone()
    H = H[perm][:, perm].double()
    Hinv = torch.linalg.inv(H + percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype))
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    for c in range(cols):
        if fmt.group_size > 0 and c % fmt.group_size == 0:
            s, z = choose_qparams(W[:, c : c + fmt.group_size].float(), fmt_col)
        code = torch.clamp(torch.round(W[:, c].float() / s[:, 0]) + z[:, 0], 0, fmt.maxq)
        q = (s[:, 0] * (code - z[:, 0])).double()
        codes[:, c] = code.to(torch.uint8)
        err = (W[:, c] - q) / Hinv[c, c]
        W[:, c:] -= err[:, None] * Hinv[c, c:][None, :]
        Hinv = Hinv - Hinv[:, c : c + 1] @ Hinv[c : c + 1, :] / Hinv[c, c]
    return codes[:, torch.argsort(perm)]


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


@pytest.mark.parametrize("blocksize", [1, 16, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_per_channel_matches_reference_with_and_without_lazy_batching(blocksize, bits):
    W, H, _ = _problem()
    fmt = WeightFormat(bits, PER_CHANNEL, scale_dtype="float32")
    qs, _ = gptq_layer(W, H, fmt, GPTQConfig(blocksize=blocksize))
    # float32 vs float64 may flip a rounding tie now and then; same codes otherwise
    assert _agree(qs.codes, obq_reference(W, H, fmt)) >= 0.995


@pytest.mark.parametrize("blocksize", [1, 16])
def test_groups_match_reference_when_group_starts_see_updated_weights(blocksize):
    W, H, _ = _problem(seed=1)
    fmt = WeightFormat(3, 16, scale_dtype="float32")
    qs, _ = gptq_layer(W, H, fmt, GPTQConfig(blocksize=blocksize))
    assert _agree(qs.codes, obq_reference(W, H, fmt)) >= 0.995
    assert qs.scale.shape == (12, 4) and qs.g_idx is None


def test_act_order_matches_reference_and_records_group_index():
    W, H, _ = _problem(seed=2)
    fmt = WeightFormat(4, 16, scale_dtype="float32")
    qs, _ = gptq_layer(W, H, fmt, GPTQConfig(blocksize=16, act_order=True))
    perm = torch.argsort(torch.diag(H), descending=True)
    assert _agree(qs.codes, obq_reference(W, H, fmt, perm=perm)) >= 0.995
    assert qs.g_idx is not None and torch.equal(qs.g_idx[perm], torch.arange(64) // 16)
    static, _ = gptq_layer(W, H, fmt, GPTQConfig(act_order=True, static_groups=True))
    assert static.g_idx is None


@pytest.mark.parametrize("fmt", [WeightFormat(3, -1), WeightFormat(3, 16), WeightFormat(2, 32)])
def test_layer_objective_below_rtn_random_inputs(fmt):
    W, H, X = _problem(rows=32, seed=3)
    qs, _ = gptq_layer(W, H, fmt, GPTQConfig())
    rtn = quantize_tensor(W, fmt)
    err = ((W - qs.dequantize()) @ X).pow(2).sum()
    err_rtn = ((W - rtn.dequantize()) @ X).pow(2).sum()
    assert err < err_rtn


def test_layer_objective_below_rtn_on_real_captured_inputs(tiny_llama):
    from suite import data, models
    from suite.sequential import collect_hessians

    src = models.resolve(f"hf:{tiny_llama}")
    model = models.load_model(src)
    adapter = models.adapter_for(model.config.model_type)
    ids = torch.tensor(models.load_tokenizer(src)(data.load_text("abcnews-lee"))["input_ids"])
    calib = data.calibration_windows(ids, 8, 64, seed=0)
    inps, kws = adapter.catch_inputs(model, calib)
    kw = kws[0]  # block 0's keyword arguments
    block = adapter.block_list(model)[0]
    layer = block.get_submodule("mlp.down_proj")
    H = collect_hessians(block, {"d": layer}, inps, kw)["d"]
    W = layer.weight.detach()
    fmt = WeightFormat(3, 32)
    gq, _ = gptq_layer(W, H, fmt, GPTQConfig())
    rq = quantize_tensor(W, fmt)

    def objective(Q):  # noqa: ANN001, ANN202 - tr((W-Q) H (W-Q)^T) = ||(W - Q) X||^2 * 2/n
        D = W - Q
        return float(torch.einsum("ij,jk,ik->", D, H, D))

    assert objective(gq.dequantize()) < objective(rq.dequantize())


def test_indefinite_hessian_escalates_damping():
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(64, 4, generator=gen)
    A = X @ X.t()  # rank 4
    H = A - 0.05 * torch.diag(A).mean() * torch.eye(64)  # slightly indefinite, as float noise
    U, damp, k = inverse_cholesky(H, 0.01, 4)
    assert k >= 1 and damp == pytest.approx(0.01 * 10**k)
    W = torch.randn(8, 64, generator=gen)
    qs, stats = gptq_layer(W, H, WeightFormat(4, -1), GPTQConfig())
    assert stats["damp_escalations"] == k and qs.codes_in_range()


def test_dead_inputs_are_zeroed():
    W, H, _ = _problem(seed=5)
    H[:, 7] = 0
    H[7, :] = 0
    qs, _ = gptq_layer(W, H, WeightFormat(4, -1), GPTQConfig())
    deq = qs.dequantize()
    assert torch.all(deq[:, 7].abs() <= qs.scale[:, 0] * 0.5 + 1e-6)


def test_hessian_dtype_is_validated():
    assert GPTQConfig().hessian_dtype == "float64"  # not the reference's float32 (module doc)
    with pytest.raises(ConfigError, match=r"^hessian_dtype: got 'float16'; accepted: float32, "
                                          r"float64$"):
        GPTQConfig(hessian_dtype="float16")
    with pytest.raises(ConfigError, match=r"^methods\.gptq\.hessian_dtype: got 'bf16'"):
        GPTQConfig.from_dict({"hessian_dtype": "bf16"}, "methods.gptq")


@pytest.mark.parametrize("fmt", [WeightFormat(4, PER_CHANNEL), WeightFormat(3, 16),
                                 WeightFormat(2, 32)], ids=["w4pc", "w3g16", "w2g32"])
@pytest.mark.parametrize("act_order", [False, True])
def test_float64_hessian_gives_the_float32_codes_on_a_well_conditioned_problem(fmt, act_order):
    """Only H's rounding changes (the sweep is float32 in both), far below the codes' spacing:
    a code may flip only where a weight sits on a rounding boundary (none did here)."""
    W, H, _ = _problem(rows=32, seed=6)
    a, sa = gptq_layer(W, H, fmt, GPTQConfig(act_order=act_order))
    b, sb = gptq_layer(W, H.double(), fmt, GPTQConfig(act_order=act_order,
                                                      hessian_dtype="float64"))
    assert _agree(a.codes, b.codes) >= 0.999  # <= 2 of 2048 codes
    assert sb["loss"] == pytest.approx(sa["loss"], rel=1e-3)


def test_float64_cholesky_needs_no_escalation_where_float32_rounding_breaks_it():
    """A rank-8 H accumulated in float64 with lambda = 1e-10 mean(diag H): positive definite in
    float64, but its float32 rounding (relative 6e-8) is far above lambda."""
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    H = X @ X.t()
    W = torch.randn(8, 64, generator=gen)
    cfg = GPTQConfig(percdamp=1e-10, max_damp_escalations=8, hessian_dtype="float32")
    _, s32 = gptq_layer(W, H, WeightFormat(4, -1), cfg)
    q64, s64 = gptq_layer(W, H, WeightFormat(4, -1),
                          dataclasses.replace(cfg, hessian_dtype="float64"))
    assert s32["damp_escalations"] >= 1 and s64["damp_escalations"] == 0
    assert q64.codes_in_range()


def _tiny(tiny_llama: Path) -> tuple[torch.nn.Module, RunContext, torch.Tensor]:
    model = models.load_model(models.resolve(f"hf:{tiny_llama}"))
    ctx = RunContext(torch.device("cpu"), Seeds.derive(0),
                     models.adapter_for(model.config.model_type))
    calib = torch.randint(0, model.config.vocab_size, (8, 32),
                          generator=torch.Generator().manual_seed(0))
    return model, ctx, calib


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pipeline_accumulates_h_in_the_configured_dtype(dtype, tiny_llama, monkeypatch):
    seen = set()

    def spy(W, H, *args):  # noqa: ANN001, ANN202
        seen.add(H.dtype)
        return gptq_layer(W, H, *args)

    monkeypatch.setattr(baselines.gptq, "gptq_layer", spy)
    model, ctx, calib = _tiny(tiny_llama)
    method = baselines.gptq.GPTQ(GPTQConfig(act_order=True, hessian_dtype=dtype),
                                 WeightFormat(4, 32))
    method.quantize(model, MethodData(calib=calib), ctx)
    assert seen == {getattr(torch, dtype)}


def test_precalibration_chain_with_float64_hessian(tiny_llama):
    """``precalibration+gptq`` (the init-qstate path, outliers on a second grid) in float64."""
    model, ctx, calib = _tiny(tiny_llama)
    fmt = WeightFormat(3, 32)
    cell = {"format": dataclasses.asdict(fmt), "chain": ["precalibration", "gptq"],
            "method_params": {"gptq": {"act_order": True, "hessian_dtype": "float64"},
                              "precalibration": {"alpha": 0.05}}}
    res = runner.quantize_chain(model, {"key_payload": {"cell": cell}}, ctx,
                                MethodData(calib=calib))
    layer = res.qstate["model.layers.0.mlp.down_proj"]
    assert layer.outliers is not None and layer.codes_in_range()
    assert honesty.check(res, ctx.adapter.target_layers(res.model), fmt, None)["passed"]


def _run_grid(tiny_llama: Path, tmp_path: Path, gptq_params: str) -> list[dict]:
    """GPTQ W4 g32 on the tiny model with 1 x 4 calibration tokens: every H has rank <= 4."""
    root = Path(__file__).resolve().parent.parent
    args = ["run", str(root / "configs" / "smoke" / "tiny.yaml"), "--out", str(tmp_path / "res"),
            "--set", f"axes.model=[hf:{tiny_llama}]", "--set", f"run.store={tmp_path / 'rec'}",
            "--set", "axes.method=[fp, gptq]", "--set", "axes.wbits=[4]",
            "--set", "axes.group_size=[32]",
            "--set", "fixed.calib={corpus: abcnews-lee, windows: 1, seqlen: 4}",
            "--set", f"methods={{gptq: {gptq_params}}}"]
    subprocess.run([sys.executable, "-m", "suite.cli", *args], cwd=tmp_path,
                   capture_output=True, text=True, timeout=600)
    recs = [json.loads(p.read_text()) for p in (tmp_path / "rec").glob("*.json")]
    return sorted(recs, key=lambda r: r["cell"]["method"])


# lambda = 1e-20 mean(diag H): below float64's rounding of a rank-4 H (relative ~1e-16), so
# H + lambda I is numerically indefinite in either Hessian dtype


def test_rank_deficient_hessian_escalates_damping_and_the_cell_finishes(tiny_llama, tmp_path):
    recs = _run_grid(tiny_llama, tmp_path, "{percdamp: 1.0e-20, max_damp_escalations: 12}")
    fp, gptq = recs
    assert fp["status"] == "ok" and gptq["status"] == "ok", gptq.get("error")
    escalated = gptq["stats"]["gptq"]["damp_escalations"]
    assert escalated, "a rank-4 Hessian with lambda = 1e-20 mean(diag H) must escalate"
    for layer in escalated.values():
        assert layer["escalations"] >= 1
        assert layer["percdamp_used"] == pytest.approx(1e-20 * 10 ** layer["escalations"])
    assert gptq["honesty"]["passed"] and math.isfinite(gptq["metrics"][0]["value"])


def test_exhausted_damping_fails_the_cell_not_the_grid(tiny_llama, tmp_path):
    fp, gptq = _run_grid(tiny_llama, tmp_path, "{percdamp: 1.0e-20, max_damp_escalations: 0}")
    assert fp["status"] == "ok"
    assert gptq["status"] == "numerical" and "CholeskyError" in gptq["error"]
