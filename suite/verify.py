"""``qbench verify``: a fresh run of published cells against the published records.

A grid whose cells carry the run keys of published cells (``configs/reproduce-quick.yaml``:
a subset of ``configs/reproduce.yaml`` under the same protocol) is run into its own store;
this module lines up, per cell and per evaluation protocol, the fresh value with the published
record of the same run key and classes it:

``identical``
    the same float, bit for bit, and the same per-unit values (windows, examples, images).
``within-float``
    within the metric's float tolerance (``FLOAT_TOL``): the same model evaluated with another
    float rounding (another BLAS kernel, thread split or CPU). Counts of examples have no float
    tolerance: one flipped example is not rounding.
``within-noise``
    within the noise measured for this cell, never a hand-picked constant:

    * **seed spread**, for a cell whose codes depend on the machine's float rounding (a QAT
      method, or a calibrated method whose decisions come from float sums, GPTQ, AWQ,
      decoupleQ: the leaderboard's ‡ cells) where the published store holds >= 3 seeds of the
      cell: another machine's rounding sends it down another trajectory, so the fresh and the
      published value are two draws whose difference has standard deviation s sqrt(2), s the
      sample standard deviation over the seeds; accepted when |fresh - published| <=
      t(1 - a/2, n - 1) s sqrt(2). Measured on GPTQ W3 g64 (SmolLM2, news calibration): the
      same code and seed on two AMD EPYC machines gave code perplexity 117.3 and 80.7, while
      its three seeds gave 117.3, 88.6 and 88.2, so rounding moves such a cell as far as
      another seed does;
    * otherwise (cells with machine-independent codes, RTN and pre-calibration, or a single
      published seed) a **paired bootstrap** over the evaluation units both records keep
      (perplexity windows' mean NLL, task examples' or images' 0/1 outcomes): resample the
      units with replacement, and accept when the observed mean paired difference lies inside
      the central 1 - a interval of the resampled means centred on 0 (perplexity in log space:
      ppl = exp(mean NLL)). Two evaluations of the same model under other float rounding land
      here; a change that moves most units one way does not. A single-seed ‡ cell judged
      this way can report ``differs`` for a rerun on another CPU: the number itself does not
      carry over, and the row says which machines made it.

    ``a`` is the family-wise false-alarm rate ``alpha`` (default 0.05) split over every value
    that reaches this test (Bonferroni), so a table of 40 agreeing values does not report one
    ``differs`` by chance.
``unjudged``
    the noise interval, clipped to the values the metric can take (an accuracy lies in
    [0, 1], a perplexity is at least 1), still admits every such value: no fresh value could
    fail it, so it is no check. This happens with a seed spread whose seeds disagree wildly
    (a QAT cell where one seed collapses to chance). Not an agreement: ``agrees`` is false.
``differs``
    none of the above, or the units cannot be paired (a different number of windows or
    examples: a protocol that changed under the same id).

A cell missing on either side is listed, never skipped. Every row keeps the noise estimate it
was judged by (``noise``, ``noise_lo``, ``noise_hi`` in the metric's units, as a difference
fresh - published), and both machines.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from suite.records import Store, canonical_json

# Float tolerance per metric: |fresh / published - 1| for perplexity (the same model evaluated
# under another float rounding: measured in docs/reproducibility.md), exact for accuracies.
FLOAT_TOL = {"ppl": 1e-4}
AGREES = ("identical", "within-float", "within-noise")
UNJUDGED = "unjudged"
COLUMNS = ["grid", "cell", "run_key", "protocol", "metric", "published", "fresh", "diff",
           "float_tol", "noise", "noise_lo", "noise_hi", "verdict", "published_machine",
           "fresh_machine"]


@dataclass(frozen=True)
class Options:
    """``alpha``: family-wise false-alarm rate of the noise test; ``resamples``: bootstrap
    resamples; ``seed``: the bootstrap's RNG seed (verification is itself reproducible)."""

    alpha: float = 0.05
    resamples: int = 20_000
    seed: int = 0


