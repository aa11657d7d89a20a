"""Executors and reliability: claims, failures as records, retries, exclusive cells, two runners
on one store, SIGKILL fault injection, and identical records through the local, submitit-local
and Ray executors. Everything runs through the real CLI on the tiny saved model; failing cells
come from a plug-in method (``tests/fault_plugin.py``) installed as a distribution."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from suite.claims import Claims, _alive, read_journal, sweep_temp_files
from suite.records import SAFE_HOST

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = ("env", "cost", "worker", "started_at", "finished_at", "determinism")


@pytest.fixture(scope="module")
def fault_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("fault-site")
    shutil.copy(ROOT / "tests" / "fault_plugin.py", site / "qbench_fault_plugin.py")
    info = site / "qbench_fault_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qbench-fault-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text("[qbench.methods]\nfault = qbench_fault_plugin\n")
    return site


def _grid(tmp: Path, model: Path, methods: list[str], file: str = "grid.yaml", **run: object
          ) -> Path:
    grid = {
        "name": "exec", "axes": {"model": [f"hf:{model}"], "method": methods, "wbits": [4],
                                 "group_size": [32], "seed": [0]},
        "fixed": {"eval": [{"type": "ppl", "corpus": "enwiki-gensim", "seqlen": 64,
                            "windows": 4}]},
        "methods": {m: {"kind": m.split(":")[1]} for m in methods if m.startswith("fault:")},
        "run": {"store": str(tmp / "records"), "timeout_s": 600, "threads": 1, **run},
    }
    path = tmp / file
    path.write_text(yaml.safe_dump(grid))
    return path


def _env(site: Path | None) -> dict[str, str]:
    paths = [str(ROOT)] + ([str(site)] if site else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "RAY_USAGE_STATS_ENABLED": "0"}


def _qbench(args: list[str], tmp: Path, site: Path | None = None, **kw: object
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "suite.cli", *args, "--out",
                           str(tmp / "results")], cwd=tmp, env=_env(site), capture_output=True,
                          text=True, timeout=900, **kw)


def _records(store: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in store.glob("[!.]*.json")}


def _ends(store: Path) -> list[dict]:
    return [e for e in read_journal(store) if e["event"] == "end"]


def _completions(store: Path) -> list[str]:
    """Run keys of every ok record a cell process wrote (its journal line follows the write)."""
    return [e["key"] for e in read_journal(store) if e["event"] == "record"
            and e["status"] == "ok"]


# --------------------------------------------------------------------------- claims (unit)

def test_a_live_claim_excludes_others_and_is_released(tmp_path: Path) -> None:
    a, b = Claims(tmp_path), Claims(tmp_path)
    assert a.acquire("k") and not b.acquire("k")
    assert a.held() == ["k"] and not a.is_stale("k")
    b.release("k")  # not b's claim: left alone
    assert not b.acquire("k")
    a.release("k")
    assert b.acquire("k") and a.owner("k")["token"] == b.token


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_owners_claim_is_taken_over_at_once(tmp_path: Path) -> None:
    a = Claims(tmp_path)
    assert a.acquire("k")
    claim = a.owner("k")
    (tmp_path / ".claims" / "k.claim").write_text(json.dumps({**claim, "pid": _dead_pid()}))
    b = Claims(tmp_path)
    assert b.is_stale("k") and b.acquire("k")


def test_a_silent_remote_claim_goes_stale_after_the_timeout(tmp_path: Path) -> None:
    a = Claims(tmp_path, stale_s=60)
    path = tmp_path / ".claims" / "k.claim"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": "other-node", "pid": 1, "token": "x"}))
    assert not a.acquire("k")  # fresh heartbeat: the remote worker is presumed alive
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert a.acquire("k")
    assert a.sweep() == 0 and a.held() == ["k"]


def test_orphaned_temp_files_are_swept_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / f".tmp-{SAFE_HOST}-{_dead_pid()}-abc.json"
    live = tmp_path / f".tmp-{SAFE_HOST}-{os.getpid()}-abc.json"
    old_remote = tmp_path / ".tmp-othernode-12-abc.json"
    for p in (dead, live, old_remote):
        p.write_text("{")
    os.utime(old_remote, (time.time() - 3600, time.time() - 3600))
    assert sweep_temp_files(tmp_path) == 2
    assert live.exists() and not dead.exists() and not old_remote.exists()


# --------------------------------------------------------------------------- local scheduling

def _fake_cells(n: int, exclusive: bool) -> list:
    from types import SimpleNamespace

    return [SimpleNamespace(key=f"k{i}", payload={"run": {"exclusive": exclusive}},
                            cell=SimpleNamespace(label=lambda i=i: f"cell{i}"))
            for i in range(n)]


@pytest.mark.parametrize("exclusive", [False, True])
def test_slots_run_cells_at_once_unless_exclusive(monkeypatch, exclusive: bool) -> None:
    from suite import executor
    from suite.config import RunSpec
    from suite.worker import WorkerOptions

    spans, lock = [], threading.Lock()

    def fake_execute(key, payload, opts, on_stage=None, warm=None):  # noqa: ANN001, ANN202
        t0 = time.monotonic()
        time.sleep(0.2)
        with lock:
            spans.append((t0, time.monotonic(), opts.threads))
        return "ok"

    monkeypatch.setattr(executor, "execute", fake_execute)
    run = RunSpec(slots=2, exclusive=exclusive, worker="fresh")
    progress = executor.Progress(6)
    busy = executor.run_local(_fake_cells(6, exclusive), run,
                              WorkerOptions(store="unused", timeout_s=10), progress)
    progress.close()
    assert busy == [] and len(spans) == 6
    spans.sort()
    overlaps = sum(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
    assert (overlaps == 0) if exclusive else (overlaps >= 2)
    cores = len(os.sched_getaffinity(0))
    assert {s[2] for s in spans} == {max(1, cores // 2)}  # cpu threads split between slots


# --------------------------------------------------------------------------- failures are rows

def test_failures_become_records_and_only_retry_failed_reruns_them(tiny_llama, fault_site,
                                                                   tmp_path: Path) -> None:
    methods = ["fp", "fault:oom", "fault:numerical", "fault:diverge", "fault:crash",
               "fault:hang", "fault:flaky"]
    grid = _grid(tmp_path, tiny_llama, methods, slots=2, timeout_s=40, retries=1,
                 retry_backoff_s=0.1)
    raw = yaml.safe_load(grid.read_text())
    raw["methods"]["fault:flaky"]["marker"] = str(tmp_path / "flaky-marker")
    grid.write_text(yaml.safe_dump(raw))
    proc = _qbench(["run", str(grid)], tmp_path, fault_site)
    assert proc.returncode == 1, proc.stderr[-3000:]
    store = tmp_path / "records"
    recs = _records(store)
    by_method = {r["cell"]["method"]: r for r in recs.values()}
    status = {m: r["status"] for m, r in by_method.items()}
    assert status == {"fp": "ok", "fault:oom": "oom", "fault:numerical": "numerical",
                      "fault:diverge": "diverged", "fault:crash": "crashed",
                      "fault:hang": "timeout", "fault:flaky": "ok"}
    assert "SIGKILL" in by_method["fault:crash"]["error"]
    assert "run.timeout_s=40" in by_method["fault:hang"]["error"]
    assert "OutOfMemoryError" in by_method["fault:oom"]["error"]
    attempts = {}
    for e in _ends(store):
        attempts.setdefault(e["key"], []).append(e["status"])
    assert attempts[by_method["fault:crash"]["run_key"]] == ["crashed", "crashed"]  # retried
    assert attempts[by_method["fault:flaky"]["run_key"]] == ["crashed", "ok"]
    assert attempts[by_method["fault:oom"]["run_key"]] == ["oom"]  # not transient: no retry
    board = (tmp_path / "results" / "exec.csv").read_text()
    assert "timeout" in board and "crashed" in board  # failures are rows of the leaderboard

    mtimes = {k: (store / f"{k}.json").stat().st_mtime_ns for k in recs}
    n_events = len(_ends(store))
    subset = _grid(tmp_path, tiny_llama, ["fp", "fault:oom"], "subset.yaml", slots=2,
                   timeout_s=40, retries=1, retry_backoff_s=0.1)
    again = _qbench(["run", str(subset)], tmp_path, fault_site)
    assert again.returncode == 1 and "2 already done" in again.stderr
    assert len(_ends(store)) == n_events  # a failure is a result: not re-run by default
    retry = _qbench(["run", str(subset), "--retry-failed"], tmp_path, fault_site)
    assert retry.returncode == 1
    new = _ends(store)[n_events:]
    assert [e["key"] for e in new] == [by_method["fault:oom"]["run_key"]]
    assert all((store / f"{k}.json").stat().st_mtime_ns == m for k, m in mtimes.items()
               if k != by_method["fault:oom"]["run_key"])
    assert not list(store.glob(".tmp-*")) and not list((store / ".claims").glob("*.claim"))


# --------------------------------------------------------------------------- concurrency, kills

def test_two_runners_on_one_store_never_run_a_cell_twice(tiny_llama, fault_site,
                                                         tmp_path: Path) -> None:
    grid = _grid(tmp_path, tiny_llama, ["fault:slow"], slots=1)
    raw = yaml.safe_load(grid.read_text())
    raw["axes"].update(wbits=[4, 3], group_size=[32, 64, "per-channel"])
    raw["methods"]["fault:slow"]["sleep_s"] = 2.0  # long enough for both runners to get cells
    grid.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "suite.cli", "run", str(grid)]
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"out{i}")], cwd=tmp_path,
                              env=_env(fault_site), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    store = tmp_path / "records"
    recs = _records(store)
    assert len(recs) == 6 and {r["status"] for r in recs.values()} == {"ok"}
    assert sorted(_completions(store)) == sorted(recs)  # each cell ran exactly once
    assert len({e["pid"] for e in _ends(store)}) == 2  # and both runners did work
    for i in range(2):  # both wrote the full table
        assert (tmp_path / f"out{i}" / "exec.csv").read_text().count("\n") == 7


def _kill_at_a_random_point(cmd: list[str], tmp: Path, store: Path, rng: random.Random,
                           trial: int, site: Path) -> None:
    """Start the runner and SIGKILL it (and its cells): every third trial at a random time of
    its start-up, otherwise a random 0-0.8 s after 1-3 further journal events (cells
    starting, ending, writing records), so kills land in every phase of a cell."""
    proc = subprocess.Popen(cmd, cwd=tmp, env=_env(site), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    if trial % 3 == 0:
        time.sleep(rng.uniform(0.2, 4.0))
    else:
        target = len(read_journal(store)) + rng.randint(1, 3)
        deadline = time.monotonic() + 120
        while (len(read_journal(store)) < target and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_at_random_points_never_loses_or_corrupts_a_record(tiny_llama, fault_site,
                                                                   tmp_path: Path) -> None:
    # RTN cells that sleep 0.3 s in quantize: on a fast host a bare RTN cell is over in well
    # under a second, and the kills then all fell between cells (CI, 2026-11-24)
    grid = _grid(tmp_path, tiny_llama, ["fp", "fault:slow"], slots=2)
    raw = yaml.safe_load(grid.read_text())
    raw["axes"].update(wbits=[4, 3, 2], group_size=[32, 64, "per-channel"])
    raw["methods"]["fault:slow"]["sleep_s"] = 0.3
    grid.write_text(yaml.safe_dump(raw))
    store, rng = tmp_path / "records", random.Random(20261123)
    cmd = [sys.executable, "-m", "suite.cli", "run", str(grid), "--out", str(tmp_path / "out")]
    finished: dict[str, tuple[int, str]] = {}
    for trial in range(10):
        _kill_at_a_random_point(cmd, tmp_path, store, rng, trial, fault_site)
        for key, (mtime, text) in finished.items():  # earlier results untouched
            path = store / f"{key}.json"
            assert path.stat().st_mtime_ns == mtime and path.read_text() == text, trial
        for path in store.glob("[!.]*.json"):  # every visible record is complete and ok
            assert json.loads(path.read_text())["status"] == "ok"
            finished.setdefault(path.stem, (path.stat().st_mtime_ns, path.read_text()))
    final = subprocess.run(cmd, cwd=tmp_path, env=_env(fault_site), capture_output=True,
                           text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    recs = _records(store)
    assert len(recs) == 10 and {r["status"] for r in recs.values()} == {"ok"}
    for key, (mtime, _) in finished.items():
        assert (store / f"{key}.json").stat().st_mtime_ns == mtime
    done = _completions(store)  # a kill between a record's rename and its journal line can
    assert len(done) == len(set(done)) and set(done) <= set(recs)  # drop a line, never add one
    assert len(done) >= len(recs) - 2  # no cell ran twice to completion
    assert not list(store.glob(".tmp-*")) and not list((store / ".claims").glob("*.claim"))
    assert not list((store / ".claims").glob(".tmp-*"))
    scratch = Path(tempfile.gettempdir()).glob(f"qbench-cell-{SAFE_HOST}-*")
    assert not [p for p in scratch if not _alive(int(p.name.split("-")[3]))]  # killed cells'
    events = read_journal(store)
    started = sum(e["event"] == "start" for e in events)
    assert started > len(recs)  # the kills did land mid-cell (attempts that never ended)
    print(f"fault injection: 10 kills, {len(finished)} cells finished before the last kill, "
          f"{started - len(recs)} attempts killed mid-cell, final run ran {10 - len(finished)}")


# --------------------------------------------------------------------------- executors agree

def _stable(obj: object) -> object:
    """A record without its timing and host fields (any key ending in ``_s`` is a duration)."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items()
                if k not in VOLATILE and not k.endswith("_s")}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def test_local_warm_fresh_submitit_and_ray_give_identical_records(tiny_llama, tmp_path: Path
                                                                  ) -> None:
    stores = {}
    for name, sets in (("local", ["--set", "run.slots=2"]),
                       ("fresh", ["--set", "run.worker=fresh"]),
                       ("slurm", ["--set", "run.executor=slurm",
                                  "--set", "run.slurm={cluster: local, cpus_per_task: 1}"]),
                       ("ray", ["--set", "run.executor=ray"])):
        tmp = tmp_path / name
        tmp.mkdir()
        grid = _grid(tmp, tiny_llama, ["fp", "rtn", "gptq"])
        proc = _qbench(["run", str(grid), *sets], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stores[name] = _records(tmp / "records")
    local = stores["local"]
    assert len(local) == 3 and {r["status"] for r in local.values()} == {"ok"}
    for name, other in stores.items():
        assert sorted(other) == sorted(local)
        for key in local:
            assert _stable(other[key]) == _stable(local[key]), name
            assert other[key]["worker"]["executor"] == name.replace("fresh", "local")
            assert other[key]["determinism"] == {"mode": "strict", "device": "cpu",
                                                 "threads": 1}


# --------------------------------------------------------------------------- run-section input

@pytest.mark.parametrize(("run", "message"), [
    ({"executor": "k8s"}, "run.executor: got 'k8s'; accepted: local, slurm, ray"),
    ({"slots": 0}, "run.slots: got 0; accepted: a positive integer or null"),
    ({"retries": -1}, "run.retries: got -1; accepted: an integer >= 0"),
    ({"retry_on": ["segfault"]}, "run.retry_on: got 'segfault'; accepted: crashed, oom"),
    ({"exclusive": "yes"}, "run.exclusive: got 'yes'; accepted: true, false"),
    ({"worker": "hot"}, "run.worker: got 'hot'; accepted: warm, fresh"),
    ({"slurm": {"partition": "gpu", "qos": "high"}}, "run.slurm.qos: unknown key"),
    ({"slurm": {"cluster": "pbs"}}, "run.slurm.cluster: got 'pbs'; accepted: slurm, local"),
    ({"ray": {"num_gpus": -1}}, "run.ray.num_gpus: got -1; accepted: a number >= 0"),
    ({"ray": 4}, "run.ray: expected a mapping"),
])
def test_bad_run_section_is_one_line_and_writes_nothing(tmp_path: Path, capsys, run: dict,
                                                        message: str) -> None:
    from suite.cli import main

    grid = _grid(tmp_path, tmp_path / "no-model", ["fp"], **run)
    assert main(["run", str(grid), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qbench: error: ") and message in err
    assert not (tmp_path / "records").exists() and not (tmp_path / "out").exists()
