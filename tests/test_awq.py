"""AWQ's pieces on problems whose answer is known: the Gram-form loss is the forward loss,
alpha = 0 is RTN, the scale search protects salient input channels (and stops doing so when
the activation statistics are taken away), the clip search never loses to min-max, and bad
settings are one-line errors. Folding per model family is checked in ``test_families.py``;
the side-by-side check against mit-han-lab/llm-awq is ``benchmarks/awq_parity.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baselines.awq import (
    AWQ,
    AWQConfig,
    _Edge,
    _gram,
    _loss_forward,
    _loss_gram,
    awq_linear,
    candidate_scale,
    clip_tokens,
    clipped_fake_quant,
    quantize_clipped,
    scaled_fake_quant,
    search_clip,
    search_scale,
)
from suite.errors import ConfigError
from suite.models import ScaleEdge
from suite.primitives import PER_CHANNEL, WeightFormat, group_view, quantize_tensor

FMT = WeightFormat(3, 16)


def _salient_problem(seed: int = 0, salient: int = 4) -> tuple[nn.Linear, list[torch.Tensor]]:
    """A linear (48 x 64) whose inputs have ``salient`` channels 30x larger than the rest (the
    activation outliers AWQ's paper is about), in 3 chunks of (2, 40, 64)."""
    g = torch.Generator().manual_seed(seed)
    lay = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lay.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
    amp = torch.ones(64)
    amp[:salient] = 30.0
    xs = [torch.randn(2, 40, 64, generator=g) * amp for _ in range(3)]
    return lay, xs


def _edge(lay: nn.Linear, xs: list[torch.Tensor]) -> _Edge:
    e = _Edge(ScaleEdge("prev", ("lay",)), nn.Identity(), [lay], lay)
    e.xs, e.calls = xs, [(x, {}) for x in xs]
    return e


def test_gram_loss_is_the_forward_loss() -> None:
    lay, xs = _salient_problem()
    e = _edge(lay, xs)
    W = lay.weight.data.clone()
    G, tokens = _gram(xs), sum(x.shape[0] * x.shape[1] for x in xs)
    org = [lay(x) for x in xs]
    for alpha in (0.0, 0.35, 0.95):
        Wq = scaled_fake_quant(W, candidate_scale(xs[0].abs().mean((0, 1)), alpha), FMT)
        lay.weight.data = Wq
        fwd = _loss_forward(e, org)
        lay.weight.data = W
        # float32 forward against the float64 quadratic form: measured 2e-7 relative
        assert _loss_gram(Wq, W, G, tokens) == pytest.approx(fwd, rel=1e-5)


def test_alpha_zero_is_rtn() -> None:
    lay, xs = _salient_problem()
    s = candidate_scale(torch.rand(64) + 0.1, 0.0)
    assert torch.equal(s, torch.ones(64))
    rtn = quantize_tensor(lay.weight.data, FMT).dequantize()
    assert torch.equal(scaled_fake_quant(lay.weight.data, s, FMT), rtn)


def test_the_search_protects_salient_channels() -> None:
    """Eq. 5 on inputs with 4 large channels: alpha* > 0, those channels are scaled up, and
    the output error falls well below RTN's (alpha = 0). Without the activation statistics
    (the fault: s_X = 1 everywhere) every alpha is RTN and nothing is gained."""
    lay, xs = _salient_problem()
    cfg = AWQConfig(gram_loss=False)
    alpha, s, losses = search_scale(_edge(lay, xs), FMT, cfg)
    assert alpha > 0 and min(losses) == losses[round(alpha * cfg.n_grid)]
    assert s[:4].min() > 1 > s[4:].max()
    assert min(losses) < 0.8 * losses[0]
    flat = [x.sign() for x in xs]  # |x| = 1 on every channel: s_X carries no information
    _, _, losses_flat = search_scale(_edge(lay, flat), FMT, cfg)
    assert losses_flat == pytest.approx([losses_flat[0]] * cfg.n_grid, rel=1e-6)


def test_the_search_restores_the_weights() -> None:
    lay, xs = _salient_problem()
    W = lay.weight.data.clone()
    search_scale(_edge(lay, xs), FMT, AWQConfig())
    assert torch.equal(lay.weight.data, W)


@pytest.mark.parametrize("fmt", [FMT, WeightFormat(4, PER_CHANNEL)])
def test_clip_never_loses_to_minmax_and_is_honest(fmt: WeightFormat) -> None:
    """Per (row, group), the chosen clip's output error is at most min-max's (shrink 1 is a
    candidate); heavy-tailed weights get clipped somewhere; the state's codes are in range and
    dequantize to the clipped fake-quantized weight."""
    g = torch.Generator().manual_seed(1)
    W = torch.distributions.StudentT(2.0).sample((32, 64)) * 0.02
    X = clip_tokens([torch.randn(4, 200, 64, generator=g)], 512)
    max_val = search_clip(W, X, fmt, AWQConfig())
    Wg, Xg = group_view(W, fmt), X.reshape(X.shape[0], *group_view(W, fmt).shape[1:])

    def err(Q: torch.Tensor) -> torch.Tensor:
        return torch.einsum("rgk,ngk->rgn", group_view(Q, fmt) - Wg, Xg).pow(2).mean(-1)

    org_max = Wg.abs().amax(-1)
    assert (err(clipped_fake_quant(W, max_val, fmt)) <= err(
        clipped_fake_quant(W, org_max, fmt)) * (1 + 1e-6)).all()
    assert (max_val < org_max).any()
    state = quantize_clipped(W, max_val, fmt)
    assert state.codes_in_range()
    assert torch.equal(state.dequantize(), clipped_fake_quant(W, max_val, fmt))


def test_one_linear_end_to_end_beats_rtn() -> None:
    """``awq_linear`` (scale search, fold, clip search, quantization) on the salient problem:
    the quantized layer, read with its inputs divided by s, has under 0.8x RTN's output error;
    the fault (the scale not divided out of the inputs) is far worse than RTN."""
    lay, xs = _salient_problem()
    X = torch.cat([x.reshape(-1, 64) for x in xs])
    state, s = awq_linear(lay.weight.data, X, FMT, AWQConfig())
    assert state.codes_in_range() and s[:4].min() > 1 > s[4:].max()
    ref = X @ lay.weight.data.T

    def err(Wq: torch.Tensor, Xin: torch.Tensor) -> float:
        return float((Xin @ Wq.T - ref).pow(2).mean())

    rtn = err(quantize_tensor(lay.weight.data, FMT).dequantize(), X)
    assert err(state.dequantize(), X / s) < 0.8 * rtn
    assert err(state.dequantize(), X) > 2 * rtn


@pytest.mark.parametrize(("field", "value"), [("n_grid", 0), ("clip_tokens", 0),
                                              ("max_shrink", 1.0)])
def test_bad_settings_are_one_line(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^methods\.awq\.{field}: got .*; accepted: "):
        AWQConfig(**{field: value})


def test_per_tensor_is_refused() -> None:
    with pytest.raises(ConfigError, match="^group_size: per-tensor with method awq"):
        AWQ.check_format(WeightFormat(4, 0), AWQConfig())
