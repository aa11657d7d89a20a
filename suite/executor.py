"""Local executor: one subprocess per pending cell, ok cells skipped, failures become records.

The store is the source of truth: a cell is done when its ok record exists. The parent never
imports a method or touches CUDA; it launches ``python -m suite.runner``, shows one progress
bar (cells done / failed, ETA, the running cell's stage) and writes a ``failed`` / ``timeout``
record itself only when the child could not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from suite.prepare import PreparedCell
from suite.records import Store, write_json_atomic


@dataclass
class RunSummary:
    """Counts of one grid run."""

    skipped: int = 0
    ok: int = 0
    not_ok: dict[str, str] = field(default_factory=dict)  # run_key -> status

    @property
    def failed(self) -> int:
        """Cells that ended in a status other than ok."""
        return len(self.not_ok)


def run_local(cells: list[PreparedCell], store: Store, log_dir: Path) -> RunSummary:
    """Run every pending cell sequentially, each in its own subprocess."""
    summary = RunSummary()
    pending = []
    for pc in cells:
        if store.is_done(pc.key):
            summary.skipped += 1
        else:
            pending.append(pc)
    bar = tqdm(total=len(pending), desc="cells", unit="cell", dynamic_ncols=True,
               disable=not pending)
    for pc in pending:
        status = _run_one(pc, store, log_dir, bar)
        if status == "ok":
            summary.ok += 1
        else:
            summary.not_ok[pc.key] = status
        bar.set_postfix_str(f"ok={summary.ok} failed={summary.failed}")
        bar.update(1)
    bar.close()
    return summary


def _run_one(pc: PreparedCell, store: Store, log_dir: Path, bar: tqdm) -> str:
    log_dir.mkdir(parents=True, exist_ok=True)
    payload_path = log_dir / f"{pc.key}.payload.json"
    stage_path = log_dir / f"{pc.key}.stage"
    log_path = log_dir / f"{pc.key}.log"
    write_json_atomic(payload_path, pc.payload)
    cmd = [sys.executable, "-m", "suite.runner", str(payload_path), str(stage_path)]
    timeout = pc.payload["run"]["timeout_s"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
        rc = _wait(proc, timeout, stage_path, bar, pc.cell.label())
    record = store.get(pc.key)
    if rc == "timeout":
        _write_fallback(pc, store, "timeout", f"cell exceeded run.timeout_s={timeout}", log_path)
        return "timeout"
    if record is None:
        _write_fallback(pc, store, "failed", f"cell process exited with code {rc}", log_path)
        return "failed"
    return record["status"]


def _wait(proc: subprocess.Popen, timeout: float, stage_path: Path, bar: tqdm, label: str
          ) -> int | str:
    t0 = time.monotonic()
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        stage = stage_path.read_text() if stage_path.exists() else "starting"
        desc = f"{label} [{stage}]"
        if desc != bar.desc:
            bar.set_description_str(desc, refresh=True)
        if time.monotonic() - t0 > timeout:
            proc.kill()
            proc.wait()
            return "timeout"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["QBENCH_PARENT_PID"] = str(os.getpid())  # the cell exits when this process dies
    return env


def _write_fallback(pc: PreparedCell, store: Store, status: str, error: str, log_path: Path
                    ) -> None:
    tail = log_path.read_text()[-3000:] if log_path.exists() else ""
    store.put({
        "schema_version": 1, "run_key": pc.key, "status": status, "grid": pc.payload["grid"],
        "cell": pc.payload["key_payload"]["cell"], "model": pc.payload["model"],
        "inputs": {"model_fingerprint": pc.payload["key_payload"]["model_fingerprint"],
                   "data": pc.payload["key_payload"]["data"]},
        "notes": pc.payload["notes"], "metrics": [], "honesty": None, "effective_bits": None,
        "cost": {}, "stats": {}, "env": {}, "error": error, "log_tail": tail,
    })
