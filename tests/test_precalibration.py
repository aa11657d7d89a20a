"""Statistical pre-calibration: KL never above min-max, reduces to RTN without outliers and
clipping, needs no data, counts its side channel, and chains before GPTQ."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines.gptq import GPTQConfig, gptq_layer
from methods.precalibration import (
    FIXED_BITS,
    KeptHistogram,
    PreCalibration,
    PreCalibrationConfig,
    kl_clip,
    kl_objective,
    log_table,
    outlier_mask,
    precalibrate_layer,
    top_k_stable,
)
from suite import honesty, models, runner
from suite.config import load_grid
from suite.errors import ConfigError
from suite.interface import MethodData, RunContext, Seeds
from suite.primitives import WeightFormat, quantize_tensor


def _weights(rows: int = 32, cols: int = 128) -> torch.Tensor:
    """Heavy-tailed weights (Student-t, global RNG), where outliers and clipping matter."""
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


@pytest.mark.parametrize("fmt", [WeightFormat(3, 32), WeightFormat(2, -1), WeightFormat(4, 64)])
def test_kl_of_chosen_grid_never_above_minmax(fmt):
    torch.manual_seed(0)
    W = _weights()
    cfg = PreCalibrationConfig()
    keep = ~outlier_mask(W, fmt, cfg)
    _, kl = kl_clip(W, keep, fmt, cfg)
    minmax = kl_objective(W, keep, fmt, 1.0, cfg.kl_bins_per_level)
    assert (kl <= minmax + 1e-6).all()  # the search's cumulative sums differ in the last ulp
    assert (kl < minmax).any()  # clipping pays off somewhere on heavy tails


@pytest.mark.parametrize("spread", ["filled", "cell"])
@pytest.mark.parametrize("fmt", [WeightFormat(4, 64), WeightFormat(3, 32, sym=True),
                                 WeightFormat(2, -1)])
def test_cumulative_kl_equals_the_direct_estimator(fmt, spread):
    """The search's O(2^b)-per-group KL (cumulative counts) is the per-bin definition."""
    torch.manual_seed(2)
    W = _weights(24, 128)
    keep = ~outlier_mask(W, fmt, PreCalibrationConfig(alpha=0.03))
    hist = KeptHistogram.build(W, keep, fmt, 8)
    for p in (1.0, 0.97, 0.9, 0.81):
        direct = kl_objective(W, keep, fmt, p, 8, spread)
        torch.testing.assert_close(hist.kl(fmt, p, spread), direct, rtol=0, atol=1e-5,
                                   check_dtype=False)


def test_kl_is_exact_and_order_free():
    """The objective is an integer sum: permuting the weights inside each group (another
    summation order, as another CPU or thread split would take) gives the same integers, and
    the fixed-point table is the decimal log to the last unit."""
    import decimal

    torch.manual_seed(3)
    fmt = WeightFormat(4, 64)
    W = _weights(16, 128)
    perm = torch.cat([torch.randperm(64), 64 + torch.randperm(64)])
    keep = torch.ones_like(W, dtype=torch.bool)
    a = KeptHistogram.build(W, keep, fmt, 8).kl_fixed(fmt, 0.93)
    b = KeptHistogram.build(W[:, perm], keep, fmt, 8).kl_fixed(fmt, 0.93)
    assert a.dtype == torch.int64 and torch.equal(a, b)
    nlogn, logn = log_table(1000)
    exact = decimal.Context(prec=60).ln(decimal.Decimal(777)) * 2**FIXED_BITS
    assert abs(int(logn[777]) - exact) <= decimal.Decimal("0.5")
    assert int(nlogn[1]) == 0 and int(logn[1]) == 0


def test_outlier_ties_are_taken_in_index_order():
    score = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.5])
    assert top_k_stable(score, 2).tolist() == [1, 3]
    W = torch.tensor([[0.5, -2.0, 2.0, 1.0, 2.0, -2.0, 0.1, 0.2]])
    mask = outlier_mask(W, WeightFormat(4, 8), PreCalibrationConfig(alpha=0.25))
    assert mask.nonzero()[:, 1].tolist() == [1, 2]  # four tied |w| = 2: the first two


