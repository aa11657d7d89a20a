"""Parent-side preparation: resolve models and data once, validate shapes, compute run keys.

Everything a cell's result depends on is fingerprinted here so the run key can be computed
before any cell runs (and, on a re-run, from caches in seconds): the model's content
fingerprint, the token streams of the calibration and evaluation corpora, the sampled
calibration windows, and the code versions of the methods and evaluators.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from suite import data, models
from suite.config import Cell, EvalSpec, Evaluation, GridConfig, TaskSpec, Top1Spec, protocol_ids
from suite.errors import ConfigError, DataError
from suite.evaluation.accuracy import ACC_VERSION
from suite.evaluation.perplexity import PPL_VERSION
from suite.evaluation.tasks import task_fingerprint
from suite.interface import Seeds, method_class
from suite.primitives import WeightFormat, check_divides
from suite.records import run_key


@dataclass
class PreparedCell:
    """A cell with its run key and the JSON payload its subprocess executes."""

    cell: Cell
    key: str
    payload: dict[str, Any]


class _Streams:
    """Token streams per (model, corpus), computed once and cached on disk by ``suite.data``."""

    def __init__(self) -> None:
        self._tokenizers: dict[str, Any] = {}

    def info(self, src: models.ModelSource, corpus: str) -> dict[str, Any]:
        tkey = models.tokenizer_key(src)
        cached = data.cached_stream_info(corpus, tkey)
        if cached is not None:
            return cached
        if src.id not in self._tokenizers:
            self._tokenizers[src.id] = models.load_tokenizer(src)
        return data.stream_info(corpus, self._tokenizers[src.id], tkey)

    def bos_id(self, src: models.ModelSource) -> int:
        """The model's BOS token id (ConfigError when its tokenizer has none)."""
        from suite.errors import ConfigError

        if src.id not in self._tokenizers:
            self._tokenizers[src.id] = models.load_tokenizer(src)
        bos = self._tokenizers[src.id].bos_token_id
        if bos is None:
            raise ConfigError(f"model {src.id}: its family reads BOS + window, but its "
                              "tokenizer has no bos_token_id")
        return int(bos)

    def ids(self, src: models.ModelSource, corpus: str):  # noqa: ANN201 - torch.Tensor
        self.info(src, corpus)
        return data.token_stream(corpus, None, models.tokenizer_key(src))


def prepare(grid: GridConfig) -> list[PreparedCell]:
    """Resolve every model and corpus of ``grid`` and return its cells with run keys.

    Raises:
        ConfigError: a group size does not divide a layer's width (naming the layer).
        DataError: a source is missing, or calibration windows overlap the evaluation text.
    """
    cells = grid.expand()
    if grid.vision is not None:
        return _prepare_vision(grid, cells)
    sources = {m: models.resolve(m) for m in grid.models}
    shapes = {m: models.target_shapes(src) for m, src in sources.items()}
    for cell in cells:
        if cell.fmt is not None:
            _check_shapes(cell.fmt, shapes[cell.model][1])
    streams = _Streams()
    bos = {m: streams.bos_id(src) if shapes[m][0].bos_per_window else None
           for m, src in sources.items()}
    out = []
    for cell in cells:
        src = sources[cell.model]
        inputs = _inputs(cell, src, streams)
        if bos[cell.model] is not None:  # (absent otherwise: older run keys stay valid)
            inputs["bos_per_window"] = bos[cell.model]
        payload = _payload(cell, src, inputs, grid)
        out.append(PreparedCell(cell, run_key(payload["key_payload"]), payload))
    return out


def _prepare_vision(grid: GridConfig, cells: list[Cell]) -> list[PreparedCell]:
    """Vision cells: the FP checkpoint of each model (trained here once, cached), then keys."""
    from suite.vision import runtime
    from suite.vision.datasets import load_vision

    assert grid.vision is not None
    sources = {m: runtime.resolve(m, grid.vision) for m in grid.models}
    shapes = {m: runtime.target_shapes(src) for m, src in sources.items()}
    out = []
    for cell in cells:
        src = sources[cell.model]
        if cell.fmt is not None:
            _check_shapes(cell.fmt, shapes[cell.model])
        data = load_vision(src.dataset)
        info = {"dataset": src.dataset, "fingerprint": data.fingerprint, "n": len(data.test)}
        inputs = {"eval": {pid: info for e in cell.evals for pid in protocol_ids(e)},
                  "calib": None}
        if _needs_calibration(cell):
            inputs["calib"] = {"dataset": src.dataset, "split": "train",
                               "fingerprint": data.fingerprint,
                               "images": grid.vision.calib_images}
        payload = {
            "key_payload": {"cell": cell_dict(cell), "model_fingerprint": src.fingerprint,
                            "data": inputs},
            "model": {"id": src.id, "domain": "vision", "arch": src.arch,
                      "dataset": src.dataset, "location": src.checkpoint, "revision": None,
                      "source_format": None, "description": src.description},
            "tokenizer_key": None, "notes": [], "run": dataclasses.asdict(grid.run),
            "grid": grid.name,
        }
        out.append(PreparedCell(cell, run_key(payload["key_payload"]), payload))
    return out


