"""A/B timing of `cpp-a8`'s inner product: the `vpdpbusd` build against the AVX2 form
(`vpmaddubsw` + `vpmaddwd`) of the same source (``-DQBENCH_A8_NO_VNNI``).

Both builds are loaded into one process and called on the same storage in alternating blocks,
the order swapped every round; cold (a rotation of copies larger than the last-level cache)
and hot (one copy). Their outputs must be bit-identical. Run on an idle machine with AVX-512
VNNI (elsewhere both builds are the AVX2 form)::

    python benchmarks/ab_a8_dot.py --rounds 40 --threads 2 --csv results/kernels-cpu-a8-dot-ab.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from typing import Any

import torch

from suite.kernels import bench, cpu
from suite.kernels.packing import from_qstate
from suite.primitives import WeightFormat, quantize_tensor


def _timed_block(mod: Any, copies: list[dict], x: torch.Tensor, bits: int, calls: int) -> float:
    """Seconds per call of ``calls`` calls rotating over ``copies``."""
    t0 = time.perf_counter()
    for i in range(calls):
        t = copies[i % len(copies)]
        mod.qgemm_a8(x, t["units"], t["scale"], t["zero"], bits, 64)
    return (time.perf_counter() - t0) / calls


def ab_rows(rounds: int, threads: int) -> list[dict]:
    """One row per (bit width, cold / hot) at 4096 x 4096, M = 1, g64."""
    torch.set_num_threads(threads)
    new, old = cpu.cpp_module(), cpu.cpp_module(("QBENCH_A8_NO_VNNI",))
    if new is None or old is None:
        raise SystemExit("ab_a8_dot: the qgemm extension cannot be built here")
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(4096, 4096, generator=g) * 0.02, torch.randn(1, 4096, generator=g)
    rows = []
    for bits in (4, 3, 2):
        k = cpu.prepare(from_qstate(quantize_tensor(W, WeightFormat(bits, 64))), "cpp-a8")
        t = k.tensors
        if not torch.equal(_call(new, t, x, bits), _call(old, t, x, bits)):
            raise AssertionError(f"W{bits}: the two builds' outputs differ")
        cold = [c.tensors for c in bench.cold_copies(k, k.nbytes())]
        for mode, copies in (("cold", cold), ("hot", [t])):
            rows.append(_pair(mode, copies, x, bits, rounds, threads, old, new))
    return rows


def _call(mod: Any, t: dict, x: torch.Tensor, bits: int) -> torch.Tensor:
    return mod.qgemm_a8(x, t["units"], t["scale"], t["zero"], bits, 64)


def _pair(mode: str, copies: list[dict], x: torch.Tensor, bits: int, rounds: int,
          threads: int, old: Any, new: Any) -> dict:
    """Alternating blocks of at least 20 calls, the order swapped every round."""
    calls = max(20, len(copies))
    res: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(rounds):
        for name in (("old", "new") if r % 2 else ("new", "old")):
            res[name].append(_timed_block(old if name == "old" else new, copies, x, bits, calls))
    ratios = [n / o for n, o in zip(res["new"], res["old"], strict=True)]
    return {"shape": "4096x4096", "M": 1, "format": f"w{bits}g64", "threads": threads,
            "mode": mode, "rounds": rounds,
            "old_median_us": round(1e6 * statistics.median(res["old"]), 1),
            "new_median_us": round(1e6 * statistics.median(res["new"]), 1),
            "median_new_over_old": round(statistics.median(ratios), 3),
            "rounds_new_faster": sum(v < 1 for v in ratios)}


def main() -> None:
    """Print the rows; with ``--csv``, also write them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--csv")
    args = ap.parse_args()
    rows = [r for n in args.threads for r in ab_rows(args.rounds, n)]
    for r in rows:
        print(r)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
