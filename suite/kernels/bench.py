"""Kernel timing: every (format x shape x batch M x backend), the machine's read bandwidth
measured in the same run, and the table ``results/kernels-<device>.csv``.

Every timing is cold: consecutive calls rotate over copies of the weight totalling at least
4x the last-level cache (``cold_copies``), so every call streams its weight from memory as the
layers of a model larger than the caches do (a single 4096x4096 int4 weight would otherwise
sit in a 32 MiB L3 and beat the memory "limit"). Achieved bandwidth is the bytes the backend
reads for the weight (``cpu.Kernel.nbytes``: its own storage tensors) over the median time;
its fraction of the read bandwidth says how close a weight-only GEMV (memory bound at M = 1)
is to the physical limit.

A shared VM's read bandwidth swings within seconds (seen here: 30-35 and 45-60 GB/s states),
so timings are paired with the bandwidth at the same moment (``time_paired``): each row is
the median of short blocks of calls, and every block sits between two quick readings
(``BandwidthProbe.quick``, a few ms each); a block's fraction is of the better of its two
readings, and the row's ``fraction_of_local_bw`` is the median over its blocks. The best
full reading of the whole run gives the conservative ``fraction_of_read_bw``. At M = 1 each
block is also followed by a block of plain cold reads of exactly the weight's bytes through
the same call path (``same_bytes_reads``): ``fraction_of_same_bytes_read`` is the time to
stream this weight over the kernel's time, the physical limit of this GEMV with its size and
per-call costs (a 64 MiB reading, unlike a 192 KB weight, pays those costs once). ``ladder_rows``
compares bit widths over interleaved rounds. A backend is timed only after its output
matched the fake-quant product within its allowed error (``check``): a kernel that fails is
not timed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
# the CPU table's columns, in order (then threads)
COLUMNS = ["shape", "out", "in", "M", "format", "backend", "status", "median_us", "iqr_us",
           "weight_bytes", "achieved_GBps", "fraction_of_read_bw", "fraction_of_local_bw",
           "speedup_vs_fp32", "speedup_vs_bf16", "rel_err", "gflops", "read_bw_GBps",
           "read_bw_local_GBps", "read_same_bytes_us", "fraction_of_same_bytes_read"]
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


QUICK_BYTES = 64 << 20  # one quick reading streams two slices of this size (> the LLC here)


class BandwidthProbe:
    """Read-bandwidth probe over one buffer (``nbytes``).

    A full reading (``probe()``) is the best of torch's ``sum`` and the C++ stream reader
    (``qgemm.stream_read``), each the median of blocked runs; ``peak`` is the best full
    reading so far. A quick reading (``quick``) takes a few ms, so that it can sit right next
    to a timing: the better of two single reads of consecutive slices (``QUICK_BYTES``, or a
    quarter of the buffer if smaller), the slices rotating over the buffer so each is cold."""

    def __init__(self, nbytes: int = 1 << 29) -> None:
        self.nbytes = nbytes
        self.readings: list[float] = []
        self.quick_readings: list[float] = []
        self._buf: torch.Tensor | None = None
        self._slice = 0

    def _buffer(self) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.ones(self.nbytes // 4)
        return self._buf

    def __call__(self, min_run_time: float = 0.3) -> float:
        buf, mod = self._buffer(), cpu.cpp_module()
        best = self.nbytes / time_fn(lambda: buf.sum(), min_run_time).median
        if mod is not None:
            raw = buf.view(torch.uint8)
            best = max(best, self.nbytes / time_fn(lambda: mod.stream_read(raw),
                                                   min_run_time).median)
        self.readings.append(best)
        return best

    def quick(self) -> float:
        """A reading of a few ms (bytes/s), for the timing next to it."""
        buf = self._buffer()
        n = min(QUICK_BYTES, self.nbytes // 4) // 512 * 128  # float32 elements per slice
        best = 0.0
        for _ in range(2):
            self._slice = (self._slice + 1) % (buf.numel() // n)
            read = _reader(buf[self._slice * n:(self._slice + 1) * n])
            t0 = time.perf_counter()
            read()
            best = max(best, 4 * n / (time.perf_counter() - t0))
        self.quick_readings.append(best)
        return best

    @property
    def peak(self) -> float:
        return max(self.readings)


@dataclass(frozen=True)
class Paired:
    """Blocks of cold calls with the bandwidth around each: per block the seconds per call,
    the better of the two quick readings on either side (bytes/s) and, where a plain read of
    the same bytes was timed right after the block, its seconds per read (``reads``)."""

    times: list[float]
    bandwidths: list[float]
    reads: list[float] = field(default_factory=list)

    def timing(self) -> Timing:
        t = torch.tensor(self.times, dtype=torch.float64)
        q = torch.quantile(t, torch.tensor([0.25, 0.75], dtype=torch.float64))
        return Timing(_median(t), float(q[1] - q[0]))

    def fractions(self, nbytes: int) -> torch.Tensor:
        """Each block's achieved bandwidth over the bandwidth read around it."""
        t, bw = (torch.tensor(v, dtype=torch.float64) for v in (self.times, self.bandwidths))
        return nbytes / t / bw

    def of_same_bytes(self) -> torch.Tensor:
        """Each block's time of the plain read of the same bytes over the block's time per
        call: the fraction of the physical limit of streaming exactly these bytes."""
        r, t = (torch.tensor(v, dtype=torch.float64) for v in (self.reads, self.times))
        return r / t

    def same_bytes(self) -> dict:
        """The same-bytes columns (median read time, median per-block fraction); none without
        ``reads``."""
        if not self.reads:
            return {}
        return {"read_same_bytes_us": 1e6 * _median(torch.tensor(self.reads, dtype=torch.float64)),
                "fraction_of_same_bytes_read": _median(self.of_same_bytes())}


