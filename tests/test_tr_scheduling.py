"""TR scheduling: the transition counter is exact, the TALR follows Eqs. 10-11, SGDT / AdamT are
their base optimizers with lr = U^t on latent weights, and a short run records the
trajectories."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.tr_scheduling import SGDT, TALR, AdamT, TransitionCounter, TRConfig, prepare_tr
from suite.errors import ConfigError
from suite.qat import unwrap_layers, wrap_layers


def test_transition_counter_is_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8, bias=False), nn.Linear(10, 4, bias=False))
    wraps = wrap_layers(net, {"0": (3, None), "1": (3, None)}, "eq13", train_weight_scale=False)
    level = {}
    with torch.no_grad():  # weights at code centres q s / gamma, codes -4..2 of -4..3
        for name, w in wraps.items():
            W, wq = w.layer.weight, w.weight_quant
            level[name] = wq.s.item() / wq.grid[2]  # code spacing in weight units
            W.copy_(torch.randint(-4, 3, W.shape) * level[name])
    counter = TransitionCounter(wraps)
    gen = torch.Generator().manual_seed(2)
    moved = {"0": 37, "1": 5}
    with torch.no_grad():
        for name, m in moved.items():
            W = wraps[name].layer.weight
            W.add_(0.3 * level[name] * torch.rand(W.shape, generator=gen))  # < half a level
            idx = torch.randperm(W.numel(), generator=gen)[:m]
            W.view(-1)[idx] += level[name]  # exactly m codes go up by one
    k = counter.update()
    assert k == (37 + 5) / (128 + 40)
    assert counter.layer_rates == {"0": 37 / 128, "1": 5 / 40}
    assert counter.update() == 0.0  # nothing moved since


def test_talr_rises_below_target_falls_above_and_clamps_at_zero():
    talr = TALR(U=0.1, eta=0.1, R0=0.01, total_steps=100)
    assert talr.K == 0.01  # K^0 = R^0
    u1 = talr.step(0.0, 0.01)  # K = 0.99 * 0.01 < R
    assert u1 == pytest.approx(0.1 + 0.1 * (0.01 - 0.0099)) and u1 > 0.1
    assert talr.step(0.5, 0.01) < u1  # K jumps above R
    for _ in range(200):
        u = talr.step(1.0, 0.0)
    assert u == 0.0


def test_target_schedules():
    cos = TALR(U=1.0, eta=1.0, R0=0.02, total_steps=100)
    assert cos.target(0) == 0.02 and cos.target(50) == pytest.approx(0.01)
    assert cos.target(100) == pytest.approx(0.0, abs=1e-18)
    step = TALR(U=1.0, eta=1.0, R0=0.02, total_steps=100, schedule="step")
    assert [step.target(t) for t in (0, 49, 50, 75)] == pytest.approx([0.02, 0.02, 2e-3, 2e-4])


def _loss(params: list[torch.Tensor], t: int) -> torch.Tensor:
    return sum(((p - 0.1 * t) ** 2 * (i + 1)).sum() for i, p in enumerate(params))


def _compare(opt_t, ref, params_t, params_r, us: list[float], pre_ref=None) -> None:  # noqa: ANN001
    for t, U in enumerate(us):
        opt_t.set_talr(U, 0)
        ref.param_groups[0]["lr"] = U
        for opt, params in ((opt_t, params_t), (ref, params_r)):
            opt.zero_grad()
            _loss(params, t).backward()
        opt_t.step()
        if pre_ref is not None:
            pre_ref(params_r[0], U)
        ref.step()
        for p, r in zip(params_t, params_r, strict=True):
            assert torch.equal(p, r)


def _params(seed: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    torch.manual_seed(seed)
    base = [torch.randn(5, 3), torch.randn(7)]
    return ([nn.Parameter(b.clone()) for b in base], [nn.Parameter(b.clone()) for b in base])


@pytest.mark.parametrize("wd_coupled", [0.0, 1e-2])
def test_sgdt_is_sgd_with_lr_talr(wd_coupled):
    pt, pr = _params(0)
    opt = SGDT([{"params": [pt[0]], "latent": True, "weight_decay": wd_coupled},
                {"params": [pt[1]], "lr": 0.05}], lr=0.3, momentum=0.9)
    ref = torch.optim.SGD([{"params": [pr[0]], "weight_decay": wd_coupled},
                           {"params": [pr[1]], "lr": 0.05}], lr=0.3, momentum=0.9)
    _compare(opt, ref, pt, pr, [0.1, 0.02, 0.0, 0.07])
    assert opt.param_groups[1]["lr"] == 0.05  # the conventional group keeps its own lr


def test_sgdt_decoupled_decay_is_scaled_by_talr():
    pt, pr = _params(1)
    opt = SGDT([{"params": [pt[0]], "latent": True, "talr_weight_decay": 0.1},
                {"params": [pt[1]]}], lr=0.05, momentum=0.9)
    ref = torch.optim.SGD([{"params": [pr[0]]}, {"params": [pr[1]]}], lr=0.05, momentum=0.9)

    def decay(p: torch.Tensor, U: float) -> None:
        with torch.no_grad():
            p.mul_(1 - U * 0.1)

    _compare(opt, ref, pt, pr, [0.1, 0.3, 0.2], pre_ref=decay)


def test_step_with_closure_returns_the_loss():
    pt, pr = _params(4)
    opt = SGDT([{"params": pt, "latent": True, "talr": 0.1}], lr=1.0)
    ref = torch.optim.SGD(pr, lr=0.1)

    def closure(opt, params):  # noqa: ANN001, ANN202
        def f():  # noqa: ANN202
            opt.zero_grad()
            loss = _loss(params, 0)
            loss.backward()
            return loss
        return f

    assert opt.step(closure(opt, pt)) == ref.step(closure(ref, pr))
    assert all(torch.equal(p, r) for p, r in zip(pt, pr, strict=True))


def test_adamt_is_adam_with_lr_talr():
    pt, pr = _params(2)
    opt = AdamT([{"params": [pt[0]], "latent": True}, {"params": [pt[1]], "lr": 1e-2}], lr=1e-3)
    ref = torch.optim.Adam([{"params": [pr[0]]}, {"params": [pr[1]], "lr": 1e-2}], lr=1e-3)
    _compare(opt, ref, pt, pr, [1e-3, 5e-3, 0.0, 2e-3])


def test_adamt_with_decoupled_decay_is_adamw_with_lr_talr():
    pt, pr = _params(3)
    opt = AdamT([{"params": [pt[0]], "latent": True, "talr_weight_decay": 0.5},
                 {"params": [pt[1]]}], lr=1e-3)
    ref = torch.optim.AdamW([{"params": [pr[0]], "weight_decay": 0.5},
                             {"params": [pr[1]], "weight_decay": 0.0}], lr=1e-3)
    _compare(opt, ref, pt, pr, [1e-3, 5e-3, 2e-3])


def test_config_defaults_and_errors():
    sgd, adam = TRConfig(), TRConfig(optimizer="adamt")
    assert (sgd.initial_U, sgd.initial_eta, adam.initial_U, adam.initial_eta) == (
        0.1, 0.1, 1e-3, 1e-3)
    assert (sgd.tr_factor, sgd.tr_momentum, sgd.scope, sgd.first_last_bits) == (
        5e-3, 0.99, "global", 0)
    assert TRConfig(U0=0.5).initial_eta == 0.5 and TRConfig(U0=0.5, eta=0.2).initial_eta == 0.2
    with pytest.raises(ConfigError, match="scope"):
        TRConfig(scope="block")
    with pytest.raises(ConfigError, match="tr_momentum"):
        TRConfig.from_dict({"tr_momentum": 1.5}, "tr")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_prepare_keeps_first_last_fp_and_freezes_weight_scales():
    net = _net()
    state = prepare_tr(net, 2, TRConfig(), total_steps=10)
    assert set(state.wraps) == {"3", "6"}  # first conv and the classifier stay FP
    assert all(not w.weight_quant.s.requires_grad for w in state.wraps.values())
    assert all(w.act_quant.s.requires_grad for w in state.wraps.values())
    latent = state.optimizer.param_groups[0]
    assert latent["latent"] and latent["params"] == [w.layer.weight for w in state.wraps.values()]
    assert math.isclose(state.talrs["global"].R0, 5e-3 * math.sqrt(2))
    per_layer = prepare_tr(_net(), 2, TRConfig(scope="per-layer", first_last_bits=8), 10)
    assert set(per_layer.talrs) == {"0", "3", "6", "11"} and per_layer.groups["6"] == 2
    assert math.isclose(per_layer.talrs["0"].R0, 5e-3 * math.sqrt(8))  # R^0 from its 8 bits
    kinds = {n: w.weight_quant.kind for n, w in per_layer.wraps.items()}
    assert kinds == {"0": "lsq", "3": "eq13", "6": "eq13", "11": "lsq"}  # edges: post-scaled
    assert list(per_layer.wraps) == ["0", "3", "6", "11"]


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_twenty_adamt_steps_record_trajectories(scope):
    net = _net()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    state = prepare_tr(net, 2, TRConfig(optimizer="adamt", scope=scope), total_steps=20)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(net(x), y)
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.after_step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    units = ["global"] if scope == "global" else ["3", "6"]
    assert set(state.history) == set(units)
    for unit in units:
        trace = state.history[unit]
        assert all(len(trace[key]) == 20 for key in ("k", "K", "R", "U"))
        assert trace["R"][-1] == pytest.approx(0.0, abs=1e-12) and min(trace["U"]) >= 0
        group = state.optimizer.param_groups[state.groups[unit]]
        assert group["talr"] == trace["U"][-1]
    assert sum(sum(t["k"]) for t in state.history.values()) > 0  # codes did move
    assert state.optimizer.param_groups[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    for name, u in unwrap_layers(net).items():
        W = net.get_submodule(name).weight
        assert torch.equal(W, u.codes.float() / 2)  # Eq. 13 weights: q / gamma, gamma = 2
