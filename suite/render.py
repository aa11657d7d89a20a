"""Rendering: the only place numbers are formatted. Leaderboard -> CSV, Markdown, PNG.

The CSV holds raw floats; the Markdown rounds for reading and marks cells whose format cannot
change the shipped weights; the PNG plots perplexity against bit width per method and group.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

DEGENERATE = "format-reproduces-source-grid"


def write_csv(board: pd.DataFrame, path: Path) -> None:
    """Tidy leaderboard CSV with raw floats, written atomically."""
    tmp = path.with_suffix(".csv.tmp")
    board.to_csv(tmp, index=False, float_format="%.10g")
    tmp.replace(path)


def _fmt_value(row: pd.Series) -> str:
    v = row["value"]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    text = f"{v:.4g}" if v >= 1e4 else f"{v:.2f}"
    if row["n_seeds"] >= 2 and not math.isnan(row["ci95"]):
        text += f" ± {row['ci95']:.2f}"
    elif not math.isnan(row["window_lo95"]) and v < 1e4:
        text += f" [{row['window_lo95']:.2f}, {row['window_hi95']:.2f}]"
    if DEGENERATE in str(row["note"]):
        text += " †"
    return text


def markdown(board: pd.DataFrame, title: str, caveats: list[str]) -> str:
    """A Markdown leaderboard: one table per (model, protocol); rows never mix protocols."""
    lines = [f"# {title}", ""]
    for (model, protocol), g in board.groupby(["model", "protocol"], sort=False):
        lines += [f"## {model} — `{protocol}`", ""]
        lines += ["| method | wbits | group | sym | value | eff. bits | seeds | status |",
                  "|---|---:|---|---|---:|---:|---:|---|"]
        for _, r in g.iterrows():
            eb = "—" if math.isnan(r["effective_bits"]) else f"{r['effective_bits']:.3f}"
            lines.append(
                f"| {r['method']} | {r['wbits']} | {r['group_size'] or '—'} | "
                f"{'yes' if r['sym'] else 'no'} | {_fmt_value(r)} | {eb} | {r['n_seeds']} | "
                f"{r['status']} |")
        lines.append("")
    lines += [f"- {c}" for c in caveats]
    return "\n".join(lines) + "\n"


def plot(board: pd.DataFrame, path: Path, title: str) -> None:
    """Perplexity vs weight bits, one line per (method, group size), FP as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(board.groupby(["model", "protocol"], sort=False))
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(7 * max(len(groups), 1), 4.5),
                             squeeze=False)
    for ax, ((model, protocol), g) in zip(axes[0], groups, strict=False):
        _plot_panel(ax, g, f"{model}\n{protocol}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_panel(ax, g: pd.DataFrame, title: str) -> None:  # noqa: ANN001 - matplotlib Axes
    fp = g[g["method"] == "fp"]
    for _, r in fp.iterrows():
        ax.axhline(r["value"], ls="--", color="k", lw=1, label=f"fp ({r['value']:.2f})")
    q = g[(g["method"] != "fp") & g["value"].notna()]
    for (method, gs, sym), s in q.groupby(["method", "group_size", "sym"], sort=False):
        s = s.sort_values("wbits")
        label = f"{method} g={gs}{' sym' if sym else ''}"
        ax.plot(s["wbits"], s["value"], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("perplexity (lower is better, log scale)")
    ax.set_title(title, fontsize=9)
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
