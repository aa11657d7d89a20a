"""Run one cell (in its own subprocess): context -> load -> quantize -> check -> evaluate -> record.

Invoked as ``python -m suite.runner PAYLOAD.json``; the payload comes from ``suite.prepare``.
Each stage is a small function; whatever happens, exactly one record is written atomically.
The runner knows no method internals: it instantiates the chain from the registry by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from suite import data, env, honesty, models, qstate_cache
from suite.claims import journal
from suite.config import TaskSpec, metric_of
from suite.errors import NumericalFailure
from suite.evaluation import accuracy, perplexity
from suite.interface import MethodData, QuantResult, RunContext, Seeds, method_class
from suite.primitives import WeightFormat
from suite.qat_train import TrainingDiverged
from suite.records import SAFE_HOST, Store, base_record, now


def make_context(payload: dict[str, Any], adapter: models.ModelAdapter,
                 stage_file: Path | None, scratch: Path | None = None) -> RunContext:
    """Seeds, threads, determinism and the progress channel of one cell."""
    run = payload["run"]
    seeds = Seeds.derive(payload["key_payload"]["cell"]["seed"])
    threads = run.get("threads") or payload.get("worker", {}).get("threads")
    if threads:  # the grid's, else the executor's share of the cores
        torch.set_num_threads(threads)
    device = run["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    strict = run["determinism"] == "strict"
    torch.backends.cuda.matmul.allow_tf32 = not strict
    torch.backends.cudnn.allow_tf32 = not strict
    torch.backends.cudnn.benchmark = not strict
    if strict and device != "cpu":  # bit-reproducible GPU kernels where torch has them
        # (CPU kernels are deterministic for a fixed thread count already, and on CPU the
        # switch only cost ~4 s per cell: it imports torch's compiler stack)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seeds.init)

    def progress(stage: str) -> None:
        if stage_file is not None:
            stage_file.write_text(stage)

    return RunContext(torch.device(device), seeds, adapter, run["determinism"],
                      scratch_dir=scratch, progress=progress)


def quantize_chain(model: torch.nn.Module, payload: dict[str, Any], ctx: RunContext,
                   data: MethodData) -> QuantResult:
    """Apply each method of the chain in order; later methods' layer states win.

    A later method starts from the ORIGINAL weights with the earlier methods' layer states as
    ``init_qstate`` ("pre-calibration, then calibration": the data-driven method refines the
    earlier grid and outlier choices on the weights it must approximate). Starting it from
    the earlier method's dequantized weights instead would hand it weights that already lie on
    its grid, and a rounding method such as GPTQ would then reproduce them unchanged.
    """
    cell = payload["key_payload"]["cell"]
    fmt = WeightFormat(**cell["format"]) if cell["format"] else None
    merged = QuantResult(model, {}, {}, {})
    original = _target_weights(model, ctx) if len(cell["chain"]) > 1 else {}
    for name in cell["chain"]:
        cls = method_class(name)
        method = cls(cls.Config(**cell["method_params"].get(name, {})), fmt)
        ctx.progress(f"quantizing ({name})")
        init = dict(merged.qstate) if merged.qstate else None
        if init:
            _restore_weights(merged.model, ctx, original)
        res = method.quantize(merged.model, dataclasses.replace(data, init_qstate=init), ctx)
        merged.model = res.model
        merged.abits = res.abits if res.abits is not None else merged.abits
        merged.qstate.update(res.qstate)
        merged.fp_layers = {k: v for k, v in {**merged.fp_layers, **res.fp_layers}.items()
                            if k not in merged.qstate or k in res.fp_layers}
        merged.stats[name] = res.stats
    return merged


def _target_weights(model: torch.nn.Module, ctx: RunContext) -> dict[str, torch.Tensor]:
    """A CPU copy of every target layer's weight (a chain restores them between methods)."""
    return {n: m.weight.detach().to("cpu", copy=True)
            for n, m in ctx.adapter.target_layers(model).items()}


@torch.no_grad()
def _restore_weights(model: torch.nn.Module, ctx: RunContext,
                     weights: dict[str, torch.Tensor]) -> None:
    for n, m in ctx.adapter.target_layers(model).items():
        m.weight.copy_(weights[n])


