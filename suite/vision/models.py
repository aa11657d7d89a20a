"""CNN architectures of the vision track and their declarative ``VisionAdapter``s.

Architectures (``build_model``):
  * ``cnn-small``: the embedded default for 1 x 28 x 28 Fashion-MNIST: conv3x3+BN+ReLU,
    maxpool, conv3x3+BN+ReLU, maxpool, conv3x3+BN+ReLU x2, then one Linear over the flattened
    7 x 7 map (an adaptive pool to 7 x 7 first, the identity at 28 x 28, so other sizes also
    run). Widths 16/16/32/32 (``CNN_WIDTHS``). Only the first conv runs at 28 x 28: with two
    convs there (the first layout) a QAT step at batch 128 cost 134 ms on 2 CPU cores against 65
    ms now, which is what lets the whole vision grid run in minutes. The flattened head
    replaced global average pooling, which reached only 81.7% test top-1 after two Adam epochs
    against 90.1% with this head (first layout, same seed, Fashion-MNIST).
  * ``cnn-small-w32``: the same network at widths 32/32/64/64.
  * ``mbv2-small``: a small MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381) for 28 x 28
    inputs, the embedded network where weight oscillation is known to hurt QAT (depthwise
    convolutions have 9 weights per output channel, so one flip moves a large share of a
    filter; the TR scheduling paper's largest gains are on MobileNetV2 at W2A2 / W3A3): a
    stride-2 3x3 stem conv to 16 channels (14 x 14), inverted residual blocks (1x1 expansion by
    t, 3x3 depthwise, 1x1 linear projection; ReLU6; identity shortcut where shape allows)
    ``MBV2_SETTINGS`` (t, c, n, s) = (1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 1), (4, 32, 1, 1),
    a 1x1 conv to 96 channels, global average pooling, Linear. Every conv but the stem and the
    classifier is a quantization target, depthwise ones included.
  * ``resnet20``: the CIFAR ResNet-20 of He et al. 2016 (arXiv 1512.03385, section 4.2): a 3x3
    conv to 16 channels, three stages of three BasicBlocks at 16/32/64 channels (stride 2 at the
    first block of stages 2 and 3), global average pooling, Linear. Where the shape changes, the
    shortcut is option B (a 1x1 conv with stride 2 plus BN) rather than the paper's CIFAR option A
    (zero padding): B is what most QAT code bases (and the TR-scheduling/EWGS ResNet-20s) use,
    and it keeps every shortcut a real layer a quantizer can see. 0.27M parameters.
  * ``resnet18`` / ``mobilenet_v2``: torchvision's constructors (``weights=None``); for
    ``in_channels != 3`` the first conv is replaced by one with the same geometry.

Each architecture has a ``VisionAdapter`` in ``VISION_ADAPTERS`` naming its first conv, its
classifier, and how its forward splits into blocks; nothing here matches class names.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from suite.errors import ConfigError

CNN_WIDTHS = {"cnn-small": (16, 16, 32, 32), "cnn-small-w32": (32, 32, 64, 64)}
POOL = "<avgpool>"  # a head/stem token for a functional global average pool in the forward
FLATTEN = "<flatten>"  # a head/stem token for a functional torch.flatten(x, 1)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        bn=nn.BatchNorm2d(c_out),
        relu=nn.ReLU(inplace=True),
    ))


def _head(c_in: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        pool=nn.AdaptiveAvgPool2d(1),  # (B, C, 1, 1)
        flatten=nn.Flatten(1),  # (B, C)
        fc=nn.Linear(c_in, num_classes),
    ))


def _flat_head(c_in: int, side: int, num_classes: int) -> nn.Sequential:
    """Average-pool to ``side`` x ``side`` (the identity for 28x28 inputs), flatten, Linear."""
    return nn.Sequential(OrderedDict(
        pool=nn.AdaptiveAvgPool2d(side),  # (B, C, side, side)
        flatten=nn.Flatten(1),  # (B, C * side * side)
        fc=nn.Linear(c_in * side * side, num_classes),
    ))


def cnn_small(num_classes: int, in_channels: int,
              widths: tuple[int, int, int, int] = CNN_WIDTHS["cnn-small"]) -> nn.Sequential:
    """conv-pool-conv-pool-conv-conv-flatten-Linear; every child is one block of the forward."""
    w1, w2, w3, w4 = widths
    return nn.Sequential(OrderedDict(
        block1=_conv_bn_relu(in_channels, w1),
        pool1=nn.MaxPool2d(2),  # 28 -> 14
        block2=_conv_bn_relu(w1, w2),
        pool2=nn.MaxPool2d(2),  # 14 -> 7
        block3=_conv_bn_relu(w2, w3),
        block4=_conv_bn_relu(w3, w4),
        head=_flat_head(w4, 7, num_classes),
    ))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or 1x1 conv+BN, option B) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(c_out),
            ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem, three stages of ``n`` BasicBlocks, head."""

    def __init__(self, n: int, num_classes: int, in_channels: int,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, widths[0])
        c_in = widths[0]
        for i, c_out in enumerate(widths):
            blocks = [BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i and j == 0) else 1)
                      for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.head = _head(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 32, 32) -> logits (B, num_classes)."""
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(x)


MBV2_SETTINGS = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 1), (4, 32, 1, 1))  # (t, c, n, s)
MBV2_STEM, MBV2_LAST = 16, 96


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1
                   ) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups,
                       bias=False),
        bn=nn.BatchNorm2d(c_out),
        relu=nn.ReLU6(inplace=True),
    ))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion to t c_in (left out for t = 1), 3x3 depthwise with
    ``stride``, 1x1 linear projection to c_out; x + block(x) when stride 1 and c_in = c_out."""

    def __init__(self, c_in: int, c_out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = c_in * t
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if t != 1:
            layers["expand"] = _conv_bn_relu6(c_in, hidden)  # (B, t c_in, H, W)
        layers["dw"] = _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)  # depthwise
        layers["project"] = nn.Conv2d(hidden, c_out, 1, bias=False)  # linear bottleneck
        layers["bn"] = nn.BatchNorm2d(c_out)
        self.body = nn.Sequential(layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, H / stride, W / stride)."""
        out = self.body(x)
        return x + out if self.residual else out


def mbv2_small(num_classes: int, in_channels: int) -> nn.Sequential:
    """stem, inverted residual blocks (``MBV2_SETTINGS``), 1x1 conv, head; every child is one
    block of the forward."""
    blocks: OrderedDict[str, nn.Module] = OrderedDict(
        stem=_conv_bn_relu6(in_channels, MBV2_STEM, 3, stride=2))  # 28 -> 14
    c_in = MBV2_STEM
    for t, c, n, s in MBV2_SETTINGS:
        for j in range(n):
            blocks[f"ir{len(blocks)}"] = InvertedResidual(c_in, c, s if j == 0 else 1, t)
            c_in = c
    blocks["last"] = _conv_bn_relu6(c_in, MBV2_LAST)
    blocks["head"] = _head(MBV2_LAST, num_classes)
    return nn.Sequential(blocks)


def _resnet18(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _mobilenet_v2(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None, num_classes=num_classes)
    if in_channels != 3:
        old = model.features[0][0]
        model.features[0][0] = nn.Conv2d(in_channels, old.out_channels, 3, stride=2, padding=1,
                                         bias=False)
        nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


def _init_cifar(model: nn.Module) -> nn.Module:
    """He init for convs (fan_out, as torchvision's ResNets), unit BN, default Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "cnn-small": lambda k, c: _init_cifar(cnn_small(k, c, CNN_WIDTHS["cnn-small"])),
    "cnn-small-w32": lambda k, c: _init_cifar(cnn_small(k, c, CNN_WIDTHS["cnn-small-w32"])),
    "mbv2-small": lambda k, c: _init_cifar(mbv2_small(k, c)),
    "resnet20": lambda k, c: _init_cifar(CifarResNet(3, k, c)),
    "resnet18": _resnet18,
    "mobilenet_v2": _mobilenet_v2,
}


