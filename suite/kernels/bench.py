"""Kernel timing: every (format x shape x batch M x backend), the machine's read bandwidth
measured in the same run, and the table ``results/kernels-<device>.csv``.

Times are medians (and inter-quartile ranges) of ``torch.utils.benchmark.Timer`` blocked
auto-ranges, and cold: consecutive calls rotate over copies of the weight totalling at least
4x the last-level cache (``time_cold``), so every call streams its weight from memory as the
layers of a model larger than the caches do (a single 4096x4096 int4 weight would otherwise
sit in a 32 MiB L3 and beat the memory "limit"). Achieved bandwidth is the bytes the backend
reads for the weight (``cpu.Kernel.nbytes``: its own storage tensors) over the median time;
its fraction of the read bandwidth measured in the same run says how close a weight-only
GEMV (memory bound at M = 1) is to the physical limit. A backend is timed only after its
output matched the fake-quant product within its allowed error (``check``): a kernel that
fails is not timed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from suite.kernels import cpu
from suite.kernels.packing import KernelWeight, from_qstate
from suite.primitives import PER_CHANNEL, WeightFormat, quantize_tensor

SHAPES = {  # (out, in): the embedded LLM's linears and the usual 7B shapes
    "smollm2-qo": (576, 576), "smollm2-kv": (192, 576), "smollm2-up": (1536, 576),
    "smollm2-down": (576, 1536),
    "4096x4096": (4096, 4096), "4096x11008": (4096, 11008), "11008x4096": (11008, 4096),
}
# every LLM-grid format (asymmetric, g32 / g64 / per-channel) plus g128 for the 7B shapes
FORMATS = [WeightFormat(b, g) for b in (4, 3, 2) for g in (32, 64, 128, PER_CHANNEL)] + [
    WeightFormat(8, 32), WeightFormat(8, 64), WeightFormat(8, PER_CHANNEL),
    WeightFormat(8, PER_CHANNEL, sym=True)]
MS = (1, 16, 128)
COLD_FACTOR = 4  # weights rotate over copies totalling >= 4x the last-level cache
SLOW_S = 1.0  # a (backend, M) whose checked call takes longer is listed, not timed


@dataclass(frozen=True)
class Timing:
    """Median and inter-quartile range in seconds."""

    median: float
    iqr: float


def time_fn(fn: Callable[[], object], min_run_time: float = 0.5) -> Timing:
    """Blocked auto-range timing of ``fn`` with torch's current thread count (``Timer``
    would otherwise pin one thread)."""
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
              ).blocked_autorange(min_run_time=min_run_time)
    return Timing(m.median, m.iqr)


def llc_bytes() -> int:
    """The last-level cache size (sysfs), 32 MiB if unknown."""
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        try:
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
        return int(size.rstrip("KM")) * mult
    return 32 << 20


def copies_for(nbytes: int) -> int:
    """How many copies of a weight make a rotation that no cache holds (at most 1024)."""
    return max(1, min(1024, math.ceil(COLD_FACTOR * llc_bytes() / max(nbytes, 1))))


def time_cold(fns: list[Callable[[], object]], min_run_time: float = 0.5) -> Timing:
    """Timing of calls that rotate over ``fns`` (each on its own copy of the weight), so every
    call streams its weight from memory, as a layer of a model larger than the caches does."""
    cycle = itertools.cycle(fns)
    return time_fn(lambda: next(cycle)(), min_run_time)


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 3) -> float:
    """The machine's read bandwidth in bytes/s over a 512 MiB buffer, all threads: the best of
    torch's ``sum`` and the C++ stream reader, each the median of blocked runs, over
    ``repeats`` rounds (a shared VM's bandwidth moves by 10-20% within a minute, and a peak
    taken at a slow moment makes kernels look faster than the memory)."""
    buf = torch.ones(nbytes // 4)
    raw, mod = buf.view(torch.uint8), cpu.cpp_module()
    best = 0.0
    for _ in range(repeats):
        best = max(best, nbytes / time_fn(lambda: buf.sum(), 1.0).median)
        if mod is not None:
            best = max(best, nbytes / time_fn(lambda: mod.stream_read(raw), 1.0).median)
    return best


def check(w: KernelWeight, kernel: cpu.Kernel, x: torch.Tensor, ref: torch.Tensor,
          wabs: torch.Tensor | None = None) -> tuple[float, bool]:
    """The kernel's relative max error against the fake-quant product, and whether it is
    within the backend's allowed error (``cpu.allowed_error``)."""
    y = kernel(x)
    err = (y - ref).abs()
    ok = bool((err <= cpu.allowed_error(w, kernel.backend, x, ref, wabs)).all())
    return float(err.max() / ref.abs().max()), ok


