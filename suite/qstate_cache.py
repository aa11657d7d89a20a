"""Kept quantized states: a cell's model as ``qbench export`` needs it, without re-running it.

A record holds no weights. ``$QBENCH_CACHE/qstate/<run key>.pt`` holds what rebuilds the cell's
quantized model from its FP model: every layer state (codes, scales, zeros, outliers) and every
other float tensor the method chain changed (decoupleQ's trained norms). Two writers, one
format: the runner, when the grid sets ``run.keep_qstate`` (the state the record was measured
on), and ``qbench export`` after a re-run. ``source`` says which, and ``how`` below reports it.

Used by ``suite.runner`` and ``suite.export.rebuild``; it imports neither.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from suite.primitives import LayerQState, OutlierChannel, WeightFormat

HOW = {"run": "kept by the run", "re-run": "cached re-run"}


def path_for(run_key: str) -> Path:
    """Where a cell's kept state lives."""
    from suite.assets import cache_dir

    return cache_dir() / "qstate" / f"{run_key}.pt"


def save(path: Path, model: torch.nn.Module, qstate: dict[str, LayerQState],
         fp_state: dict[str, torch.Tensor], source: str) -> None:
    """Write the layer states and the float tensors that differ from ``fp_state`` (atomic)."""
    targets = {f"{n}.weight" for n in qstate}
    changed = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
               if k not in targets and not torch.equal(v.cpu(), fp_state[k].cpu())}
    states = {n: dataclasses.asdict(qs) | {"fmt": dataclasses.asdict(qs.fmt)}
              for n, qs in qstate.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"qstate": states, "changed": changed, "source": source}, tmp)
    tmp.replace(path)


def load(path: Path) -> tuple[dict[str, LayerQState], dict[str, torch.Tensor], str]:
    """(layer states, changed float tensors, how it was made: a ``HOW`` value)."""
    blob = torch.load(path, weights_only=False)
    qstate = {n: state_from_dict(s) for n, s in blob["qstate"].items()}
    return qstate, blob["changed"], HOW[blob.get("source", "re-run")]


def state_from_dict(fields: dict[str, Any]) -> LayerQState:
    """A ``LayerQState`` from its ``dataclasses.asdict`` form."""
    out = fields["outliers"]
    return LayerQState(**(fields | {"fmt": WeightFormat(**fields["fmt"]),
                                    "outliers": OutlierChannel(**out) if out else None}))
