"""``qbench export KEY --format gguf|compressed-tensors --out DIR``.

Every input is checked before any model is loaded (the key, the record's status, the output
folder, the cell's format against the target); the cell is then re-created
(``suite.export.rebuild``), its layer states are checked against the target's types once
more, and the files are written into a temporary folder beside ``DIR`` that replaces ``DIR``
only when complete: a refusal or a crash leaves nothing behind.

Provenance goes into the files themselves (GGUF metadata keys ``qbench.*``; safetensors
metadata and ``config.json``'s ``qbench`` object) and into ``DIR/qbench-export.json``, which also
says how the state was obtained and how the re-run compared with the record.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from suite.errors import ConfigError, ExportRefused
from suite.export import rebuild as rb
from suite.primitives import WeightFormat

FORMATS = ("gguf", "compressed-tensors")
PROVENANCE_FILE = "qbench-export.json"


def export(key: str, fmt: str, out: str, *, force: bool = False,
           stores: tuple[str, ...] = rb.DEFAULT_STORES, check: bool = True,
           configs: tuple[str, ...] | None = None, other_cpu: bool = False) -> int:
    """Export the cell of run key ``key``; returns the exit code (0). ``other_cpu``: accept a
    re-run that differs from a record made on another CPU type (``rebuild.verify``)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: got {fmt!r}; accepted: {', '.join(FORMATS)}")
    out_dir = Path(out)
    _check_out(out_dir, force)
    record = rb.locate(key, stores)
    precheck(record, fmt)
    print(f"qbench: export {record['run_key']}: re-creating the cell (records hold no "
          "weights: from its kept or cached state, else by re-running it)", file=sys.stderr)
    built = rb.rebuild(record, configs=configs)
    _writer(fmt).check_exportable(built.qstate)  # (before the minute the check takes)
    if check:
        rb.verify(built, other_cpu)
    meta = provenance(built)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-") as tmp:
        summary = _write(fmt, built, Path(tmp) / "out", meta)
        if "path" in summary:  # where it will be, not the temporary folder
            summary["path"] = str(out_dir / Path(summary["path"]).relative_to(Path(tmp) / "out"))
        report = {**meta, "how": built.how, "check": built.check, "summary": summary}
        (Path(tmp) / "out" / PROVENANCE_FILE).write_text(json.dumps(report, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        (Path(tmp) / "out").replace(out_dir)
    _print_done(out_dir, built, summary)
    return 0


def _check_out(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out: {out_dir} is a file; accepted: a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"--out: {out_dir} exists and is not empty; accepted: a new or empty "
                          "folder, or --force to replace it")
    if not out_dir.parent.is_dir():
        raise ConfigError(f"--out: the parent folder {out_dir.parent} does not exist")


# formats each target represents exactly, judged from the record before any model is loaded
_GGUF_BITS = {4: "Q4_0 / Q4_1", 5: "Q5_0 / Q5_1", 8: "Q8_0 (symmetric only)"}


def precheck(record: dict[str, Any], fmt: str) -> None:
    """Refuse, from the record alone, a cell format that ``fmt`` cannot carry."""
    spec = record["cell"]["format"]
    if spec is None:
        if fmt == "compressed-tensors":
            raise ExportRefused("compressed-tensors: the fp cell has no quantized layer; its "
                                f"model is the source folder {record['model']['location']}")
        return
    wf = WeightFormat(**spec)
    if fmt == "gguf":
        ok = wf.bits in (4, 5) or (wf.bits == 8 and wf.sym)
        grouped = wf.group_size <= 0 or wf.group_size % 32 == 0
        if not (ok and grouped):
            raise ExportRefused(
                f"gguf: {record['run_key']} is {wf.label()}; GGUF holds exactly 4-bit (Q4_0 "
                "symmetric, Q4_1 asymmetric), 5-bit (Q5_0/Q5_1) and symmetric 8-bit (Q8_0) "
                "with groups a multiple of 32, per-channel or per-tensor; export a cell of "
                "one of those, or use --format compressed-tensors")


def _writer(fmt: str) -> Any:
    if fmt == "gguf":
        from suite.export import to_gguf

        return to_gguf
    from suite.export import to_ctensors

    return to_ctensors


def provenance(built: rb.Rebuilt) -> dict[str, str | int | float]:
    """What the exported files say about where they come from."""
    from suite import __version__
    from suite.env import capture

    rec = built.record
    cell = rec["cell"]
    spec = cell["format"]
    meta: dict[str, str | int | float] = {
        "qbench.version": __version__,
        "qbench.export_git_sha": str(capture("cpu").get("git_sha")),
        "qbench.run_key": rec["run_key"],
        "qbench.grid": rec["grid"],
        "qbench.model": rec["model"]["id"],
        "qbench.method": "+".join(cell["chain"]) if cell.get("chain") else cell["method"],
        "qbench.format": WeightFormat(**spec).label() if spec else "fp",
        "qbench.seed": int(cell["seed"]),
        "qbench.record_git_sha": str(rec["env"].get("git_sha")),
        "qbench.effective_bits": float(rec.get("effective_bits") or 0.0),
        "qbench.rebuild": built.how,
        # identical / within-float: the published model; other-cpu: this machine's re-run
        "qbench.check": ", ".join(sorted({c["verdict"] for c in built.check})) or "not checked",
    }
    for m in rec["metrics"]:
        meta[f"qbench.metric.{m['protocol']}"] = float(m["value"])
    for c in built.check:  # the exported model's own values, as re-evaluated here
        meta[f"qbench.check_metric.{c['protocol']}"] = float(c["fresh"])
    return meta


def _write(fmt: str, built: rb.Rebuilt, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    if fmt == "gguf":
        from suite.export import to_gguf

        out.mkdir()
        name = f"{_slug(built.record['model']['id'])}-{meta['qbench.method']}-" \
               f"{meta['qbench.format']}.gguf".replace("+", "-").replace(":", "-")
        return to_gguf.write_gguf(built.model, built.qstate, out / name,
                                  template=_template(built), tokenizer_dir=built.source_dir,
                                  metadata=meta)
    from suite.export import to_ctensors

    return to_ctensors.write_compressed_tensors(built.model, built.qstate, out,
                                                tokenizer_dir=built.source_dir, metadata=meta)


def _slug(model_id: str) -> str:
    """A file-name part for a model id (``hf:/a/b@rev`` -> ``b``; ``name@source`` -> ``name``)."""
    base = Path(model_id.removeprefix("hf:").split("@")[0].rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base) or "model"


def _template(built: rb.Rebuilt) -> Path | None:
    """The GGUF the model came from (its tokenizer is copied verbatim), where there is one."""
    from suite.models import MODELS

    model_id = built.record["model"]["id"]
    spec = MODELS.get(model_id, field="models") if model_id in MODELS else None
    return spec.gguf_source() if spec is not None and spec.gguf_source else None


def _print_done(out_dir: Path, built: rb.Rebuilt, summary: dict[str, Any]) -> None:
    checks = ", ".join(f"{c['verdict']} ({c['fresh']:.4f} vs {c['published']:.4f})"
                       for c in built.check) or "not checked"
    print(f"qbench: exported {built.record['run_key']} to {out_dir} ({built.how}; "
          f"perplexity vs the record: {checks})")
    for k, v in summary.items():
        print(f"  {k}: {v}")
