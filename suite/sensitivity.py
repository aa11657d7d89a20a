"""Calibration sensitivity (issue 28): how much a calibrated method's metric depends on the text
it calibrates on, next to the data-free methods that read none.

From a leaderboard whose calibrated rows span several calibration corpora (``axes.calib``):
one row per (model, protocol, format, method) with the metric under each corpus, the spread
across corpora (perplexity: worst / best, a ratio; accuracy: best - worst, in points) and which
corpus matches the protocol's evaluation domain (``suite.data.MATCHED``). A calibrated
method run under one corpus only has no spread (NaN, "—"), not a spread of 1. A data-free
method (RTN, statistical pre-calibration) has one value by construction: its row holds it
under ``data-free`` and is the reference line of the plot.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from suite.aggregate import n_calib_corpora
from suite.data import matched_calib

FORMAT = ["wbits", "abits", "group_size", "sym"]
DATA_FREE = "data-free"


def applies(board: pd.DataFrame) -> bool:
    """Whether the board's calibrated rows span more than one corpus."""
    return "calib" in board.columns and n_calib_corpora(board["calib"]) > 1


def table(board: pd.DataFrame) -> pd.DataFrame:
    """The sensitivity table (module docstring); FP rows are left out."""
    b = board[(board["method"] != "fp") & board["value"].notna()].copy()
    b["calib"] = b["calib"].astype(object).fillna("").replace("", DATA_FREE)
    corpora = sorted(set(b["calib"]) - {DATA_FREE})
    rows = []
    for key, g in b.groupby(["model", "protocol", *FORMAT, "method"], sort=False):
        values = dict(zip(g["calib"], g["value"], strict=True))
        higher = bool(g["higher_is_better"].iloc[0])
        rows.append({**dict(zip(["model", "protocol", *FORMAT, "method"], key, strict=True)),
                     **{c: values.get(c, math.nan) for c in [DATA_FREE, *corpora]},
                     "matched": matched_calib(key[1]) or "",
                     "spread": _spread(list(values.values()), higher)
                     if len(values) > 1 or DATA_FREE in values else math.nan,
                     "spread_unit": "points" if higher else "ratio"})
    return pd.DataFrame(rows)


def _spread(values: list[float], higher_is_better: bool) -> float:
    """Accuracy: best - worst in points; perplexity: worst / best (1 = no dependence)."""
    if higher_is_better:
        return 100.0 * (max(values) - min(values))
    return max(values) / min(values)


def markdown(sens: pd.DataFrame) -> str:
    """The sensitivity table for reading: one table per (model, protocol)."""
    corpora = [c for c in sens.columns if c not in
               {"model", "protocol", *FORMAT, "method", "matched", "spread", "spread_unit"}]
    lines = ["## Calibration sensitivity", "",
             "The metric under each calibration corpus (**bold**: the corpus matching the "
             "evaluation domain); spread = worst / best perplexity across corpora (accuracy: "
             "best - worst, points). Data-free methods read no calibration text.", ""]
    for (model, protocol), g in sens.groupby(["model", "protocol"], sort=False):
        matched = g["matched"].iloc[0]
        head = [f"**{c}**" if c == matched else c for c in corpora]
        lines += [f"### {model} — `{protocol}`", "",
                  f"| method | format | {' | '.join(head)} | spread |",
                  f"|---|---|{'---:|' * len(corpora)}---:|"]
        for _, r in g.iterrows():
            cells = " | ".join("—" if math.isnan(r[c]) else f"{r[c]:.2f}" for c in corpora)
            unit = "x" if r["spread_unit"] == "ratio" else " pts"
            spread = "—" if math.isnan(r["spread"]) else f"{r['spread']:.3f}{unit}"
            lines.append(f"| {r['method']} | {_format(r)} | {cells} | {spread} |")
        lines.append("")
    return "\n".join(lines)


def _format(r: pd.Series) -> str:
    gs = r["group_size"] or "per-channel"
    return f"W{r['wbits']} {gs if str(gs).startswith('per') else 'g' + str(gs)}"


def plot(sens: pd.DataFrame, path: Path, title: str) -> None:
    """A panel per (model, protocol, format): the metric against the calibration corpus, a line
    per calibrated method, data-free methods as dashed reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = [c for c in sens.columns if c not in
               {"model", "protocol", *FORMAT, "method", "matched", "spread", "spread_unit",
                DATA_FREE}]
    groups = list(sens.groupby(["model", "protocol", *FORMAT], sort=False))
    ncols = min(max(len(groups), 1), 4)
    nrows = max(math.ceil(len(groups) / ncols), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for ax, (key, g) in zip(axes.flat, groups, strict=False):
        _panel(ax, g, corpora, f"{key[0]}\n{key[1]}\n{_format(g.iloc[0])}")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panel(ax, g: pd.DataFrame, corpora: list[str], title: str) -> None:  # noqa: ANN001
    x = list(range(len(corpora)))
    for _, r in g.iterrows():
        if not math.isnan(r[DATA_FREE]):
            ax.axhline(r[DATA_FREE], ls="--", lw=1, color="0.4")
            ax.annotate(r["method"], (x[-1], r[DATA_FREE]), fontsize=7, va="bottom", ha="right")
        else:
            ax.plot(x, [r[c] for c in corpora], marker="o", label=r["method"])
    if g["spread_unit"].iloc[0] == "ratio":
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (lower is better, log)")
    ax.set_xticks(x, corpora, rotation=20, fontsize=8)
    for tick, c in zip(ax.get_xticklabels(), corpora, strict=True):
        tick.set_fontweight("bold" if c == g["matched"].iloc[0] else "normal")
    ax.set_xlabel("calibration corpus (bold: matches the evaluation domain)", fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