def evaluate(model: torch.nn.Module, payload: dict[str, Any], ctx: RunContext
             ) -> list[dict[str, Any]]:
    """Every protocol of the cell, as metric rows (an accuracy task covers two protocols)."""
    rows: list[dict[str, Any]] = []
    for pid, spec in payload["key_payload"]["cell"]["protocols"].items():
        if spec["type"] != "acc":
            rows.append(_evaluate_ppl(model, payload, pid, spec, ctx))
        elif metric_of(pid) == accuracy.METRICS[0]:  # one lm-eval run yields every metric
            pids = dict(zip(accuracy.METRICS, TaskSpec(**spec).protocol_ids, strict=True))
            rows += _evaluate_task(model, payload, spec, pids, ctx)
    return rows


def _source(payload: dict[str, Any]) -> models.ModelSource:
    """The cell's model source as the parent resolved it (no re-resolution in the child)."""
    src = payload["model"]
    return models.ModelSource(src["id"], src["location"], src["revision"],
                              payload["key_payload"]["model_fingerprint"], None, "")


def _evaluate_ppl(model: torch.nn.Module, payload: dict[str, Any], pid: str,
                  spec: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    ids = data.token_stream(spec["corpus"], None, payload["tokenizer_key"])
    windows = data.eval_windows(ids, spec["seqlen"], spec["windows"])

    def prog(done: int, total: int) -> None:
        ctx.progress(f"evaluating {pid} {done}/{total} windows")

    t0 = time.perf_counter()
    bos = payload["key_payload"]["data"].get("bos_per_window")
    res = perplexity.summarize(perplexity.window_nlls(model, windows, progress=prog, bos_id=bos))
    return {"protocol": pid, "metric": "ppl", "unit": "ppl", "higher_is_better": False,
            "eval_time_s": time.perf_counter() - t0, **res}


def _evaluate_task(model: torch.nn.Module, payload: dict[str, Any], spec: dict[str, Any],
                   pids: dict[str, str], ctx: RunContext) -> list[dict[str, Any]]:
    tokenizer = models.load_tokenizer(_source(payload))
    t0 = time.perf_counter()
    out = accuracy.run_task(model, tokenizer, spec, ctx.seeds.eval, ctx.progress)
    accuracy.check_examples(out, spec["limit"])
    return accuracy.metric_rows(out, pids, time.perf_counter() - t0)


def _calib(payload: dict[str, Any]) -> torch.Tensor | None:
    spec = payload["key_payload"]["cell"]["calib"]
    if spec is None:
        return None
    ids = data.token_stream(spec["corpus"], None, payload["tokenizer_key"])
    seeds = Seeds.derive(payload["key_payload"]["cell"]["seed"])
    windows = data.calibration_windows(ids, spec["windows"], spec["seqlen"], seeds.calib)
    expect = payload["key_payload"]["data"]["calib"]["windows_fp"]
    if data.fingerprint_tokens(windows) != expect:
        raise RuntimeError("calibration windows differ from the ones fingerprinted in the key")
    return data.with_bos(windows, payload["key_payload"]["data"].get("bos_per_window"))


# a cell's scratch directory (in the system temp dir) names its host and pid, so a later run can
# delete the one a killed cell left behind (``suite.claims.sweep_temp_files``)
SCRATCH_PREFIX = f"qbench-cell-{SAFE_HOST}-"


def failure_status(e: BaseException) -> str:
    """The record status of a cell that raised ``e`` (see ``suite.records.STATUSES``)."""
    if isinstance(e, TrainingDiverged):  # a QAT run whose loss or weights went NaN/inf
        return "diverged"
    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return "oom"
    if isinstance(e, NumericalFailure | torch.linalg.LinAlgError):
        return "numerical"
    return "failed"


def run_cell(payload: dict[str, Any], stage_file: Path | None = None) -> dict[str, Any]:
    """Execute one cell and return its record (never raises for a method's failure)."""
    t_start = time.perf_counter()
    env.git_state()  # the commit of the code this cell runs, taken before it runs
    record = base_record(payload)
    try:
        with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
            _run_stages(payload, record, stage_file, Path(scratch))
    except Exception as e:  # noqa: BLE001 - a failure is a record, not a crash
        record["status"] = failure_status(e)
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()[-4000:]
    record["cost"]["wall_s"] = time.perf_counter() - t_start
    record["cost"]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["finished_at"] = now()
    return record


class _LMCell:
    """A language-model cell: transformers model, token calibration, ppl / lm-eval tasks."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self.model = models.load_model(_source(payload), "cpu")
        self.adapter: Any = models.adapter_for(self.model.config.model_type)

    def method_data(self, ctx: RunContext) -> MethodData:
        return MethodData(calib=_calib(self.payload))

    def evaluate(self, model: torch.nn.Module, ctx: RunContext) -> list[dict[str, Any]]:
        return evaluate(model, self.payload, ctx)


class _VisionCell:
    """A vision cell: the grid's FP checkpoint, calibration images or the QAT budget, top-1."""

    def __init__(self, payload: dict[str, Any]) -> None:
        from suite.vision import runtime

        self.payload, self.runtime = payload, runtime
        self.model, self.adapter, self.data = runtime.load(payload["model"])

    def method_data(self, ctx: RunContext) -> MethodData:
        vision = self.payload["key_payload"]["cell"]["vision"]
        calib = None
        if "calib_images" in vision:
            calib = self.runtime.calib_images(self.data, vision["calib_images"], ctx.seeds.calib)
        budget = self.runtime.QATBudget(**vision["train"]) if "train" in vision else None
        return MethodData(calib=calib, train_data=self.data, train_budget=budget)

    def evaluate(self, model: torch.nn.Module, ctx: RunContext) -> list[dict[str, Any]]:
        ctx.progress("evaluating top-1")
        return [self.runtime.evaluate(model, self.data, pid)
                for pid in self.payload["key_payload"]["cell"]["protocols"]]


def _run_stages(payload: dict[str, Any], record: dict[str, Any], stage_file: Path | None,
                scratch: Path) -> None:
    t0 = time.perf_counter()
    vision = payload["model"].get("domain") == "vision"
    cell = _VisionCell(payload) if vision else _LMCell(payload)
    adapter = cell.adapter
    ctx = make_context(payload, adapter, stage_file, scratch)
    model = cell.model.to(ctx.device)
    record["env"] = env.capture(str(ctx.device))
    record["determinism"] = {"mode": ctx.determinism, "device": str(ctx.device),
                             "threads": torch.get_num_threads()}
    record["cost"]["load_s"] = time.perf_counter() - t0
    record["fp_modules"] = list(adapter.fp_modules)
    targets = adapter.target_layers(model)
    before = honesty.weight_fingerprints(targets)
    keep = payload["run"].get("keep_qstate") and not vision
    fp_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if keep else None
    t0 = time.perf_counter()
    result = quantize_chain(model, payload, ctx, cell.method_data(ctx))
    record["cost"]["quant_s"] = time.perf_counter() - t0
    record["stats"] = result.stats
    record["abits"] = result.abits
    fmt = payload["key_payload"]["cell"]["format"]
    check = honesty.check(result, adapter.target_layers(result.model),
                          WeightFormat(**fmt) if fmt else None, before)
    record["honesty"] = check
    record["effective_bits"] = check["effective_bits"]
    if check["quantized_layers_unchanged"] and check["quantized_layers_unchanged"] == check[
            "n_quantized"]:
        record["notes"].append("no-quantized-weight-changed")
    if not check["passed"]:
        record["status"] = "invalid"
        record["error"] = "honesty check failed: " + "; ".join(check["problems"][:3])
        return
    ctx.progress("evaluating")
    record["metrics"] = cell.evaluate(result.model, ctx)
    bad = any(not math.isfinite(m["value"]) for m in record["metrics"])
    record["status"] = "diverged" if bad else "ok"
    if fp_state is not None and result.qstate and record["status"] == "ok":
        qstate_cache.save(qstate_cache.path_for(record["run_key"]), result.model,
                          dict(result.qstate), fp_state, "run")


def die_with_parent(parent: int | None) -> None:
    """Linux: get SIGTERM when the process that started this one dies, so killing ``qbench
    run`` does not leave an orphan cell computing (and competing for the cores of) a result
    nobody collects. Records are written atomically, so nothing half-written remains."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the cell subprocess: ``python -m suite.runner PAYLOAD.json [STAGEFILE]``."""
    if argv is None:
        parent = os.environ.get("QBENCH_PARENT_PID")
        die_with_parent(int(parent) if parent else None)
    args = sys.argv[1:] if argv is None else argv
    payload = json.loads(Path(args[0]).read_text())
    stage_file = Path(args[1]) if len(args) > 1 else None
    record = run_cell(payload, stage_file)
    store = Store(payload["run"]["store"])
    store.put(record)
    journal(store.root, {"event": "record", "key": record["run_key"], "status": record["status"],
                         "attempt_id": record["worker"].get("attempt_id")})
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
