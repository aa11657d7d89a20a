"""CUDA kernel timing: every (shape x M x format x GPU backend x activation dtype) against cuBLAS
dense fp32 / fp16 / bf16, the device's read bandwidth measured in the same run, and the rows of
``results/kernels-cuda.csv`` (the same columns as ``bench.bench_rows``).

Times come from CUDA events around each call: ``warmup`` calls first, then the median and
inter-quartile range over ``reps`` calls, each preceded by zeroing a 256 MiB buffer so the
weight is read from HBM, not from L2 (an H100 has 50 MiB of L2, enough for a 4-bit 4096 x
11008 weight). Read bandwidth: a float32 ``sum`` over a 1 GiB device buffer, timed the same way.
``weight_bytes`` is what the backend reads in its own layout (``gpu.layout_bytes``). A backend
is timed only after its output matched the fake-quant product (``gpu.check`` within
``gpu.TOLERANCE``); one that fails is recorded as wrong, one that raises as an error.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable

import torch

from suite.kernels import bench, gpu
from suite.kernels.packing import from_qstate
from suite.primitives import LayerQState, WeightFormat, quantize_tensor

MS = (1, 16, 128)
DENSE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FLUSH_BYTES = 256 << 20


def cuda_time(fn: Callable[[], object], warmup: int = 25, reps: int = 200) -> bench.Timing:
    """Median and IQR (seconds) of ``fn`` over ``reps`` CUDA-event-timed calls, L2 flushed."""
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    q = statistics.quantiles(ms, n=4)
    return bench.Timing(statistics.median(ms) / 1e3, (q[2] - q[0]) / 1e3)


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """The device's read bandwidth in bytes/s: ``sum`` over a float32 device buffer."""
    buf = torch.ones(nbytes // 4, device="cuda")
    return nbytes / cuda_time(lambda: buf.sum(), warmup=5, reps=50).median


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read AND written (what a
    ``cudaMemcpy`` moves); the GPU check's reference for a kernel's achieved bandwidth."""
    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src), warmup=5, reps=50).median


def shape_rows(name: str, shape: tuple[int, int], formats: list[WeightFormat],
               ms: tuple[int, ...], bandwidth: float) -> list[dict]:
    """The rows of one shape: each format is quantized once (on the CPU) and its packed
    weight timed at every M against the cuBLAS baselines of the same M."""
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(out_f, in_f, generator=gen) * 0.02
    xs = {m: torch.randn(m, in_f, generator=gen) for m in ms}
    dense = {m: _dense_rows(name, W, xs[m], bandwidth) for m in ms}
    rows = [r for m in ms for r in dense[m]["rows"]]
    for fmt in formats:
        if fmt.group_size > 0 and in_f % fmt.group_size:
            continue
        qs = quantize_tensor(W, fmt)
        for m in ms:
            rows += _format_rows(name, W, xs[m], fmt, bandwidth, dense[m]["timings"], qs)
    return rows


def bench_rows(shapes: dict[str, tuple[int, int]], formats: list[WeightFormat],
               ms: tuple[int, ...] = MS, bandwidth: float | None = None) -> list[dict]:
    """One row per (shape, M, format, backend-dtype), plus the cuBLAS dense baselines."""
    bandwidth = bandwidth or read_bandwidth()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for (name, (out_f, in_f)), m in itertools.product(shapes.items(), ms):
        x = torch.randn(m, in_f, generator=gen)
        W = torch.randn(out_f, in_f, generator=gen) * 0.02
        dense = _dense_rows(name, W, x, bandwidth)
        rows += dense["rows"]
        for fmt in formats:
            if fmt.group_size <= 0 or in_f % fmt.group_size == 0:
                rows += _format_rows(name, W, x, fmt, bandwidth, dense["timings"])
    return rows


def _dense_rows(name: str, W: torch.Tensor, x: torch.Tensor, bandwidth: float) -> dict:
    timings, rows = {}, []
    for dt in DENSE.values():
        Wd, xd = W.to("cuda", dt), x.to("cuda", dt)
        timings[dt] = cuda_time(lambda Wd=Wd, xd=xd: xd @ Wd.t())
    for label, dt in DENSE.items():
        rows.append(bench._row(name, *W.shape, x.shape[0], label, "cublas", timings[dt],
                               W.numel() * dt.itemsize, bandwidth, timings))
    return {"rows": rows, "timings": timings}


def _format_rows(name: str, W: torch.Tensor, x: torch.Tensor, fmt: WeightFormat,
                 bandwidth: float, dense: dict, qs: LayerQState | None = None) -> list[dict]:
    qs = qs if qs is not None else quantize_tensor(W, fmt)
    w, weight = from_qstate(qs), qs.dequantize()
    out_f, in_f = W.shape
    rows = []
    for backend, dt in itertools.product(gpu.BACKENDS, (torch.bfloat16, torch.float16)):
        if not gpu.supports(backend, w, dt):
            continue
        label = f"{backend}-{'bf16' if dt == torch.bfloat16 else 'fp16'}"
        ids = bench._ids(name, out_f, in_f, x.shape[0], fmt.label(), label)
        xd = x.to("cuda", dt)
        try:
            err = gpu.check(w, backend, xd, weight)
        except Exception as e:  # noqa: BLE001 - record a kernel that cannot run, keep going
            rows.append({**ids, "status": f"error ({type(e).__name__}: {str(e)[:80]})"})
            continue
        if not err < gpu.TOLERANCE[dt]:  # a kernel that fails is not timed
            rows.append({**ids, "status": f"wrong (rel err {err:.2e})"})
            continue
        run = gpu.prepare(w, backend, dt)
        t = cuda_time(lambda run=run, xd=xd: run(xd))
        rows.append(bench._row(name, out_f, in_f, x.shape[0], fmt.label(), label, t,
                               gpu.layout_bytes(w, backend), bandwidth, dense, err))
    return rows
