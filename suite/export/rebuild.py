"""Re-create a published cell's quantized model for export.

A record holds metrics, statistics and checks, never weights: a 4-bit SmolLM2 is ~70 MB per
cell, and the published store holds about a hundred cells. So ``qbench export`` re-runs the
cell deterministically from the grid that published it (the cell's run key names everything
its result depends on) and proves the re-run is the published model before writing it:

1. **locate**: the record of a run key (or a unique prefix of one) in the stores; a failed
   record, an unknown or ambiguous key is a one-line error;
2. **re-run**: the grid named in the record is prepared from ``configs/*.yaml`` (without its
   accuracy tasks) until the cell with the record's quantization identity appears (its run key
   minus the evaluation protocols: the same method versions and settings, format, seed, model
   and calibration windows), and the method chain runs in this process with the record's thread
   count;
3. **check**: the honesty check of the runner, then the cell's perplexity protocols are
   evaluated and compared with the record: ``identical`` or ``within-float`` (the verify
   tolerance, ``suite.verify.FLOAT_TOL``) passes, anything else refuses the export (the file
   would not be the published model). Accuracy tasks are not re-run (minutes each; the
   perplexity windows already pin every weight).

The re-run's state is cached (``$QBENCH_CACHE/qstate/<run key>.pt``: the layer states and the
float tensors the method changed besides them, e.g. decoupleQ's trained norms;
``suite.qstate_cache``), so exporting the same cell in a second format takes seconds. A grid
run with ``run.keep_qstate: true`` leaves the same file behind for each cell it runs, so a cell
that costs half an hour (decoupleQ) is exported without a re-run: the check in step 3 still
runs. ``how`` says which happened: ``re-ran the cell``, ``cached re-run`` or ``kept by the
run``.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from suite import honesty, qstate_cache
from suite.env import cpu_capability, cpu_name, cpu_type
from suite.errors import ConfigError, DataError
from suite.primitives import LayerQState, WeightFormat
from suite.records import Store

DEFAULT_STORES = ("results/records", "results/staging/records", "results/export/records")
CONFIG_DIR = "configs"


@dataclass
class Rebuilt:
    """A cell's quantized model, its layer states and how they were obtained."""

    record: dict[str, Any]
    model: torch.nn.Module
    qstate: dict[str, LayerQState]
    source_dir: Path  # the FP model's transformers directory (config, tokenizer)
    how: str  # "re-ran the cell" | "cached re-run" | "kept by the run"
    payload: dict[str, Any]  # the cell's payload, as the runner executes it
    check: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # (``verify``)


def locate(key: str, stores: tuple[str, ...] = DEFAULT_STORES) -> dict[str, Any]:
    """The ok record whose run key is ``key`` or starts with it (>= 6 characters)."""
    if len(key) < 6 or any(c not in "0123456789abcdef" for c in key):
        raise ConfigError(f"run key: got {key!r}; accepted: a run key (20 hex digits) or a "
                          "unique prefix of at least 6")
    found = {p.stem: p for s in stores for p in Path(s).glob(f"{key}*.json")}
    if not found:
        raise ConfigError(f"run key: {key!r} is in none of the stores {', '.join(stores)}")
    if len(found) > 1:
        raise ConfigError(f"run key: {key!r} is ambiguous ({', '.join(sorted(found))}); "
                          "give more digits")
    stem, path = next(iter(found.items()))
    record = Store(path.parent).get(stem)
    if record is None:
        raise DataError(f"run key: the record {path} is unreadable")
    if record.get("status") != "ok":
        raise ConfigError(f"run key: {stem} is a {record.get('status')} record (no model to "
                          "export); accepted: a cell whose status is ok")
    return record


def prepared_cell(record: dict[str, Any], configs: tuple[str, ...] | None = None) -> Any:
    """The prepared cell (``suite.prepare.PreparedCell``) that quantizes exactly as the
    record's did, from the grid of ``configs/*.yaml`` that bears the record's grid name.

    The grid is prepared without its accuracy tasks (their data, e.g. the BIG-bench sdist, is
    not needed to re-create weights), so the match is on the cell's quantization identity
    (``quant_identity``: everything in the run key but the evaluation protocols) instead of the
    run key itself."""
    from suite.config import TaskSpec, load_grids
    from suite.prepare import prepare

    want = quant_identity(record["cell"], record["inputs"])
    paths = configs or tuple(str(p) for p in sorted(Path(CONFIG_DIR).glob("*.yaml")))
    for path in paths:
        for grid in load_grids(path, []):
            if grid.name != record["grid"]:
                continue
            grid = dataclasses.replace(
                grid, evals=tuple(e for e in grid.evals if not isinstance(e, TaskSpec)))
            for pc in prepare(grid):
                kp = pc.payload["key_payload"]
                if quant_identity(kp["cell"], kp) == want:
                    return pc
    raise ConfigError(f"run key: no grid named {record['grid']!r} in {', '.join(paths)} "
                      f"prepares the cell {record['run_key']} any more (its code or protocol "
                      "changed since it ran): it cannot be re-created")


def quant_identity(cell: dict[str, Any], inputs: dict[str, Any]) -> str:
    """Everything a cell's quantized weights depend on: its run key's payload without the
    evaluation protocols and their data."""
    from suite.records import canonical_json

    core = {k: v for k, v in cell.items() if k not in ("protocols", "evaluator_versions")}
    return canonical_json({"cell": core, "model": inputs.get("model_fingerprint"),
                           "calib": (inputs.get("data") or {}).get("calib")})


