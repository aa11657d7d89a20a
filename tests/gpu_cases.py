"""Quantized layer states shared by the GPU kernel tests (the Triton-interpreter check and the
``gpu``-marked tests): every bit width, group kind and zero kind on odd and even shapes, plus
decoupleQ float offsets, a GPTQ act-order permutation and a pre-calibration outlier channel."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from suite.primitives import PER_CHANNEL, PER_TENSOR, LayerQState, WeightFormat, quantize_tensor


@dataclass(frozen=True)
class Case:
    """One quantized layer to build: a format on a (rows, cols) Gaussian weight."""

    bits: int
    group: int
    sym: bool
    rows: int
    cols: int

    @property
    def name(self) -> str:
        return f"{WeightFormat(self.bits, self.group, self.sym).label()}-{self.rows}x{self.cols}"

    def state(self) -> LayerQState:
        """The layer state (seeded by the case, so every run builds the same one)."""
        g = torch.Generator().manual_seed(hash((self.bits, self.group, self.sym)) % 2**31)
        w = torch.randn(self.rows, self.cols, generator=g)
        return quantize_tensor(w, WeightFormat(self.bits, self.group, self.sym))


def format_cases(bits: tuple[int, ...], groups: tuple[int, ...],
                 shapes: tuple[tuple[int, int], ...]) -> list[Case]:
    """Every bits x group x sym x shape whose columns split into whole groups."""
    return [Case(b, gs, sym, rows, cols)
            for b, gs, sym, (rows, cols) in itertools.product(bits, groups, (False, True), shapes)
            if gs <= 0 or cols % gs == 0]


def special_states() -> list[tuple[str, LayerQState]]:
    """decoupleQ float offsets, GPTQ act-order g_idx and a pre-calibration outlier channel."""
    from methods.precalibration import PreCalibrationConfig, precalibrate_layer

    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=g)
    fmt = WeightFormat(3, 32)
    base = quantize_tensor(w, fmt)
    floaty = LayerQState(base.codes, base.scale, torch.randn(32, 4, generator=g), fmt,
                         zero_kind="float")
    perm = torch.randperm(128, generator=g)
    g_idx = torch.empty(128, dtype=torch.long)
    g_idx[perm] = torch.arange(128) // 32
    actorder = LayerQState(base.codes, base.scale, base.zero, fmt, g_idx=g_idx)
    outl, _ = precalibrate_layer(w, fmt, PreCalibrationConfig())
    return [("float-offset", floaty), ("act-order", actorder), ("outliers", outl)]


def small_states() -> list[tuple[str, LayerQState]]:
    """The interpreter's handful: bits 2/3/4/8, group 32 / 64 / per-channel, sym and asym,
    odd shapes, and the special states."""
    cases = (format_cases((2, 3, 4, 8), (32, PER_CHANNEL), ((17, 96),))
             + format_cases((2, 3, 4), (64,), ((24, 128),)))
    return [(c.name, c.state()) for c in cases] + special_states()


def full_cases() -> list[Case]:
    """The GPU matrix (built lazily, one case per test): every bit width and group kind on odd,
    small and 7B-like shapes."""
    return format_cases((2, 3, 4, 5, 8), (32, 64, 128, PER_CHANNEL, PER_TENSOR),
                        ((17, 96), (48, 256), (256, 1024), (4096, 4096)))
