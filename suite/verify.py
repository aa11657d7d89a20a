"""``qbench verify``: a fresh run of published cells against the published records.

A grid whose cells carry the run keys of published cells (``configs/reproduce-quick.yaml``:
a subset of ``configs/reproduce.yaml`` under the same protocol) is run into its own store;
this module lines up, per cell and per evaluation protocol, the fresh value with the
published record of the same run key. Same code, same inputs and the same thread count give
the same numbers bit for bit (``identical``); another machine or BLAS may move them by
float rounding (``within`` the tolerance: perplexity relative, ``|fresh / published - 1| <=
ppl_rel``; accuracies absolute, in percentage points as ``qbench parity``); anything more is
``differs``. A cell missing on either side is listed, never skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from suite import parity
from suite.records import Store


@dataclass(frozen=True)
class Tolerance(parity.Tolerance):
    """``qbench parity``'s tolerance (``ppl_rel`` relative for perplexity, ``acc_abs`` points
    for accuracies) with verify's defaults: 1e-3 relative, accuracies exact."""

    ppl_rel: float = 1e-3
    acc_abs: float = 0.0


COLUMNS = ["grid", "cell", "protocol", "metric", "published", "fresh", "diff", "verdict"]


def line_up(grid: str, cells: list[tuple[str, str]], fresh: Store, published: Store,
            tol: Tolerance) -> pd.DataFrame:
    """One row per (cell, protocol) of ``cells`` ((label, run key) pairs) in either store."""
    rows: list[dict] = []
    for label, key in cells:
        new, old = fresh.get(key), published.get(key)
        base = {"grid": grid, "cell": label}
        if new is None or old is None:
            side = "fresh" if new is None else "published"
            rows.append({**base, "protocol": "–", "verdict": f"no {side} record"})
            continue
        if new["status"] != "ok" or old["status"] != "ok":
            rows.append({**base, "protocol": "–",
                         "verdict": f"status {old['status']} -> {new['status']}"})
            continue
        rows += [{**base, **row} for row in _metric_rows(new, old, tol)]
    return pd.DataFrame(rows, columns=COLUMNS)


def _metric_rows(new: dict, old: dict, tol: Tolerance) -> list[dict]:
    """Protocol by protocol: the published value, the fresh one and the verdict."""
    fresh = {m["protocol"]: m for m in new["metrics"]}
    out = []
    for m in old["metrics"]:
        f = fresh.get(m["protocol"])
        row = {"protocol": m["protocol"], "metric": m["metric"], "published": m["value"]}
        if f is None:
            out.append({**row, "verdict": "no fresh value"})
            continue
        a, b = float(m["value"]), float(f["value"])
        verdict = ("identical" if a == b else "within" if tol.within(m["metric"], a, b)
                   else "differs")
        out.append({**row, "fresh": b, "diff": b - a, "verdict": verdict})
    return out


def agrees(table: pd.DataFrame) -> bool:
    """Whether every row is ``identical`` or ``within`` (and there is at least one)."""
    return len(table) > 0 and bool(table["verdict"].isin(["identical", "within"]).all())


def markdown(table: pd.DataFrame, tol: Tolerance) -> str:
    """The verification table, one line per (cell, protocol)."""
    lines = [f"Tolerance: perplexity within {tol.ppl_rel:g} relative, accuracies within "
             f"{tol.acc_abs:g} points.", "",
             "| grid | cell | protocol | published | fresh | diff | verdict |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in table.itertuples(index=False):
        nums = [f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else "–"
                for v in (r.published, r.fresh, r.diff)]
        lines.append(f"| {r.grid} | {r.cell} | {r.protocol} | {' | '.join(nums)} | {r.verdict} |")
    return "\n".join(lines) + "\n"