def materialise(grid: GridConfig, pending: list[PreparedCell]) -> None:
    """Produce what pending cells load but preparation only fingerprinted: the FP checkpoints
    of a vision grid's models (trained once, cached). Nothing for LM grids."""
    from suite.vision import runtime

    if grid.vision is None:
        return
    for model in dict.fromkeys(pc.cell.model for pc in pending):
        top1 = runtime.materialise(runtime.resolve(model, grid.vision), grid.vision)
        print(f"qbench: FP checkpoint of {model}: test top-1 {100 * top1:.2f}%", file=sys.stderr)


def _needs_calibration(cell: Cell) -> bool:
    return any(method_class(m).needs_calibration for m in cell.chain)


def _check_shapes(fmt: WeightFormat, shapes: dict[str, tuple[int, int]]) -> None:
    for layer, (_, cols) in shapes.items():
        check_divides(fmt, cols, layer)


def _inputs(cell: Cell, src: models.ModelSource, streams: _Streams) -> dict[str, Any]:
    """Fingerprints of everything the cell reads, plus the leakage guard for calibration."""
    evals = {}
    for e in cell.evals:
        info = _task_info(e) if isinstance(e, TaskSpec) else streams.info(src, e.corpus)
        evals.update({pid: info for pid in protocol_ids(e)})
    inputs: dict[str, Any] = {"eval": evals, "calib": None}
    if cell.calib is not None:
        spec = cell.calib
        ids = streams.ids(src, spec.corpus)
        windows = data.calibration_windows(ids, spec.windows, spec.seqlen,
                                           Seeds.derive(cell.seed).calib)
        leaks = {e.corpus: data.leakage_check(windows, streams.ids(src, e.corpus))
                 for e in cell.evals if isinstance(e, EvalSpec)}
        if any(leaks.values()):
            raise DataError(f"fixed.calib: calibration windows from {spec.corpus!r} overlap the "
                            f"evaluation text ({leaks}); choose a disjoint corpus")
        inputs["calib"] = {**streams.info(src, spec.corpus),
                           "windows_fp": data.fingerprint_tokens(windows), "leakage": leaks}
    return inputs


def _task_info(spec: TaskSpec) -> dict[str, Any]:
    info = task_fingerprint(spec.task)
    n = info.get("n_examples")
    if spec.limit is not None and n is not None and spec.limit > n:
        raise ConfigError(f"fixed.eval: {spec.task} has {n} examples; limit {spec.limit} is "
                          f"more (accepted: 1..{n})")
    return info


CHAIN_VERSION = 2  # 2: a later method of a chain starts from the original weights


def cell_dict(cell: Cell) -> dict[str, Any]:
    """The scientific identity of a cell (what enters the run key and the record)."""
    fmt = dataclasses.asdict(cell.fmt) if cell.fmt else None
    chain = {"chain_version": CHAIN_VERSION} if len(cell.chain) > 1 else {}
    return {**chain, **_vision_dict(cell),
        "model": cell.model,
        "method": cell.method,
        "chain": list(cell.chain),
        "format": fmt,
        "seed": cell.seed,
        "method_params": {m: dict(p) for m, p in cell.method_params},
        "method_versions": {m: method_class(m).Config.version for m in cell.chain},
        "calib": dataclasses.asdict(cell.calib) if cell.calib else None,
        "protocols": {pid: dataclasses.asdict(e) for e in cell.evals for pid in protocol_ids(e)},
        "evaluator_versions": evaluator_versions(cell.evals),
    }


def _vision_dict(cell: Cell) -> dict[str, Any]:
    """What of ``fixed.vision`` a vision cell's result depends on (absent for LM cells)."""
    if cell.vision is None:
        return {}
    out: dict[str, Any] = {}
    if any(method_class(m).kind == "qat" for m in cell.chain):
        out["train"] = dataclasses.asdict(cell.vision.train)
    if _needs_calibration(cell):
        out["calib_images"] = cell.vision.calib_images
    return {"vision": out}


def evaluator_versions(evals: tuple[Evaluation, ...]) -> dict[str, int]:
    """Code versions of the evaluators a cell uses (``acc`` only where a task is evaluated)."""
    if evals and all(isinstance(e, Top1Spec) for e in evals):
        from suite.vision.runtime import EVAL_VERSION

        return {"top1": EVAL_VERSION}
    versions = {"ppl": PPL_VERSION}
    if any(isinstance(e, TaskSpec) for e in evals):
        versions["acc"] = ACC_VERSION
    return versions


def _payload(cell: Cell, src: models.ModelSource, inputs: dict[str, Any], grid: GridConfig
             ) -> dict[str, Any]:
    source_fmt = dataclasses.asdict(src.source_format) if src.source_format else None
    key_payload = {
        "cell": cell_dict(cell),
        "model_fingerprint": src.fingerprint,
        "data": inputs,
    }
    notes = []
    if cell.fmt is not None and models.degenerate_format(cell.model, cell.fmt):
        notes.append("format-reproduces-source-grid")
    return {
        "key_payload": key_payload,
        "model": {"id": src.id, "location": src.location, "revision": src.revision,
                  "source_format": source_fmt, "description": src.description},
        "tokenizer_key": models.tokenizer_key(src),
        "notes": notes,
        "run": dataclasses.asdict(grid.run),
        "grid": grid.name,
    }