@dataclass(frozen=True)
class Noise:
    """The noise interval of one value: ``kind`` (how it was measured), and the interval
    [lo, hi] of fresh - published it allows (bootstrap) or +-half-width (seed spread)."""

    kind: str
    lo: float
    hi: float

    def accepts(self, diff: float) -> bool:
        """Whether ``diff`` (fresh - published) lies inside the interval."""
        return self.lo <= diff <= self.hi

    def clipped(self, lo: float, hi: float) -> tuple[Noise, bool]:
        """The interval cut to the feasible differences [lo, hi], and whether it covers all of
        them (a vacuous check)."""
        out = Noise(self.kind, max(self.lo, lo), min(self.hi, hi))
        vacuous = out.lo <= lo and out.hi >= hi
        return (Noise(f"{self.kind}, vacuous" if vacuous else self.kind, out.lo, out.hi),
                vacuous)


def feasible(unit: str | None, metric: str, published: float) -> tuple[float, float]:
    """The differences fresh - published a metric can take: accuracies lie in [0, 1],
    perplexities in [1, inf)."""
    if unit == "accuracy":
        return -published, 1.0 - published
    if metric == "ppl":
        return 1.0 - published, math.inf
    return -math.inf, math.inf


# ---------------------------------------------------------------------------------------------
# evaluation units and seeds


def units(metric: dict[str, Any]) -> np.ndarray | None:
    """The per-unit values a metric was averaged from: window NLLs (perplexity) or 0/1
    outcomes (accuracy, top-1); None when the record keeps none."""
    if metric.get("window_nlls") is not None:
        w = metric["window_nlls"]
        return np.asarray(json.loads(w) if isinstance(w, str) else w, dtype=np.float64)
    if metric.get("outcomes"):
        return np.frombuffer(metric["outcomes"].encode(), dtype=np.uint8) - ord("0")
    return None


def _without_seed(rec: dict[str, Any]) -> str:
    """The cell without its seed. Not the grid's name: a published grid may reuse the
    records of another grid's identical cells (llm-ppl-smollm2 those of
    calib-domains-smollm2), and its seeds are still seeds of one cell."""
    return canonical_json({k: v for k, v in rec["cell"].items() if k != "seed"})


def seed_values(published: list[dict[str, Any]], rec: dict[str, Any], protocol: str
                ) -> list[float]:
    """The published values of ``protocol`` over the distinct ok seeds of ``rec``'s cell."""
    sig = _without_seed(rec)
    by_seed: dict[Any, float] = {}
    for r in published:
        if r.get("status") == "ok" and _without_seed(r) == sig:
            by_seed.update({r["cell"].get("seed"): float(m["value"]) for m in r["metrics"]
                            if m["protocol"] == protocol})
    return list(by_seed.values())


# ---------------------------------------------------------------------------------------------
# the two noise estimates


def seed_spread(values: list[float], level: float) -> Noise:
    """+-t(1 - level/2, n - 1) s sqrt(2): the difference of two draws of the seed distribution."""
    from scipy import stats

    n = len(values)
    half = float(stats.t.ppf(1 - level / 2, n - 1) * np.std(values, ddof=1) * math.sqrt(2))
    return Noise(f"seed-spread(n={n})", -half, half)


def paired_bootstrap(fresh: np.ndarray, published: np.ndarray, metric: str, pub_value: float,
                     level: float, opts: Options) -> Noise:
    """The noise band of the mean paired difference: the central 1 - level interval of the
    bootstrap means, centred on 0 (what resampling the units alone moves the mean by), in
    metric units; the observed difference is within noise when it lies inside.

    Resampling n units with replacement is a multinomial draw over the distinct paired
    differences, which is exact and costs O(distinct values) per resample (0/1 outcomes have
    at most three distinct differences)."""
    d = fresh.astype(np.float64) - published.astype(np.float64)  # (n,)
    vals, counts = np.unique(d, return_counts=True)
    rng = np.random.default_rng(opts.seed)
    draws = rng.multinomial(len(d), counts / len(d), size=opts.resamples)  # (B, distinct)
    means = draws @ vals / len(d) - d.mean()  # (B,): centred on 0
    lo, hi = np.quantile(means, [level / 2, 1 - level / 2])
    if metric == "ppl":  # mean NLL difference -> perplexity difference
        lo, hi = pub_value * math.expm1(lo), pub_value * math.expm1(hi)
    return Noise(f"paired-bootstrap(n={len(d)},B={opts.resamples})", float(lo), float(hi))


