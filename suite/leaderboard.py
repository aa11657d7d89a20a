"""The published leaderboard format: ``results/leaderboard/<track>.csv`` with a versioned schema.

One row per model x method x format x protocol (seeds aggregated), raw floats. The columns, their
order and dtypes are declared here and nowhere else; ``SCHEMA.md`` is generated from them, and
a test pins the column list to ``SCHEMA_VERSION`` so a change without a version bump fails.
Readers check ``schema_version`` (the first column) before trusting the others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from suite.render import write_csv

SCHEMA_VERSION = 4  # 4: the calib column (calibration corpus as a grid axis)


@dataclass(frozen=True)
class Column:
    """One leaderboard column: name, pandas dtype (``string`` may be empty) and meaning."""

    name: str
    dtype: str
    description: str


COLUMNS = (
    Column("schema_version", "int", "version of this schema"),
    Column("model", "string", "model id (registry id, hf:<repo>, or <arch>@<dataset>)"),
    Column("method", "string", "method chain, e.g. gptq or precalibration+gptq; fp = reference"),
    Column("wbits", "int", "weight bits (16 for the FP reference)"),
    Column("abits", "int", "input-activation bits (16 = not quantized)"),
    Column("group_size", "string", "columns per scale group; empty = per-channel/reference"),
    Column("sym", "bool", "symmetric weight grid"),
    Column("calib", "string", "calibration corpus id of the cells; empty for data-free methods "
           "(RTN, pre-calibration), the FP reference and vision rows"),
    Column("protocol", "string", "evaluation protocol id (metric, data, split, windowing)"),
    Column("metric", "string", "ppl, acc or top1"),
    Column("unit", "string", "unit of value"),
    Column("value", "float", "mean over seeds"),
    Column("n_seeds", "int", "seeds the mean rests on"),
    Column("ci95", "float", "95% t-interval half-width over seeds; empty for one seed"),
    Column("lo95", "float", "lower end of the 95% interval (over windows/examples for one seed)"),
    Column("hi95", "float", "upper end of the 95% interval"),
    Column("effective_bits", "float", "stored bits per weight incl. scales/zeros, from qstate"),
    Column("higher_is_better", "bool", "direction of the metric"),
    Column("status", "string", "ok, or the failure status of the cells (see README Records)"),
    Column("note", "string", "flags, e.g. no-quantized-weight-changed"),
    Column("quant_s", "float", "quantization cost: mean seconds of the method's quantize step"),
    Column("wall_s", "float", "mean seconds of the whole cell (load, quantize, evaluate)"),
    Column("machine", "string", "CPU/GPU model x torch threads of the records ('; ' between "
           "several: the row mixes machines)"),
    Column("machine_bound", "bool", "the value depends on the machine's float rounding (codes "
           "from data-dependent float sums, or a model trained by the suite); false: the codes "
           "are the same on any machine and only evaluation rounding remains"),
    Column("speedup", "float", "model-level weight-only GEMV (M=1) speedup of the format "
           "over fp32 on speed_device; empty where not timed"),
    Column("speed_backend", "string", "kernel backend(s) the speedup comes from"),
    Column("speed_device", "string", "device of the kernel timings"),
    Column("speed_coverage", "float", "fraction of the model's linear weights the timing covers"),
    Column("signal", "string", "name of the method's mechanism signal (TR scheduling: k/R); "
           "empty when the method publishes none"),
    Column("signal_value", "float", "its value, mean over seeds (k/R: median windowed "
           "transition rate over the target, steps 10%-90% of training; 1 = on target)"),
    Column("speedup_cuda", "float", "as speedup, from the GPU check's kernel table "
           "(results/gpu/kernels-cuda.csv); empty without one"),
    Column("speed_backend_cuda", "string", "kernel backend(s) of speedup_cuda"),
    Column("speed_coverage_cuda", "float", "coverage of speedup_cuda"),
)
NAMES = tuple(c.name for c in COLUMNS)


def schema_fingerprint() -> str:
    """Hash of the column names and dtypes (pinned per version in the tests)."""
    text = ";".join(f"{c.name}:{c.dtype}" for c in COLUMNS)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def frame(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard rows of an aggregated board, in schema order (a board column the schema
    does not declare, or a declared one the board lacks, is an error: bump the version)."""
    have = set(board.columns) | {"schema_version"}
    if have != set(NAMES):
        raise ValueError(f"board columns differ from leaderboard schema v{SCHEMA_VERSION}: "
                         f"extra {sorted(have - set(NAMES))}, missing {sorted(set(NAMES) - have)}")
    out = board.assign(schema_version=SCHEMA_VERSION)[list(NAMES)]
    return out.drop_duplicates(subset=["model", "method", "wbits", "abits", "group_size", "sym",
                                       "protocol"], keep="first")


def write(board: pd.DataFrame, out_dir: Path, track: str) -> Path:
    """``<out_dir>/leaderboard/<track>.csv`` and the generated ``SCHEMA.md`` beside it."""
    folder = out_dir / "leaderboard"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{track}.csv"
    write_csv(frame(board), path)
    (folder / "SCHEMA.md").write_text(schema_markdown())
    return path


def schema_markdown() -> str:
    """SCHEMA.md: the column table of this version."""
    lines = [f"# Leaderboard CSV schema, version {SCHEMA_VERSION}", "",
             "Generated from `suite/leaderboard.py`; do not edit by hand. One row per model x "
             "method x format x protocol; raw floats; `schema_version` is the first column.",
             f"Column fingerprint: `{schema_fingerprint()}`.", "",
             "| column | dtype | meaning |", "|---|---|---|"]
    lines += [f"| `{c.name}` | {c.dtype} | {c.description} |" for c in COLUMNS]
    return "\n".join(lines) + "\n"
