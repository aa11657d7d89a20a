"""Kernel timing: every (format x shape x batch M x backend), the machine's read bandwidth
measured in the same run, and the table ``results/kernels-<device>.csv``.

Times are medians (and inter-quartile ranges) of ``torch.utils.benchmark.Timer`` blocked
auto-ranges, and cold: consecutive calls rotate over copies of the weight totalling at least
4x the last-level cache (``time_cold``), so every call streams its weight from memory as the
layers of a model larger than the caches do (a single 4096x4096 int4 weight would otherwise
sit in a 32 MiB L3 and beat the memory "limit"). Achieved bandwidth is the bytes the backend
reads for the weight (``cpu.Kernel.nbytes``: its own storage tensors) over the median time;
its fraction of the read bandwidth measured in the same run says how close a weight-only
GEMV (memory bound at M = 1) is to the physical limit; on a shared VM whose bandwidth swings,
both the bandwidth probed around each group of timings and the run's best are reported.
``ladder_rows`` compares bit widths over interleaved rounds. A backend is timed only after its
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
from typing import Any

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
COLUMNS = ["shape", "out", "in", "M", "format", "backend", "status", "median_us", "iqr_us",
           "weight_bytes", "achieved_GBps", "fraction_of_read_bw", "fraction_of_local_bw",
           "speedup_vs_fp32", "speedup_vs_bf16", "rel_err", "gflops", "read_bw_GBps",
           "read_bw_local_GBps"]  # the CPU table's columns, in order (then threads)
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


def cold_copies(obj: Any, nbytes: int) -> list:
    """``obj`` (a tensor or a ``cpu.Kernel``, ``nbytes`` each) and clones of it: a rotation
    that no cache holds (``copies_for``)."""
    return [obj] + [obj.clone() for _ in range(copies_for(nbytes) - 1)]


def time_cold(fns: list[Callable[[], object]], min_run_time: float = 0.5) -> Timing:
    """Timing of calls that rotate over ``fns`` (each on its own copy of the weight), so every
    call streams its weight from memory, as a layer of a model larger than the caches does."""
    cycle = itertools.cycle(fns)
    return time_fn(lambda: next(cycle)(), min_run_time)


class BandwidthProbe:
    """Read-bandwidth probe over one buffer that keeps every reading: each call is the best of
    torch's ``sum`` and the C++ stream reader (``qgemm.stream_read``), each the median of
    blocked runs; ``peak`` is the best reading so far."""

    def __init__(self, nbytes: int = 1 << 29) -> None:
        self.nbytes = nbytes
        self.readings: list[float] = []
        self._buf: torch.Tensor | None = None

    def __call__(self, min_run_time: float = 0.3) -> float:
        if self._buf is None:
            self._buf = torch.ones(self.nbytes // 4)
        buf, mod = self._buf, cpu.cpp_module()
        best = self.nbytes / time_fn(lambda: buf.sum(), min_run_time).median
        if mod is not None:
            raw = buf.view(torch.uint8)
            best = max(best, self.nbytes / time_fn(lambda: mod.stream_read(raw),
                                                   min_run_time).median)
        self.readings.append(best)
        return best

    @property
    def peak(self) -> float:
        return max(self.readings)

    def around(self, before: float) -> tuple[float, float]:
        """Close a stretch of timings that ``before`` opened: a new reading ``after``, and the
        stretch's bandwidth, the better of the two; returns (that, after)."""
        after = self()
        return max(before, after), after


def check(w: KernelWeight, kernel: cpu.Kernel, x: torch.Tensor, ref: torch.Tensor,
          wabs: torch.Tensor | None = None) -> tuple[float, bool]:
    """The kernel's relative max error against the fake-quant product, and whether it is
    within the backend's allowed error (``cpu.allowed_error``)."""
    y = kernel(x)
    err = (y - ref).abs()
    ok = bool((err <= cpu.allowed_error(w, kernel.backend, x, ref, wabs)).all())
    return float(err.max() / ref.abs().max()), ok


