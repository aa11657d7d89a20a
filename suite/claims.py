"""Claims: which worker is running which cell, so runners sharing one store never run a cell
twice to completion, and a crash never blocks a cell for good.

A claim is ``<store>/.claims/<run_key>.claim`` (JSON: host, pid, token, time). Acquiring it,
breaking a stale one and releasing it all happen under one store-wide ``flock`` held for
microseconds, so two runners cannot both win a cell. While a cell runs, its worker touches the
claim every ``heartbeat_s``. A claim is stale when its owner is on this host and its pid is
gone (a SIGKILLed runner: recovered at once), or when its heartbeat is older than ``stale_s``
(a worker on another node that died: recovered after the timeout). ``flock`` over NFS/Lustre
may be node-local; there the heartbeat rule still holds and the remaining window is one
file rename.

The journal ``<store>/.journal.jsonl`` gets one line per attempt start and end (run key,
status, host, pid, executor): the audit trail of who ran what, appended with O_APPEND.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from suite.records import HOST, SAFE_HOST, write_json_atomic


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Claims:
    """The claims directory of one store."""

    def __init__(self, store_root: Path, stale_s: float = 300.0) -> None:
        self.dir = Path(store_root) / ".claims"
        self.stale_s = stale_s
        self.token = uuid.uuid4().hex  # this process's identity on its claims

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.claim"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def owner(self, key: str) -> dict[str, Any] | None:
        """The claim on ``key`` (None when unclaimed or unreadable)."""
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_stale(self, key: str) -> bool:
        """Whether the claim on ``key`` belongs to a dead worker."""
        path, claim = self._path(key), self.owner(key)
        if claim is None:
            return path.exists()  # unreadable: a kill mid-write (written atomically, so rare)
        if claim.get("host") == HOST and not _alive(int(claim.get("pid", -1))):
            return True
        try:
            return time.time() - path.stat().st_mtime > self.stale_s
        except FileNotFoundError:
            return False

    def acquire(self, key: str) -> bool:
        """Claim ``key`` for this process; False when a live worker holds it."""
        with self._locked():
            path = self._path(key)
            if path.exists() and not self.is_stale(key):
                return False
            write_json_atomic(path, {"host": HOST, "pid": os.getpid(), "token": self.token,
                                     "since": time.time()})
            return True

    def release(self, key: str) -> None:
        """Drop this process's claim on ``key`` (someone else's claim is left alone)."""
        with self._locked():
            claim = self.owner(key)
            if claim is not None and claim.get("token") == self.token:
                self._path(key).unlink(missing_ok=True)

    def heartbeat(self, key: str) -> None:
        """Mark this process's claim on ``key`` as alive."""
        claim = self.owner(key)
        if claim is not None and claim.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self._path(key))

    def sweep(self) -> int:
        """Remove every stale claim (a killed runner's); returns how many."""
        n = 0
        with self._locked():
            for path in self.dir.glob("*.claim"):
                if self.is_stale(path.stem):
                    path.unlink(missing_ok=True)
                    n += 1
        return n

    def held(self) -> list[str]:
        """Run keys with a live claim (cells running somewhere right now)."""
        if not self.dir.exists():
            return []
        return [p.stem for p in self.dir.glob("*.claim") if not self.is_stale(p.stem)]


class Heartbeat:
    """A daemon thread touching the claims of the cells this process is running."""

    def __init__(self, claims: Claims, every_s: float = 30.0) -> None:
        self.claims, self.every_s = claims, every_s
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True, name="qbench-heartbeat").start()

    def add(self, key: str) -> None:
        """Start beating for ``key``."""
        with self._lock:
            self._keys.add(key)

    def discard(self, key: str) -> None:
        """Stop beating for ``key``."""
        with self._lock:
            self._keys.discard(key)

    def stop(self) -> None:
        """End the thread."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                keys = list(self._keys)
            for key in keys:
                self.claims.heartbeat(key)


def journal(store_root: Path, event: dict[str, Any]) -> None:
    """Append one event line to the store's journal (atomic for lines under PIPE_BUF)."""
    line = json.dumps({"t": round(time.time(), 3), "host": HOST, "pid": os.getpid(), **event},
                      sort_keys=True) + "\n"
    Path(store_root).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(store_root) / ".journal.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_journal(store_root: Path) -> list[dict[str, Any]]:
    """Every event of the store's journal, oldest first (a torn last line is skipped)."""
    path = Path(store_root) / ".journal.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def sweep_temp_files(store_root: Path, min_age_s: float = 60.0) -> int:
    """Delete temp files a killed writer left behind in the store (``.tmp-*``: a record write
    that never reached its rename, or a claim write). The writer's host and pid are in the name
    (``.tmp-<host>-<pid>-*``): on this host a temp file is an orphan once its pid is gone; one
    from another host once it is older than ``min_age_s``."""
    root, n = Path(store_root), 0
    for path in [*root.glob(".tmp-*"), *(root / ".claims").glob(".tmp-*")]:
        if _temp_is_orphan(path, min_age_s):
            path.unlink(missing_ok=True)
            n += 1
    return n + _sweep_scratch()


def _sweep_scratch() -> int:
    """Delete the scratch directories of this host's cells whose process is gone (a killed
    cell cannot run its own clean-up): ``<tmp>/qbench-cell-<host>-<pid>-*``."""
    prefix = f"qbench-cell-{SAFE_HOST}-"
    n = 0
    for path in Path(tempfile.gettempdir()).glob(prefix + "*"):
        pid = path.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            n += 1
    return n


def _temp_is_orphan(path: Path, min_age_s: float) -> bool:
    parts = path.name.split("-")  # .tmp-<host>-<pid>-<random>.json
    if len(parts) >= 4 and parts[1] == SAFE_HOST and parts[2].isdigit():
        return not _alive(int(parts[2]))
    try:
        return time.time() - path.stat().st_mtime > min_age_s
    except FileNotFoundError:
        return False
