"""pytest-benchmark: local executor throughput, 1 slot against 2, on a grid of 22 short cells.

Each round is a full ``qbench run`` of the same grid (FP and RTN at W2..W8 x g32/g64/per-channel
on the tiny saved LLaMA of ``tests/conftest.py``, ppl on 4 windows) into a fresh store, with
``run.slots`` 1 or 2 (threads split between slots) and warm or fresh cell processes. The wall
time, the cells' own time, the per-cell process start-up and the per-cell scheduling overhead
(runner time outside any cell process) are in ``extra_info``; ``QBENCH_EXECUTOR_TABLE=1`` also
writes them to ``results/executor-cpu.csv``. Goal (issue 8): 2 slots >= 1.6x faster than 1
with fresh cell processes; warm ones are reported (see the assertion's comment).
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
RESULTS: dict[tuple[int, str], dict[str, float]] = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("qbench_test_fixtures",
                                                  ROOT / "tests" / "conftest.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    os.environ.setdefault("QBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    return fixtures.build_tiny("llama", tmp_path_factory.mktemp("tiny"))


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
    tmp.mkdir(parents=True)
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
def test_bench_local_executor_slots(benchmark, tiny: Path, tmp_path: Path, worker: str) -> None:
    """The benchmarked round is the 2-slot run; the 1-slot run of the same grid precedes it.
    Asserts the issue's goal (2 slots >= 1.6x faster) for fresh cell processes, on the
    executor's own wall time."""
    one = _run_grid(tmp_path / "one", tiny, 1, worker)
    two = benchmark.pedantic(lambda: _run_grid(tmp_path / "two", tiny, 2, worker), rounds=1,
                             iterations=1)
    assert one["cells"] == two["cells"] == 22
    speedup = one["executor_s"] / two["executor_s"]
    benchmark.extra_info.update({"speedup_2_vs_1": speedup, "one_slot": one, "two_slots": two})
    RESULTS[(1, worker)], RESULTS[(2, worker)] = one, two
    if os.environ.get("QBENCH_EXECUTOR_TABLE") and len(RESULTS) == 4:
        _write_table(ROOT / "results" / "executor-cpu.csv")
    # fresh cells: the goal. Warm cells have no start-up left to overlap (0.03 s per
    # cell); what 2 slots gain there is bounded by how well one cell already uses both cores
    # through its threads, and each slot pays its warm process's ~5 s of imports once.
    goal = 1.6 if worker == "fresh" else 1.0
    assert speedup >= goal, f"2 slots only {speedup:.2f}x faster than 1 ({worker} workers)"


def _write_table(out: Path) -> None:
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