def time_paired(fns: list[Callable[[], object]], probe: BandwidthProbe, blocks: int = 8,
                block_s: float = 0.02, reads: list[Callable[[], object]] | None = None
                ) -> Paired:
    """``blocks`` blocks of calls rotating over ``fns`` (about ``block_s`` seconds each), a
    quick bandwidth reading before the first and after every block; the first call warms up
    and sizes the blocks (``_sized``). With ``reads`` (``same_bytes_reads``), a block of those
    follows each block of calls, before the reading."""
    cycle, calls = _sized(fns, block_s)
    rcycle = _sized(reads, block_s) if reads else None
    times, bws, rts, before = [], [], [], probe.quick()
    for _ in range(blocks):
        times.append(_block(cycle, calls))
        if rcycle:
            rts.append(_block(*rcycle))
        after = probe.quick()
        bws.append(max(before, after))
        before = after
    return Paired(times, bws, rts)


def same_bytes_reads(nbytes: int) -> list[Callable[[], object]]:
    """Plain cold reads of ``nbytes`` (rounded down to 128 bytes, at least 128) through the
    same call path as a kernel (``qgemm.stream_read``, or torch's ``sum`` without the C++
    module), rotating over copies that no cache holds: the time to stream a weight of that
    size, the physical limit of a weight-only GEMV of it, per-call costs included."""
    n = max(128, nbytes // 128 * 128)
    return [_reader(b) for b in cold_copies(torch.zeros(n // 4), n)]


def _reader(buf: torch.Tensor) -> Callable[[], object]:
    """A plain read of the float32 ``buf`` (a multiple of 128 bytes): the C++ stream reader,
    or torch's ``sum`` without the C++ module."""
    mod = cpu.cpp_module()
    if mod is None:
        return buf.sum
    raw = buf.view(torch.uint8)
    return lambda: mod.stream_read(raw)


def _block(cycle: Any, calls: int) -> float:
    """Seconds per call over ``calls`` consecutive calls of the rotation."""
    t0 = time.perf_counter()
    for _ in range(calls):
        next(cycle)()
    return (time.perf_counter() - t0) / calls


def check(w: KernelWeight, kernel: cpu.Kernel, x: torch.Tensor, ref: torch.Tensor,
          wabs: torch.Tensor | None = None) -> tuple[float, bool]:
    """The kernel's relative max error against the fake-quant product, and whether it is
    within the backend's allowed error (``cpu.allowed_error``)."""
    y = kernel(x)
    err = (y - ref).abs()
    ok = bool((err <= cpu.allowed_error(w, kernel.backend, x, ref, wabs)).all())
    return float(err.max() / ref.abs().max()), ok


def bench_rows(shapes: dict[str, tuple[int, int]], formats: list[WeightFormat],
               ms: tuple[int, ...], probe: BandwidthProbe, blocks: int = 8,
               block_s: float = 0.02) -> list[dict]:
    """One row per (shape, format, M, backend), plus the fp32 and bf16 dense baselines; every
    timing is cold and paired with the bandwidth at the same moment (``time_paired``:
    ``read_bw_local_GBps`` is the median of the readings around the row's blocks and
    ``fraction_of_local_bw`` the median of its blocks' fractions). ``against_peak`` adds
    the fraction of the best full reading of the whole run (``fraction_of_read_bw``, the
    conservative figure)."""
    from tqdm import tqdm

    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    for name, (out_f, in_f) in tqdm(shapes.items(), desc="kernel shapes", unit="shape"):
        W = torch.randn(out_f, in_f, generator=gen) * 0.02
        xs = {m: torch.randn(m, in_f, generator=gen) for m in ms}
        dense = _dense_timings(W, xs, probe, blocks, block_s)
        rows += [_paired_row(name, out_f, in_f, m, label, "dense", dense[m][dt],
                             dt.itemsize * W.numel(), dense[m])
                 for m in ms for dt, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))]
        for fmt in formats:
            if fmt.group_size <= 0 or in_f % fmt.group_size == 0:
                rows += _format_rows(name, W, fmt, xs, dense, probe, blocks, block_s)
    return rows


def against_peak(rows: list[dict], peak: float) -> None:
    """Set each row's ``read_bw_GBps`` to ``peak`` (bytes/s) and ``fraction_of_read_bw``."""
    for r in rows:
        r["read_bw_GBps"] = peak / 1e9
        if r["status"] == "ok":
            r["fraction_of_read_bw"] = r["achieved_GBps"] * 1e9 / peak


def _dense_timings(W: torch.Tensor, xs: dict[int, torch.Tensor], probe: BandwidthProbe,
                   blocks: int, block_s: float) -> dict[int, dict[torch.dtype, Paired]]:
    out: dict[int, dict[torch.dtype, Paired]] = {m: {} for m in xs}
    for dt in (torch.float32, torch.bfloat16):
        Wd = W.to(dt)
        copies = cold_copies(Wd, Wd.numel() * dt.itemsize)
        reads = _gemv_reads(Wd.numel() * dt.itemsize, xs)
        for m, x in xs.items():
            xd = x.to(dt)
            out[m][dt] = time_paired([lambda w=w, xd=xd: xd @ w.t() for w in copies], probe,
                                     blocks, block_s, reads.get(m))
    return out


def _format_rows(name: str, W: torch.Tensor, fmt: WeightFormat, xs: dict[int, torch.Tensor],
                 dense: dict, probe: BandwidthProbe, blocks: int, block_s: float) -> list[dict]:
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
        reads = _gemv_reads(kernel.nbytes(), xs)
        for m, x in xs.items():
            ids = _ids(name, out_f, in_f, m, fmt.label(), backend)
            err, ok = check(w, kernel, x, x @ dq.t(), wabs)
            t0 = time.perf_counter()
            kernel(x)
            once = time.perf_counter() - t0
            if not ok:  # a kernel that fails is not timed
                rows.append({**ids, "status": f"wrong (rel err {err:.2e})"})
            elif once > SLOW_S:  # e.g. torch's int4 op with float32 activations at M = 128
                rows.append({**ids, "status": f"not timed ({once:.1f} s per call)", "rel_err": err})
            else:
                t = time_paired([lambda k=k, x=x: k(x) for k in copies], probe, blocks, block_s,
                                reads.get(m))
                rows.append(_paired_row(name, out_f, in_f, m, fmt.label(), backend, t,
                                        kernel.nbytes(), dense[m], err))
    return rows


def _gemv_reads(nbytes: int, xs: dict[int, torch.Tensor]) -> dict[int, list]:
    """The same-bytes reads for the GEMV rows (M = 1), where streaming the weight is the
    limit; other M are not paired with one."""
    return {1: same_bytes_reads(nbytes)} if 1 in xs else {}


def _paired_row(name: str, out_f: int, in_f: int, m: int, fmt: str, backend: str, t: Paired,
                nbytes: int, dense: dict[torch.dtype, Paired], err: float = 0.0) -> dict:
    """``_row`` from paired timings, with the bandwidth read around the row's blocks and,
    where timed, the plain read of the same bytes after each block."""
    timings = {dt: p.timing() for dt, p in dense.items()}
    return {**_row(name, out_f, in_f, m, fmt, backend, t.timing(), nbytes, None, timings, err),
            "read_bw_local_GBps": _median(torch.tensor(t.bandwidths, dtype=torch.float64)) / 1e9,
            "fraction_of_local_bw": _median(t.fractions(nbytes)), **t.same_bytes()}


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
                rounds: int = 400, block_s: float = 0.05,
                also: tuple[str, ...] = ("cpp-a8",)) -> list[dict]:
    """The bit-width comparison at M = 1, robust to a shared VM's bandwidth swings: ``rounds``
    rounds, each one block of cold calls (``block_s``) of the fp32 linear and of every format
    (selected backend) in turn, with a quick bandwidth reading between consecutive blocks, so
    that a round's entries are timed within a fraction of a second of each other and of their
    readings. Per entry: the median time over rounds, the median of the per-round ratios to
    the fp32 linear and to the first format, the rounds in which it beat the first format,
    the median fraction of the better reading around each block, and the same over the
    rounds whose reading is in the faster half of the entry's readings (with the median of
    those readings: a run spent in one bandwidth state has no fast half to speak of). Each
    entry's block is followed by a block of plain reads of the same bytes (``same_bytes_reads``)
    before the reading: per entry the median read time and the median per-round fraction of
    it (the read's time over the entry's). ``also``: backends timed as extra entries for every
    format they support (``cpp-a8``: int8 activations, not weight-only; its rows name it)."""
    gen = torch.Generator().manual_seed(0)
    W, x = torch.randn(out_f, in_f, generator=gen) * 0.02, torch.randn(1, in_f, generator=gen)
    entries = {"fp32": ("dense", W.numel() * 4,
                        [lambda w=w: x @ w.t() for w in cold_copies(W, W.numel() * 4)])}
    for fmt in formats:
        qs = quantize_tensor(W, fmt)
        w = from_qstate(qs)
        chosen = cpu.select(w)
        for backend in (chosen, *(b for b in also if b != chosen and cpu.supports(b, w))):
            kernel = cpu.prepare(w, backend)
            if not check(w, kernel, x, x @ qs.dequantize().t())[1]:
                raise AssertionError(f"{fmt.label()} {backend}: wrong output, not timed")
            key = fmt.label() if backend == chosen else f"{fmt.label()}@{backend}"
            entries[key] = (backend, kernel.nbytes(),
                            [lambda k=k: k(x) for k in cold_copies(kernel, kernel.nbytes())])
    sized = {label: (_sized(fns, block_s), _sized(same_bytes_reads(nbytes), block_s))
             for label, (_, nbytes, fns) in entries.items()}
    times: dict[str, list[float]] = {k: [] for k in entries}
    bws: dict[str, list[float]] = {k: [] for k in entries}
    reads: dict[str, list[float]] = {k: [] for k in entries}
    before = probe.quick()
    for _ in range(rounds):
        for label, (fn_cycle, read_cycle) in sized.items():
            times[label].append(_block(*fn_cycle))
            reads[label].append(_block(*read_cycle))
            after = probe.quick()
            bws[label].append(max(before, after))
            before = after
    return [{**_ladder_row(out_f, in_f, label, backend, nbytes, times, bws[label],
                           formats[0].label()),
             **Paired(times[label], bws[label], reads[label]).same_bytes()}
            for label, (backend, nbytes, _) in entries.items()]


def _sized(fns: list[Callable[[], object]], block_s: float) -> tuple[Any, int]:
    """The rotation over ``fns``, warmed up by one call, and the calls in a block of about
    ``block_s`` seconds (at least one). The rotation goes on across blocks, so every call
    runs on the next copy whatever the block length."""
    cycle = itertools.cycle(fns)
    t0 = time.perf_counter()
    next(cycle)()
    return cycle, max(1, math.ceil(block_s / max(time.perf_counter() - t0, 1e-7)))


def _ladder_row(out_f: int, in_f: int, label: str, backend: str, nbytes: int,
                times: dict[str, list[float]], bw: list[float], ref: str) -> dict:
    t, b = (torch.tensor(v, dtype=torch.float64) for v in (times[label], bw))
    vs = {k: torch.tensor(v, dtype=torch.float64) for k, v in times.items()}
    frac = nbytes / t / b
    return {"shape": f"{out_f}x{in_f}", "out": out_f, "in": in_f, "M": 1,
            "format": label.partition("@")[0],
            "backend": backend, "rounds": len(t), "median_us": 1e6 * _median(t),
            "min_us": 1e6 * float(t.min()), "max_us": 1e6 * float(t.max()),
            "weight_bytes": nbytes, "achieved_GBps": nbytes / _median(t) / 1e9,
            "read_bw_local_GBps": _median(b) / 1e9, "fraction_of_local_bw": _median(frac),
            "fraction_of_local_bw_fast": _median(frac[b >= _median(b)]),
            "read_bw_local_fast_GBps": _median(b[b >= _median(b)]) / 1e9,
            "speedup_vs_fp32": _median(vs["fp32"] / t), "time_ratio_to_ref": _median(t / vs[ref]),
            "rounds_faster_than_ref": int((t < vs[ref]).sum()), "ref": ref}


def _median(v: torch.Tensor) -> float:
    return float(v.median())  # torch's median of an even count is the lower middle value