# ---------------------------------------------------------------------------------------------
# lining up


def within_float(metric: str, published: float, fresh: float) -> bool:
    """Whether two values of one metric agree within the metric's float tolerance."""
    tol = FLOAT_TOL.get(metric)
    if tol is None or math.isnan(published) or math.isnan(fresh):
        return False
    return abs(fresh - published) <= tol * abs(published)


def machine(rec: dict[str, Any]) -> str:
    """'<CPU or GPU model> x<threads>' of a record."""
    env = rec.get("env") or {}
    threads = (rec.get("determinism") or {}).get("threads") or env.get("torch_threads")
    return f"{env.get('device_name', '?')} x{threads}"


def line_up(grid: str, cells: list[tuple[str, str]], fresh: Store, published: Store,
            opts: Options = Options()) -> pd.DataFrame:
    """One row per (cell, protocol) of ``cells`` ((label, run key) pairs) in either store."""
    pub_all = published.all()
    pending: list[dict] = []
    for label, key in cells:
        new, old = fresh.get(key), published.get(key)
        base = {"grid": grid, "cell": label, "run_key": key}
        if new is None or old is None:
            side = "fresh" if new is None else "published"
            pending.append({**base, "protocol": "–", "verdict": f"no {side} record"})
            continue
        base.update(published_machine=machine(old), fresh_machine=machine(new))
        if new["status"] != "ok" or old["status"] != "ok":
            pending.append({**base, "protocol": "–",
                            "verdict": f"status {old['status']} -> {new['status']}"})
            continue
        pending += [{**base, **row} for row in _metric_rows(new, old)]
    _judge_noise(pending, {r["run_key"]: r for r in pub_all if "run_key" in r}, fresh, pub_all,
                 opts)
    for row in pending:
        row.pop("_units", None)
        row.pop("_unit", None)
    return pd.DataFrame(pending, columns=COLUMNS)


def _metric_rows(new: dict, old: dict) -> list[dict]:
    """Protocol by protocol: the published value, the fresh one, and the float verdict (rows
    that need the noise test carry ``verdict=None`` and their paired units)."""
    fresh = {m["protocol"]: m for m in new["metrics"]}
    out = []
    for m in old["metrics"]:
        f = fresh.get(m["protocol"])
        row = {"protocol": m["protocol"], "metric": m["metric"], "published": m["value"],
               "float_tol": FLOAT_TOL.get(m["metric"], 0.0), "_unit": m.get("unit")}
        if f is None:
            out.append({**row, "verdict": "no fresh value"})
            continue
        a, b = float(m["value"]), float(f["value"])
        pair = (units(f), units(m))
        row.update(fresh=b, diff=b - a)
        verdict = "identical" if a == b and _same_units(*pair) else \
            "within-float" if within_float(m["metric"], a, b) else None
        out.append({**row, "verdict": verdict, "_units": pair})
    return out


def _same_units(new: np.ndarray | None, old: np.ndarray | None) -> bool:
    """Equal per-unit values (or none kept): a swap of examples is not ``identical``."""
    return new is None or old is None or (new.shape == old.shape and bool((new == old).all()))


def _judge_noise(rows: list[dict], by_key: dict[str, dict], fresh: Store,
                 pub_all: list[dict], opts: Options) -> None:
    """Class every row still undecided by the noise test, at level alpha / (number of them)."""
    todo = [r for r in rows if r.get("verdict") is None]
    level = opts.alpha / max(len(todo), 1)
    for row in todo:
        noise, why = _noise_for(row, by_key[row["run_key"]], level, pub_all, opts)
        if noise is None:
            row.update(noise=why, verdict="differs")
            continue
        noise, vacuous = noise.clipped(*feasible(row["_unit"], row["metric"],
                                                 float(row["published"])))
        verdict = UNJUDGED if vacuous else \
            "within-noise" if noise.accepts(row["diff"]) else "differs"
        row.update(noise=noise.kind, noise_lo=noise.lo, noise_hi=noise.hi, verdict=verdict)


