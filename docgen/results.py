"""Markdown from the published leaderboards (``results/<grid>.csv``), never edited by hand.

Rows are always picked by what they are (model, method, format, protocol), never by position,
so a regenerated CSV with more seeds or new method variants renders without a code change.
Numbers are formatted by ``suite.render`` where a full leaderboard is shown, and by
:func:`short_value` in the compact tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from docgen import RESULTS

_TEXT = ("model", "method", "group_size", "protocol", "metric", "unit", "status", "note",
         "machine", "signal", "speed_backend", "speed_device", "speed_backend_cuda")
# The order of the headline rows; methods not named here follow in the order of the CSV.
METHOD_ORDER = ("fp", "rtn", "awq", "gptq", "precalibration", "precalibration+gptq",
                "decoupleq", "lsq", "tr_scheduling")
# The LLM headline's formats: (weight bits, group size as written in the CSV); a grid shows
# those it has.
LLM_FORMATS = ((4, "64"), (4, "per-channel"), (3, "64"), (3, "per-channel"), (2, "64"))
VISION_BITS = (4, 3, 2)


def load_board(path: Path) -> pd.DataFrame:
    """A leaderboard CSV with its text columns as plain strings ('' where empty)."""
    board = pd.read_csv(path, dtype={c: str for c in _TEXT})
    for col in _TEXT:
        if col in board.columns:
            board[col] = board[col].fillna("").astype(object)
    return board


@dataclass(frozen=True)
class Grid:
    """One published grid: its name, CSV, and the meta written beside it by ``qbench table``."""

    name: str
    csv: Path
    meta: dict

    @property
    def board(self) -> pd.DataFrame:
        """The grid's leaderboard rows."""
        return load_board(self.csv)

    @property
    def primary(self) -> str | None:
        """The protocol the grid declares first (tables written before it was recorded: none)."""
        return self.meta.get("primary_protocol")

    @property
    def vision(self) -> bool:
        """Whether the grid's metric is image top-1 (the vision track)."""
        return bool((self.board["metric"] == "top1").any())

    @property
    def figures(self) -> list[str]:
        """File names of the grid's plots in results/, in the order ``qbench table`` wrote
        them (the metric plot first)."""
        names = [f"{self.name}.png", *self.meta.get("extra_files", [])]
        return [n for n in names if n.endswith(".png") and (self.csv.parent / n).is_file()]


def published_grids(results: Path = RESULTS) -> list[Grid]:
    """Every grid whose CSV and ``.meta.json`` are in ``results`` (the LLM grid first)."""
    grids = []
    for meta_path in sorted(results.glob("*.meta.json")):
        name = meta_path.name.removesuffix(".meta.json")
        csv = results / f"{name}.csv"
        if csv.is_file():
            grids.append(Grid(name, csv, json.loads(meta_path.read_text())))
    return sorted(grids, key=lambda g: (g.vision, g.name))


def format_label(row: pd.Series) -> str:
    """``W4 g64``, ``W3 per-channel``, ``W2A2 per-tensor sym``, ``FP``: one cell's format."""
    if row["method"] == "fp":
        return "FP"
    acts = f"A{row['abits']}" if row["abits"] != 16 else ""
    group = row["group_size"]
    group = f"g{group}" if group.isdigit() else group
    return f"W{row['wbits']}{acts} {group}{' sym' if row['sym'] else ''}".strip()


def short_value(row: pd.Series, percent: bool = False) -> str:
    """A compact value: ``26.57``, ``4.3e+04``, ``89.4 ± 0.4`` (seeds), with ‡ when the value
    depends on the machine's float rounding."""
    v = row["value"]
    if v is None or math.isnan(v):
        return "—"
    scale = 100.0 if percent else 1.0
    digits = 1 if percent else (3 if row["unit"] == "accuracy" else 2)
    text = _sci(v) if v >= 1e4 else f"{v * scale:.{digits}f}"
    if row["n_seeds"] >= 2 and not math.isnan(row["ci95"]):
        text += f" ± {row['ci95'] * scale:.{digits}f}"
    return text


def _sci(v: float) -> str:
    """``5.1e5``: a diverged perplexity, two significant digits."""
    mantissa, exp = f"{v:.1e}".split("e")
    return f"{mantissa}e{int(exp)}"


PRIMARY_METRICS = ("ppl", "top1", "acc")  # the metric a model's headline is given in


def primary_protocol(board: pd.DataFrame, model: str, declared: str | None = None) -> str:
    """A model's headline protocol: the one its grid declares first (``declared``, from the
    table's meta) when the model has it; else its perplexity (LLM) or top-1 (vision) protocol,
    the first in sorted order if there are several. Chosen by identity, not by row order."""
    rows = board[board["model"] == model]
    if declared in set(rows["protocol"]):
        return str(declared)
    rank = {m: i for i, m in enumerate(PRIMARY_METRICS)}
    pairs = sorted(set(zip(rows["metric"], rows["protocol"], strict=True)),
                   key=lambda mp: (rank.get(mp[0], len(rank)), mp[1]))
    return str(pairs[0][1])


