"""Vision models: seeded construction, adapters' target layers and block decompositions (which
must reproduce each architecture's forward exactly, also after a module swap)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from suite.errors import ConfigError
from suite.vision.models import VISION_ADAPTERS, adapter_for, build_model, vision_archs

# (arch, in_channels, image side): each architecture at a small input it supports.
CASES = [("cnn-small", 1, 28), ("cnn-small-w32", 1, 28), ("cnn-small", 3, 32),
         ("resnet20", 3, 32), ("resnet20", 1, 28), ("resnet18", 3, 32), ("resnet18", 1, 32),
         ("mobilenet_v2", 3, 32), ("mobilenet_v2", 1, 32), ("mbv2-small", 1, 28),
         ("mbv2-small", 3, 32)]


def _run_blocks(model: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    for _, block in VISION_ADAPTERS[arch].blocks(model):
        x = block(x)
    return x


@pytest.mark.parametrize(("arch", "channels", "side"), CASES)
def test_blocks_reproduce_forward(arch: str, channels: int, side: int) -> None:
    model = build_model(arch, 10, channels, seed=0).eval()
    x = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == (2, 10)
        assert torch.equal(_run_blocks(model, arch, x), expected)


@pytest.mark.parametrize(("arch", "channels", "side"), CASES)
def test_layers_cover_first_and_last(arch: str, channels: int, side: int) -> None:
    model = build_model(arch, 7, channels, seed=0)
    adapter = adapter_for(arch)
    layers = adapter.layers(model)
    names = list(layers)
    assert list(adapter.target_layers(model)) == names[1:-1]  # first and last stay FP in PTQ
    assert names[0] == adapter.first and names[-1] == adapter.last
    assert isinstance(layers[adapter.first], nn.Conv2d)
    assert layers[adapter.first].in_channels == channels
    assert isinstance(layers[adapter.last], nn.Linear) and layers[adapter.last].out_features == 7
    expected = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert names == expected


def test_block_names_are_submodules_or_composites() -> None:
    for arch in vision_archs():
        model = build_model(arch, 10, 3, seed=0)
        modules = dict(model.named_modules())
        pieces = VISION_ADAPTERS[arch].blocks(model)
        for name, block in pieces:
            assert modules.get(name) is block or name in ("stem", "head")
        assert len({n for n, _ in pieces}) == len(pieces)
    r20 = [n for n, _ in VISION_ADAPTERS["resnet20"].blocks(build_model("resnet20", 10, 3))]
    assert r20 == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["head"]


def test_blocks_see_module_swaps() -> None:
    """QAT methods swap layers in place; blocks() built afterwards must use the new modules."""
    for arch, name in (("resnet18", "conv1"), ("mobilenet_v2", "classifier.1"),
                       ("resnet20", "layer2.0.shortcut.conv")):
        model = build_model(arch, 10, 3, seed=0).eval()
        swapped = nn.Sequential(model.get_submodule(name), nn.Identity())
        model.set_submodule(name, swapped)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(_run_blocks(model, arch, x), model(x))
        assert any(m is swapped for _, b in VISION_ADAPTERS[arch].blocks(model)
                   for m in b.modules())


def test_resnet20_structure() -> None:
    model = build_model("resnet20", 10, 3, seed=0)
    convs = VISION_ADAPTERS["resnet20"].layers(model)
    assert sum(p.numel() for p in model.parameters()) == 272_474  # 0.27M, as in He et al.
    shortcuts = [n for n in convs if "shortcut" in n]
    assert shortcuts == ["layer2.0.shortcut.conv", "layer3.0.shortcut.conv"]  # option B
    assert len(convs) - len(shortcuts) == 20  # 19 convs + 1 Linear: the 20 weighted layers
    widths = [model.get_submodule(f"layer{s}.2.conv2").out_channels for s in (1, 2, 3)]
    assert widths == [16, 32, 64]
    out = model.get_submodule("layer3")(model.get_submodule("layer2")(
        model.get_submodule("layer1")(model.stem(torch.zeros(1, 3, 32, 32)))))
    assert out.shape == (1, 64, 8, 8)


def test_seeded_init_and_rng_isolation() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("cnn-small", 10, 1, seed=5).state_dict()
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG is untouched
    b = build_model("cnn-small", 10, 1, seed=5).state_dict()
    c = build_model("cnn-small", 10, 1, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["block1.conv.weight"], c["block1.conv.weight"])


def test_unknown_arch_lists_choices() -> None:
    with pytest.raises(ConfigError, match="arch: unknown vision arch 'resnet50'.*resnet20"):
        build_model("resnet50", 10, 3)
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        adapter_for("vgg")


@pytest.mark.parametrize("arch", ["cnn-small", "resnet20"])
def test_pipeline_groups_every_target_once_in_forward_order(arch: str) -> None:
    model = build_model(arch, 10, 1, seed=0)
    adapter = adapter_for(arch)
    for true_sequential in (False, True):
        pipe = adapter.pipeline(model, true_sequential)
        names = [n for _, groups in pipe for g in groups for n in g]
        assert names == list(adapter.target_layers(model))
        if true_sequential:
            assert all(len(g) == 1 for _, groups in pipe for g in groups)
    inps, kwargs = adapter.catch_inputs(model, torch.randn(100, 1, 28, 28))
    assert [len(x) for x in inps] == [64, 36] and kwargs == {}


def test_mbv2_small_is_an_inverted_residual_network() -> None:
    """Depthwise 3x3 convs (groups = channels) are quantization targets; shortcuts where the
    shape allows; 28 x 28 -> 14 -> 7."""
    model = build_model("mbv2-small", 10, 1, seed=0)
    targets = adapter_for("mbv2-small").target_layers(model)
    depthwise = [n for n, m in targets.items() if m.groups > 1]
    assert depthwise and all(targets[n].groups == targets[n].in_channels for n in depthwise)
    assert len(depthwise) == 6  # one per inverted residual block
    residual = [n for n, m in model.named_children() if getattr(m, "residual", False)]
    assert residual == ["ir3", "ir5"]
    x = torch.randn(2, 1, 28, 28)
    assert model.last(model[:-2](x)).shape == (2, 96, 7, 7)
