"""TR scheduling: the transition counter is exact, the TALR follows Eqs. 10-11, SGDT / AdamT are
their base optimizers with lr = U^t on latent weights, and a short run records the
trajectories."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.tr_scheduling import (
    SGDT,
    TALR,
    AdamT,
    TransitionCounter,
    TRConfig,
    budget_constants,
    prepare_tr,
    tracking,
)
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
    talr = TALR(U=0.1, eta=0.1, R0=0.01, total_steps=100, K0="target")
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


def test_initial_running_rate_options():
    assert TALR(U=0.1, eta=0.1, R0=0.01, total_steps=10).K == 0.0  # the paper: K^0 = 0
    first = TALR(U=0.1, eta=0.1, R0=0.01, total_steps=10, m=0.9, K0="first")
    assert first.K is None
    first.step(0.004, 0.01)
    assert first.K == 0.004  # K^1 = k^1
    first.step(0.014, 0.01)
    assert pytest.approx(0.9 * 0.004 + 0.1 * 0.014) == first.K
    zero = TALR(U=0.1, eta=0.1, R0=0.01, total_steps=10, m=0.9)
    assert zero.step(0.01, 0.01) > 0.1  # K^1 = 0.001 < R: U rises first


def test_budget_rule_returns_the_papers_constants_at_paper_scale():
    for R0 in (5e-3 * math.sqrt(2), 5e-3 * math.sqrt(3), 5e-3 * math.sqrt(4)):
        for U0 in (0.1, 1e-3):
            assert budget_constants(U0, R0, 80_000) == (0.99, U0)  # CIFAR-scale T
            assert budget_constants(U0, R0, 600_000) == (0.99, U0)  # ImageNet-scale T
    m, eta = budget_constants(0.01, 5e-3 * math.sqrt(2), 200)
    assert m == pytest.approx(0.9) and 1 / (1 - m) == pytest.approx(200 / 20)
    assert eta * 5e-3 * math.sqrt(2) * 20 == pytest.approx(10 * 0.01)  # 10 U^0 in T/10
    assert budget_constants(0.01, 0.01, 10)[0] == 0.0  # very short runs: K = k


def test_tracking_statistics():
    R = [0.01] * 100
    k = [0.02 if t % 2 else 0.0 for t in range(100)]  # mean 0.01, alternating
    tr = tracking(k, R)
    assert tr["window"] == 2 and (tr["from_step"], tr["to_step"]) == (10, 90)
    assert tr["median"] == pytest.approx(1.0) and tr["q25"] == pytest.approx(1.0)
    assert tracking([0.03] * 100, R)["median"] == pytest.approx(3.0)
    assert tracking([0.0] * 10 + [0.01] * 90, R, window=1)["q25"] == pytest.approx(1.0)


def test_config_defaults_and_errors():
    sgd, adam = TRConfig(), TRConfig(optimizer="adamt")
    assert (sgd.initial_U, adam.initial_U) == (0.1, 1e-3)
    assert (sgd.tr_factor, sgd.tr_momentum, sgd.eta, sgd.K0, sgd.scope, sgd.first_last_bits) == (
        5e-3, None, None, "zero", "global", 0)
    assert sgd.constants(0.01, 80_000) == (0.99, 0.1)  # the paper's at the paper's T
    assert TRConfig(U0=0.5, eta=0.2, tr_momentum=0.95).constants(0.01, 200) == (0.95, 0.2)
    with pytest.raises(ConfigError, match="K0"):
        TRConfig(K0="one")
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
    # the 8-bit edges are neither TALR units nor counted: only the b-bit layers are
    assert set(per_layer.talrs) == {"3", "6"} and per_layer.groups["6"] == 1
    assert set(per_layer.counter.wraps) == {"3", "6"} and per_layer.counter.N == 2 * 8 * 8 * 9
    edge_weights = {id(per_layer.wraps[n].layer.weight) for n in ("0", "11")}
    conventional = [id(p) for g in per_layer.optimizer.param_groups if "base_lr" in g
                    for p in g["params"]]
    assert edge_weights <= set(conventional)  # edges train with the conventional cosine LR
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


def test_flips_in_an_8bit_edge_layer_leave_k_at_zero():
    net = _net()
    state = prepare_tr(net, 2, TRConfig(first_last_bits=8), total_steps=10)
    edge = state.wraps["11"]  # the classifier, at 8 bits
    with torch.no_grad():
        s = edge.weight_quant.s.item()
        edge.layer.weight.add_(3 * s)  # every edge code moves by 3 levels (or clips)
    assert not torch.equal(edge.weight_codes(), torch.zeros(1))  # codes exist and moved
    assert state.counter.update() == 0.0  # k over the 2-bit layers only


def _train(net: nn.Module, state, steps: int, seed: int = 0) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(256, 3, 8, 8, generator=gen), torch.randint(0, 4, (256,), generator=gen)
    for t in range(steps):
        idx = torch.arange(t * 32, t * 32 + 32) % 256
        loss = F.cross_entropy(net(x[idx]), y[idx])
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.after_step()


@pytest.mark.parametrize(("tr_factor", "rises"), [(0.2, True), (1e-5, False)])
def test_talr_rises_when_the_natural_rate_is_below_target_and_falls_above(tr_factor, rises):
    """R^0 far above (0.2 sqrt 2) or far below (1e-5 sqrt 2) what U^0 produces."""
    net = _net()
    cfg = TRConfig(U0=0.01, tr_factor=tr_factor, target_schedule="step")
    state = prepare_tr(net, 2, cfg, total_steps=60)
    _train(net, state, 30)
    U = state.history["global"]["U"]
    assert (U[-1] > 2 * 0.01) if rises else (U[-1] < 0.01 / 2)


@pytest.mark.parametrize(("constants", "tracks"), [
    ({}, True),  # the budget rule
    ({"eta": 0.01, "tr_momentum": 0.99, "K0": "target"}, False),  # the paper's, at T = 200
])
def test_scaled_constants_track_the_target_on_a_short_real_run(constants, tracks):
    """200 steps: with the budget-scaled m and eta the windowed k follows R (the band of issue
    24, [0.67, 1.5], on the median of windowed k / R over steps 10%-90%); the paper's 80K-step
    constants on the same run do not (measured median about 1.9), so the band can fail."""
    net = _net()
    state = prepare_tr(net, 2, TRConfig(U0=0.01, **constants), total_steps=200)
    _train(net, state, 200)
    tr = state.tracking()["global"]
    assert (0.67 <= tr["median"] <= 1.5) == tracks, tr
