"""pytest-benchmark: packed low-bit GEMV/GEMM on CUDA (tinygemm int4, Triton int2/3/4/8) against
cuBLAS fp16 / bf16 / fp32 (issue 7, GPU part). Skipped without a CUDA device.

Each packed case first checks the kernel's output against the fake-quant product (a kernel that
fails is not timed). pytest-benchmark times wall clock around a synchronised call; the table
uses CUDA events instead (``suite.kernels.gpu_bench``): with ``QBENCH_KERNEL_TABLE=1``,
``test_write_cuda_kernel_table`` writes ``results/kernels-cuda.csv`` (shapes of
``bench.SHAPES``, M in {1, 16, 128}, the columns of ``results/kernels-cpu.csv``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from suite.kernels import bench, gpu, gpu_bench
from suite.kernels.packing import from_qstate
from suite.primitives import PER_CHANNEL, WeightFormat, quantize_tensor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
FMTS = [WeightFormat(4, 64), WeightFormat(3, 64), WeightFormat(2, 64),
        WeightFormat(8, PER_CHANNEL, sym=True)]


def _synced(fn):  # noqa: ANN001, ANN202
    def run() -> None:
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_cublas_dense_4096(benchmark, m, dtype):
    W = torch.randn(4096, 4096, device="cuda", dtype=dtype)
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    benchmark(_synced(lambda: x @ W.t()))


@pytest.mark.parametrize("m", [1, 16, 128])
@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.label())
@pytest.mark.parametrize("backend", gpu.BACKENDS)
def test_packed_4096(benchmark, backend, fmt, m):
    qs = quantize_tensor(torch.randn(4096, 4096) * 0.02, fmt)
    w = from_qstate(qs)
    if not gpu.supports(backend, w, torch.bfloat16):
        pytest.skip(f"{backend} does not support {fmt.label()} here")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    assert gpu.check(w, backend, x, qs.dequantize()) < gpu.TOLERANCE[torch.bfloat16]
    run = gpu.prepare(w, backend, torch.bfloat16)
    benchmark(_synced(lambda: run(x)))


@pytest.mark.skipif(not os.environ.get("QBENCH_KERNEL_TABLE"), reason="QBENCH_KERNEL_TABLE=1")
def test_write_cuda_kernel_table():
    import pandas as pd

    bw = gpu_bench.read_bandwidth()
    rows = gpu_bench.bench_rows(bench.SHAPES, bench.FORMATS, gpu_bench.MS, bw)
    out = Path(__file__).resolve().parent.parent / "results" / "kernels-cuda.csv"
    df = pd.DataFrame(rows)
    df["read_bw_GBps"] = bw / 1e9
    df.to_csv(out, index=False, float_format="%.6g")
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"][["shape", "format", "backend"]]
