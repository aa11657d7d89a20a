"""Kernel timing: every (format x shape x batch M x backend), the machine's read bandwidth
measured in the same run, and the table ``results/kernels-<device>.csv``.

Times are medians (and inter-quartile ranges) of ``torch.utils.benchmark.Timer`` blocked
auto-ranges. Achieved bandwidth is the bytes the kernel must read for the weight
(``KernelWeight.nbytes``: packed codes, float32 scales and offsets) over the median time; its
fraction of the measured read bandwidth says how close a weight-only GEMV (memory bound at
M = 1) is to the physical limit. A backend is timed only after its output matched the
fake-quant product (``check``): a kernel that fails is not timed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer

from suite.kernels import cpu
from suite.kernels.packing import KernelWeight, from_qstate
from suite.primitives import PER_CHANNEL, WeightFormat, quantize_tensor

SHAPES = {  # (out, in): the embedded LLM's linears and the usual 7B shapes
    "smollm2-qkvo": (576, 576), "smollm2-up": (1536, 576), "smollm2-down": (576, 1536),
    "4096x4096": (4096, 4096), "4096x11008": (4096, 11008), "11008x4096": (11008, 4096),
}
FORMATS = [WeightFormat(b, g) for b in (4, 3, 2) for g in (64, 128)] + [
    WeightFormat(8, PER_CHANNEL, sym=True)]
RTOL = 1e-5


@dataclass(frozen=True)
class Timing:
    """Median and inter-quartile range in seconds."""

    median: float
    iqr: float


def time_fn(fn: Callable[[], object], min_run_time: float = 0.5) -> Timing:
    """Blocked auto-range timing of ``fn``."""
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return Timing(m.median, m.iqr)


def read_bandwidth(nbytes: int = 1 << 29) -> float:
    """The machine's read bandwidth in bytes/s: ``sum`` over a float32 buffer far larger than
    the caches (512 MiB), all threads, median of blocked runs."""
    buf = torch.ones(nbytes // 4)
    return nbytes / time_fn(lambda: buf.sum(), 1.0).median


def check(w: KernelWeight, backend: str, x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative max error of ``backend`` against the fake-quant product."""
    y = cpu.prepare(w, backend)(x)
    return float((y - ref).abs().max() / ref.abs().max())


def bench_rows(shapes: dict[str, tuple[int, int]], formats: list[WeightFormat],
               ms: tuple[int, ...], bandwidth: float, min_run_time: float = 0.5
               ) -> list[dict]:
    """One row per (shape, format, M, backend), plus the fp32 (and bf16) dense baselines."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    from tqdm import tqdm

    cases = list(itertools.product(shapes.items(), ms))
    for (name, (out_f, in_f)), m in tqdm(cases, desc="kernel cases", unit="case"):
        x = torch.randn(m, in_f, generator=gen)
        W = torch.randn(out_f, in_f, generator=gen) * 0.02
        dense = {dt: _time_dense(W.to(dt), x.to(dt), min_run_time)
                 for dt in (torch.float32, torch.bfloat16)}
        base = _row(name, out_f, in_f, m, "fp32", "dense", dense[torch.float32],
                    4 * W.numel(), bandwidth, dense)
        rows += [base, _row(name, out_f, in_f, m, "bf16", "dense", dense[torch.bfloat16],
                            2 * W.numel(), bandwidth, dense)]
        for fmt in formats:
            if fmt.group_size > 0 and in_f % fmt.group_size:
                continue
            qs = quantize_tensor(W, fmt)
            w, ref = from_qstate(qs), x @ qs.dequantize().t()
            for backend in cpu.BACKENDS:
                if backend == "reference" or not cpu.supports(backend, w):
                    continue
                err = check(w, backend, x, ref)
                if not err < RTOL:  # a kernel that fails is not timed
                    rows.append({**_ids(name, out_f, in_f, m, fmt.label(), backend),
                                 "status": f"wrong (rel err {err:.2e})"})
                    continue
                run = cpu.prepare(w, backend)
                t = time_fn(lambda run=run, x=x: run(x), min_run_time)
                rows.append(_row(name, out_f, in_f, m, fmt.label(), backend, t, w.nbytes(),
                                 bandwidth, dense, err))
    return rows


def _time_dense(W: torch.Tensor, x: torch.Tensor, min_run_time: float) -> Timing:
    return time_fn(lambda: x @ W.t(), min_run_time)


def _ids(name: str, out_f: int, in_f: int, m: int, fmt: str, backend: str) -> dict:
    return {"shape": name, "out": out_f, "in": in_f, "M": m, "format": fmt, "backend": backend}


def _row(name: str, out_f: int, in_f: int, m: int, fmt: str, backend: str, t: Timing,
         nbytes: int, bandwidth: float, dense: dict, err: float = 0.0) -> dict:
    gbs = nbytes / t.median
    return {**_ids(name, out_f, in_f, m, fmt, backend), "status": "ok",
            "median_us": 1e6 * t.median, "iqr_us": 1e6 * t.iqr, "weight_bytes": nbytes,
            "achieved_GBps": gbs / 1e9, "fraction_of_read_bw": gbs / bandwidth,
            "speedup_vs_fp32": dense[torch.float32].median / t.median,
            "speedup_vs_bf16": dense[torch.bfloat16].median / t.median,
            "rel_err": err, "gflops": 2 * m * out_f * in_f / t.median / 1e9}
