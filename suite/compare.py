"""Paired comparisons of one method against baselines on the same cells (``qbench compare``).

For every (model, format, protocol) that NEW and a baseline share, the difference NEW minus
baseline is paired over what both runs share:

  * three or more seeds ok in both: the per-seed differences, mean and 95% t-interval (the
    seed is the unit: same calibration sample / data order);
  * one or two shared seeds: a paired bootstrap over the evaluation units both records hold
    (the perplexity windows' NLLs, or the task examples' / test images' 0/1 outcomes), the
    per-unit difference averaged over the shared seeds; 2,000 resamples with a fixed seed,
    percentile 95% interval. (A t-interval over two seeds rests on a one-degree-of-freedom
    variance and came out misleadingly narrow on the published vision grid.)

With ``best_of`` the baselines are candidates, not separate rows: in each cell group the one
with the best mean value over the seeds it shares with NEW is the baseline (e.g. TR scheduling
against the best point of LSQ's LR sweep). The choice uses the same evaluation as the
comparison, which favours the baseline: a ``better`` verdict for NEW survives that selection,
a ``worse`` one may be partly selection.

Seed-free methods (``QuantMethod.seed_free``: RTN, statistical pre-calibration, FP): the
output cannot depend on the seed, so grids run them once, and their one record stands for
every seed of the method it is compared with. Pre-calibration against GPTQ over GPTQ's three
seeds is then a comparison over seeds, not one seed's windows (``paired_over`` says so).

Calibration corpus: cells calibrated on different corpora are different cells (``calib``
column). A data-free method's cells (no calibration) are compared with a calibrated method's
cells under each corpus the latter used, so "pre-calibration vs GPTQ calibrated on X" is one
row per X.

Perplexity is compared as the difference of mean token NLL (log perplexity), so the interval
does not depend on the scale, and reported with the perplexity ratio. The verdict is
``better`` / ``worse`` when the interval excludes 0 (in the metric's good direction), else
``not distinguishable``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

BOOTSTRAP = 2000
MIN_SEEDS_FOR_T = 3
COLUMNS = ["model", "wbits", "abits", "group_size", "sym", "calib", "protocol", "metric", "new",
           "baseline", "new_value", "baseline_value", "diff", "lo95", "hi95", "unit_of_diff",
           "paired_over", "n", "verdict"]


def _units(metric_row: dict[str, Any]) -> np.ndarray | None:
    """Per-unit values: window NLLs (perplexity) or 0/1 outcomes (accuracy)."""
    if "window_nlls" in metric_row:
        return np.asarray(metric_row["window_nlls"], dtype=float)
    if "outcomes" in metric_row:
        return np.frombuffer(metric_row["outcomes"].encode(), dtype=np.uint8) - 48.0
    return None


def _rows(records: list[dict]) -> pd.DataFrame:
    """One row per (record, metric) with the units kept (ok records only)."""
    from suite.aggregate import cell_columns, chain_declares

    out = []
    for rec in records:
        if rec.get("status") != "ok":
            continue
        base = {**cell_columns(rec), "seed_free": chain_declares(rec, "seed_free")}
        for m in rec.get("metrics") or []:
            ppl = m["metric"] == "ppl"
            out.append({**base, "protocol": m["protocol"], "metric": m["metric"],
                        "value": m["value"], "stat": m.get("nll") if ppl else m["value"],
                        "units": _units(m), "higher_is_better": m["higher_is_better"]})
    return pd.DataFrame(out)


KEYS = ["model", "wbits", "abits", "group_size", "sym", "calib", "protocol", "metric"]


def _spread_data_free(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of data-free cells (``calib`` empty) repeated under every calibration corpus the
    other rows of their cell group use (``free`` marks the copies' origin)."""
    df = df.assign(free=df["calib"] == "")
    groups = [k for k in KEYS if k != "calib"]
    out = [df]
    for _, g in df.groupby(groups, sort=False):
        corpora = sorted(set(g["calib"]) - {""})
        out += [g[g["free"]].assign(calib=c) for c in corpora]
    return pd.concat(out, ignore_index=True)


def compare(records: list[dict], new: str, baselines: list[str], *,
            best_of: bool = False) -> pd.DataFrame:
    """The paired table (``COLUMNS``): one row per shared cell group and baseline, or with
    ``best_of`` one row per cell group against its best baseline (module docstring)."""
    df = _rows(records)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    df = df.assign(seed_free=df.get("seed_free", False))
    df = _spread_data_free(df[df["method"].isin([new, *baselines])])
    out = []
    for key, g in df.groupby(KEYS, sort=True):
        a = g[g["method"] == new]
        shared = {b: _on_shared_seeds(a, g[g["method"] == b]) for b in baselines}
        # two data-free methods are compared once, without a corpus
        copies = bool(key[KEYS.index("calib")]) and a["free"].all()
        shared = {b: pair for b, pair in shared.items()
                  if len(pair[1]) and not (copies and pair[1]["free"].all())}
        if best_of and shared:
            shared = dict([_best(shared)])
        for base, (a_b, b) in shared.items():
            out.append({**dict(zip(KEYS, key, strict=True)), "new": new, "baseline": base,
                        **_paired(a_b, b)})
    order = {b: i for i, b in enumerate(baselines)}  # rows baseline by baseline, as named
    out.sort(key=lambda row: order[row["baseline"]])  # (stable: groups stay sorted)
    return pd.DataFrame(out, columns=COLUMNS)


