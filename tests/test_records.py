"""The record store: atomic writes, skip-on-rerun status, interrupted writes are invisible."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from suite.records import Store

ROOT = Path(__file__).resolve().parent.parent


def _rec(key: str, status: str = "ok") -> dict:
    return {"run_key": key, "status": status, "metrics": []}


def test_put_get_and_done(tmp_path):
    store = Store(tmp_path)
    store.put(_rec("a"))
    store.put(_rec("b", "failed"))
    assert store.is_done("a") and not store.is_done("b") and not store.is_done("c")
    assert [r["run_key"] for r in store.all()] == ["a", "b"]
    with pytest.raises(ValueError, match="status"):
        store.put(_rec("c", "fine"))


def test_interrupted_write_leaves_no_visible_record(tmp_path):
    store = Store(tmp_path)
    store.put(_rec("a"))
    # what a SIGKILL between write and rename leaves: a complete or partial temp file
    (tmp_path / ".tmp-x1.json").write_text(json.dumps(_rec("a-copy")))
    (tmp_path / ".tmp-x2.json").write_text('{"run_key": "half')
    assert [r["run_key"] for r in store.all()] == ["a"]
    assert not list(tmp_path.glob("[!.]*.tmp"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_cell_process_exits_when_the_runner_dies(tmp_path):
    """Killing ``qbench run`` must not leave its cell process computing as an orphan."""
    pid_file = tmp_path / "child.pid"
    child = ("import os, sys, time; from suite.runner import die_with_parent; "
             "die_with_parent(int(os.environ['QBENCH_PARENT_PID'])); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = ("import os, subprocess, sys, time; "
              "env = {**os.environ, 'QBENCH_PARENT_PID': str(os.getpid())}; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}], env=env); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT)
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    proc.kill()
    proc.wait()
    for _ in range(100):
        if not _alive(child_pid):
            return
        time.sleep(0.05)
    os.kill(child_pid, signal.SIGKILL)
    pytest.fail("the cell process outlived its runner")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for whoever adopted it to reap it counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
