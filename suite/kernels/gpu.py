"""GPU kernels over ``KernelWeight`` storage (issue 7, GPU part).

Backends (``x`` (M, cols) in the activation dtype, on the device -> (M, rows) in that dtype):
  * ``cuda-int4``: ``aten._weight_int4pack_mm`` (torch's tinygemm CUDA kernel; bf16
    activations only, compute capability >= 8.0). It dequantises ``(q - 8) * s + z`` per
    (group, row) in bf16, so ``z = offset + 8 s`` converts our ``s q + offset`` exactly before
    the scale and zero are rounded to bf16. ``aten._convert_weight_to_int4pack`` takes the
    codes as uint8 (rows, cols / 2), the even column in the high nibble. Used for 4-bit codes,
    groups of 32, 64, 128 or 256, rows a multiple of 8 and columns a multiple of 32.
  * ``triton``: ``triton_qgemm.qgemm_kernel`` for 2, 3, 4 and 8 bits, any group whose K
    blocks can stay inside one group (see ``block_k``), fp16 / bf16 / fp32 activations,
    float32 accumulation and float32 scales and offsets. Layout: codes packed along the input
    dimension into int32 words, ``32 / b`` codes per word for b in {2, 4, 8}; 3-bit codes as
    a 2-bit plane plus a 1-bit plane (exactly 3 bits per code; details in ``triton_qgemm``).

``prepare`` builds a backend's layout once on the device; a column permutation gathers ``x``
first and outlier channels add a sparse float32 product, whatever the backend (as in ``cpu``).
Nothing here touches CUDA or imports triton at import time: ``supports`` is False on a machine
without CUDA (and, for ``triton``, without an importable triton), and the triton kernel module
is imported on first use. Under ``TRITON_INTERPRET=1`` the ``triton`` backend also runs on CPU
tensors (``prepare(..., device="cpu")``), which is how it is tested without a GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from suite.kernels.packing import KernelWeight

BACKENDS = ("cuda-int4", "triton")
PREFERENCE = ("cuda-int4", "triton")  # see select(); untuned order (no GPU timing yet)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT4_GROUPS = (32, 64, 128, 256)
TRITON_BITS = (2, 3, 4, 8)

# Correctness gate against the fake-quant product computed in float64 from the SAME activations
# (already in the kernel's dtype), as max |y - ref| / max |ref|. The kernels accumulate in
# float32 but store the output in the activation dtype: unit roundoff 2^-8 for bf16 (RTNE on
# the GPU; triton's interpreter truncates, 2^-7), 2^-11 for fp16; the outlier correction rounds
# once more. tinygemm also rounds scale, zero and each dequantised weight to bf16, which adds
# about 2^-8 of the output scale (random signs over K). bf16: 2e-2 is ~2.5x the sum of those
# worst cases; fp16: 3e-3 ~3x; fp32: summation order over K only (measured ~1e-6).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    """Whether ``triton`` can be imported (checked once, without importing it here)."""
    return importlib.util.find_spec("triton") is not None


def cuda_ready() -> bool:
    """Whether a CUDA device is visible (does not create a CUDA context)."""
    return torch.cuda.is_available()


def unsupported(backend: str, w: KernelWeight, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot compute with ``w`` in ``dtype`` (format and shape only, not the
    device), or None when it can."""
    if backend not in BACKENDS:
        return f"backend: got {backend!r}; accepted: auto, {', '.join(BACKENDS)}"
    if dtype not in DTYPES:
        return f"activation dtype {dtype} (accepted: float16, bfloat16, float32)"
    if backend == "cuda-int4":
        if dtype != torch.bfloat16:
            return f"cuda-int4 takes bfloat16 activations only (got {dtype})"
        if w.bits != 4 or w.group not in INT4_GROUPS:
            return (f"cuda-int4 needs 4-bit codes in groups of 32..256 (got {w.bits}-bit, "
                    f"group {w.group})")
        if w.rows % 8 or w.cols % 32 or w.cols % w.group:
            return f"cuda-int4 needs rows % 8 == 0 and cols % 32 == 0 (got {w.rows}x{w.cols})"
        return None
    if w.bits not in TRITON_BITS:
        return f"triton handles 2, 3, 4 and 8-bit codes (got {w.bits})"
    if w.cols % w.group:
        return f"triton needs whole groups (cols {w.cols}, group {w.group})"
    if w.cols > w.group and _pow2_divisor(w.group) < 16:
        return (f"triton: group {w.group} has no power-of-two divisor >= 16, so a K block "
                "(>= 16 for tl.dot) would straddle groups")
    return None


