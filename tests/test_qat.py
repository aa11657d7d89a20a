"""Shared QAT primitives: straight-through pieces, the fake quantizer's init, gradients, step-size
floor and codes, and the wrap / unwrap round trip (weights exactly scale * codes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from suite.errors import ConfigError
from suite.qat import (
    FakeQuantizer,
    QuantWrap,
    clip_ste,
    grad_scale,
    integer_grid,
    layer_plan,
    quantizable_layers,
    round_ste,
    unwrap_layers,
    wrap_layers,
)


def test_grad_scale_is_identity_forward_and_scales_backward():
    x = torch.tensor([0.1, -3.7, 2.5], requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.25))


def test_round_ste_and_clip_ste():
    x = torch.tensor([-3.0, -2.0, -0.5, 0.4, 1.0, 2.6], requires_grad=True)
    y = round_ste(clip_ste(x, -2, 1))
    assert torch.equal(y, torch.tensor([-2.0, -2.0, -0.0, 0.0, 1.0, 1.0]))
    y.sum().backward()
    # gradient 1 strictly inside (-2, 1); the bounds themselves count as clipped
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0]))


def test_integer_grids():
    assert integer_grid(2, True, "lsq") == (-2, 1, 1)
    assert integer_grid(3, False, "lsq") == (0, 7, 1)
    assert integer_grid(2, True, "eq13") == (-2, 1, 2)
    assert integer_grid(4, False, "eq13") == (0, 15, 16)


def test_activation_input_gradient_has_the_clip_mask():
    q = FakeQuantizer(2, "lsq", role="activation", signed=False)
    q.initialize(torch.ones(1, 4))
    with torch.no_grad():
        q.s.fill_(0.5)  # grid 0..3 -> values 0, 0.5, 1, 1.5
    x = torch.tensor([[-0.2, 0.0, 0.3, 1.2, 1.5, 4.0]], requires_grad=True)
    y = q(x)
    assert torch.equal(y, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.5, 1.5]]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]))


def test_eq13_step_gradient_is_inside_term_only():
    """x_q = round(clip(gamma x / s)) / gamma: d x_q / d s = -x / s^2 inside, 0 when clipped."""
    q = FakeQuantizer(2, "eq13", role="activation", signed=False)  # (0, 3, gamma 4)
    q.initialize(torch.ones(1, 3))
    with torch.no_grad():
        q.s.fill_(2.0)
    x = torch.tensor([[-0.25, 0.75, 2.0]])  # gamma x / s = -0.5 (clipped), 1.5, 4 (clipped)
    q(x).sum().backward()
    g = 1 / math.sqrt(3 * 3)  # N = 3 features, Q_P = 3
    assert torch.allclose(q.s.grad, torch.tensor(g * (-0.75 / 4.0)))


def test_init_formulas():
    torch.manual_seed(0)
    W = torch.randn(8, 4, 3, 3)
    lsq = FakeQuantizer(3, "lsq")
    lsq.initialize(W)
    assert torch.allclose(lsq.s, 2 * W.abs().mean() / math.sqrt(3))
    eq13 = FakeQuantizer(3, "eq13")
    eq13.initialize(W)
    assert torch.allclose(eq13.s, 4 * 2 * W.abs().mean() / math.sqrt(3))  # gamma = 4
    pc = FakeQuantizer(4, "lsq", channels=8)
    pc.initialize(W)
    assert torch.allclose(pc.s, 2 * W.abs().mean(dim=(1, 2, 3)) / math.sqrt(7))


def test_activation_initialises_from_first_batch_and_picks_its_sign():
    post_relu = FakeQuantizer(4, "lsq", role="activation")
    x = torch.rand(2, 5)
    post_relu(x)
    assert post_relu.initialized and post_relu.signed is False
    assert torch.allclose(post_relu.s, 2 * x.mean() / math.sqrt(15))
    post_relu(10 * x)  # a later batch does not re-initialise
    assert torch.allclose(post_relu.s, 2 * x.mean() / math.sqrt(15))
    image = FakeQuantizer(8, "lsq", role="activation")
    image(torch.randn(2, 5))
    assert image.signed is True and image.grid[:2] == (-128, 127)


def test_step_size_stays_positive_after_a_huge_negative_step():
    W = torch.randn(16, 16)
    q = FakeQuantizer(2, "lsq")
    q.initialize(W)
    opt = torch.optim.SGD([q.s], lr=1.0)
    q.s.grad = torch.tensor(1e6)
    opt.step()
    assert q.s.item() < 0  # the raw parameter went negative ...
    s = q.step_size(W)  # broadcast to W's shape
    assert s.min().item() == s.max().item() == pytest.approx(q.s_min)  # ... the floor is used
    y = q(W)
    assert torch.isfinite(y).all()
    assert q.codes(W).min() >= -2 and q.codes(W).max() <= 1
    opt.zero_grad()
    (y * W.sign()).sum().backward()  # the loss can still move the step size
    assert q.s.grad is not None and q.s.grad.item() != 0


def test_codes_are_what_forward_uses():
    torch.manual_seed(1)
    W = torch.randn(6, 10)
    for kind in ("lsq", "eq13"):
        q = FakeQuantizer(3, kind)
        q.initialize(W)
        _, _, gamma = q.grid
        post = q.s.detach() if kind == "lsq" else torch.tensor(1.0 / gamma)
        assert torch.equal(q(W), post * q.codes(W).float())


def test_extra_state_round_trips():
    a = FakeQuantizer(4, "eq13", role="activation")
    a(torch.rand(3, 4))
    b = FakeQuantizer(4, "eq13", role="activation")
    b.load_state_dict(a.state_dict())
    assert b.initialized and b.signed is False and torch.equal(a.s, b.s)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="bits"):
        FakeQuantizer(1)
    with pytest.raises(ConfigError, match="kind"):
        FakeQuantizer(2, "dorefa")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="layers"):
        wrap_layers(nn.Sequential(nn.ReLU()), {"0": (2, 2)}, "lsq")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


def test_layer_plan_first_last():
    names = ["a", "b", "c"]
    assert layer_plan(names, 2, 2, 8) == {"a": (8, 8), "b": (2, 2), "c": (8, 8)}
    assert layer_plan(names, 3, None, 0) == {"b": (3, None)}


@pytest.mark.parametrize("kind,per_channel", [("lsq", False), ("lsq", True), ("eq13", False)])
def test_wrap_unwrap_round_trip(kind, per_channel):
    net, x = _net(), torch.randn(4, 3, 8, 8)
    names = quantizable_layers(net)
    assert names == ["0", "3", "7"]
    wraps = wrap_layers(net, layer_plan(names, 2, 2, 8), kind, per_channel=per_channel)
    assert all(isinstance(net.get_submodule(n), QuantWrap) for n in names)
    net.eval()
    y_wrapped = net(x)
    fake_w = {n: w.weight_quant(w.layer.weight).detach() for n, w in wraps.items()}
    out = unwrap_layers(net)
    for n, u in out.items():
        layer = net.get_submodule(n)
        assert type(layer) in (nn.Conv2d, nn.Linear)
        alpha, beta, gamma = integer_grid(u.bits, True, kind)
        assert alpha <= u.codes.min() and u.codes.max() <= beta
        expected = u.codes.float() / gamma if kind == "eq13" else (
            u.scale.reshape(-1, *[1] * (u.codes.dim() - 1)) * u.codes.float())
        assert torch.equal(layer.weight, expected)
        assert torch.equal(layer.weight, fake_w[n])
        qs = u.qstate()
        assert qs.codes_in_range()
        assert torch.equal(qs.dequantize().reshape(layer.weight.shape), layer.weight)
    assert out["3"].bits == 2 and out["0"].bits == 8 and out["0"].act_signed is True
    assert out["3"].act_signed is False
    assert torch.equal(net(x), y_wrapped)  # input quantizers stay on the plain layers


def _fused_and_autograd(q: FakeQuantizer, x: torch.Tensor, g: torch.Tensor, grid=None):
    """(output, d x, d s) of the quantizer's forward (the fused C++ path for a scalar s) and of
    ``ste_quant`` through autograd with the same s broadcast (``grid`` may differ: a fault)."""
    from suite.qat import ste_quant

    outs = []
    for fused in (True, False):
        xi = x.clone().requires_grad_()
        y = q(xi) if fused else ste_quant(xi, q.step_size(xi), grid or q.grid, q.kind)
        (y * g).sum().backward()
        outs.append((y.detach(), xi.grad, q.s.grad.clone()))
        q.s.grad = None
    return outs


@pytest.mark.parametrize("kind", ["lsq", "eq13"])
@pytest.mark.parametrize(("role", "signed"), [("weight", True), ("activation", False),
                                              ("activation", True)])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_fused_scalar_step_quantizer_is_bit_identical_to_autograd(kind, role, signed, bits):
    from suite.kernels import fakequant

    if fakequant.module() is None:
        pytest.skip("no C++ compiler: the autograd path is the only one")
    torch.manual_seed(bits)
    q = FakeQuantizer(bits, kind, role=role, signed=signed)
    x = torch.randn(8, 16, 13, 11) * 2  # 18304 elements: not a multiple of the sum's chunk
    x = x.relu() if signed is False else x
    q.initialize(x)
    x.view(-1)[:64] = q.s.detach() * torch.arange(-32, 32) / q.grid[2]  # exactly on grid points
    g = torch.randn_like(x)
    (y1, dx1, ds1), (y2, dx2, ds2) = _fused_and_autograd(q, x, g)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2) and torch.equal(ds1, ds2)


def test_fused_comparison_catches_a_wrong_clip_bound():
    from suite.kernels import fakequant

    if fakequant.module() is None:
        pytest.skip("no C++ compiler")
    q = FakeQuantizer(2, "lsq", role="activation", signed=False)
    x = torch.rand(4, 8, 9, 9) ** 4 * 10  # a long tail: some of it is clipped at beta
    q.initialize(x)
    alpha, beta, gamma = q.grid
    (y1, dx1, ds1), (y2, dx2, ds2) = _fused_and_autograd(q, x, torch.randn_like(x),
                                                         grid=(alpha, beta + 1, gamma))
    assert not torch.equal(y1, y2) and not torch.equal(dx1, dx2) and not torch.equal(ds1, ds2)