@pytest.mark.parametrize("fmt", [WeightFormat(3, 32), WeightFormat(4, -1, sym=True)])
def test_no_outliers_no_clipping_is_exactly_rtn(fmt):
    torch.manual_seed(1)
    W = _weights()
    state, _ = precalibrate_layer(W, fmt, PreCalibrationConfig(alpha=0.0, kl_search=False))
    rtn = quantize_tensor(W, fmt)
    assert state.outliers is None
    for a, b in ((state.codes, rtn.codes), (state.scale, rtn.scale), (state.zero, rtn.zero)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("storage", ["second-grid", "float16"])
@pytest.mark.parametrize("scope", ["matrix", "group"])
def test_outlier_channel_is_exact_counted_and_in_range(storage, scope):
    torch.manual_seed(2)
    W = _weights()
    fmt = WeightFormat(3, 32)
    cfg = PreCalibrationConfig(alpha=0.03, outlier_scope=scope, outlier_storage=storage)
    state, stats = precalibrate_layer(W, fmt, cfg)
    ch = state.outliers
    assert ch is not None and stats["outliers"] == ch.idx.numel()
    expected = round(0.03 * W.numel()) if scope == "matrix" else 32 * 4 * round(0.03 * 32)
    assert ch.idx.numel() == expected
    assert state.codes_in_range()
    deq = state.dequantize().reshape(-1)
    err_out = (deq[ch.idx] - W.reshape(-1)[ch.idx]).abs()
    if storage == "float16":
        assert torch.equal(deq[ch.idx], W.reshape(-1)[ch.idx].half().float())
    main = quantize_tensor(W, fmt).dequantize().reshape(-1)
    assert err_out.mean() < (main[ch.idx] - W.reshape(-1)[ch.idx]).abs().mean()
    base = quantize_tensor(W, fmt).effective_bits()
    assert state.effective_bits() > base  # the side channel is paid for


def test_runs_without_any_data(tiny_llama):
    src = models.resolve(f"hf:{tiny_llama}")
    model = models.load_model(src)
    adapter = models.adapter_for(model.config.model_type)
    fmt = WeightFormat(3, 32)
    res = PreCalibration(PreCalibrationConfig(), fmt).quantize(
        model, MethodData(), RunContext(torch.device("cpu"), Seeds.derive(0), adapter))
    check = honesty.check(res, adapter.target_layers(res.model), fmt)
    assert check["passed"], check["problems"]
    assert 0 < res.stats["outlier_fraction"] < 0.02


@pytest.mark.parametrize("storage", ["second-grid", "float16"])
@pytest.mark.parametrize("g", [32, -1])
def test_gptq_starts_from_the_precalibrated_grid_and_outliers(storage, g):
    torch.manual_seed(3)
    W = _weights(24, 64)
    X = torch.randn(512, 64)
    H = 2 * X.T @ X / 512
    fmt = WeightFormat(3, g)
    init, _ = precalibrate_layer(W, fmt, PreCalibrationConfig(alpha=0.05,
                                                              outlier_storage=storage))
    state, _ = gptq_layer(W, H, fmt, GPTQConfig(act_order=True), init)
    assert torch.equal(state.scale, init.scale) and torch.equal(state.zero, init.zero)
    assert state.outliers is not None and torch.equal(state.outliers.idx, init.outliers.idx)
    assert state.codes_in_range()
    D = state.dequantize() - W
    D0 = init.dequantize() - W
    assert ((D @ H) * D).sum() < ((D0 @ H) * D0).sum()  # calibration refines the start


def test_chain_requires_a_method_that_accepts_a_starting_state(tmp_path):
    base = ("name: t\naxes: {model: [hf:x], method: [%s], wbits: [3], group_size: [32], "
            "seed: [0]}\nfixed: {calib: {corpus: abcnews-lee, windows: 2, seqlen: 32}, "
            "eval: [{type: ppl, corpus: enwiki-gensim, seqlen: 32, windows: 2}]}\n"
            "run: {store: %s}\n")
    ok = tmp_path / "ok.yaml"
    ok.write_text(base % ("precalibration+gptq", tmp_path / "r"))
    assert [c.method for c in load_grid(ok).expand()] == ["precalibration+gptq"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(base % ("precalibration+rtn", tmp_path / "r"))
    with pytest.raises(ConfigError, match=r"'rtn' cannot start from a previous method's"):
        load_grid(bad)


def test_chain_refines_on_the_original_weights(tiny_llama):
    """In ``precalibration+gptq`` GPTQ sees the FP weights (not the pre-calibrated ones, which
    already lie on the grid and would pass through unchanged) and keeps the pre-calibrated grid."""
    src = models.resolve(f"hf:{tiny_llama}")
    model = models.load_model(src)
    adapter = models.adapter_for(model.config.model_type)
    ctx = RunContext(torch.device("cpu"), Seeds.derive(0), adapter)
    fmt = WeightFormat(3, 32)
    fp = {n: m.weight.detach().clone() for n, m in adapter.target_layers(model).items()}
    cell = {"format": dataclasses.asdict(fmt), "chain": ["precalibration", "gptq"],
            "method_params": {}}
    calib = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator()
                          .manual_seed(0))
    res = runner.quantize_chain(model, {"key_payload": {"cell": cell}}, ctx,
                                MethodData(calib=calib))
    pre, _ = precalibrate_layer(fp["model.layers.0.mlp.down_proj"], fmt, PreCalibrationConfig())
    chained = res.qstate["model.layers.0.mlp.down_proj"]
    assert torch.equal(chained.scale, pre.scale)  # GPTQ kept the pre-calibrated grid ...
    assert not torch.equal(chained.codes, pre.codes)  # ... and re-rounded the FP weights
    assert honesty.check(res, adapter.target_layers(res.model), fmt, None)["passed"]


def test_group_index_accounting_is_adpq_count():
    """``index_bits: group`` charges ceil(log2 g) bits per outlier and nothing else; the codes
    are unchanged, and only the accounting differs from the decodable CSR count."""
    torch.manual_seed(4)
    W, fmt = _weights(), WeightFormat(3, 32)
    csr, _ = precalibrate_layer(W, fmt, PreCalibrationConfig(alpha=0.03))
    grp, _ = precalibrate_layer(W, fmt, PreCalibrationConfig(alpha=0.03, index_bits="group"))
    assert torch.equal(csr.dequantize(), grp.dequantize())
    n, rows = csr.outliers.idx.numel(), W.shape[0]
    saved = rows * 8 + n * 7 - n * 5  # csr: ceil(log2 129) per row + 7 per outlier; group: 5
    assert (csr.effective_bits() - grp.effective_bits()) * W.numel() == pytest.approx(saved)


def test_an_option_added_later_keeps_existing_run_keys():
    """``index_bits`` came after records were published: at its default it stays out of the
    method's key dict (old keys stay valid); set to anything else it enters."""
    assert "index_bits" not in PreCalibrationConfig().to_dict()
    assert PreCalibrationConfig(index_bits="group").to_dict()["index_bits"] == "group"
    assert "kl_search" in PreCalibrationConfig().to_dict()  # ordinary fields always do


def test_norm_gamma_salience_follows_the_preceding_norm(tiny_llama):
    """``salience: norm-gamma`` weights q/k/v's columns by |gamma| of input_layernorm: a column
    whose gain is raised 1000x takes outliers it did not have; o_proj reads no norm, so its
    split is plain AdpQ's."""
    src = models.resolve(f"hf:{tiny_llama}")
    model = models.load_model(src)
    adapter = models.adapter_for(model.config.model_type)
    gains = adapter.norm_gains(model)
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    assert q in gains and o not in gains
    torch.testing.assert_close(gains[q], model.model.layers[0].input_layernorm.weight.abs())
    cfg = PreCalibrationConfig(alpha=0.02, salience="norm-gamma")
    W = model.get_submodule(q).weight.detach()
    gain = gains[q].clone()
    col = int((outlier_mask(W, WeightFormat(4, 32), cfg, gain).sum(0)).argmin())
    gain[col] *= 1000
    assert outlier_mask(W, WeightFormat(4, 32), cfg, gain)[:, col].any()
    Wo = model.get_submodule(o).weight.detach()
    assert torch.equal(outlier_mask(Wo, WeightFormat(4, 32), cfg, None),
                       outlier_mask(Wo, WeightFormat(4, 32), PreCalibrationConfig(alpha=0.02)))