def main_model(board: pd.DataFrame) -> str:
    """The model a headline shows (the first in sorted order, for a grid of several)."""
    return str(sorted(set(board["model"]))[0])


def _method_rank(methods: list[str]) -> list[str]:
    """Methods in headline order: by their base method (``lsq`` for ``lsq:adam``) as in
    ``METHOD_ORDER``, unknown ones last; variants after their base, as the CSV orders them."""
    def key(m: str) -> tuple[int, int]:
        base = m.split(":")[0]
        rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return rank, methods.index(m)

    return sorted(methods, key=key)


def ppl_protocols(board: pd.DataFrame, model: str, declared: str | None = None) -> list[str]:
    """A model's perplexity protocols, the primary one first (one headline table each)."""
    rows = board[(board["model"] == model) & (board["metric"] == "ppl")]
    first = primary_protocol(board, model, declared)
    return [first] + sorted(set(rows["protocol"]) - {first})


def headline_llm(grid: Grid) -> str:
    """The LLM headline: perplexity of each method at the main formats, with effective bits;
    one table per perplexity protocol of the grid (evaluation domain)."""
    board = grid.board
    model = main_model(board)
    return "\n\n".join(_llm_table(grid, board[board["model"] == model], model, protocol)
                       for protocol in ppl_protocols(board, model, grid.primary))


def _llm_table(grid: Grid, board: pd.DataFrame, model: str, protocol: str) -> str:
    """One perplexity table of the LLM headline (methods x formats) with its caption."""
    rows = board[board["protocol"] == protocol]
    fp = rows[rows["method"] == "fp"]
    cols = [f for f in LLM_FORMATS
            if ((rows["wbits"] == f[0]) & (rows["group_size"] == f[1])).any()]
    head = " | ".join(f"W{b} {'g' + g if g.isdigit() else g}" for b, g in cols)
    lines = [f"| method | {head} |", "|---|" + "---:|" * len(cols)]
    for method in _method_rank(list(dict.fromkeys(rows["method"]))):
        if method == "fp":
            continue
        cells = []
        for bits, group in cols:
            hit = rows[(rows["method"] == method) & (rows["wbits"] == bits)
                       & (rows["group_size"] == group)]
            cells.append("—" if hit.empty else
                         f"{short_value(hit.iloc[0])} ({hit.iloc[0]['effective_bits']:.2f} b)")
        if any(c != "—" for c in cells):
            lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    fp_text = "" if fp.empty else (
        f"FP: {short_value(fp.iloc[0])} [{fp.iloc[0]['lo95']:.2f}, {fp.iloc[0]['hi95']:.2f}]. ")
    caption = (f"Perplexity of `{model}`, `{protocol}` (lower is better; effective bits per "
               f"weight in brackets, scales and zeros included; ± is the 95% t-interval over "
               f"seeds where a cell has several). {fp_text}Source: `results/{grid.csv.name}`.")
    return caption + "\n\n" + "\n".join(lines)


def headline_vision(grid: Grid) -> str:
    """The vision headline: top-1 % of every method per bit width, mean ± 95% over seeds."""
    board = grid.board
    model = main_model(board)
    protocol = primary_protocol(board, model, grid.primary)
    rows = board[(board["model"] == model) & (board["protocol"] == protocol)]
    lines = ["| method | format | " + " | ".join(f"W{b}" for b in VISION_BITS) + " | seeds |",
             "|---|---|" + "---:|" * (len(VISION_BITS) + 1)]
    fp = rows[rows["method"] == "fp"]
    for method in _method_rank(list(dict.fromkeys(rows["method"]))):
        if method == "fp":
            continue
        mine = rows[rows["method"] == method]
        first = mine.iloc[0]
        kind = "weight-only" if first["abits"] == 16 else "weights and inputs (W=A)"
        group = first["group_size"] or "—"
        sym = "sym" if first["sym"] else "asym"
        cells = []
        for bits in VISION_BITS:
            hit = mine[mine["wbits"] == bits]
            cells.append("—" if hit.empty else short_value(hit.iloc[0], percent=True))
        seeds = "/".join(str(n) for n in sorted(set(mine["n_seeds"])))
        lines.append(f"| `{method}` | {kind}, {group} {sym} | " + " | ".join(cells)
                     + f" | {seeds} |")
    fp_text = "" if fp.empty else f"FP: {short_value(fp.iloc[0], percent=True)}. "
    caption = (f"Top-1 (%) of `{model}`, `{protocol}` (higher is "
               f"better; ± is the 95% t-interval over seeds). {fp_text}"
               f"Source: `results/{grid.csv.name}`.")
    return caption + "\n\n" + "\n".join(lines)


# The grids the front page shows; the others (`reproduce`, whose BIG-bench accuracy can no longer
# be recomputed, and ablations such as precalibration-variants) have their leaderboard pages.
FRONT_GRIDS = ("llm-ppl-smollm2", "reproduce-vision", "reproduce-vision-mbv2")


