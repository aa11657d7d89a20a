"""Rendering: the only place numbers are formatted. Leaderboard -> CSV, Markdown, PNG.

The CSV holds raw floats; the Markdown rounds for reading and marks cells whose format cannot
change the shipped weights; the PNG plots each protocol's metric (perplexity on a log scale,
accuracy on a linear one) against bit width per method and group; the Pareto PNG plots each
model's primary metric against the speedup column (``suite.speed``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from suite.aggregate import n_calib_corpora

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
    acc = row["unit"] == "accuracy"
    f = ".3f" if acc else ".2f"
    text = f"{v:.4g}" if v >= 1e4 else format(v, f)
    if row["n_seeds"] >= 2 and not math.isnan(row["ci95"]):
        text += f" ± {format(row['ci95'], f)}"
    elif not math.isnan(row["lo95"]) and v < 1e4:
        text += f" [{format(row['lo95'], f)}, {format(row['hi95'], f)}]"
    if DEGENERATE in str(row["note"]):
        text += " †"
    if row.get("machine_bound") is True:
        text += " ‡"
    return text


def markdown(board: pd.DataFrame, title: str, caveats: list[str]) -> str:
    """A Markdown leaderboard: one table per (model, protocol); rows never mix protocols. An
    ``abits`` column appears when some row quantizes activations, a ``speedup`` column when
    some quantized row has one, a ``signal`` column when some row publishes a mechanism signal
    (TR scheduling's k/R)."""
    lines = [f"# {title}", ""]
    acts = bool(len(board)) and bool((board["abits"] != 16).any())
    mixed = "machine" in board.columns and board["machine"].nunique() > 1
    speed = "speedup" in board.columns and bool(
        (board["speedup"].notna() & (board["method"] != "fp")).any())
    sig = "signal" in board.columns and bool((board["signal"].fillna("") != "").any())
    calib = "calib" in board.columns and n_calib_corpora(board["calib"]) > 1
    for (model, protocol), g in board.groupby(["model", "protocol"], sort=False):
        lines += [f"## {model} — `{protocol}`", ""]
        lines += [f"| method |{' calib |' if calib else ''} wbits |{' abits |' if acts else ''}"
                  f" group | sym | value | "
                  f"eff. bits | seeds | status |{' speedup |' if speed else ''}"
                  f"{' signal |' if sig else ''}{' machine |' if mixed else ''}",
                  f"|---|{'---|' if calib else ''}---:|{'---:|' if acts else ''}---|---|---:|"
                  f"---:|---:|---|"
                  f"{'---:|' if speed else ''}{'---:|' if sig else ''}{'---|' if mixed else ''}"]
        for _, r in g.iterrows():
            eb = "—" if math.isnan(r["effective_bits"]) else f"{r['effective_bits']:.3f}"
            ab = f" {r['abits'] if r['abits'] != 16 else 'fp'} |" if acts else ""
            cal = f" {r['calib'] or '—'} |" if calib else ""
            lines.append(
                f"| {r['method']} |{cal} {r['wbits']} |{ab} {r['group_size'] or '—'} | "
                f"{'yes' if r['sym'] else 'no'} | {_fmt_value(r)} | {eb} | {r['n_seeds']} | "
                f"{r['status']} |{_fmt_speedup(r) if speed else ''}"
                f"{_fmt_signal(r) if sig else ''}{_fmt_machine(r) if mixed else ''}")
        lines.append("")
    lines += [f"- {c}" for c in caveats]
    return "\n".join(lines) + "\n"


def _fmt_signal(row: pd.Series) -> str:
    """`` k/R 0.98 |`` or `` — |``: the method's mechanism signal."""
    name, v = row.get("signal") or "", row.get("signal_value")
    if not name or v is None or math.isnan(v):
        return " — |"
    return f" {name} {v:.2f} |"


def _fmt_machine(row: pd.Series) -> str:
    """`` AMD EPYC x2 |``: the machine of a row, in tables whose rows come from several."""
    return f" {row['machine']} |"


def _fmt_speedup(row: pd.Series) -> str:
    """`` 0.49× |`` or `` — |``: the Markdown speedup cell."""
    v = row["speedup"]
    return " — |" if v is None or math.isnan(v) else f" {v:.2f}× |"


_LINESTYLES = ("-", "--", ":", "-.")


def plot(board: pd.DataFrame, path: Path, title: str) -> None:
    """Metric vs weight bits, a panel per protocol, a line per (method, group): one colour per
    method and one line style per group across all panels, FP dashed black with its value
    written on it, one legend for the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(board.groupby(["model", "protocol"], sort=False))
    ncols = min(max(len(groups), 1), 3)
    nrows = max(math.ceil(len(groups) / ncols), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.5 * nrows), squeeze=False)
    style = _line_style(board, plt)
    handles: dict[str, object] = {}
    for ax, ((model, protocol), g) in zip(axes.flat, groups, strict=False):
        _plot_panel(ax, g, f"{model}\n{protocol}", style)
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    if handles:  # grouped by method: labels start with the method id
        handles = dict(sorted(handles.items()))
        fig.legend(list(handles.values()), list(handles), loc="center left",
                   bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _line_keys(q: pd.DataFrame) -> list[str]:
    """The columns that tell a board's lines apart: method, group, symmetry (and calibration
    corpus when a grid has several)."""
    several = "calib" in q.columns and n_calib_corpora(q["calib"]) > 1
    return ["method", "group_size", "sym", *(["calib"] if several else [])]


def _line_style(board: pd.DataFrame, plt) -> dict[tuple, dict]:  # noqa: ANN001 - pyplot
    """matplotlib keyword arguments per line key: the colour from the method, the line style
    from the rest of the key (group, symmetry, corpus), the same in every panel."""
    q = board[(board["method"] != "fp") & board["value"].notna()]
    keys = _line_keys(q)
    lines = list(dict.fromkeys(map(tuple, q[keys].astype(object).fillna("")
                                   .itertuples(index=False))))
    methods = list(dict.fromkeys(k[0] for k in lines))
    rests = list(dict.fromkeys(k[1:] for k in lines))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {k: {"color": cmap(methods.index(k[0]) % cmap.N),
                "ls": _LINESTYLES[rests.index(k[1:]) % len(_LINESTYLES)]} for k in lines}


def _plot_panel(ax, g: pd.DataFrame, title: str, style: dict[tuple, dict]  # noqa: ANN001
                ) -> None:
    """One (model, protocol) panel of :func:`plot`."""
    fp = g[g["method"] == "fp"]
    for _, r in fp.iterrows():
        ax.axhline(r["value"], ls="--", color="k", lw=1)
        ax.annotate(f"fp {r['value']:.2f}", (0.01, r["value"]), xycoords=("axes fraction", "data"),
                    fontsize=8, va="bottom")
    q = g[(g["method"] != "fp") & g["value"].notna()]
    keys = _line_keys(q)
    q = q.assign(**{k: q[k].astype(object).fillna("") for k in keys})
    for key, s in q.groupby(keys, sort=False):
        method, gs, sym = key[:3]
        calib = key[3] if len(key) > 3 else ""
        s = s.sort_values("wbits")
        acts = " A=W" if (s["abits"] != 16).any() else ""
        label = f"{method} g={gs}{' sym' if sym else ''}{acts}{f' calib={calib}' if calib else ''}"
        ax.plot(s["wbits"], s["value"], marker="o", label=label, **style.get(tuple(key), {}))
    acc = bool(len(g)) and g["unit"].iloc[0] == "accuracy"
    if not acc:
        ax.set_yscale("log")
    if len(q):
        ax.set_xticks(sorted(q["wbits"].unique()))
    ax.set_xlabel("weight bits")
    ax.set_ylabel("accuracy (higher is better)" if acc
                  else "perplexity (lower is better, log scale)")
    ax.set_title(title, fontsize=9)
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)


def plot_pareto(board: pd.DataFrame, path: Path, title: str) -> bool:
    """The Pareto view: each model's primary metric (its first protocol, perplexity for an LLM
    grid) against the speedup over fp32, a marker per method, each format labelled once, the
    frontier dashed. Only rows with a speedup; returns False (and writes nothing) unless some
    quantized row has one."""
    from suite.speed import pareto_front

    if "speedup" not in board.columns:
        return False
    ok = board[board["speedup"].notna() & board["value"].notna() & (board["status"] == "ok")]
    primary = ok.groupby("model", sort=False)["protocol"].first()
    panels = [(m, ok[(ok["model"] == m) & (ok["protocol"] == p)]) for m, p in primary.items()]
    panels = [(m, g) for m, g in panels if (g["method"] != "fp").any()]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5.5), squeeze=False)
    for ax, (model, g) in zip(axes.flat, panels, strict=True):
        _pareto_panel(ax, g, pareto_front(list(g["speedup"]), list(g["value"]),
                                          bool(g["higher_is_better"].iloc[0])))
        ax.set_title(f"{model}\n{g['protocol'].iloc[0]}", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pareto_panel(ax, g: pd.DataFrame, front: list[bool]) -> None:  # noqa: ANN001 - Axes
    markers = "osD^vP*Xh<>"
    for i, (method, s) in enumerate(g.groupby("method", sort=False)):
        ax.scatter(s["speedup"], s["value"], marker=markers[i % len(markers)],
                   color=f"C{i % 10}", s=45, label=method, zorder=3)
    best_first = g.sort_values("value", ascending=not bool(g["higher_is_better"].iloc[0]))
    for _, r in best_first.drop_duplicates(["wbits", "group_size", "sym"]).iterrows():
        ax.annotate(_format_tag(r), (r["speedup"], r["value"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=7)
    f = g[front].sort_values("speedup")
    ax.plot(f["speedup"], f["value"], ls="--", color="k", lw=1, marker="o", ms=13,
            mfc="none", label="Pareto frontier", zorder=2)
    acc = g["unit"].iloc[0] == "accuracy"
    if not acc:
        ax.set_yscale("log")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    device = g["speed_device"].iloc[0]
    ax.set_xlabel(f"speedup over fp32 (M = 1 GEMV, {device}; log scale; right is faster)")
    ax.set_ylabel("accuracy (higher is better)" if acc
                  else "perplexity (lower is better, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _format_tag(r: pd.Series) -> str:
    """``fp``, ``w4 g64``, ``w3 pc``, ``w8 pc sym``: one label per format on the Pareto plot."""
    if r["method"] == "fp" or r["wbits"] >= 16:
        return "fp"
    gs = {"per-channel": "pc", "per-tensor": "pt"}.get(str(r["group_size"]),
                                                       f"g{r['group_size']}")
    return f"w{r['wbits']} {gs}{' sym' if r['sym'] else ''}"


def plot_trajectories(records: list[dict], path: Path, title: str) -> bool:
    """TR scheduling's transition rates and TALR over training: for each TR record of seed 0,
    the measured k (faint), its windowed mean (T/50 steps), the running average K and the
    target R (top), and U (bottom), a
    colour per (method, bits). Returns False (and writes nothing) if no record has them."""
    traces = _tr_traces(records)
    if not traces:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for i, (label, steps, h) in enumerate(traces):
        color = f"C{i % 10}"
        x = [j * (steps - 1) / max(1, len(h["K"]) - 1) for j in range(len(h["K"]))]
        top.plot(x, h["k"], color=color, alpha=0.2, lw=0.6)
        if "k_window" in h:  # records before TR version 3 have no windowed rate
            top.plot(x, h["k_window"], color=color, lw=1.5, label=f"{label}: windowed k")
        top.plot(x, h["K"], color=color, lw=0.9, ls=":")
        top.plot(x, h["R"], color=color, lw=1.2, ls="--")
        bottom.plot(x, h["U"], color=color, lw=1.5, label=label)
    top.set_ylabel("transition rate (k faint, windowed k solid,\nK dotted, target R dashed)")
    top.set_yscale("symlog", linthresh=1e-4)
    bottom.set_ylabel("TALR U (latent-weight step)")
    bottom.set_xlabel("training step")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _tr_traces(records: list[dict]) -> list[tuple[str, int, dict]]:
    """(label, steps, global history) of every seed-0 record whose stats hold a TR history."""
    out = []
    for rec in records:
        if rec.get("status") != "ok" or rec["cell"]["seed"] != 0:
            continue
        for name, st in (rec.get("stats") or {}).items():
            hist = (st or {}).get("tr_history", {}).get("global") if isinstance(st, dict) else None
            if hist:
                bits = (rec["cell"].get("format") or {}).get("bits")
                out.append((f"{name} W{bits}A{rec.get('abits') or 'fp'}",
                            int(st.get("train_steps") or len(hist["K"])), hist))
    return sorted(out, key=lambda t: t[0])


def results_readme(meta_files: list[Path]) -> str:
    """results/README.md: for each published table its grid, protocols, hardware and command."""
    lines = ["# Published results", "",
             "Generated by `qbench run` / `qbench table` from the records; do not edit by hand.",
             "",
             "Check them independently: `nox -s reproduce` reruns the quick tier (a subset of "
             "the published cells) from nothing into `results/quick/` and `qbench verify` "
             "classes every fresh value against the record of the same run key in `records/` "
             "(identical, within float tolerance, within measured noise, or differs; the "
             "verdicts land in `reproduce-verify.csv`). `nox -s reproduce -- full` "
             "regenerates every published cell (resumable). Values marked ‡ depend on the "
             "machine's float rounding.", ""]
    for path in meta_files:
        m = json.loads(path.read_text())
        name = m["grid"]
        extra = "".join(f", `{f}`" for f in m.get("extra_files", []))
        lines += [f"## {name}", "", m.get("description") or "", "",
                  f"- Files: `{name}.csv` (tidy, raw floats), `{name}.md`, `{name}.png`{extra}",
                  f"- Grid: `{m['config']}`; regenerate: `{m['command']}`",
                  f"- Protocols: {', '.join(f'`{p}`' for p in m['protocols'])}",
                  f"- Rows: {m['rows']} from {m['records']} records"]
        if m.get("leaderboard"):
            lb = m["leaderboard"]
            lines.append(f"- Leaderboard: `{lb['csv']}`, schema version {lb['schema_version']} "
                         "(`leaderboard/SCHEMA.md`)")
        if m.get("speed"):
            lines.append(f"- Speedup (`speedup`, `speed_*` columns): the format's model-level "
                         f"weight-only GEMV (M = 1) speedup over fp32 on {m['speed']['device']}"
                         f" from `{m['speed']['kernels']}`; empty where not timed (caveats in "
                         f"`{name}.md`)")
        for e in m["environments"]:
            dirty = " (dirty tree)" if e.get("git_dirty") else ""
            lines.append(f"- Hardware / software: {e['device']} ({e['cores']} cores), torch "
                         f"{e['torch']}, transformers {e['transformers']}, qbench "
                         f"{(e.get('git_sha') or 'unknown')[:10]}{dirty}")
        lines.append("")
    return "\n".join(lines)
