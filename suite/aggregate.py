"""Aggregation: records -> tidy DataFrame -> leaderboard (pure pandas, no formatting).

``tidy`` has one row per (record, metric); failed cells keep a row per protocol with a NaN
value so failures are rows, not holes. ``leaderboard`` groups over seeds: mean, number of ok
seeds and the 95% t-interval half-width; with one seed, ``lo95``/``hi95`` carry the 95%
interval over the evaluation units (perplexity windows, or task examples for accuracy). Rows are
never ranked across protocol ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from suite.config import metric_of
from suite.env import machine_name
from suite.primitives import group_size_label

FP_BITS = 16
KEYS = ["model", "method", "wbits", "abits", "group_size", "sym", "calib", "protocol", "metric",
        "unit"]
LEADERBOARD_COLUMNS = [
    *KEYS, "value", "n_seeds", "ci95", "lo95", "hi95", "effective_bits",
    "higher_is_better", "status", "note", "quant_s", "wall_s", "machine", "machine_bound",
    "signal", "signal_value",
]


def cell_columns(rec: dict[str, Any]) -> dict[str, Any]:
    """The identifying columns of one record (run key, model, method, format, seed, ...)."""
    cell = rec["cell"]
    fmt = cell.get("format")
    return {
        "run_key": rec["run_key"],
        "model": cell["model"],
        "method": cell["method"],
        "wbits": fmt["bits"] if fmt else FP_BITS,
        "abits": rec.get("abits") or FP_BITS,
        "group_size": group_size_label(fmt["group_size"]) if fmt else "",
        "sym": bool(fmt["sym"]) if fmt else False,
        "calib": (cell.get("calib") or {}).get("corpus", ""),
        "seed": cell["seed"],
        "status": rec["status"],
        "effective_bits": rec.get("effective_bits") if fmt else float(FP_BITS),
        "note": ";".join(rec.get("notes") or []),
        "honesty_passed": (rec.get("honesty") or {}).get("passed"),
        "quant_s": (rec.get("cost") or {}).get("quant_s"),
        "wall_s": (rec.get("cost") or {}).get("wall_s"),
        "error": rec.get("error"),
        "machine": machine(rec),
        "machine_bound": machine_bound(rec),
        **signal(rec),
    }


def n_calib_corpora(column: pd.Series) -> int:
    """How many calibration corpora a ``calib`` column names (empty / NaN: data-free rows)."""
    return len({c for c in column.dropna() if c})


def signal(rec: dict[str, Any]) -> dict[str, Any]:
    """The method's mechanism signal, published next to its metric: a method's stats may hold
    ``signal: {name, value}`` (TR scheduling: ``k/R``, its median windowed transition rate over
    the target). ``signal`` is the name ('' when none), ``signal_value`` the number."""
    for st in (rec.get("stats") or {}).values():
        sig = st.get("signal") if isinstance(st, dict) else None
        if isinstance(sig, dict) and sig.get("name"):
            value = sig.get("value")
            return {"signal": str(sig["name"]),
                    "signal_value": math.nan if value is None else float(value)}
    return {"signal": "", "signal_value": math.nan}


def machine(rec: dict[str, Any]) -> str:
    """The machine (``env.machine_name``: a CPU with its ISA, or a GPU) and thread count a
    record was made with, e.g. 'AMD EPYC [AVX512] x2'."""
    env = rec.get("env") or {}
    threads = (rec.get("determinism") or {}).get("threads") or env.get("torch_threads")
    return f"{machine_name(env)} x{threads or '?'}"


def machine_bound(rec: dict[str, Any]) -> bool:
    """Whether the value depends on the machine's float rounding beyond evaluation noise: a
    model trained by the suite (vision FP checkpoints), or a method in the chain whose codes
    come from data-dependent float sums (``QuantMethod.machine_independent`` is False), or
    made by another version of a method than the one installed."""
    if (rec.get("model") or {}).get("domain") == "vision":
        return True
    return not chain_declares(rec, "machine_independent")


def chain_declares(rec: dict[str, Any], flag: str) -> bool:
    """Whether every method of the record's chain sets the class flag ``flag`` (e.g.
    ``machine_independent``, ``seed_free``) and made the record with the installed version:
    a record made by another version is not vouched for by this one's flag, and a plug-in not
    installed here is assumed not to set it."""
    from suite.errors import QbenchError
    from suite.interface import method_class

    try:
        chain = rec["cell"].get("chain") or [rec["cell"]["method"]]
        versions = rec["cell"].get("method_versions") or {}
        return all(getattr(method_class(m), flag) and versions.get(
            m.split(":")[0], method_class(m).Config.version) == method_class(m).Config.version
            for m in chain)
    except QbenchError:
        return False


def tidy(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (record, metric)."""
    rows = []
    for rec in records:
        base = cell_columns(rec)
        metrics = {m["protocol"]: m for m in rec.get("metrics") or []}
        for pid in rec["cell"]["protocols"]:
            m = metrics.get(pid)
            rows.append({
                **base, "protocol": pid,
                "metric": m["metric"] if m else metric_of(pid),
                "unit": m["unit"] if m else ("ppl" if pid.startswith("ppl/") else "accuracy"),
                "higher_is_better": m["higher_is_better"] if m else None,
                "value": m["value"] if m else math.nan,
                "lo95": m.get("lo95", m.get("ppl_lo95")) if m else math.nan,
                "hi95": m.get("hi95", m.get("ppl_hi95")) if m else math.nan,
            })
    return pd.DataFrame(rows)