def headline(results: Path = RESULTS) -> str:
    """The front page's headline block: the LLM table, the vision table, the leaderboard plot."""
    grids = [g for g in published_grids(results) if g.name in FRONT_GRIDS]
    parts = []
    for grid in grids:
        parts.append(headline_vision(grid) if grid.vision else headline_llm(grid))
    llm = [g for g in grids if not g.vision]
    if llm and llm[0].figures:
        fig = llm[0].figures[-1]  # the Pareto plot when there is one
        parts.append(f"![{fig}](results/{fig})")
    return "\n\n".join(parts)


def _caveats(grid: Grid) -> list[str]:
    """The caveat bullets ``qbench table`` wrote under the tables of ``results/<grid>.md``."""
    md = grid.csv.with_suffix(".md")
    if not md.is_file():
        return []
    lines = md.read_text().splitlines()
    tail: list[str] = []
    for line in reversed(lines):
        if line.startswith("|"):
            break
        tail.append(line)
    return [ln[2:] for ln in reversed(tail) if ln.startswith("- ")]


def leaderboard_page(grid: Grid, image_prefix: str = "../results/") -> str:
    """A whole leaderboard page: description, source, every table, caveats and plots."""
    from suite import render

    board = grid.board
    tables = render.markdown(board, "x", [])
    tables = tables.split("\n", 2)[2].replace("\n## ", "\n### ")  # drop the title, demote
    tables = tables.replace("## ", "### ", 1) if tables.startswith("## ") else tables
    meta = grid.meta
    lines = ["---", "hide:", "  - toc", "---", "", f"# Leaderboard: {grid.name}", "",
             "Generated at build time from `results/" + grid.csv.name + "` (written by "
             "`qbench table` from the records); never edited by hand.", "",
             str(meta.get("description", "")), "",
             f"- Grid: `{meta.get('config', '')}`; regenerate: `{meta.get('command', '')}`",
             f"- Rows: {len(board)} from {meta.get('records', '?')} records; versioned CSV: "
             f"`results/{meta.get('leaderboard', {}).get('csv', '')}` (schema "
             f"{meta.get('leaderboard', {}).get('schema_version', '?')}, see "
             "[the schema](../reference/leaderboard-schema.md))", ""]
    # each plot links to its full-size file (the multi-panel metric plot is wide)
    lines += [f"[![{fig}]({image_prefix}{fig})]({image_prefix}{fig})" for fig in grid.figures]
    lines += ["", '<div class="qbench-board" markdown>', "", tables.rstrip(), "", "</div>", "",
              "## Caveats", ""]
    lines += [f"- {c}" for c in _caveats(grid)]
    return "\n".join(lines) + "\n"


def method_rows(method: str, results: Path = RESULTS) -> str:
    """Every published row of ``method`` (its variants ``method:x`` and chains through it
    included) on each grid's primary protocol: format, value with its interval, effective
    bits, signal. Empty string when no grid has the method."""
    out = []
    for grid in published_grids(results):
        board = grid.board
        chains = board["method"].str.split("+")
        ids = chains.map(lambda c: any(m == method or m.startswith(method + ":") for m in c))
        for model in dict.fromkeys(board.loc[ids, "model"]):
            protocol = primary_protocol(board, model, grid.primary)
            rows = board[ids & (board["model"] == model) & (board["protocol"] == protocol)]
            if rows.empty:
                continue
            vision = grid.vision
            out += [f"`{grid.name}`, `{model}`, `{protocol}` "
                    f"({'top-1 %' if vision else 'lower is better'}; "
                    f"[full leaderboard](../leaderboards/{grid.name}.md)):", "",
                    "| method | format | value | eff. bits | seeds | signal |",
                    "|---|---|---:|---:|---:|---:|"]
            for _, r in rows.iterrows():
                value = short_value(r, percent=vision)
                if r["n_seeds"] < 2 and not math.isnan(r["lo95"]) and r["value"] < 1e4:
                    s = 100.0 if vision else 1.0
                    d = 1 if vision else 2
                    value += f" [{r['lo95'] * s:.{d}f}, {r['hi95'] * s:.{d}f}]"
                value += " ‡" if r["machine_bound"] else ""
                sig = "—" if not r["signal"] or math.isnan(r["signal_value"]) else (
                    f"{r['signal']} {r['signal_value']:.2f}")
                out.append(f"| `{r['method']}` | {format_label(r)} | {value} | "
                           f"{r['effective_bits']:.2f} | {r['n_seeds']} | {sig} |")
            out.append("")
    if out:
        out.append("‡: the value depends on the machine's float rounding "
                   "([determinism](../concepts.md#determinism-and-cross-machine-verification)).")
    return "\n".join(out)


def csv_table(path: Path, columns: list[str]) -> str:
    """A plain Markdown table of some columns of a results CSV (kernel and executor tables)."""
    frame = pd.read_csv(path)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, r in frame.iterrows():
        cells = []
        for c in columns:
            v = r[c]
            cells.append("" if isinstance(v, float) and math.isnan(v) else
                         f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
