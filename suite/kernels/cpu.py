"""CPU kernels over ``KernelWeight`` storage, and ``PackedLinear``.

Backends (``x`` float32 (M, cols) -> (M, rows)):
  * ``torch-int4``: ``aten._weight_int4pack_mm_for_cpu`` (torch's tinygemm CPU kernel). Its
    dequantisation is ``(q - 8) * s + z`` per (group, row), so ``z = offset + 8 s`` converts
    our ``s q + offset`` exactly. Used for 4-bit codes with a group that is a multiple of 32
    up to 256, rows a multiple of 16 and columns a multiple of 64; other shapes go to the
    next backend (nothing is padded).
  * ``torch-int8``: ``aten._weight_int8pack_mm`` (per-channel scale, signed int8 codes): 8-bit
    symmetric per-channel layers (q - 128 fits int8, offset = -128 s).
  * ``cpp``: ``qgemm.cpp``, compiled once per machine with ``torch.utils.cpp_extension`` (-O3
    -march=native); every bit width 2..8 and any group; multi-threaded over rows.
  * ``reference``: unpack, dequantize, matmul in torch: always available, the correctness
    yardstick and the fallback when no compiler is present.

``select`` picks, for a weight, the first backend of ``PREFERENCE`` that supports it; outlier
channels add a sparse product and a column permutation gathers ``x`` first, whatever the
backend.
"""

from __future__ import annotations

import hashlib
import logging
import platform
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suite.kernels.packing import KernelWeight

log = logging.getLogger("qbench.kernels")
BACKENDS = ("torch-int4", "torch-int8", "cpp", "reference")
PREFERENCE = ("cpp", "torch-int4", "torch-int8", "reference")  # see select()
_SOURCE = Path(__file__).with_name("qgemm.cpp")


@lru_cache(maxsize=1)
def cpp_module() -> Any | None:
    """The compiled ``qgemm`` extension, or None (logged once) when it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        from suite.assets import cache_dir

        tag = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode()
                             + platform.processor().encode() + b"omp").hexdigest()[:12]
        build = cache_dir() / "torch-ext" / f"qgemm-{tag}"
        build.mkdir(parents=True, exist_ok=True)
        return load(name=f"qbench_qgemm_{tag}", sources=[str(_SOURCE)], build_directory=str(build),
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no headers: fall back, say so once
        log.warning("qbench: C++ kernel unavailable (%s); using the reference backend",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def supports(backend: str, w: KernelWeight) -> bool:
    """Whether ``backend`` can compute with ``w`` (exactly, up to float summation order)."""
    if backend == "torch-int4":
        return (w.bits == 4 and w.group % 32 == 0 and w.group <= 256 and w.rows % 16 == 0
                and w.cols % w.group == 0 and w.cols % 64 == 0)
    if backend == "torch-int8":
        return (w.bits == 8 and w.group == w.cols
                and bool(torch.equal(w.offset, -128 * w.scale)))
    if backend == "cpp":
        return cpp_module() is not None
    return backend == "reference"


def select(w: KernelWeight, backend: str = "auto") -> str:
    """The backend to use: ``backend`` itself (checked), or the first supporting one."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend: got {backend!r}; accepted: auto, {', '.join(BACKENDS)}")
        if not supports(backend, w):
            raise ValueError(f"backend {backend!r} does not support {w.bits}-bit group "
                             f"{w.group} ({w.rows}x{w.cols})")
        return backend
    return next(b for b in PREFERENCE if supports(b, w))


def prepare(w: KernelWeight, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function x (M, cols) float32 -> (M, rows) float32 for ``w`` on ``backend``; the
    backend's own weight layout is built once here."""
    core = _CORES[backend](w)
    perm, outliers = w.perm, w.outliers

    def run(x: torch.Tensor) -> torch.Tensor:
        y = core(x if perm is None else x[:, perm])
        if outliers is not None:
            y = y + (outliers @ x.t()).t()
        return y

    return run


def _int4_core(w: KernelWeight) -> Callable[[torch.Tensor], torch.Tensor]:
    q = w.codes().to(torch.int32)  # (rows, cols)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    zero = w.offset + 8 * w.scale  # (q - 8) s + zero = s q + offset
    sz = torch.stack([w.scale.t(), zero.t()], dim=-1).contiguous()  # (groups, rows, 2)
    group = w.group
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)


def _int8_core(w: KernelWeight) -> Callable[[torch.Tensor], torch.Tensor]:
    q = (w.codes().to(torch.int16) - 128).to(torch.int8)  # (rows, cols) signed
    scale = w.scale[:, 0].contiguous()
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale)


def _cpp_core(w: KernelWeight) -> Callable[[torch.Tensor], torch.Tensor]:
    mod = cpp_module()
    assert mod is not None
    scale, offset, bits, group = w.scale, w.offset, w.bits, w.group
    if w.cols % 8 == 0 and w.bits in (2, 3, 4, 8):  # the fast path: row-planar layout
        planar = to_planar(w.codes(), w.bits)
        return lambda x: mod.qgemm_planar(x, planar, scale, offset, bits, group)
    packed = w.packed
    return lambda x: mod.qgemm(x, packed, scale, offset, bits, group)


def to_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) codes -> the C++ fast path's row-planar layout, uint8 (rows, cols * bits
    / 8): the same bytes per code as dense packing (layout in qgemm.cpp)."""
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    if bits == 4:
        h = c.shape[1] // 2
        return (c[:, :h] | (c[:, h:] << 4)).contiguous()
    low = (c & 3).unflatten(1, (4, -1))  # (rows, 4, Q): plane s holds columns s*Q ..
    out = low[:, 0] | (low[:, 1] << 2) | (low[:, 2] << 4) | (low[:, 3] << 6)  # (rows, Q)
    if bits == 3:
        high = (c >> 2).unflatten(1, (8, -1)).to(torch.int32)  # (rows, 8, E)
        word = (high << torch.arange(8, dtype=torch.int32)[:, None]).sum(1)  # (rows, E)
        out = torch.cat([out, word.to(torch.uint8)], dim=1)
    return out.contiguous()


def _reference_core(w: KernelWeight) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        q = w.codes().float().reshape(w.rows, -1, w.group)  # (rows, groups, group)
        dq = (q * w.scale[..., None] + w.offset[..., None]).reshape(w.rows, w.cols)
        return x @ dq.t()
    return run


_CORES = {"torch-int4": _int4_core, "torch-int8": _int8_core, "cpp": _cpp_core,
          "reference": _reference_core}


class PackedLinear(nn.Module):
    """A Linear computed from packed low-bit storage (float32 activations in and out).

    Args:
        weight: the packed weight (``packing.from_qstate``).
        bias: the layer's bias or None.
        backend: ``auto`` or one of ``BACKENDS``.
    """

    def __init__(self, weight: KernelWeight, bias: torch.Tensor | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        self.weight_packed = weight
        self.backend = select(weight, backend)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.in_features, self.out_features = weight.cols, weight.rows
        self._run = prepare(weight, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        lead = x.shape[:-1]
        y = self._run(x.reshape(-1, self.in_features).float().contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        w = self.weight_packed
        return (f"in={w.cols}, out={w.rows}, bits={w.bits}, group={w.group}, "
                f"backend={self.backend}, bytes={w.nbytes()}")
