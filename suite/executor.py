"""Executors: where a grid's pending cells run. The store is the source of truth.

A cell is finished when its record exists (ok, or a failure: failures are results too, re-run
only with ``--retry-failed``). Every executor hands each pending cell to
``suite.worker.execute``, which claims it, runs it in its own process and writes its record, so
records do not depend on the executor:

- ``local``: ``run.slots`` worker threads on this machine, each driving one cell process at a
  time (one slot per visible GPU for cuda grids; cpu threads split between slots); cells of an
  ``exclusive`` grid run alone;
- ``slurm``: submitit job arrays, one per resource class (gpus, cpus, memory, time), capped at
  ``run.slurm.array_parallelism`` tasks at once; ``run.slurm.cluster: local`` runs the same path
  as local processes;
- ``ray``: one Ray task per cell with ``num_cpus`` / ``num_gpus`` resources.

Cells another runner holds a live claim on are waited for, then taken over if that runner died.
The parent never imports a method's code or touches CUDA itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from suite.claims import Claims, read_journal, sweep_temp_files
from suite.config import RunSpec
from suite.prepare import PreparedCell
from suite.records import Store
from suite.warm import WarmProcess
from suite.worker import ROOT, WorkerOptions, child_env, execute, needs_run


@dataclass
class RunSummary:
    """Counts of one grid run."""

    skipped: int = 0
    ok: int = 0
    not_ok: dict[str, str] = field(default_factory=dict)  # run_key -> status
    wall_s: float = 0.0  # executing the pending cells, end to end
    proc_s: float = 0.0  # sum over attempts of the cell processes' lifetimes
    cell_s: float = 0.0  # sum over cells of the in-process time (record cost.wall_s)

    @property
    def failed(self) -> int:
        """Cells that ended in a status other than ok."""
        return len(self.not_ok)

    @property
    def ran(self) -> int:
        """Cells executed by this run."""
        return self.ok + self.failed

    def startup_s(self) -> float:
        """Mean per cell of process start (interpreter, imports) and teardown."""
        return max(0.0, self.proc_s - self.cell_s) / max(1, self.ran)

    def scheduling_s(self, slots: int) -> float:
        """Mean per cell of runner time outside any cell process, with ``slots`` at once."""
        return max(0.0, self.wall_s * slots - self.proc_s) / max(1, self.ran)


class Progress:
    """One grid-level bar: cells done / running / failed with ETA, and the running cells'
    stages (thread-safe: slots report from their own threads)."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="cells", unit="cell", dynamic_ncols=True,
                        disable=not total)
        self.lock = threading.Lock()
        self.running: dict[str, str] = {}
        self.labels: dict[str, str] = {}
        self.ok = self.failed = 0
        self.closed = False

    def start(self, pc: PreparedCell) -> None:
        """A cell was handed to a worker."""
        with self.lock:
            self.labels[pc.key] = pc.cell.label()
            self.running[pc.key] = "starting"
            self._refresh()

    def stage(self, key: str, stage: str) -> None:
        """A running cell reported its stage."""
        with self.lock:
            if key in self.running:
                self.running[key] = stage
                self._refresh()

    def finish(self, key: str, status: str) -> None:
        """A cell ended (``busy``: it belongs to another runner and is not counted yet)."""
        with self.lock:
            self.running.pop(key, None)
            if status == "busy":
                self._refresh()
                return
            self.ok += status in ("ok", "skipped")
            self.failed += status not in ("ok", "skipped")
            if not self.closed:
                self.bar.update(1)
            self._refresh()

    def _refresh(self) -> None:
        if self.closed:  # a slot thread outliving an interrupt prints nothing more
            return
        stages = [f"{self.labels[k]} [{s}]" for k, s in self.running.items()]
        self.bar.set_description_str(" | ".join(stages) or "cells", refresh=False)
        self.bar.set_postfix_str(f"running={len(self.running)} ok={self.ok} "
                                 f"failed={self.failed}", refresh=True)

    def close(self) -> None:
        """End the bar (idempotent)."""
        with self.lock:
            self.closed = True
            self.bar.close()


Backend = Callable[[list[PreparedCell], RunSpec, WorkerOptions, Progress], list[PreparedCell]]