def bench_rows(shapes: dict[str, tuple[int, int]], formats: list[WeightFormat],
               ms: tuple[int, ...], bandwidth: float, min_run_time: float = 0.5
               ) -> list[dict]:
    """One row per (shape, format, M, backend), plus the fp32 and bf16 dense baselines; every
    timing is cold (``time_cold``)."""
    from tqdm import tqdm

    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, (out_f, in_f) in tqdm(shapes.items(), desc="kernel shapes", unit="shape"):
        W = torch.randn(out_f, in_f, generator=gen) * 0.02
        xs = {m: torch.randn(m, in_f, generator=gen) for m in ms}
        dense = _dense_timings(W, xs, min_run_time)
        for m in ms:
            for dt, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                rows.append(_row(name, out_f, in_f, m, label, "dense", dense[m][dt],
                                 dt.itemsize * W.numel(), bandwidth, dense[m]))
        for fmt in formats:
            if fmt.group_size > 0 and in_f % fmt.group_size:
                continue
            rows += _format_rows(name, W, fmt, xs, bandwidth, dense, min_run_time)
    return rows


def _dense_timings(W: torch.Tensor, xs: dict[int, torch.Tensor], min_run_time: float
                   ) -> dict[int, dict[torch.dtype, Timing]]:
    out: dict[int, dict[torch.dtype, Timing]] = {m: {} for m in xs}
    for dt in (torch.float32, torch.bfloat16):
        Wd = W.to(dt)
        copies = [Wd] + [Wd.clone() for _ in range(copies_for(Wd.numel() * dt.itemsize) - 1)]
        for m, x in xs.items():
            xd = x.to(dt)
            out[m][dt] = time_cold([lambda w=w, xd=xd: xd @ w.t() for w in copies], min_run_time)
    return out


def _format_rows(name: str, W: torch.Tensor, fmt: WeightFormat, xs: dict[int, torch.Tensor],
                 bandwidth: float, dense: dict, min_run_time: float) -> list[dict]:
    out_f, in_f = W.shape
    qs = quantize_tensor(W, fmt)
    w, dq = from_qstate(qs), qs.dequantize()
    wabs = dq.abs()  # the quantize_tensor states here have no column permutation
    rows = []
    for backend in cpu.BACKENDS:
        if backend == "reference" or not cpu.supports(backend, w):
            continue
        kernel = cpu.prepare(w, backend)
        copies = [kernel] + [kernel.clone() for _ in range(copies_for(kernel.nbytes()) - 1)]
        for m, x in xs.items():
            err, ok = check(w, kernel, x, x @ dq.t(), wabs)
            t0 = time.perf_counter()
            kernel(x)
            once = time.perf_counter() - t0
            if not ok:  # a kernel that fails is not timed
                rows.append({**_ids(name, out_f, in_f, m, fmt.label(), backend),
                             "status": f"wrong (rel err {err:.2e})"})
                continue
            if once > SLOW_S:  # e.g. torch's int4 op with float32 activations at M = 128
                rows.append({**_ids(name, out_f, in_f, m, fmt.label(), backend),
                             "status": f"not timed ({once:.1f} s per call)", "rel_err": err})
                continue
            t = time_cold([lambda k=k, x=x: k(x) for k in copies], min_run_time)
            rows.append(_row(name, out_f, in_f, m, fmt.label(), backend, t, kernel.nbytes(),
                             bandwidth, dense[m], err))
    return rows


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
