"""``qbench parity``: measured against published, wherever a run exists.

The published numbers are data (``suite/published.yaml``: value, model, method, format,
metric and the paper table each comes from). For every published row whose grid is among the
given configs, the measured leaderboard row of the same model x method x format x protocol is
aggregated from the grid's store. The verdict is ``within`` or ``outside`` the tolerance
(relative for perplexity, absolute points for accuracy), or ``not run``: nothing is invented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from suite.config import GridConfig
from suite.errors import ConfigError

PUBLISHED = Path(__file__).resolve().parent / "published.yaml"
_SOURCE_KEYS = ("cite", "grid", "protocol", "metric", "scale", "rows")


@dataclass(frozen=True)
class Tolerance:
    """``ppl_rel``: |measured / published - 1| allowed for perplexity; ``acc_abs``: absolute
    difference allowed for accuracies, in percentage points."""

    ppl_rel: float = 0.05
    acc_abs: float = 1.0

    def within(self, metric: str, published: float, measured: float) -> bool:
        """Whether ``measured`` agrees with ``published`` (both in qbench's units; NaN agrees
        only with NaN; 1e-9 points absorb the float error of the percent conversion)."""
        if math.isnan(published) or math.isnan(measured):
            return math.isnan(published) and math.isnan(measured)
        if metric == "ppl":
            return abs(measured - published) <= self.ppl_rel * abs(published)
        return abs(measured - published) * 100.0 <= self.acc_abs + 1e-9


def load_published(path: Path = PUBLISHED) -> pd.DataFrame:
    """One row per published number, in qbench's units, with its grid, protocol prefix and cite."""
    raw = yaml.safe_load(path.read_text())
    rows = []
    for name, src in raw["sources"].items():
        unknown = set(src) - set(_SOURCE_KEYS)
        if unknown:
            raise ConfigError(f"{path.name}: sources.{name}.{sorted(unknown)[0]}: unknown key; "
                              f"accepted: {', '.join(_SOURCE_KEYS)}")
        for model, method, wbits, abits, group, value in src["rows"]:
            rows.append({"source": name, "cite": src["cite"], "grid": src["grid"],
                         "prefix": src["protocol"], "metric": src["metric"], "model": model,
                         "method": method, "wbits": int(wbits), "abits": int(abits),
                         "group_size": str(group),
                         "published": float(value) * float(src.get("scale", 1.0))})
    return pd.DataFrame(rows)


def measured(grids: list[GridConfig]) -> pd.DataFrame:
    """The leaderboard rows of the grids' stored records (ok cells only)."""
    from suite import aggregate
    from suite.records import Store

    frames = []
    for grid in grids:
        recs = [r for r in Store(grid.run.store).all()
                if r.get("grid") == grid.name and r.get("status") == "ok"]
        if recs:
            frames.append(aggregate.leaderboard(aggregate.tidy(recs)).assign(grid=grid.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def line_up(published: pd.DataFrame, board: pd.DataFrame, tol: Tolerance) -> pd.DataFrame:
    """Each published row with its measured counterpart (or none) and the verdict."""
    out = []
    for p in published.itertuples(index=False):
        m = _match(board, p)
        row: dict[str, Any] = {**p._asdict(), "measured": math.nan, "ci95": math.nan,
                               "n_seeds": 0, "verdict": "not run"}
        if m is not None:
            row.update(measured=m["value"], ci95=m["ci95"], n_seeds=int(m["n_seeds"]),
                       protocol=m["protocol"],
                       verdict="within" if tol.within(p.metric, p.published, m["value"])
                       else "outside")
        out.append(row)
    return pd.DataFrame(out)


def _match(board: pd.DataFrame, p: Any) -> pd.Series | None:
    if board.empty:
        return None
    hit = board[(board["grid"] == p.grid) & (board["model"] == p.model)
                & (board["method"] == p.method) & (board["wbits"] == p.wbits)
                & (board["abits"] == p.abits) & (board["group_size"].astype(str) == p.group_size)
                & board["protocol"].str.startswith(p.prefix)]
    return None if hit.empty else hit.iloc[0]


def markdown(table: pd.DataFrame, tol: Tolerance) -> str:
    """The parity table: published, measured (mean ± 95% CI, seeds), difference, verdict."""
    lines = [f"Tolerance: perplexity within {tol.ppl_rel:.0%} relative, accuracy within "
             f"{tol.acc_abs:g} points.", "",
             "| grid | model | method | format | published | measured | diff | verdict | "
             "source |", "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in table.itertuples(index=False):
        fmt = "FP" if r.method == "fp" else f"W{r.wbits}A{r.abits} {r.group_size}"
        meas = diff = "–"
        if r.verdict != "not run":
            ci = f" ± {r.ci95:.3g}" if not math.isnan(r.ci95) else ""
            meas = f"{_num(r.measured, r.metric)}{ci} (n={r.n_seeds})"
            diff = (f"{r.measured / r.published - 1:+.1%}" if r.metric == "ppl"
                    else f"{(r.measured - r.published) * 100:+.1f} pt")
        lines.append(f"| {r.grid} | {r.model} | {r.method} | {fmt} | "
                     f"{_num(r.published, r.metric)} | {meas} | {diff} | {r.verdict} | "
                     f"{r.source} |")
    return "\n".join(lines) + "\n"


def _num(v: float, metric: str) -> str:
    return f"{v:.4g}" if metric == "ppl" else f"{v * 100:.1f}%"
