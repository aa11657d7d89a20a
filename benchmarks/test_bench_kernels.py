"""pytest-benchmark: packed low-bit GEMV/GEMM on CPU against the fp32 / bf16 linear (issue 7).

Each packed case first checks the kernel's output against the fake-quant product within the
backend's allowed error (a kernel that fails is not timed). Timings are cold: calls rotate over
copies of the weight larger than the caches (``bench.cold_copies``). ``test_write_kernel_table``
writes ``results/kernels-cpu.csv`` (every shape x format x M in {1, 16, 128} x backend;
median, IQR, achieved GB/s, fraction of the read bandwidth read around each block of the
timing and of the run's best full reading, speedups)
when ``QBENCH_KERNEL_TABLE=1``.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

from suite.kernels import bench, cpu
from suite.kernels.packing import from_qstate
from suite.primitives import PER_CHANNEL, WeightFormat, quantize_tensor

FMTS = [WeightFormat(4, 64), WeightFormat(3, 64), WeightFormat(2, 64),
        WeightFormat(8, PER_CHANNEL, sym=True)]


def _rotating(fns):
    cycle = itertools.cycle(fns)
    return lambda: next(cycle)()


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_linear_4096(benchmark, m, dtype):
    W, x = torch.randn(4096, 4096).to(dtype), torch.randn(m, 4096).to(dtype)
    copies = bench.cold_copies(W, W.numel() * W.element_size())
    benchmark(_rotating([lambda w=w: x @ w.t() for w in copies]))


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.label())
@pytest.mark.parametrize("backend", [b for b in cpu.BACKENDS if b != "reference"])
def test_packed_4096(benchmark, backend, fmt, m):
    qs = quantize_tensor(torch.randn(4096, 4096) * 0.02, fmt)
    w = from_qstate(qs)
    if not cpu.supports(backend, w):
        pytest.skip(f"{backend} does not support {fmt.label()}")
    x = torch.randn(m, 4096)
    kernel = cpu.prepare(w, backend)
    assert bench.check(w, kernel, x, x @ qs.dequantize().t())[1]
    copies = bench.cold_copies(kernel, kernel.nbytes())
    benchmark(_rotating([lambda k=k: k(x) for k in copies]))


@pytest.mark.skipif(not os.environ.get("QBENCH_KERNEL_TABLE"), reason="QBENCH_KERNEL_TABLE=1")
def test_write_kernel_table():
    import pandas as pd

    probe = bench.BandwidthProbe()
    for _ in range(3):  # the peak is the best reading before, during and after the run
        probe(1.0)
    rows = bench.bench_rows(bench.SHAPES, bench.FORMATS, bench.MS, probe)
    for _ in range(3):
        probe(1.0)
    bench.against_peak(rows, probe.peak)
    out = Path(__file__).resolve().parent.parent / "results" / "kernels-cpu.csv"
    df = pd.DataFrame(rows)[bench.COLUMNS]
    df["threads"] = torch.get_num_threads()
    df.to_csv(out, index=False, float_format="%.6g")
    assert not df["status"].str.startswith("wrong").any()


@pytest.mark.skipif(not os.environ.get("QBENCH_KERNEL_TABLE"), reason="QBENCH_KERNEL_TABLE=1")
def test_write_ladder_table():
    """results/kernels-cpu-ladder.csv: int4 / int3 / int2 g64 against fp32 at 4096x4096, M = 1,
    interleaved over 400 rounds (the acceptance comparison of the bit widths)."""
    import pandas as pd

    rows = bench.ladder_rows(4096, 4096, bench.BandwidthProbe())
    out = Path(__file__).resolve().parent.parent / "results" / "kernels-cpu-ladder.csv"
    df = pd.DataFrame(rows)
    df["threads"] = torch.get_num_threads()
    df.to_csv(out, index=False, float_format="%.6g")
