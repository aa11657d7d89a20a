"""Multiple-choice task sources for lm-eval: BIG-bench offline, lm-eval's own tasks on the hub.

Task ids:

- ``bigbench:<task>[/<subtask>]``: a BIG-bench JSON task read from the ``bigbench`` 1.0.0 sdist
  on PyPI (never installed). It is converted once into a JSON-lines file plus a real lm-eval
  task YAML (``dataset_path: json``) in the cache, so the same task can be run by hand with
  ``lm_eval --include_path <cache>/tasks/bigbench-1.0.0``.
- ``lm-eval:<task>``: any task lm-eval registers (``piqa``, ``arc_easy``, ``hellaswag``, ...):
  the paper-scale path, which needs the hub or a local datasets cache.

The conversion follows BIG-bench's own zero-shot formatting (``bigbench/api/json_task.py``,
``default_format_fn``): ``task_prefix + input_prefix + input [+ choice_prefix + choices] +
output_prefix`` with the task's prefixes or BIG-bench's defaults (``"\\nQ: "``, ``"\\nA: "``,
``"\\n  choice: "``), the appended choices permuted by ``RandomState(42)`` over the sorted
choices, and every choice scored as a continuation of that prompt (``target_delimiter: ""``).
Gold = every choice holding the maximum target score. Examples are stored in a fixed shuffled
order (``random.Random(1234)``) so that a protocol's first ``n`` examples are a uniform sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from suite import assets
from suite.errors import ConfigError, DataError

CONVERT_VERSION = 1
SHUFFLE_SEED = 1234
BB_DEFAULTS = {"example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
               "choice_prefix": "\n  choice: "}
PREFIXES = ("bigbench:", "lm-eval:")


def check_task(task_id: Any, where: str) -> None:
    """Reject a malformed task id with a one-line error naming ``where``."""
    ok = isinstance(task_id, str) and any(
        task_id.startswith(p) and len(task_id) > len(p) for p in PREFIXES)
    if not ok or any(c in task_id for c in " \n\\"):
        raise ConfigError(f"{where}: got {task_id!r}; accepted: 'bigbench:<task>[/<subtask>]' "
                          f"(offline, e.g. bigbench:social_iqa) or 'lm-eval:<task>' (hub)")


def _task_dir() -> Path:
    return assets.cache_dir() / "tasks" / f"bigbench-{assets.BIGBENCH_SDIST.version}"


def _stem(name: str) -> str:
    return name.replace("/", "__")


def format_examples(task: dict[str, Any]) -> list[dict[str, Any]]:
    """A BIG-bench JSON task -> ``{idx, text, choices, gold}`` rows of its MC examples."""
    p = {k: task.get(k, v) for k, v in BB_DEFAULTS.items()}
    append = task.get("append_choices_to_input", True)
    prefix = str(task.get("task_prefix", ""))
    rows = []
    for idx, ex in enumerate(task.get("examples", [])):
        scores = ex.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        body = ex["input"]
        if append:  # BIG-bench: RandomState(42) per example over the sorted choices
            permuted = np.random.RandomState(seed=42).permutation(sorted(choices))
            body = body + p["choice_prefix"] + p["choice_prefix"].join(permuted)
        best = max(scores.values())
        rows.append({"idx": idx,
                     "text": prefix + p["example_input_prefix"] + body
                     + p["example_output_prefix"],
                     "choices": choices,
                     "gold": [i for i, c in enumerate(choices) if scores[c] == best]})
    return rows


def _task_yaml(name: str, jsonl: Path) -> dict[str, Any]:
    """A plain lm-eval task config reading ``jsonl`` (what the written YAML file holds)."""
    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True}
               for m in ("acc", "acc_norm")]
    return {
        "task": "qbench_bigbench_" + _stem(name),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "text",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",
        "metric_list": metrics,
        "metadata": {"version": CONVERT_VERSION,
                     "source": f"bigbench=={assets.BIGBENCH_SDIST.version} sdist, task {name}"},
    }


def convert_bigbench(names: list[str], sdist: Path | None = None) -> None:
    """Convert the named BIG-bench tasks (one pass over the sdist) into JSON lines + YAML.

    Raises:
        DataError: a task is not in the sdist or has no multiple-choice examples.
    """
    sdist = sdist or assets.fetch_sdist(assets.BIGBENCH_SDIST)
    wanted = {f"/benchmark_tasks/{n}/task.json": n for n in names}
    found: dict[str, dict[str, Any]] = {}
    with tarfile.open(sdist, "r:gz") as tf:
        for member in tf:
            hit = next((n for suffix, n in wanted.items() if member.name.endswith(suffix)), None)
            if hit is not None:
                found[hit] = json.load(tf.extractfile(member))
    for name in names:
        if name not in found:
            raise DataError(f"bigbench:{name}: no such task in bigbench=="
                            f"{assets.BIGBENCH_SDIST.version}")
        _write_task(name, format_examples(found[name]))


def _write_task(name: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        raise DataError(f"bigbench:{name}: the task has no multiple-choice examples")
    random.Random(SHUFFLE_SEED).shuffle(rows)
    out = _task_dir()
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{_stem(name)}.jsonl"
    tmp = jsonl.with_name(f".{jsonl.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, jsonl)
    ytmp = out / f".{_stem(name)}.{os.getpid()}.yaml.tmp"
    ytmp.write_text(yaml.safe_dump(_task_yaml(name, jsonl), sort_keys=False))
    os.replace(ytmp, out / f"{_stem(name)}.yaml")


def bigbench_files(name: str) -> tuple[Path, Path]:
    """(jsonl, yaml) of a converted BIG-bench task, converting it on first use."""
    jsonl, yml = _task_dir() / f"{_stem(name)}.jsonl", _task_dir() / f"{_stem(name)}.yaml"
    if not (jsonl.exists() and yml.exists()):
        convert_bigbench([name])
    return jsonl, yml


def task_config(task_id: str) -> str | dict[str, Any]:
    """What lm-eval's evaluator takes: a registered task name, or the converted task's config."""
    kind, name = task_id.split(":", 1)
    if kind == "lm-eval":
        return name
    _, yml = bigbench_files(name)
    return yaml.safe_load(yml.read_text())


def task_fingerprint(task_id: str) -> dict[str, Any]:
    """Identity of the examples a task id evaluates on (enters the run key)."""
    kind, name = task_id.split(":", 1)
    if kind == "lm-eval":  # the hub dataset revision is pinned by lm-eval's version
        return {"task": task_id, "source": "lm-eval registry"}
    jsonl, _ = bigbench_files(name)
    raw = jsonl.read_bytes()
    return {"task": task_id, "n_examples": raw.count(b"\n"),
            "sha256": hashlib.sha256(raw).hexdigest()[:16], "convert_version": CONVERT_VERSION}