def check_arch(arch: object, where: str) -> None:
    """ConfigError naming ``where`` and the accepted architectures unless ``arch`` is one."""
    if arch not in _BUILDERS:
        raise ConfigError(f"{where}: unknown vision arch {arch!r}; accepted: "
                          f"{', '.join(_BUILDERS)}")


def build_model(arch: str, num_classes: int, in_channels: int, seed: int = 0) -> nn.Module:
    """A freshly initialised ``arch`` whose weights depend only on ``seed``.

    The global RNG is forked, seeded and restored around construction, so building a model
    neither depends on nor disturbs the caller's random state.
    """
    check_arch(arch, "arch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[arch](num_classes, in_channels)


@dataclass(frozen=True)
class VisionAdapter:
    """Where an architecture keeps the layers a quantizer touches and how its forward splits.

    Attributes:
        arch: architecture id.
        first: dotted name of the first conv (kept at high precision by LSQ / TR scheduling).
        last: dotted name of the classifier Linear.
        stem: dotted names run in order before the blocks (``POOL``/``FLATTEN`` tokens allowed).
        stages: dotted names of ``nn.Sequential`` containers whose children are the blocks, in
            order (``""`` is the model itself).
        head: dotted names run in order after the blocks (tokens allowed).
    """

    arch: str
    first: str
    last: str
    stem: tuple[str, ...]
    stages: tuple[str, ...]
    head: tuple[str, ...]

    calib_batch: int = 64  # calibration images per pipeline forward (speed only)

    @property
    def fp_modules(self) -> tuple[str, ...]:
        """What a weight quantizer leaves in floating point: the first conv and the classifier
        (QAT methods put them at ``first_last_bits`` instead) and every BatchNorm."""
        return (self.first, self.last, "*bn")

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every ``nn.Conv2d`` and ``nn.Linear`` by dotted name, in module order."""
        return {name: m for name, m in model.named_modules()
                if isinstance(m, nn.Conv2d | nn.Linear)}

    def target_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The quantization targets: every conv and Linear but the first and the last."""
        return {n: m for n, m in self.layers(model).items() if n not in (self.first, self.last)}

    # --- the sequential calibration pipeline (suite.sequential) ---------------------------

    def catch_inputs(self, model: nn.Module, calib: torch.Tensor
                     ) -> tuple[list[torch.Tensor], dict]:
        """The first block's inputs are the images themselves, ``calib_batch`` per chunk."""
        return list(calib.split(self.calib_batch)), {}

    def pipeline(self, model: nn.Module, true_sequential: bool
                 ) -> list[tuple[nn.Module, list[dict[str, nn.Module]]]]:
        """Each block with its target layers (model-level names), in forward order: one group,
        or one group per layer with ``true_sequential``."""
        names = {id(m): n for n, m in self.target_layers(model).items()}
        out = []
        for _, block in self.blocks(model):
            found = {names[id(m)]: m for m in block.modules() if id(m) in names}
            groups = [{n: m} for n, m in found.items()] if true_sequential else [found]
            out.append((block, [g for g in groups if g]))
        return out

    def block_norms(self, block: nn.Module) -> list[nn.Module]:
        """The BatchNorms of a block (affine parameters a block-wise tuner may train)."""
        return [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` pieces whose composition in order is ``model``'s forward.

        Block names are dotted submodule names. A stem or head of several entries is wrapped in
        a fresh ``nn.Sequential`` named ``"stem"`` / ``"head"`` that holds the model's own
        modules (children named after them, dots as underscores), so call it after module swaps.
        """
        out = [] if not self.stem else [_compose(model, self.stem, "stem")]
        for stage in self.stages:
            prefix = f"{stage}." if stage else ""
            out += [(prefix + n, m) for n, m in model.get_submodule(stage).named_children()]
        return out + ([_compose(model, self.head, "head")] if self.head else [])


def _compose(model: nn.Module, names: tuple[str, ...], label: str) -> tuple[str, nn.Module]:
    """One piece from ``names``: the submodule itself if single, else a Sequential of them."""
    if len(names) == 1 and names[0] not in (POOL, FLATTEN):
        return names[0], model.get_submodule(names[0])
    parts = OrderedDict()
    for name in names:
        if name == POOL:
            parts["pool"] = nn.AdaptiveAvgPool2d(1)  # (B, C, 1, 1)
        elif name == FLATTEN:
            parts["flatten"] = nn.Flatten(1)  # (B, C)
        else:
            parts[name.replace(".", "_")] = model.get_submodule(name)
    return label, nn.Sequential(parts)


def _cnn_adapter(arch: str) -> VisionAdapter:
    return VisionAdapter(arch, first="block1.conv", last="head.fc", stem=(), stages=("",),
                         head=())


VISION_ADAPTERS: dict[str, VisionAdapter] = {
    "cnn-small": _cnn_adapter("cnn-small"),
    "cnn-small-w32": _cnn_adapter("cnn-small-w32"),
    "mbv2-small": VisionAdapter("mbv2-small", first="stem.conv", last="head.fc", stem=(),
                                stages=("",), head=()),
    "resnet20": VisionAdapter("resnet20", first="stem.conv", last="head.fc", stem=("stem",),
                              stages=("layer1", "layer2", "layer3"), head=("head",)),
    "resnet18": VisionAdapter("resnet18", first="conv1", last="fc",
                              stem=("conv1", "bn1", "relu", "maxpool"),
                              stages=("layer1", "layer2", "layer3", "layer4"),
                              head=("avgpool", FLATTEN, "fc")),
    "mobilenet_v2": VisionAdapter("mobilenet_v2", first="features.0.0", last="classifier.1",
                                  stem=(), stages=("features",),
                                  head=(POOL, FLATTEN, "classifier")),
}


def adapter_for(arch: str) -> VisionAdapter:
    """The adapter of ``arch`` (ConfigError listing the accepted architectures otherwise)."""
    check_arch(arch, "arch")
    return VISION_ADAPTERS[arch]


def vision_archs() -> list[str]:
    """Registered architecture ids."""
    return list(_BUILDERS)
