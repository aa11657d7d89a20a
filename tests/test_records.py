"""The record store: atomic writes, skip-on-rerun status, interrupted writes are invisible."""

from __future__ import annotations

import json

import pytest

from suite.records import Store


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
