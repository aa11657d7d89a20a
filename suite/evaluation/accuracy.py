"""Zero/few-shot multiple-choice accuracy through lm-eval's own evaluator.

The quantized model is evaluated in memory: it is wrapped in lm-eval's ``HFLM`` (no save and
reload round trip, so the weights lm-eval scores are exactly the ones the honesty check saw) and
run through ``lm_eval.simple_evaluate`` on one task. Each task yields two metric rows, ``acc``
(argmax of the summed choice log-likelihood) and ``acc_norm`` (the same divided by the choice's
length in characters), each with lm-eval's standard error, a 95% normal interval and the
per-example 0/1 outcomes (for paired comparisons between methods on the same examples).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib import metadata
from typing import Any

from torch import nn

from suite.errors import DataError
from suite.evaluation import tasks

ACC_VERSION = 1
METRICS = ("acc", "acc_norm")
BATCH_SIZE = 32  # fixed: batching changes padding, hence float rounding, hence rare ties


def lm_eval_version() -> str:
    """The installed lm-eval release (part of every accuracy protocol id)."""
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "missing"


def _task_manager(config: str | dict[str, Any]):  # noqa: ANN202 - lm_eval TaskManager | None
    from lm_eval.tasks import TaskManager

    # A registered name needs lm-eval's index; a converted BIG-bench config does not.
    return TaskManager() if isinstance(config, str) else None


def run_task(
    model: nn.Module,
    tokenizer: Any,
    spec: dict[str, Any],
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one multiple-choice task; return lm-eval's task results and per-sample outcomes."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    config = tasks.task_config(spec["task"])
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE, device=device)
    if progress is not None:
        progress(f"lm-eval {spec['task']} ({spec['limit'] or 'all'} examples)")
    try:
        out = simple_evaluate(
            model=lm, tasks=[config], num_fewshot=spec["shots"] or None, limit=spec["limit"],
            log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, task_manager=_task_manager(config),
        )
    except (ConnectionError, OSError, ValueError) as e:
        raise DataError(f"lm-eval task {spec['task']!r}: {str(e).splitlines()[0][:200]}") from e
    (name,) = out["results"].keys()
    return {"results": out["results"][name], "samples": out["samples"][name]}


def metric_rows(out: dict[str, Any], pids: dict[str, str], eval_s: float) -> list[dict[str, Any]]:
    """One row per metric (``pids``: metric -> protocol id) from ``run_task``'s output."""
    samples = sorted(out["samples"], key=lambda s: s["doc_id"])
    rows = []
    for metric, pid in pids.items():
        value = float(out["results"][f"{metric},none"])
        se = float(out["results"].get(f"{metric}_stderr,none", math.nan))
        outcomes = "".join(str(int(s[metric])) for s in samples)
        rows.append({"protocol": pid, "metric": metric, "unit": "accuracy",
                     "higher_is_better": True, "value": value, "se": se,
                     "lo95": value - 1.96 * se, "hi95": value + 1.96 * se,
                     "n_examples": len(samples), "outcomes": outcomes, "eval_time_s": eval_s})
    return rows


def check_examples(out: dict[str, Any], expected: int | None) -> None:
    """Fail loudly if lm-eval scored a different number of examples than the protocol names."""
    n = len(out["samples"])
    if expected is not None and n != expected:
        raise DataError(f"lm-eval scored {n} examples; the protocol asks for {expected}")