def bench_rows(shapes: dict[str, tuple[int, int]], formats: list[WeightFormat],
               ms: tuple[int, ...], probe: BandwidthProbe, min_run_time: float = 0.5
               ) -> list[dict]:
    """One row per (shape, format, M, backend), plus the fp32 and bf16 dense baselines; every
    timing is cold (``time_cold``).

    The bandwidth of a shared VM swings (seen here: 30 to 58 GB/s within minutes), so each
    (shape, format) group of timings is bracketed by short probes: ``read_bw_local_GBps`` is
    the better of the two around the row's group and ``fraction_of_local_bw`` its achieved
    fraction of that. ``against_peak`` adds the fraction of the best reading of the whole
    run (``fraction_of_read_bw``, the conservative figure)."""
    from tqdm import tqdm

    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    before = probe()
    for name, (out_f, in_f) in tqdm(shapes.items(), desc="kernel shapes", unit="shape"):
        W = torch.randn(out_f, in_f, generator=gen) * 0.02
        xs = {m: torch.randn(m, in_f, generator=gen) for m in ms}
        dense = _dense_timings(W, xs, min_run_time)
        group = [_row(name, out_f, in_f, m, label, "dense", dense[m][dt],
                      dt.itemsize * W.numel(), None, dense[m])
                 for m in ms for dt, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))]
        before = _close_group(rows, group, before, probe)
        for fmt in formats:
            if fmt.group_size > 0 and in_f % fmt.group_size:
                continue
            group = _format_rows(name, W, fmt, xs, dense, min_run_time)
            before = _close_group(rows, group, before, probe)
    return rows


def against_peak(rows: list[dict], peak: float) -> None:
    """Set each row's ``read_bw_GBps`` to ``peak`` (bytes/s) and ``fraction_of_read_bw``."""
    for r in rows:
        r["read_bw_GBps"] = peak / 1e9
        if r["status"] == "ok":
            r["fraction_of_read_bw"] = r["achieved_GBps"] * 1e9 / peak


def _close_group(rows: list[dict], group: list[dict], before: float, probe: BandwidthProbe
                 ) -> float:
    """Append ``group`` with the bandwidth measured around it (the better of the probe just
    before and one just after); return the after probe, the next group's before."""
    local, after = probe.around(before)
    for r in group:
        r["read_bw_local_GBps"] = local / 1e9
        if r["status"] == "ok":
            r["fraction_of_local_bw"] = r["achieved_GBps"] / r["read_bw_local_GBps"]
    rows += group
    return after


def _dense_timings(W: torch.Tensor, xs: dict[int, torch.Tensor], min_run_time: float
                   ) -> dict[int, dict[torch.dtype, Timing]]:
    out: dict[int, dict[torch.dtype, Timing]] = {m: {} for m in xs}
    for dt in (torch.float32, torch.bfloat16):
        Wd = W.to(dt)
        copies = cold_copies(Wd, Wd.numel() * dt.itemsize)
        for m, x in xs.items():
            xd = x.to(dt)
            out[m][dt] = time_cold([lambda w=w, xd=xd: xd @ w.t() for w in copies], min_run_time)
    return out


def _format_rows(name: str, W: torch.Tensor, fmt: WeightFormat, xs: dict[int, torch.Tensor],
                 dense: dict, min_run_time: float) -> list[dict]:
    out_f, in_f = W.shape
    qs = quantize_tensor(W, fmt)
    w, dq = from_qstate(qs), qs.dequantize()
    wabs = dq.abs()  # the quantize_tensor states here have no column permutation
    rows = []
    for backend in cpu.BACKENDS:
        if backend == "reference" or not cpu.supports(backend, w):
            continue
        kernel = cpu.prepare(w, backend)
        copies = cold_copies(kernel, kernel.nbytes())
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
                             None, dense[m], err))
    return rows


def _ids(name: str, out_f: int, in_f: int, m: int, fmt: str, backend: str) -> dict:
    return {"shape": name, "out": out_f, "in": in_f, "M": m, "format": fmt, "backend": backend}


