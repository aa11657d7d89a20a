"""GPU kernels (``suite.kernels.gpu``): layouts, shape rules and the correctness gate.

Without a GPU: the triton layout round-trips through the kernel's own index arithmetic,
unsupported shapes are rejected with a reason, tinygemm's operands encode the same weight, and
the Triton kernel itself runs under triton's CPU interpreter (a subprocess with
``TRITON_INTERPRET=1``, see ``triton_interpreter_check.py``) against the fake-quant product for
bits 2/3/4/8, group 32 / 64 / per-channel, sym and asym, 17x96 and 24x128, M = 1, 3 and 5, and
fp32 / fp16 / bf16 activations. With a GPU (``-m gpu``): both backends over the full format
matrix on CUDA, within ``gpu.TOLERANCE``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpu_cases import Case, full_cases, special_states

from suite.kernels import gpu
from suite.kernels.packing import from_qstate
from suite.primitives import LayerQState, WeightFormat, quantize_tensor

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cols", [13, 96, 100])
def test_triton_layout_round_trips(bits: int, cols: int) -> None:
    g = torch.Generator().manual_seed(bits * cols)
    codes = torch.randint(0, 2**bits, (7, cols), generator=g, dtype=torch.uint8)
    qa, qb = gpu.pack_words(codes, bits)
    assert qa.dtype == torch.int32 and qa.shape[1] == 7
    assert torch.equal(gpu.unpack_words(qa, qb, bits, cols), codes)


def test_triton_layout_bytes_are_dense() -> None:
    """3-bit planes: exactly 3 bits per code; scales and offsets stay float32."""
    kw = from_qstate(quantize_tensor(torch.randn(64, 256), WeightFormat(3, 64)))
    qa, qb = gpu.pack_words(kw.codes(), 3)
    assert 4 * (qa.numel() + qb.numel()) == 64 * 256 * 3 // 8
    assert gpu.layout_bytes(kw, "triton") == kw.packed.numel() + 2 * 4 * kw.scale.numel()
    assert gpu.layout_bytes(kw, "cuda-int4") == 64 * 128 + 4 * 4 * 64  # codes + bf16 (s, z)


def test_unsupported_shapes_are_rejected_with_a_reason() -> None:
    odd = from_qstate(quantize_tensor(torch.randn(17, 96), WeightFormat(4, 24)))
    assert "straddle" in gpu.unsupported("triton", odd, torch.float16)
    with pytest.raises(ValueError, match="straddle"):
        gpu.prepare(odd, "triton", torch.float16, "cpu")
    w3 = from_qstate(quantize_tensor(torch.randn(16, 64), WeightFormat(3, 32)))
    assert "4-bit" in gpu.unsupported("cuda-int4", w3, torch.bfloat16)
    w4 = from_qstate(quantize_tensor(torch.randn(17, 96), WeightFormat(4, 32)))
    assert "rows % 8" in gpu.unsupported("cuda-int4", w4, torch.bfloat16)
    assert "bfloat16" in gpu.unsupported("cuda-int4", w4, torch.float16)
    assert gpu.unsupported("triton", w4, torch.float16) is None
    with pytest.raises(ValueError, match="backend: got 'cpp'"):
        gpu.select(w4, "cpp")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_no_backend_without_cuda() -> None:
    w4 = from_qstate(quantize_tensor(torch.randn(64, 128), WeightFormat(4, 64)))
    assert not any(gpu.supports(b, w4) for b in gpu.BACKENDS)
    with pytest.raises(ValueError, match="no GPU backend"):
        gpu.select(w4)


def test_import_touches_neither_cuda_nor_triton() -> None:
    code = ("import sys, torch, suite.kernels.gpu; "
            "assert 'triton' not in sys.modules; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_env())


def test_int4_operands_encode_the_same_weight() -> None:
    """tinygemm's (q - 8) * s + z over our nibbles equals the state (up to bf16 s and z), and
    the packed shapes pass torch's meta checks for the CUDA ops."""
    qs = quantize_tensor(torch.randn(24, 192), WeightFormat(4, 64))
    kw = from_qstate(qs)
    nibbles, inner, sz = gpu.int4_operands(kw)
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (24, 96) and inner == 4
    q = torch.stack([nibbles >> 4, nibbles & 15], dim=-1).reshape(24, 192)  # even col: high
    assert torch.equal(q, kw.codes())
    s, z = (sz[..., i].float().t().repeat_interleave(64, dim=1) for i in (0, 1))
    torch.testing.assert_close((q.float() - 8) * s + z, qs.dequantize(), rtol=0, atol=2e-2)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # torch's meta checks of the CUDA ops, no device needed
        fake_nibbles, fake_sz, x = (mode.from_tensor(t) for t in
                                    (nibbles, sz, torch.empty(5, 192, dtype=torch.bfloat16)))
        packed = torch.ops.aten._convert_weight_to_int4pack(fake_nibbles, inner)
        assert packed.shape == (24 // 8, 192 // (16 * inner), 32, inner // 2)
        y = torch.ops.aten._weight_int4pack_mm(x, packed, 64, fake_sz)
        assert y.shape == (5, 24)


def test_triton_kernel_under_the_interpreter() -> None:
    """The real kernel, interpreted on CPU, equals the fake-quant product (about 15 s)."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_interpreter_check.py")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=_env(TRITON_INTERPRET="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) >= 200  # 25 states x M in {1, 3, 5} x 3 dtypes
    bad = [r for r in rows if not r["err"] < r["tol"]]
    assert not bad, bad[:5]


def _env(**extra: str) -> dict[str, str]:
    """This checkout first on the path (qbench may be installed from another checkout)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, **extra}


# --- on a GPU --------------------------------------------------------------------------------

FULL = full_cases()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", FULL, ids=[c.name for c in FULL])
@pytest.mark.parametrize("m", [1, 5, 16, 128])
def test_gpu_backends_match_fake_quant(case: Case, m: int) -> None:
    _check_every_backend(case.state(), m)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 5, 16, 128])
def test_gpu_backends_handle_offsets_permutations_and_outliers(m: int) -> None:
    for _, qs in special_states():
        _check_every_backend(qs, m)


def _check_every_backend(qs: LayerQState, m: int) -> None:
    kw, weight = from_qstate(qs), qs.dequantize()
    x32 = torch.randn(m, kw.cols, generator=torch.Generator().manual_seed(m))
    ran = []
    for backend in gpu.BACKENDS:
        for dtype in gpu.DTYPES:
            if not gpu.supports(backend, kw, dtype):
                continue
            err = gpu.check(kw, backend, x32.to("cuda", dtype), weight)
            assert err < gpu.TOLERANCE[dtype], (backend, dtype, err)
            ran.append(backend)
    if kw.bits in gpu.TRITON_BITS and gpu.triton_importable():
        assert "triton" in ran
    if (kw.bits == 4 and kw.group in gpu.INT4_GROUPS and kw.rows % 8 == 0 and kw.cols % 32 == 0
            and torch.cuda.get_device_capability() >= (8, 0)):
        assert "cuda-int4" in ran


@pytest.mark.gpu
@needs_cuda
def test_gpu_select_prefers_tinygemm_for_int4_bf16() -> None:
    kw = from_qstate(quantize_tensor(torch.randn(128, 256), WeightFormat(4, 64)))
    assert gpu.select(kw, dtype=torch.bfloat16) == "cuda-int4"
    assert gpu.select(kw, dtype=torch.float16) == "triton"