def rebuild(record: dict[str, Any], configs: tuple[str, ...] | None = None) -> Rebuilt:
    """Re-run (or load the cached re-run of) the record's cell."""
    if record["model"].get("domain") == "vision":
        raise ConfigError(f"run key: {record['run_key']} is a vision cell "
                          f"({record['model']['id']}); export writes decoder language models")
    pc = prepared_cell(record, configs)
    cache = qstate_cache.path_for(record["run_key"])
    if cache.exists():
        model, qstate, how = _from_cache(pc.payload, cache)
    else:
        model, qstate = _rerun(pc.payload, record)
        _save_cache(cache, pc.payload, model, qstate)
        how = "re-ran the cell"
    return Rebuilt(record, model, qstate, Path(pc.payload["model"]["location"]), how,
                   pc.payload)


def verify(built: Rebuilt, other_cpu: bool = False) -> None:
    """Evaluate the cell's perplexity protocols on the re-created model (``built.check``);
    refuse when one is not the published value, unless ``other_cpu`` and the record was made
    on another CPU type (verdict ``other-cpu``: the file is this machine's model of the cell)."""
    built.check = _check_metrics(built.model, built.payload, built.record, other_cpu)


def _threads(record: dict[str, Any]) -> int:
    return int((record.get("determinism") or {}).get("threads") or torch.get_num_threads())


def _load_fp(payload: dict[str, Any]) -> tuple[Any, Any]:
    from suite.runner import _LMCell

    cell = _LMCell(payload)
    return cell, cell.adapter


def _rerun(payload: dict[str, Any], record: dict[str, Any]
           ) -> tuple[torch.nn.Module, dict[str, LayerQState]]:
    """Run the cell's method chain in this process, as the runner does, with its checks."""
    from suite.runner import make_context, quantize_chain

    torch.set_num_threads(_threads(record))
    cell, adapter = _load_fp(payload)
    with tempfile.TemporaryDirectory(prefix="qbench-export-") as scratch:
        ctx = make_context(payload, adapter, None, Path(scratch))
        torch.set_num_threads(_threads(record))
        model = cell.model.to(ctx.device)
        before = honesty.weight_fingerprints(adapter.target_layers(model))
        result = quantize_chain(model, payload, ctx, cell.method_data(ctx))
    fmt = payload["key_payload"]["cell"]["format"]
    verdict = honesty.check(result, adapter.target_layers(result.model),
                            WeightFormat(**fmt) if fmt else None, before)
    if not verdict["passed"]:
        raise DataError("export: the re-run failed the honesty check: "
                        + "; ".join(verdict["problems"][:2]))
    return result.model, dict(result.qstate)


# --- the cache of re-runs ------------------------------------------------------------------


def _save_cache(path: Path, payload: dict[str, Any], model: torch.nn.Module,
                qstate: dict[str, LayerQState]) -> None:
    """The layer states and every other float tensor the chain changed (vs the FP model)."""
    fp = _load_fp(payload)[0].model.state_dict()
    qstate_cache.save(path, model, qstate, fp, "re-run")


def _from_cache(payload: dict[str, Any], path: Path
                ) -> tuple[torch.nn.Module, dict[str, LayerQState], str]:
    from suite.primitives import write_weight

    qstate, changed, how = qstate_cache.load(path)
    cell, adapter = _load_fp(payload)
    model = cell.model
    model.load_state_dict(changed, strict=False)
    targets = adapter.target_layers(model)
    for n, qs in qstate.items():
        write_weight(targets[n], qs)
    return model, qstate, how


# --- the check against the record ----------------------------------------------------------


def _check_metrics(model: torch.nn.Module, payload: dict[str, Any], record: dict[str, Any],
                   other_cpu: bool = False) -> list[dict[str, Any]]:
    """Evaluate the cell's perplexity protocols; refuse when one is not the published value
    (see :func:`verify` for ``other_cpu``)."""
    from suite.runner import _evaluate_ppl, make_context
    from suite.verify import FLOAT_TOL

    ctx = make_context(payload, None, None)  # type: ignore[arg-type] - (no adapter needed)
    torch.set_num_threads(_threads(record))
    published = {m["protocol"]: m for m in record["metrics"] if m["metric"] == "ppl"}
    rows = []
    for pid, spec in payload["key_payload"]["cell"]["protocols"].items():
        if pid not in published:
            continue
        fresh = _evaluate_ppl(model, payload, pid, spec, ctx)["value"]
        pub = published[pid]["value"]
        rel = abs(fresh / pub - 1)
        verdict = ("identical" if fresh == pub else
                   "within-float" if rel <= FLOAT_TOL["ppl"] else "differs")
        if verdict == "differs" and other_cpu and _other_cpu_type(record):
            verdict = "other-cpu"
        rows.append({"protocol": pid, "published": pub, "fresh": fresh, "rel_diff": rel,
                     "verdict": verdict, "record_cpu": cpu_type(record.get("env") or {}),
                     "this_cpu": cpu_type()})
        if verdict == "differs" or not math.isfinite(fresh):
            raise DataError(
                f"export: the re-run of {record['run_key']} gives {pid} = {fresh:.6g}, the "
                f"record {pub:.6g} (relative {rel:.2e} > {FLOAT_TOL['ppl']:.0e}): the file "
                "would not be the published model; --no-check exports it anyway"
                + ("" if not _other_cpu_type(record) else
                   f" (the record was made on a {cpu_type(record.get('env') or {})}, this is "
                   f"a {cpu_type()}: --other-cpu exports this machine's re-run and says so)"))
    return rows


def _other_cpu_type(record: dict[str, Any]) -> bool:
    """Whether the record's CPU differs from this one by model name or, where the record
    names it, by ATen's vector ISA (``suite.env.cpu_type``)."""
    env = record.get("env") or {}
    if env.get("device_name") != cpu_name():
        return True
    return bool(env.get("cpu_capability")) and env["cpu_capability"] != cpu_capability()
