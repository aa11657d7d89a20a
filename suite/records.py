"""Records: one JSON file per cell, keyed by a content hash of everything that fixes its result.

A record is written atomically (temp file + rename) so a crash or kill never leaves a
half-written file. A record is a finished result, failures included: re-runs skip it
(``qbench run --retry-failed`` re-runs the failed ones; an ok record is never re-run).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SUITE_VERSION = "0.1.0"
# ok; failed (an exception in a method or the suite); invalid (the honesty check failed);
# diverged (NaN/inf loss or metric); numerical (a linear-algebra failure, e.g. a Hessian that is
# not positive definite); oom (out of memory); timeout (past run.timeout_s); crashed (the worker
# died without writing a record: a signal, a segfault, the kernel's OOM killer)
STATUSES = ("ok", "failed", "invalid", "diverged", "numerical", "oom", "timeout", "crashed")
HOST = socket.gethostname()
SAFE_HOST = HOST.replace("-", "_").replace(".", "_")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_key(key_payload: dict[str, Any]) -> str:
    """Content hash of a cell's canonical config, input fingerprints and code versions."""
    payload = {"schema": SCHEMA_VERSION, "suite": SUITE_VERSION, **key_payload}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:20]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temp file in the same directory and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's host and pid in the name let a later run delete what a kill left behind
    prefix = f".tmp-{SAFE_HOST}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True, allow_nan=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def base_record(payload: dict[str, Any]) -> dict[str, Any]:
    """The record of a cell before it ran: identity, inputs, status ``failed`` until set."""
    kp = payload["key_payload"]
    return {
        "schema_version": SCHEMA_VERSION,
        "run_key": run_key(kp),
        "status": "failed",
        "grid": payload["grid"],
        "cell": kp["cell"],
        "inputs": {"model_fingerprint": kp["model_fingerprint"], "data": kp["data"]},
        "model": payload["model"],
        "notes": list(payload["notes"]),
        "metrics": [],
        "honesty": None,
        "effective_bits": None,
        "abits": None,
        "fp_modules": [],
        "cost": {},
        "stats": {},
        "env": {},
        "error": None,
        "worker": payload.get("worker", {}),
        "started_at": now(),
    }


class Store:
    """A directory of records, ``<root>/<run_key>.json``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """Where the record of ``key`` lives."""
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, or None (also for an unreadable file)."""
        try:
            return json.loads(self.path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_done(self, key: str) -> bool:
        """Whether ``key`` has an ok record (then the cell is skipped)."""
        rec = self.get(key)
        return rec is not None and rec.get("status") == "ok"

    def put(self, record: dict[str, Any]) -> Path:
        """Write ``record`` atomically under its run key."""
        if record.get("status") not in STATUSES:
            raise ValueError(f"record status must be one of {STATUSES}")
        path = self.path(record["run_key"])
        write_json_atomic(path, record)
        return path

    def all(self) -> list[dict[str, Any]]:
        """Every readable record in the store (a ``.tmp-*`` file a kill left behind is not one)."""
        out = []
        for p in sorted(self.root.glob("[!.]*.json")):
            rec = self.get(p.stem)
            if rec is not None:
                out.append(rec)
        return out


def unreadable_records(root: str | Path) -> list[tuple[Path, str]]:
    """Record files of the store at ``root`` that are not complete records, with the reason.
    Records are written by atomic rename, so a truncated or hand-edited one is damage from
    outside: it is reported, never silently treated as a pending cell and overwritten. Names
    starting with ``.`` (temp files, ``.logs``, ``.claims``, the journal) are not records."""
    bad = []
    for path in sorted(Path(root).glob("[!.]*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            bad.append((path, f"not readable JSON ({type(e).__name__}: {e})"))
            continue
        missing = [k for k in ("run_key", "status", "cell") if not isinstance(rec, dict)
                   or k not in rec]
        if missing:
            bad.append((path, f"not a record (missing {', '.join(missing)})"))
        elif rec["run_key"] != path.stem:
            bad.append((path, f"not a valid record (its run_key {rec['run_key']!r} is not its "
                              "file name)"))
        elif rec["status"] not in STATUSES:
            bad.append((path, f"not a valid record (status {rec['status']!r}; accepted: "
                              f"{', '.join(STATUSES)})"))
    return bad