def run_grid(cells: list[PreparedCell], run: RunSpec, retry_failed: bool = False,
             executor: str | None = None) -> RunSummary:
    """Run every cell of ``cells`` that needs it on ``executor`` (default ``run.executor``)."""
    store, name = Store(run.store), executor or run.executor
    store.root.mkdir(parents=True, exist_ok=True)
    Claims(store.root, run.stale_claim_s).sweep()  # a killed runner's claims and temp files
    sweep_temp_files(store.root)
    todo = [pc for pc in cells if needs_run(store.get(pc.key), retry_failed)]
    summary = RunSummary(skipped=len(cells) - len(todo))
    opts = WorkerOptions.from_run(run, name, retry_failed, run.threads)
    progress = Progress(len(todo))
    t0, since = time.perf_counter(), time.time()
    try:
        busy = BACKENDS[name](todo, run, opts, progress)
        while busy:  # held by another runner: wait, then take over what a dead one left
            busy = _wait_for_others(busy, store, run)
            busy = BACKENDS[name](busy, run, opts, progress) if busy else []
    finally:  # also on Ctrl-C: the bar ends before the interrupt line is printed
        progress.close()
    summary.wall_s = time.perf_counter() - t0
    _tally(summary, todo, store, since)
    return summary


def _tally(summary: RunSummary, todo: list[PreparedCell], store: Store, since: float) -> None:
    keys = {pc.key for pc in todo}
    for pc in todo:
        rec = store.get(pc.key) or {"status": "failed"}
        summary.cell_s += rec.get("cost", {}).get("wall_s", 0.0)
        if rec["status"] == "ok":
            summary.ok += 1
        else:
            summary.not_ok[pc.key] = rec["status"]
    summary.proc_s = sum(e.get("proc_s", 0.0) for e in read_journal(store.root)
                         if e["event"] == "end" and e["key"] in keys and e["t"] >= since)


def _wait_for_others(busy: list[PreparedCell], store: Store, run: RunSpec,
                     poll_s: float = 1.0) -> list[PreparedCell]:
    """Block until no live claim remains on ``busy``; return those still without an ok record
    (their runner died or failed them: they are run here)."""
    claims = Claims(store.root, run.stale_claim_s)
    while any(pc.key in claims.held() for pc in busy):
        time.sleep(poll_s)
    return [pc for pc in busy if store.get(pc.key) is None]


# --------------------------------------------------------------------------- local slots

