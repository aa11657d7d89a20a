"""One cell, on whatever machine an executor placed it: claim, run, retry, record, release.

Every executor (local slots, submitit job arrays, Ray tasks) calls ``execute``, so the way a
cell runs, fails and is recorded does not depend on where it runs. ``execute`` runs the cell
in a child process (``python -m suite.runner``) and never raises for the cell's failure:

- an ok record already in the store: nothing to do (``skipped``);
- a live claim by another worker: the cell is theirs (``busy``);
- otherwise claim it, run it; a child that dies without writing a record becomes a
  ``crashed`` record, one past ``timeout_s`` a ``timeout`` record (with the log tail);
- attempts ending in a status of ``retry_on`` are re-run ``retries`` times with exponential
  backoff; the last attempt's record stands;
- the claim is released, and the journal has the attempt's start and end.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suite.claims import Claims, Heartbeat, journal
from suite.records import Store, base_record, write_json_atomic
from suite.warm import WarmProcess

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WorkerOptions:
    """How ``execute`` runs a cell (everything here is picklable: it travels to Slurm / Ray)."""

    store: str
    timeout_s: float
    retries: int = 2
    retry_backoff_s: float = 5.0
    retry_on: tuple[str, ...] = ("crashed",)
    retry_failed: bool = False  # re-run a cell whose record is not ok
    stale_claim_s: float = 300.0
    executor: str = "local"
    threads: int | None = None
    env: tuple[tuple[str, str], ...] = ()  # extra environment, e.g. CUDA_VISIBLE_DEVICES

    @classmethod
    def from_run(cls, run: Any, executor: str, retry_failed: bool, threads: int | None
                 ) -> WorkerOptions:
        """Options from a grid's ``RunSpec``."""
        return cls(store=run.store, timeout_s=run.timeout_s, retries=run.retries,
                   retry_backoff_s=run.retry_backoff_s, retry_on=tuple(run.retry_on),
                   retry_failed=retry_failed, stale_claim_s=run.stale_claim_s,
                   executor=executor, threads=threads)


StageFn = Callable[[str, str], None]  # (run_key, stage)
_CLAIMS: dict[tuple[str, float], tuple[Claims, Heartbeat]] = {}
_CLAIMS_LOCK = threading.Lock()


def claims_for(store: str, stale_s: float) -> tuple[Claims, Heartbeat]:
    """This process's claims on ``store`` (one identity and one heartbeat thread per process)."""
    with _CLAIMS_LOCK:
        if (store, stale_s) not in _CLAIMS:
            claims = Claims(Path(store), stale_s)
            _CLAIMS[(store, stale_s)] = (claims, Heartbeat(claims, min(30.0, stale_s / 4)))
        return _CLAIMS[(store, stale_s)]


def needs_run(record: dict[str, Any] | None, retry_failed: bool) -> bool:
    """Whether a cell with this record (None: none yet) is to be run: never an ok one; a
    failed one only when failures are being retried (a failure is a result too)."""
    if record is None:
        return True
    return record.get("status") != "ok" and retry_failed


def execute(key: str, payload: dict[str, Any], opts: WorkerOptions,
            on_stage: StageFn | None = None, warm: WarmProcess | None = None) -> str:
    """Run the cell ``key`` to a record; returns its final status, ``skipped`` or ``busy``.
    ``warm``: fork the cell from this warm process instead of starting an interpreter."""
    payload, store = {**payload, "run_key": key}, Store(opts.store)
    if not needs_run(store.get(key), opts.retry_failed):
        return "skipped"
    claims, beat = claims_for(opts.store, opts.stale_claim_s)
    if not claims.acquire(key):
        return "busy"
    beat.add(key)
    try:
        if not needs_run(store.get(key), opts.retry_failed):  # finished while we claimed
            return "skipped"
        return _attempts(payload, opts, store, on_stage, warm)
    finally:
        beat.discard(key)
        claims.release(key)