def _noise_for(row: dict, old: dict, level: float, pub_all: list[dict], opts: Options
               ) -> tuple[Noise | None, str]:
    """A machine-bound cell's seed spread (>= 3 published seeds); else the paired bootstrap
    (the seed spread where the records keep no units); or the reason there is none."""
    from suite.aggregate import machine_bound

    seeds = seed_values(pub_all, old, row["protocol"])
    new_u, old_u = row["_units"]
    if len(seeds) >= 3 and (machine_bound(old) or new_u is None or old_u is None):
        return seed_spread(seeds, level), ""
    if new_u is None or old_u is None:
        return None, "no units"
    if len(new_u) != len(old_u):
        return None, f"units {len(old_u)} -> {len(new_u)}"
    return paired_bootstrap(new_u, old_u, row["metric"], row["published"], level, opts), ""


def agrees(table: pd.DataFrame) -> bool:
    """Whether every row is identical, within-float or within-noise (and there is one)."""
    return len(table) > 0 and bool(table["verdict"].isin(AGREES).all())


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else "–"


def markdown(table: pd.DataFrame, opts: Options = Options()) -> str:
    """The verification table, one line per (cell, protocol)."""
    lines = [f"Float tolerance: perplexity {FLOAT_TOL['ppl']:g} relative, accuracies exact. "
             f"Noise: seed spread (>= 3 seeds) or paired bootstrap over evaluation units, "
             f"family-wise false-alarm rate {opts.alpha:g}.", "",
             "| grid | cell | protocol | published | fresh | diff | noise interval | verdict |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for r in table.itertuples(index=False):
        nums = " | ".join(_num(v) for v in (r.published, r.fresh, r.diff))
        noise = (f"[{_num(r.noise_lo)}, {_num(r.noise_hi)}] {r.noise}"
                 if isinstance(r.noise, str) and r.noise and not math.isnan(r.noise_lo)
                 else (r.noise if isinstance(r.noise, str) else "–"))
        lines.append(f"| {r.grid} | {r.cell} | {r.protocol} | {nums} | {noise} | {r.verdict} |")
    return "\n".join(lines) + "\n"


def explain(table: pd.DataFrame, key: str, fresh: Store, published: Store) -> str:
    """For one cell (run key or its prefix, or the cell label): both values per protocol, the
    noise estimate used, the verdict, and what differs between the two environments."""
    from suite.env import version_differences

    hit = table[table["run_key"].str.startswith(key) | (table["cell"] == key)]
    if hit.empty:
        return f"no cell matches {key!r}\n"
    run_key = hit["run_key"].iloc[0]
    new, old = fresh.get(run_key), published.get(run_key)
    lines = [f"cell {hit['cell'].iloc[0]}  (run key {run_key}, grid {hit['grid'].iloc[0]})"]
    if new is not None and old is not None:
        lines.append(f"  machines: published {machine(old)}; fresh {machine(new)}")
        diffs = version_differences(new.get("env") or {}, old.get("env") or {})
        lines.append("  environment: " + ("; ".join(diffs) if diffs else "identical"))
    for r in hit.itertuples(index=False):
        lines += [f"  {r.protocol}", f"    published {_num(r.published)}  fresh {_num(r.fresh)}"
                  f"  diff {_num(r.diff)}",
                  f"    float tolerance {_num(float(r.float_tol))} relative"
                  if r.metric == "ppl" else "    float tolerance: exact (a count of examples)",
                  f"    noise: {r.noise if isinstance(r.noise, str) else '–'}"
                  + (f" allows diff in [{_num(r.noise_lo)}, {_num(r.noise_hi)}]"
                     if not _nan(r.noise_lo) else ""),
                  f"    verdict: {r.verdict}"]
    return "\n".join(lines) + "\n"


def _nan(v: Any) -> bool:
    return not isinstance(v, float) or math.isnan(v)


def environment_differences(table: pd.DataFrame, fresh: Store, published: Store) -> list[str]:
    """Every version, lock, CPU/GPU or thread count that differs between any fresh record
    and its published record, once each."""
    from suite.env import version_differences

    seen: dict[str, None] = {}
    for key in table["run_key"].dropna().unique():
        new, old = fresh.get(key), published.get(key)
        if new is not None and old is not None:
            for line in version_differences(new.get("env") or {}, old.get("env") or {}):
                seen.setdefault(line, None)
    return list(seen)