def slot_resources(run: RunSpec) -> list[tuple[int | None, tuple[tuple[str, str], ...]]]:
    """(torch threads, extra env) of each local slot."""
    if run.device == "cuda":
        gpus = _visible_gpus()
        n = run.slots or max(1, len(gpus))
        return [(run.threads, (("CUDA_VISIBLE_DEVICES", gpus[i % len(gpus)]),) if gpus else ())
                for i in range(n)]
    n = run.slots or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [(run.threads or max(1, (cores or 1) // n), ())] * n


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch  # counts devices through NVML without initialising CUDA in this process

    return [str(i) for i in range(torch.cuda.device_count())]


class _Queue:
    """Pending cells; an exclusive cell starts only when nothing runs, and blocks the rest."""

    def __init__(self, cells: list[PreparedCell]) -> None:
        self.cells = deque(cells)
        self.cond = threading.Condition()
        self.running = 0
        self.exclusive = False

    def take(self) -> PreparedCell | None:
        with self.cond:
            while True:
                if not self.cells:
                    return None
                head = self.cells[0].payload["run"].get("exclusive", False)
                if not self.exclusive and not (head and self.running):
                    pc = self.cells.popleft()
                    self.running += 1
                    self.exclusive = head
                    return pc
                self.cond.wait()

    def done(self) -> None:
        with self.cond:
            self.running -= 1
            self.exclusive = False
            self.cond.notify_all()


def run_local(cells: list[PreparedCell], run: RunSpec, opts: WorkerOptions,
              progress: Progress) -> list[PreparedCell]:
    """Run ``cells`` on ``run.slots`` local slots; returns the cells another runner holds."""
    queue, busy = _Queue(cells), []

    def slot(i: int, threads: int | None, env: tuple[tuple[str, str], ...]) -> None:
        slot_opts = dataclasses.replace(opts, threads=threads, env=env)
        warm: WarmProcess | None = None
        try:
            while (pc := queue.take()) is not None:
                if run.worker == "warm" and run.device == "cpu" and not (warm and warm.alive()):
                    warm = _start_warm(slot_opts, i)
                progress.start(pc)
                try:
                    status = execute(pc.key, pc.payload, slot_opts, progress.stage, warm)
                finally:
                    queue.done()
                if status == "busy":
                    busy.append(pc)
                progress.finish(pc.key, status)
        finally:
            if warm is not None:
                warm.close()

    threads = [threading.Thread(target=slot, args=(i, *res), name=f"qbench-slot-{i}")
               for i, res in enumerate(slot_resources(run))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:  # start no further cell; the ones in flight end (their record
        with queue.cond:       # is saved) before the runner reports, so nothing prints after it
            queue.cells.clear()
        for t in threads:
            t.join()
        raise
    return busy


def _start_warm(opts: WorkerOptions, slot: int) -> WarmProcess | None:
    """The slot's warm process, or None (then cells start fresh) if it cannot start."""
    try:
        return WarmProcess(child_env(opts), Path(opts.store) / ".logs" / f"warm-{slot}.log")
    except (OSError, RuntimeError, ValueError) as e:
        print(f"qbench: warm cell process failed to start ({e}); starting cells fresh",
              file=sys.stderr)
        return None


# --------------------------------------------------------------------------- slurm (submitit)

def resource_class(run: RunSpec) -> dict[str, object]:
    """submitit parameters of a grid's cells (one job array per distinct class)."""
    s = run.slurm
    gpus = s.gpus_per_task if s.gpus_per_task is not None else int(run.device == "cuda")
    minutes = math.ceil(run.timeout_s * (run.retries + 1) / 60) + 5
    params: dict[str, object] = {"timeout_min": minutes, "cpus_per_task": s.cpus_per_task,
                                 "mem_gb": s.mem_gb, "gpus_per_node": gpus, "nodes": 1,
                                 "tasks_per_node": 1,
                                 "slurm_array_parallelism": s.array_parallelism}
    if s.partition:
        params["slurm_partition"] = s.partition
    return params


def run_slurm(cells: list[PreparedCell], run: RunSpec, opts: WorkerOptions,
              progress: Progress) -> list[PreparedCell]:
    """Submit ``cells`` as submitit job arrays grouped by resource class; wait for them."""
    import submitit

    _export_pythonpath()
    folder = Path(run.slurm.folder or Path(run.store) / ".submitit") / "%j"
    ex = submitit.AutoExecutor(folder=folder, cluster=run.slurm.cluster)
    groups: dict[str, list[PreparedCell]] = {}
    for pc in cells:  # the class key: the parameters themselves
        groups.setdefault(repr(sorted(resource_class(run).items())), []).append(pc)
    jobs = {}
    task_opts = dataclasses.replace(opts, threads=run.threads or run.slurm.cpus_per_task)
    for group in groups.values():
        ex.update_parameters(name=f"qbench-{group[0].cell.model[:20]}", **resource_class(run))
        submitted = ex.map_array(execute, [pc.key for pc in group],
                                 [pc.payload for pc in group], [task_opts] * len(group))
        for job, pc in zip(submitted, group, strict=True):
            jobs[job] = pc
            progress.start(pc)
    return _collect_jobs(jobs, progress, Store(run.store))


def _collect_jobs(jobs: dict, progress: Progress, store: Store) -> list[PreparedCell]:
    import submitit

    busy = []
    for job in submitit.helpers.as_completed(list(jobs)):
        pc = jobs[job]
        try:
            status = job.result()
        except Exception:  # noqa: BLE001 - the job itself died (node failure, preemption)
            status = _status_after_lost_worker(pc, store)
        if status == "busy":
            busy.append(pc)
        progress.finish(pc.key, status)
    return busy


def _status_after_lost_worker(pc: PreparedCell, store: Store) -> str:
    """A job or task that died before ``execute`` returned: its claim is stale now; the cell
    keeps whatever record exists, else it is left pending for the next run."""
    rec = store.get(pc.key)
    return rec["status"] if rec else "crashed"


def _export_pythonpath() -> None:
    """Jobs and tasks start fresh interpreters that must import this checkout's ``suite``."""
    path = os.environ.get("PYTHONPATH", "")
    if str(ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")


# --------------------------------------------------------------------------- ray

def run_ray(cells: list[PreparedCell], run: RunSpec, opts: WorkerOptions,
            progress: Progress) -> list[PreparedCell]:
    """One Ray task per cell; a local Ray instance is started when ``run.ray.address`` is
    null and none is running in this process."""
    import ray

    _export_pythonpath()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address=run.ray.address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    try:
        return _ray_tasks(cells, run, opts, progress)
    finally:
        if started:
            ray.shutdown()


def _ray_tasks(cells: list[PreparedCell], run: RunSpec, opts: WorkerOptions,
               progress: Progress) -> list[PreparedCell]:
    import ray

    gpus = run.ray.num_gpus if run.ray.num_gpus is not None else float(run.device == "cuda")
    task = ray.remote(execute).options(num_cpus=run.ray.num_cpus, num_gpus=gpus, max_retries=0)
    task_opts = dataclasses.replace(opts, threads=run.threads or run.ray.num_cpus)
    refs = {}
    for pc in cells:
        refs[task.remote(pc.key, pc.payload, task_opts)] = pc
        progress.start(pc)
    busy, store = [], Store(run.store)
    while refs:
        (ready,), _ = ray.wait(list(refs), num_returns=1)
        pc = refs.pop(ready)
        try:
            status = ray.get(ready)
        except Exception:  # noqa: BLE001 - the task's worker died
            status = _status_after_lost_worker(pc, store)
        if status == "busy":
            busy.append(pc)
        progress.finish(pc.key, status)
    return busy


BACKENDS: dict[str, Backend] = {"local": run_local, "slurm": run_slurm, "ray": run_ray}
