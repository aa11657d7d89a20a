"""Records: one JSON file per cell, keyed by a content hash of everything that fixes its result.

A record is written atomically (temp file + rename) so a crash or kill never leaves a
half-written file; ``ok`` records are skipped on re-run, anything else is retried.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SUITE_VERSION = "0.1.0"
STATUSES = ("ok", "failed", "invalid", "diverged", "timeout")


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True, allow_nan=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
