"""End to end through the real CLI on the tiny saved model: run, skip on re-run, kill safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke" / "tiny.yaml"


def _qbench(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "suite.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, **kw)


def _sets(model: Path, tmp: Path) -> list[str]:
    return ["--set", f"axes.model=[hf:{model}]", "--set", f"run.store={tmp / 'records'}"]


def test_smoke_grid_end_to_end_and_skip_on_rerun(tiny_llama, tmp_path):
    out = tmp_path / "results"
    proc = _qbench(["run", str(SMOKE), "--out", str(out), *_sets(tiny_llama, tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = pd.read_csv(out / "smoke-tiny.csv")
    assert len(board) == 5  # fp + rtn x {w4, w2} x {g32, per-channel}
    assert set(board["status"]) == {"ok"}
    assert {"model", "method", "wbits", "abits", "group_size", "protocol", "metric", "value",
            "unit", "n_seeds", "ci95", "effective_bits", "status"} <= set(board.columns)
    fp = board[board["method"] == "fp"]["value"].item()
    rtn = board[board["method"] == "rtn"].set_index(["wbits", "group_size"])["value"]
    assert rtn[(2, "per-channel")] > rtn[(4, "per-channel")]
    assert abs(rtn[(4, "32")] - fp) / fp < 0.05
    assert (out / "smoke-tiny.md").read_text().count("| rtn |") == 4
    assert (out / "smoke-tiny.png").stat().st_size > 10_000
    records = [json.loads(p.read_text()) for p in (tmp_path / "records").glob("*.json")]
    assert len(records) == 5 and all(r["honesty"]["passed"] for r in records)
    assert all(r["inputs"]["data"]["eval"] for r in records)

    t0 = time.perf_counter()
    again = _qbench(["run", str(SMOKE), "--out", str(out), *_sets(tiny_llama, tmp_path)],
                    tmp_path)
    assert again.returncode == 0
    assert "5 already done, 0 ran ok" in again.stderr
    assert time.perf_counter() - t0 < 60
    _verify_against_a_copy(tiny_llama, tmp_path)


def _verify_against_a_copy(model: Path, tmp: Path) -> None:
    """``qbench verify``: the store against a copy of itself agrees; a changed value does not."""
    import shutil

    published = tmp / "published"
    shutil.copytree(tmp / "records", published)
    args = ["verify", str(SMOKE), "--published", str(published), *_sets(model, tmp)]
    same = _qbench(args, tmp)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "identical 5" in same.stderr and same.stdout.count("| identical |") == 5
    path = next(published.glob("*.json"))
    rec = json.loads(path.read_text())
    rec["metrics"][0]["value"] *= 1.01
    path.write_text(json.dumps(rec))
    changed = _qbench(args, tmp)
    assert changed.returncode == 1 and "differs 1" in changed.stderr


def test_kill_during_grid_loses_no_finished_record(tiny_llama, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "suite.cli", "run", str(SMOKE), "--out",
            str(tmp_path / "results"), *_sets(tiny_llama, tmp_path)]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    records = tmp_path / "records"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(records.glob("[!.]*.json"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and the running cell, mid-grid
    proc.wait()
    # every visible record is complete; a write the kill interrupted can only leave a .tmp-* file
    finished = {p.name: json.loads(p.read_text()) for p in records.glob("[!.]*.json")}
    assert 2 <= len(finished) < 5
    assert all(r["status"] == "ok" for r in finished.values())
    mtimes = {p.name: p.stat().st_mtime_ns for p in records.glob("[!.]*.json")}

    rerun = _qbench(["run", str(SMOKE), "--out", str(tmp_path / "results"),
                     *_sets(tiny_llama, tmp_path)], tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(finished)} already done" in rerun.stderr
    assert len(list(records.glob("[!.]*.json"))) == 5
    assert all(p.stat().st_mtime_ns == m for p in records.glob("[!.]*.json")
               for n, m in mtimes.items() if p.name == n)