def _attempts(payload: dict[str, Any], opts: WorkerOptions, store: Store,
              on_stage: StageFn | None, warm: WarmProcess | None) -> str:
    status = "failed"
    for attempt in range(opts.retries + 1):
        if attempt:
            time.sleep(opts.retry_backoff_s * 2 ** (attempt - 1))
        journal(store.root, {"event": "start", "key": payload["run_key"], "attempt": attempt,
                             "executor": opts.executor})
        t0 = time.perf_counter()
        status = _attempt(payload, opts, store, attempt, on_stage, warm)
        journal(store.root, {"event": "end", "key": payload["run_key"], "attempt": attempt,
                             "executor": opts.executor, "status": status,
                             "proc_s": round(time.perf_counter() - t0, 3)})
        if status not in opts.retry_on:
            break
    return status


def _attempt(payload: dict[str, Any], opts: WorkerOptions, store: Store, attempt: int,
             on_stage: StageFn | None, warm: WarmProcess | None) -> str:
    key = payload["run_key"]
    log_dir = store.root / ".logs"
    paths = {s: log_dir / f"{key}.{s}" for s in ("payload.json", "stage", "log")}
    worker = {"executor": opts.executor, "attempt": attempt, "threads": opts.threads,
              "attempt_id": uuid.uuid4().hex}
    write_json_atomic(paths["payload.json"], {**payload, "worker": worker})
    paths["stage"].unlink(missing_ok=True)
    argv = [str(paths["payload.json"]), str(paths["stage"])]
    poll = _stage_poller(key, paths["stage"], on_stage)
    if warm is not None and warm.alive():
        rc = warm.run(argv, paths["log"], opts.timeout_s, poll)
    else:
        with paths["log"].open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "suite.runner", *argv], stdout=log,
                                    stderr=subprocess.STDOUT, env=child_env(opts))
            rc = _wait(proc, opts.timeout_s, poll)
    record = store.get(key)  # the child's own record, or an earlier attempt's / none
    fresh = record is not None and record.get("worker", {}).get("attempt_id") == \
        worker["attempt_id"]
    if rc == "timeout":
        _fallback(payload, store, "timeout", f"cell exceeded run.timeout_s={opts.timeout_s:g}",
                  paths["log"], worker)
        return "timeout"
    if not fresh:
        _fallback(payload, store, "crashed", _exit_reason(rc), paths["log"], worker)
        return "crashed"
    return record["status"]


def _exit_reason(rc: int | str) -> str:
    if isinstance(rc, int) and rc < 0:
        name = signal.Signals(-rc).name
        hint = " (possibly the kernel's OOM killer)" if rc == -signal.SIGKILL else ""
        return f"cell process killed by {name}{hint} before writing its record"
    return f"cell process exited with code {rc} without writing its record"


def _stage_poller(key: str, stage_path: Path, on_stage: StageFn | None) -> Callable[[], None]:
    """A function reporting the cell's stage file to ``on_stage`` when it changed."""
    last = [None]

    def poll() -> None:
        if on_stage is None:
            return
        try:
            stage = stage_path.read_text()
        except FileNotFoundError:
            stage = "starting"
        if stage != last[0]:
            on_stage(key, stage)
            last[0] = stage

    return poll


def _wait(proc: subprocess.Popen, timeout: float, poll: Callable[[], None]) -> int | str:
    t0 = time.monotonic()
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        poll()
        if time.monotonic() - t0 > timeout:
            proc.kill()
            proc.wait()
            return "timeout"


def child_env(opts: WorkerOptions) -> dict[str, str]:
    """The environment of a cell process (or of a slot's warm process)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["QBENCH_PARENT_PID"] = str(os.getpid())  # the cell exits when this process dies
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    env.update(dict(opts.env))
    return env


def _fallback(payload: dict[str, Any], store: Store, status: str, error: str, log_path: Path,
              worker: dict[str, Any]) -> None:
    """The record of a cell whose process could not write one itself."""
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    record = base_record(payload)
    record.update(status=status, error=error, log_tail=tail, worker=worker)
    store.put(record)


def replace_worker(opts: WorkerOptions, **changes: Any) -> WorkerOptions:
    """``opts`` with some fields changed (slots give each worker its own env / threads)."""
    return dataclasses.replace(opts, **changes)