def supports(backend: str, w: KernelWeight, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``backend`` can run ``w`` with ``dtype`` activations on this machine's GPU."""
    if unsupported(backend, w, dtype) is not None or not cuda_ready():
        return False
    if backend == "triton":
        return triton_importable()
    return torch.cuda.get_device_capability() >= (8, 0)  # tinygemm uses bf16 mma (sm80+)


def select(w: KernelWeight, backend: str = "auto", dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend to use: ``backend`` itself (checked), or the first supporting one."""
    if backend != "auto":
        reason = unsupported(backend, w, dtype)
        if reason is not None:
            raise ValueError(reason)
        if not supports(backend, w, dtype):
            raise ValueError(f"backend {backend!r} needs a CUDA device"
                             + (" and triton" if backend == "triton" else " (sm80+)"))
        return backend
    found = [b for b in PREFERENCE if supports(b, w, dtype)]
    if not found:
        raise ValueError(f"no GPU backend for {w.bits}-bit group {w.group} ({w.rows}x{w.cols}) "
                         f"with {dtype} activations on this machine")
    return found[0]


def prepare(w: KernelWeight, backend: str, dtype: torch.dtype = torch.bfloat16,
            device: str | torch.device = "cuda") -> Callable[[torch.Tensor], torch.Tensor]:
    """A function x (M, cols) ``dtype`` on ``device`` -> (M, rows) ``dtype`` for ``w``.

    The backend's own layout is built once here, on ``device``. Raises ValueError, with the
    reason, for a format or shape the backend does not handle.
    """
    reason = unsupported(backend, w, dtype)
    if reason is not None:
        raise ValueError(reason)
    core = (_triton_core if backend == "triton" else _int4_core)(w, device)
    perm = None if w.perm is None else w.perm.to(device)
    outliers = None if w.outliers is None else w.outliers.to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        y = core(x if perm is None else x[:, perm])
        if outliers is not None:  # float32 sparse correction; one more rounding
            y = (y.float() + (outliers @ x.float().t()).t()).to(y.dtype)
        return y

    return run


def check(w: KernelWeight, backend: str, x: torch.Tensor, weight: torch.Tensor) -> float:
    """``max |y - ref| / max |ref|`` of ``backend`` on ``x`` (its dtype and device) against the
    fake-quant product ``x @ weight.T`` in float64 (``weight``: the dequantized layer state)."""
    y = prepare(w, backend, x.dtype, x.device)(x)
    ref = x.double() @ weight.to(x.device, torch.float64).t()
    return float((y.double() - ref).abs().max() / ref.abs().max())


# --- cuda-int4 (tinygemm) --------------------------------------------------------------------

def int4_operands(w: KernelWeight) -> tuple[torch.Tensor, int, torch.Tensor]:
    """tinygemm's inputs on the CPU: uint8 codes (rows, cols / 2) with the even column in the
    high nibble, innerKTiles, and bf16 scale-and-zero (groups, rows, 2) with z = offset + 8 s."""
    q = w.codes()  # (rows, cols) uint8, packed (permuted) column order
    nibbles = ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()
    inner = next(t for t in (8, 4, 2) if w.cols % (16 * t) == 0)
    zero = w.offset + 8 * w.scale  # (q - 8) s + zero = s q + offset
    sz = torch.stack([w.scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return nibbles, inner, sz


def _int4_core(w: KernelWeight, device: str | torch.device
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    nibbles, inner, sz = int4_operands(w)
    packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.to(device), inner)
    sz, group = sz.to(device), w.group
    return lambda x: torch.ops.aten._weight_int4pack_mm(x.contiguous(), packed, group, sz)


# --- triton ----------------------------------------------------------------------------------

def pack_words(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows, cols) codes -> the triton layout: int32 words (ceil(cols * b / 32), rows) for
    b in {1, 2, 4, 8}; for b = 3 the 2-bit plane of the low bits and the 1-bit plane of the
    high bit. The second tensor is None except for b = 3."""
    if bits == 3:
        return pack_words(codes & 3, 2)[0], pack_words(codes >> 2, 1)[0]
    per = 32 // bits
    c = codes.t().to(torch.int64)  # (cols, rows): words run along the input dimension
    pad = -c.shape[0] % per
    if pad:
        c = torch.cat([c, c.new_zeros(pad, c.shape[1])])
    shifts = (torch.arange(per, dtype=torch.int64) * bits)[None, :, None]
    word = (c.reshape(-1, per, c.shape[1]) << shifts).sum(1)  # (words, rows) in [0, 2^32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous(), None


def unpack_words(qa: torch.Tensor, qb: torch.Tensor | None, bits: int, cols: int
                 ) -> torch.Tensor:
    """Inverse of :func:`pack_words` with the kernel's own index arithmetic: uint8 (rows, cols)."""
    k = torch.arange(cols)
    if bits == 3:
        assert qb is not None
        lo = (qa[k // 16] >> ((k % 16) * 2)[:, None]) & 3
        hi = (qb[k // 32] >> (k % 32)[:, None]) & 1
        return (lo | (hi << 2)).t().to(torch.uint8)
    per = 32 // bits
    return ((qa[k // per] >> ((k % per) * bits)[:, None]) & (2**bits - 1)).t().to(torch.uint8)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one launch; ``use_dot`` selects ``tl.dot`` over the GEMV path."""

    block_m: int
    block_n: int
    block_k: int
    use_dot: bool
    num_warps: int = 4


def launch_config(m: int, w: KernelWeight) -> LaunchConfig:
    """Heuristic tiles (untuned: no GPU timing yet). M <= 4 takes the broadcast GEMV path with
    narrow N tiles (more programs for a memory-bound GEMV), larger M ``tl.dot`` tiles."""
    align = block_k(w.group, w.cols)
    if m <= 4:
        bm = 1 << (m - 1).bit_length()  # 1, 2, 4
        return LaunchConfig(bm, 32, min(align, 128 // bm), use_dot=False)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    return LaunchConfig(bm, 64, min(align, 64), use_dot=True)


def block_k(group: int, cols: int, cap: int = 128) -> int:
    """The largest K block (a power of two <= ``cap``) that never straddles a group: any block
    for a single group (per-channel / per-tensor, the tail is masked), else a divisor of
    ``group``."""
    return cap if group >= cols else min(cap, _pow2_divisor(group))


def _pow2_divisor(n: int) -> int:
    return n & -n


def layout_bytes(w: KernelWeight, backend: str) -> int:
    """Bytes the backend reads for the weight in its own layout: codes, scales and offsets (and
    permutation and outlier channel, as ``KernelWeight.nbytes`` counts them)."""
    side = w.side_nbytes()
    groups = w.scale.shape[1]
    if backend == "cuda-int4":  # int32 tiles of 4-bit codes + bf16 (scale, zero) pairs
        return w.rows * w.cols // 2 + 4 * groups * w.rows + side
    planes = (2, 1) if w.bits == 3 else (w.bits,)
    words = sum(-(-w.cols * b // 32) for b in planes)
    return 4 * words * w.rows + 8 * groups * w.rows + side


def _triton_core(w: KernelWeight, device: str | torch.device
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    from suite.kernels import triton_qgemm  # imports triton (and fixes interpreter mode)

    qa, qb = pack_words(w.codes(), w.bits)
    qa = qa.to(device)
    qb = qa if qb is None else qb.to(device)
    scale, offset = (t.t().contiguous().to(device) for t in (w.scale, w.offset))

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty(x.shape[0], w.rows, dtype=x.dtype, device=x.device)
        cfg = launch_config(x.shape[0], w)
        triton_qgemm.launch(x, qa, qb, scale, offset, y, w.group, w.bits,
                            (cfg.block_m, cfg.block_n, cfg.block_k), cfg.use_dot, cfg.num_warps)
        return y

    return run
