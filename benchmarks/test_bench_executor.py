"""pytest-benchmark: local executor throughput, 1 slot against 2, on a grid of 22 short cells.

Each round is a full ``qbench run`` of the same grid (FP and RTN at W2..W8 x g32/g64/per-channel
on the tiny saved LLaMA of ``tests/conftest.py``, ppl on 4 windows) into a fresh store, with
``run.slots`` 1 or 2 (threads split between slots) and warm or fresh cell processes. The wall
time, the cells' own time, the per-cell process start-up and the per-cell scheduling overhead
(runner time outside any cell process) are in ``extra_info``; ``QBENCH_EXECUTOR_TABLE=1`` also
writes them to ``results/executor-cpu.csv``. Goal (issue 8): 2 slots >= 1.6x faster than 1.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
RESULTS: dict[tuple[int, str], dict[str, float]] = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_tiny

    os.environ.setdefault("QBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    return build_tiny("llama", tmp_path_factory.mktemp("tiny"))


def _grid(tmp: Path, model: Path, slots: int, worker: str) -> Path:
    grid = {"name": "throughput",
            "axes": {"model": [f"hf:{model}"], "method": ["fp", "rtn"],
                     "wbits": [2, 3, 4, 5, 6, 7, 8], "group_size": [32, 64, "per-channel"],
                     "seed": [0]},
            "fixed": {"eval": [{"type": "ppl", "corpus": "enwiki-gensim", "seqlen": 64,
                                "windows": 4}]},
            "run": {"store": str(tmp / "records"), "slots": slots, "worker": worker}}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _run_grid(tmp: Path, model: Path, slots: int, worker: str) -> dict[str, float]:
    grid = _grid(tmp, model, slots, worker)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "suite.cli", "run", str(grid), "--out",
                           str(tmp / "out")], env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp / "records").glob("[!.]*.json")]
    ends = [json.loads(line) for line in (tmp / "records" / ".journal.jsonl").read_text()
            .splitlines() if '"end"' in line]
    m = re.search(r"executor local: ([0-9.]+) s for", proc.stderr)
    wall = float(m.group(1))
    proc_s = sum(e["proc_s"] for e in ends)
    return {"cells": len(records), "command_s": total, "executor_s": wall,
            "cell_s": sum(r["cost"]["wall_s"] for r in records), "proc_s": proc_s,
            "startup_per_cell_s": (proc_s - sum(r["cost"]["wall_s"] for r in records))
            / len(records),
            "scheduling_per_cell_s": max(0.0, wall * slots - proc_s) / len(records)}


@pytest.mark.parametrize("worker", ["warm", "fresh"])
@pytest.mark.parametrize("slots", [1, 2])
def test_bench_local_executor(benchmark, tiny: Path, tmp_path: Path, slots: int, worker: str
                              ) -> None:
    rounds = iter(range(100))

    def once() -> dict[str, float]:
        tmp = tmp_path / f"round{next(rounds)}"
        tmp.mkdir()
        return _run_grid(tmp, tiny, slots, worker)

    stats = benchmark.pedantic(once, rounds=1, iterations=1)
    assert stats["cells"] == 22
    benchmark.extra_info.update(stats)
    RESULTS[(slots, worker)] = stats


@pytest.mark.parametrize("worker", ["warm", "fresh"])
def test_two_slots_are_at_least_1_6x_faster(worker: str) -> None:
    if (1, worker) not in RESULTS or (2, worker) not in RESULTS:
        pytest.skip("needs both throughput benchmarks of this worker kind in the same session")
    speedup = RESULTS[(1, worker)]["executor_s"] / RESULTS[(2, worker)]["executor_s"]
    assert speedup >= 1.6, f"2 slots only {speedup:.2f}x faster than 1 ({worker} workers)"


def test_write_executor_table() -> None:
    if not os.environ.get("QBENCH_EXECUTOR_TABLE"):
        pytest.skip("set QBENCH_EXECUTOR_TABLE=1 to write results/executor-cpu.csv")
    if len(RESULTS) < 4:
        pytest.skip("needs the four throughput benchmarks in the same session")
    out = ROOT / "results" / "executor-cpu.csv"
    cols = ["worker", "slots", "cells", "executor_s", "speedup_vs_1_slot", "cell_s", "proc_s",
            "startup_per_cell_s", "scheduling_per_cell_s", "command_s"]
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for (slots, worker), s in sorted(RESULTS.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            base = RESULTS[(1, worker)]["executor_s"]
            w.writerow({"worker": worker, "slots": slots, "speedup_vs_1_slot":
                        round(base / s["executor_s"], 3),
                        **{k: round(v, 3) for k, v in s.items() if k in cols}})