def _row(name: str, out_f: int, in_f: int, m: int, fmt: str, backend: str, t: Timing,
         nbytes: int, bandwidth: float | None, dense: dict, err: float = 0.0) -> dict:
    """A timed row; ``fraction_of_read_bw`` only with a ``bandwidth`` (the CPU table sets it
    once the run's peak is known)."""
    gbs = nbytes / t.median
    return {**_ids(name, out_f, in_f, m, fmt, backend), "status": "ok",
            "median_us": 1e6 * t.median, "iqr_us": 1e6 * t.iqr, "weight_bytes": nbytes,
            "achieved_GBps": gbs / 1e9,
            **({"fraction_of_read_bw": gbs / bandwidth} if bandwidth else {}),
            "speedup_vs_fp32": dense[torch.float32].median / t.median,
            "speedup_vs_bf16": dense[torch.bfloat16].median / t.median,
            "rel_err": err, "gflops": 2 * m * out_f * in_f / t.median / 1e9}


LADDER = [WeightFormat(4, 64), WeightFormat(3, 64), WeightFormat(2, 64)]  # int4 first: the ref


def ladder_rows(out_f: int, in_f: int, probe: BandwidthProbe, formats: list[WeightFormat] = LADDER,
                rounds: int = 10, min_run_time: float = 0.3) -> list[dict]:
    """The bit-width comparison at M = 1, robust to a shared VM's slow stretches: ``rounds``
    rounds, each a bandwidth probe and then one cold timing of the fp32 linear and of every
    format (selected backend), so a slow stretch hits all of a round alike. Per entry: the
    median time over rounds, the median of the per-round ratios to the fp32 linear and to the
    first format, the rounds in which it beat the first format, and the median fraction of
    the bandwidth probed around its round."""
    gen = torch.Generator().manual_seed(0)
    W, x = torch.randn(out_f, in_f, generator=gen) * 0.02, torch.randn(1, in_f, generator=gen)
    entries = {"fp32": ("dense", W.numel() * 4,
                        [lambda w=w: x @ w.t() for w in cold_copies(W, W.numel() * 4)])}
    for fmt in formats:
        qs = quantize_tensor(W, fmt)
        w = from_qstate(qs)
        kernel = cpu.prepare(w, cpu.select(w))
        if not check(w, kernel, x, x @ qs.dequantize().t())[1]:
            raise AssertionError(f"{fmt.label()} {kernel.backend}: wrong output, not timed")
        entries[fmt.label()] = (kernel.backend, kernel.nbytes(),
                                [lambda k=k: k(x) for k in cold_copies(kernel, kernel.nbytes())])
    times: dict[str, list[float]] = {k: [] for k in entries}
    bw, before = [], probe()
    for _ in range(rounds):
        for label, (_, _, fns) in entries.items():
            times[label].append(time_cold(fns, min_run_time).median)
        local, before = probe.around(before)
        bw.append(local)
    return [_ladder_row(out_f, in_f, label, backend, nbytes, times, bw, formats[0].label())
            for label, (backend, nbytes, _) in entries.items()]


def _ladder_row(out_f: int, in_f: int, label: str, backend: str, nbytes: int,
                times: dict[str, list[float]], bw: list[float], ref: str) -> dict:
    t = torch.tensor(times[label], dtype=torch.float64)
    vs = {k: torch.tensor(v, dtype=torch.float64) for k, v in times.items()}
    return {"shape": f"{out_f}x{in_f}", "out": out_f, "in": in_f, "M": 1, "format": label,
            "backend": backend, "rounds": len(t), "median_us": 1e6 * _median(t),
            "min_us": 1e6 * float(t.min()), "max_us": 1e6 * float(t.max()),
            "weight_bytes": nbytes, "achieved_GBps": nbytes / _median(t) / 1e9,
            "fraction_of_local_bw": _median(nbytes / t / torch.tensor(bw, dtype=torch.float64)),
            "speedup_vs_fp32": _median(vs["fp32"] / t), "time_ratio_to_ref": _median(t / vs[ref]),
            "rounds_faster_than_ref": int((t < vs[ref]).sum()), "ref": ref}


def _median(v: torch.Tensor) -> float:
    return float(v.median())  # torch's median of an even count is the lower middle value
