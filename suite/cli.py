"""``qbench`` command line: run, table, leaderboard, compare, parity, verify, export, list,
expand (parsing).

Every user error (bad config, unknown name, missing data package) prints one line
``qbench: error: ...`` and exits with code 2 before anything is written; Ctrl-C prints one
line and exits with 130. Unless ``HF_HUB_OFFLINE`` is set, a run whose assets are all local
(or whose hub is unreachable) runs with the Hugging Face clients offline
(``commands.default_offline``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from suite.errors import QbenchError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qbench", description="Quantization benchmark suite")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("run", "run every pending cell of a grid, then write its tables"),
                        ("table", "aggregate a grid's records into CSV / Markdown / PNG"),
                        ("leaderboard", "write results/leaderboard/<grid>.csv (versioned "
                         "schema) and the tables from the records, running nothing"),
                        ("expand", "print the cells of a grid without running anything")):
        s = sub.add_parser(name, help=help_)
        if name == "leaderboard":
            s.add_argument("config", nargs="?", default="configs/reproduce.yaml",
                           help="grid YAML (default: configs/reproduce.yaml)")
        else:
            s.add_argument("config", help="grid YAML")
        s.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config value (YAML syntax)")
        s.add_argument("--grid", default=None, metavar="NAME",
                       help="only the grid of this name (a config file may hold several)")
        if name != "expand":
            s.add_argument("--out", default="results", help="directory for the tables")
            s.add_argument("--kernels", default=None, metavar="PATH",
                           help="kernel timings for the speedup column (default: "
                           "<out>/kernels-<run.device>.csv; absent = empty column)")
        if name in ("table", "leaderboard"):
            s.add_argument("--by-cell", action="store_true",
                           help="select the records by cell configuration instead of run key, "
                           "preparing no inputs (to render when a data source cannot be "
                           "fetched); a cell with two records is an error")
        if name == "run":
            s.add_argument("--retry-failed", action="store_true",
                           help="also re-run cells whose record is a failure (timeout, "
                           "crashed, oom, ...); ok records are never re-run")
    cmp = sub.add_parser("compare", help="paired differences of a method against baselines")
    cmp.add_argument("new", help="the method (registry id or variant, as in the records)")
    cmp.add_argument("--against", required=True, metavar="A,B",
                     help="comma-separated baseline methods")
    cmp.add_argument("--best", action="store_true",
                     help="one row per cell group, against the baseline with the best mean "
                     "there (e.g. the best point of an LR sweep; chosen on the same "
                     "evaluation, which favours the baseline)")
    cmp.add_argument("--by-cell", action="store_true",
                     help="select the grid's records by cell configuration instead of run key "
                     "(when a data source cannot be fetched; see table --by-cell)")
    cmp.add_argument("--config", default="configs/reproduce.yaml", help="grid YAML")
    cmp.add_argument("--grid", default=None, metavar="NAME", help="only this grid of the file")
    cmp.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config value (YAML syntax)")
    cmp.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    par = sub.add_parser("parity", help="measured against published numbers (paper configs)")
    par.add_argument("configs", nargs="*", metavar="CONFIG",
                     help="grid YAMLs (default: every configs/paper/*.yaml)")
    par.add_argument("--ppl-rel", type=float, default=0.05, metavar="R",
                     help="relative perplexity tolerance (default 0.05)")
    par.add_argument("--acc-abs", type=float, default=1.0, metavar="PT",
                     help="absolute accuracy tolerance in points (default 1.0)")
    par.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    par.add_argument("--strict", action="store_true",
                     help="exit 1 when a run lies outside the tolerance")
    ver = sub.add_parser("verify", help="a fresh run's records against the published records "
                         "of the same cells (run keys)")
    ver.add_argument("config", nargs="?", default="configs/reproduce-quick.yaml",
                     help="grid YAML whose store holds the fresh run (default: "
                     "configs/reproduce-quick.yaml)")
    ver.add_argument("--published", default="results/records", metavar="STORE",
                     help="the published store (default: results/records)")
    ver.add_argument("--alpha", type=float, default=0.05, metavar="A",
                     help="family-wise false-alarm rate of the noise test (default 0.05)")
    ver.add_argument("--explain", default=None, metavar="KEY",
                     help="for one cell (run key, its prefix, or the cell label): both values, "
                     "the noise estimate used, the verdict and the environment differences")
    ver.add_argument("--grid", default=None, metavar="NAME", help="only this grid of the file")
    ver.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config value (YAML syntax)")
    ver.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    exp = sub.add_parser("export", help="write a published cell's quantized model as GGUF or "
                         "compressed-tensors (re-created from its run key, checked against "
                         "its record)")
    exp.add_argument("key", metavar="RUN_KEY", help="a run key, or a unique prefix (>= 6)")
    exp.add_argument("--format", required=True, choices=["gguf", "compressed-tensors"],
                     help="gguf: llama.cpp / transformers; compressed-tensors: transformers "
                     "/ vLLM")
    exp.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    exp.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    exp.add_argument("--store", dest="stores", action="append", default=None, metavar="STORE",
                     help="record store(s) to find the key in (default: results/records, "
                     "results/staging/records and results/export/records)")
    exp.add_argument("--config", dest="configs", action="append", default=None,
                     metavar="YAML", help="grid file(s) holding the cell's grid (default: "
                     "configs/*.yaml)")
    exp.add_argument("--no-check", action="store_true",
                     help="skip re-evaluating the cell's perplexity against its record")
    exp.add_argument("--other-cpu", action="store_true",
                     help="where the record was made on another CPU type and the re-run here "
                     "differs from it (GPTQ's codes depend on the CPU), export this machine's "
                     "re-run; the files and the report say so (check: other-cpu)")
    ls = sub.add_parser("list", help="list registered methods, models, datasets, protocols")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "methods", "models", "datasets", "protocols"])
    return p


def _honour_sigint() -> None:
    """Let ``kill -INT`` stop a runner that a script started in the background.

    A non-interactive shell starts ``cmd &`` with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so the runner would ignore the graceful stop (no new cell, the
    ones in flight finish). The runner restores it; a handler someone set on purpose stays."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and \
            threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qbench`` console script."""
    args = _parser().parse_args(argv)
    from suite import commands

    try:
        if args.cmd == "list":
            return commands.list_(args.what)
        if args.cmd == "export":
            from suite.export.command import export
            from suite.export.rebuild import DEFAULT_STORES

            return export(args.key, args.format, args.out, force=args.force,
                          stores=tuple(args.stores or DEFAULT_STORES), check=not args.no_check,
                          configs=tuple(args.configs) if args.configs else None,
                          other_cpu=args.other_cpu)
        if args.cmd == "parity":
            return commands.parity(args.configs, args.ppl_rel, args.acc_abs, args.csv,
                                   args.strict)
        grids = commands.load(args.config, args.overrides, args.grid)
        if args.cmd != "expand":  # (expand loads no model)
            commands.default_offline(grids)
        if args.cmd == "verify":
            return commands.verify(grids, args.published, args.alpha, args.csv,
                                   args.explain)
        if args.cmd == "compare":
            return commands.compare(grids, args.new, args.against.split(","), args.csv,
                                    best_of=args.best, by_cell=args.by_cell)
        if args.cmd == "run":
            _honour_sigint()
        rc = 0
        for grid in grids:  # every grid is validated before the first runs
            if args.cmd == "expand":
                rc = max(rc, commands.expand(grid))
            elif args.cmd == "run":
                rc = max(rc, commands.run(grid, Path(args.out), args.config, args.kernels,
                                          args.retry_failed, args.overrides))
            else:
                rc = max(rc, commands.table(grid, Path(args.out), args.config, args.kernels,
                                            args.overrides, by_cell=args.by_cell))
        return rc
    except QbenchError as e:
        msg = " ".join(str(e).split())
        print(f"qbench: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (130 = 128 + SIGINT)
        saved = ("; finished cells are saved, the claimed cell is recovered on re-run"
                 if args.cmd == "run" else "")
        print(f"\nqbench: interrupted{saved}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