def _t_halfwidth(values: pd.Series) -> float:
    from scipy import stats

    v = values.dropna()
    if len(v) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def _group(g: pd.DataFrame) -> pd.Series:
    ok = g[g["status"] == "ok"]
    statuses = sorted(set(g["status"]))
    single = len(ok) == 1
    return pd.Series({
        "value": ok["value"].mean() if len(ok) else math.nan,
        "n_seeds": len(ok),
        "ci95": _t_halfwidth(ok["value"]),
        "lo95": ok["lo95"].iloc[0] if single else math.nan,
        "hi95": ok["hi95"].iloc[0] if single else math.nan,
        "effective_bits": ok["effective_bits"].mean() if len(ok) else math.nan,
        "higher_is_better": ok["higher_is_better"].iloc[0] if len(ok) else None,
        "status": "ok" if statuses == ["ok"] else "/".join(statuses),
        "note": ";".join(sorted({n for n in g["note"] if n})),
        "quant_s": ok["quant_s"].mean() if len(ok) else math.nan,
        "wall_s": ok["wall_s"].mean() if len(ok) else math.nan,
        "machine": "; ".join(sorted(set(g["machine"]))),
        "machine_bound": bool(g["machine_bound"].any()),
        "signal": next((n for n in ok["signal"] if n), ""),
        "signal_value": ok["signal_value"].mean() if len(ok) else math.nan,
    })


def _sort_key(first: str | None) -> Callable[[pd.Series], pd.Series]:
    """FP first among methods; among protocols the grid's primary one (``first``), then
    perplexity (the primary LLM metric), then the rest by name."""
    def key(s: pd.Series) -> pd.Series:
        if s.name == "method":
            return s.map(lambda m: (m != "fp", m))
        if s.name == "protocol":
            return s.map(lambda p: (p != first, not p.startswith("ppl/"), p))
        return s

    return key


def leaderboard(df: pd.DataFrame, first: str | None = None) -> pd.DataFrame:
    """Mean and 95% CI over seeds per (model, method, format, protocol); raw floats. Rows of
    the protocol ``first`` (the grid's first evaluation) come first in each model."""
    if df.empty:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    out = df.groupby(KEYS, dropna=False, sort=False).apply(_group, include_groups=False)
    out = out.reset_index()
    out["n_seeds"] = out["n_seeds"].astype(int)
    # a total order, independent of the order records were read in
    out = out.sort_values(
        ["model", "protocol", "wbits", "group_size", "sym", "method", "calib"],
        key=_sort_key(first),
        ascending=[True, True, False, True, True, True, True],
        kind="stable",
    )
    return out[LEADERBOARD_COLUMNS].reset_index(drop=True)
