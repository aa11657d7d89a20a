"""LSQ: the step-size gradient equals the paper's closed form (both clip regions, the bounds,
the gradient scale), the paper's recipe defaults, the model preparation and a short run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.lsq import (
    LSQConfig,
    lsq_param_groups,
    make_lsq_optimizer,
    make_lsq_scheduler,
    prepare_lsq,
    step_size_params,
)
from suite.errors import ConfigError
from suite.qat import FakeQuantizer, QuantWrap, unwrap_layers


def _closed_form(v_over_s: torch.Tensor, QN: int, QP: int) -> torch.Tensor:
    """d v_hat / d s (Esser et al., Eq. 3): -Q_N below, Q_P above, -v/s + round(v/s) inside."""
    inside = -v_over_s + torch.round(v_over_s)
    return torch.where(v_over_s <= -QN, -QN, torch.where(v_over_s >= QP, QP, inside))


def test_weight_step_gradient_matches_closed_form():
    q = FakeQuantizer(2, "lsq")  # Q_N = 2, Q_P = 1
    v = torch.tensor([-1.25, -1.0, -0.1875, 0.125, 0.375, 0.5, 0.625, 2.0], requires_grad=True)
    q.initialize(v)
    with torch.no_grad():
        q.s.fill_(0.5)  # v / s = -2.5, -2 (bound), -0.375, 0.25, 0.75, 1 (bound), 1.25, 4
    c = torch.tensor([0.3, -1.1, 0.7, 2.0, -0.4, 1.5, 0.9, -0.6])  # dL / d v_hat
    (q(v) * c).sum().backward()
    v_over_s = v.detach() / 0.5
    g = 1 / math.sqrt(v.numel() * 1)  # 1 / sqrt(N_W Q_P)
    d = _closed_form(v_over_s, 2, 1)
    assert torch.equal(d, torch.tensor([-2, -2, 0.375, -0.25, 0.25, 1, 1, 1]))
    assert torch.allclose(q.s.grad, g * (c * d).sum())
    # the STE clip mask on d v_hat / d v: 1 strictly inside (-Q_N, Q_P)
    assert torch.equal(v.grad, c * torch.tensor([0.0, 0, 1, 1, 1, 0, 0, 0]))


def test_activation_step_gradient_matches_closed_form():
    q = FakeQuantizer(2, "lsq", role="activation", signed=False)  # Q_N = 0, Q_P = 3
    x = torch.tensor([[-0.5, 0.25, 1.75, 3.5], [0.0, 1.0, 0.5, 2.5]])  # 2 samples, 4 features
    q.initialize(x.abs())
    with torch.no_grad():
        q.s.fill_(1.0)
    c = torch.arange(8.0).reshape(2, 4) - 3.5
    (q(x) * c).sum().backward()
    g = 1 / math.sqrt(4 * 3)  # N_F = features per sample
    assert torch.allclose(q.s.grad, g * (c * _closed_form(x, 0, 3)).sum())


def test_config_defaults_follow_the_paper():
    cfg = LSQConfig()
    assert (cfg.optimizer, cfg.momentum, cfg.schedule, cfg.first_last_bits) == (
        "sgd", 0.9, "cosine", 8)
    assert [cfg.lr_for(b) for b in (2, 3, 4, 8)] == [0.01, 0.01, 0.01, 0.001]
    assert [cfg.weight_decay_for(b) for b in (2, 3, 4, 8)] == [0.25e-4, 0.5e-4, 1e-4, 1e-4]
    assert [LSQConfig(optimizer="adam").lr_for(b) for b in (2, 8)] == [1e-3, 1e-4]
    assert LSQConfig(lr=0.02).lr_for(8) == 0.02
    assert not cfg.per_channel


@pytest.mark.parametrize("raw,field", [({"optimizer": "rmsprop"}, "optimizer"),
                                       ({"first_last_bits": 1}, "first_last_bits"),
                                       ({"lr": -1.0}, "lr"), ({"lr": "fast"}, "lr")])
def test_config_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field):
        LSQConfig.from_dict(raw, "lsq")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_prepare_wraps_first_last_at_8_bits_and_scales_have_no_decay():
    net, cfg = _net(), LSQConfig()
    wraps = prepare_lsq(net, 3, cfg)
    bits = {n: (w.weight_quant.bits, w.act_quant.bits) for n, w in wraps.items()}
    assert bits == {"0": (8, 8), "3": (3, 3), "8": (8, 8)}
    net(torch.randn(2, 3, 8, 8))  # activation step sizes initialise here
    groups = lsq_param_groups(net, 3, cfg)
    assert groups[0]["weight_decay"] == 0.5e-4 and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 6 == len(step_size_params(net))
    n_params = sum(1 for p in net.parameters() if p.requires_grad)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_params


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_twenty_steps_train_and_unwrap_honestly(optimizer):
    net, cfg = _net(), LSQConfig(optimizer=optimizer)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    wraps = prepare_lsq(net, 2, cfg)
    opt = make_lsq_optimizer(net, 2, cfg)
    sched = make_lsq_scheduler(opt, 20, cfg)
    s0 = wraps["3"].weight_quant.s.item()
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert wraps["3"].weight_quant.s.item() != s0  # step sizes are learned
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reached 0
    out = unwrap_layers(net)
    assert not any(isinstance(m, QuantWrap) for m in net.modules())
    for name, u in out.items():
        W = net.get_submodule(name).weight
        assert torch.equal(u.qstate().dequantize().reshape(W.shape), W)