def _on_shared_seeds(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both sides on the seeds they share. A seed-free side with a single record stands for
    every seed of the other side (its output is the same under any seed)."""
    def lone_seed_free(x: pd.DataFrame) -> bool:
        return len(x) == 1 and bool(x["seed_free"].all())

    if lone_seed_free(a) and len(b):
        a = _repeat(a, b["seed"])
    elif lone_seed_free(b) and len(a):
        b = _repeat(b, a["seed"])
    seeds = set(a["seed"]) & set(b["seed"])
    return a[a["seed"].isin(seeds)], b[b["seed"].isin(seeds)]


def _repeat(row: pd.DataFrame, seeds: pd.Series) -> pd.DataFrame:
    """A one-row frame once per seed (``repeated`` marks the copies)."""
    return pd.concat([row.assign(seed=s, repeated=True) for s in sorted(set(seeds))],
                     ignore_index=True)


def _best(candidates: dict[str, tuple[pd.DataFrame, pd.DataFrame]]
          ) -> tuple[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """The candidate with the best mean value (ties: the first named)."""
    sign = 1.0 if next(iter(candidates.values()))[1]["higher_is_better"].iloc[0] else -1.0
    return max(candidates.items(), key=lambda kv: sign * kv[1][1]["value"].mean())


def _paired(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, Any]:
    """Difference new - baseline with its interval and verdict."""
    seeds = sorted(set(a["seed"]) & set(b["seed"]))  # (callers pass b on a's seeds)
    ppl = a["metric"].iloc[0] == "ppl"
    higher = bool(a["higher_is_better"].iloc[0])
    sa, sb = (x.set_index("seed").loc[seeds] for x in (a, b))
    res = {"new_value": float(sa["value"].mean()), "baseline_value": float(sb["value"].mean()),
           "unit_of_diff": "mean NLL (log ppl)" if ppl else "accuracy"}
    if len(seeds) >= MIN_SEEDS_FOR_T:
        d = (sa["stat"] - sb["stat"]).to_numpy(dtype=float)
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        res.update(diff=d.mean(), lo95=d.mean() - half, hi95=d.mean() + half,
                   paired_over="seeds", n=len(d))
    else:
        ua, ub = list(sa["units"]), list(sb["units"])
        if any(u is None or len(u) != len(ua[0]) for u in ua + ub):
            res.update(diff=float((sa["stat"] - sb["stat"]).mean()), lo95=math.nan,
                       hi95=math.nan, paired_over="none (no shared units)", n=len(seeds))
        else:
            d = np.mean([x - y for x, y in zip(ua, ub, strict=True)], axis=0)  # (units,)
            res.update(_bootstrap(d, len(seeds)))
    if len(seeds) > 1 and any("repeated" in x and x["repeated"].eq(True).any() for x in (a, b)):
        res["paired_over"] += " (seed-free side repeated)"
    res["verdict"] = _verdict(res["lo95"], res["hi95"], higher)
    return res


def _bootstrap(d: np.ndarray, n_seeds: int) -> dict[str, Any]:
    """Percentile interval of the mean paired difference over evaluation units."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "lo95": float(lo), "hi95": float(hi),
            "paired_over": f"bootstrap over evaluation units, {n_seeds} seed(s)", "n": len(d)}


def _verdict(lo: float, hi: float, higher_is_better: bool) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return "not distinguishable"
    up = lo > 0
    return "better" if up == higher_is_better else "worse"


def markdown(table: pd.DataFrame) -> str:
    """The paired table for reading (perplexity differences also as ratios)."""
    lines = ["| model | format | protocol | new | baseline | new | baseline | diff [95%] | "
             "paired over | verdict |", "|---|---|---|---|---|---:|---:|---|---|---|"]
    for _, r in table.iterrows():
        fmt = f"w{r['wbits']}{'a' + str(r['abits']) if r['abits'] != 16 else ''} " \
              f"{r['group_size'] or ''}{' sym' if r['sym'] else ''}".strip()
        fmt += f", calib {r['calib']}" if r["calib"] else ""
        ppl = r["metric"] == "ppl"
        diff = (f"x{math.exp(r['diff']):.3g} [{math.exp(r['lo95']):.3g}, "
                f"{math.exp(r['hi95']):.3g}]" if ppl else
                f"{r['diff']:+.4f} [{r['lo95']:+.4f}, {r['hi95']:+.4f}]")
        lines.append(f"| {r['model']} | {fmt} | `{r['protocol']}` | {r['new']} | "
                     f"{r['baseline']} | {r['new_value']:.4g} | {r['baseline_value']:.4g} | "
                     f"{diff} | {r['paired_over']} (n={r['n']}) | {r['verdict']} |")
    return "\n".join(lines) + "\n"
