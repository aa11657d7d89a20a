"""``qbench parity``: the published numbers are well-formed data that name cells of the paper
configs, and measured rows are lined up against them (a synthetic store stands in for runs
that need the hub models and a GPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from suite import parity
from suite.cli import main
from suite.config import load_grids, protocol_ids
from suite.primitives import PER_CHANNEL, group_size_label
from suite.records import Store, base_record

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper"


def test_every_published_number_names_a_cell_of_its_paper_config():
    published = parity.load_published()
    grids = {g.name: g for p in PAPER.glob("*.yaml") for g in load_grids(p, [])}
    assert len(published) >= 50 and published["published"].gt(0).all()
    for row in published.itertuples(index=False):
        grid = grids[row.grid]
        cells = {(c.model, "+".join(c.chain), c.fmt.bits if c.fmt else 16,
                  group_size_label(c.fmt.group_size) if c.fmt else "") for c in grid.expand()}
        assert (row.model, row.method, row.wbits, row.group_size) in cells, row
        pids = [pid for e in grid.evals for pid in protocol_ids(e)]
        assert any(pid.startswith(row.prefix) for pid in pids), row


def _opt_config(tmp: Path) -> Path:
    raw = yaml.safe_load((PAPER / "opt-gptq.yaml").read_text())
    raw["run"]["store"] = str(tmp / "store")
    path = tmp / "opt-gptq.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _record(grid, model: str, method: str, bits: int | None, value: float) -> dict:  # noqa: ANN001
    pid = next(p for e in grid.evals for p in protocol_ids(e) if p.startswith("ppl/wikitext2"))
    fmt = {"bits": bits, "group_size": PER_CHANNEL, "sym": False} if bits else None
    cell = {"model": model, "method": method, "chain": [method], "format": fmt, "seed": 0,
            "protocols": [pid]}
    key = f"{model}-{method}-{bits}".replace("/", "_").replace(":", "_")
    rec = base_record({"key_payload": {"cell": cell, "model_fingerprint": "x", "data": {}},
                       "grid": grid.name, "model": {"id": model}, "notes": []})
    rec.update(run_key=key, status="ok", effective_bits=4.25 if bits else 16.0,
               metrics=[{"protocol": pid, "metric": "ppl", "unit": "ppl", "value": value,
                         "higher_is_better": False}])
    return rec


def test_measured_rows_are_lined_up_with_their_published_numbers(tmp_path, capsys):
    path = _opt_config(tmp_path)
    (grid,) = load_grids(path, [])
    store = Store(tmp_path / "store")
    store.put(_record(grid, "hf:facebook/opt-125m", "gptq", 4, 31.5))  # published 31.12
    store.put(_record(grid, "hf:facebook/opt-125m", "fp", None, 29.5))  # published 27.65
    table = parity.line_up(parity.load_published().query("grid == 'opt-gptq'"),
                           parity.measured([grid]), parity.Tolerance())
    got = {(r.model, r.method, r.wbits): r for r in table.itertuples(index=False)}
    gptq = got[("hf:facebook/opt-125m", "gptq", 4)]
    assert gptq.verdict == "within" and gptq.measured == 31.5 and gptq.n_seeds == 1
    assert got[("hf:facebook/opt-125m", "fp", 16)].verdict == "outside"  # 6.7% off
    rtn = got[("hf:facebook/opt-125m", "rtn", 4)]
    assert rtn.verdict == "not run" and math.isnan(rtn.measured)  # nothing invented
    assert (table["verdict"] == "not run").sum() == len(table) - 2

    assert main(["parity", str(path)]) == 0
    out = capsys.readouterr()
    assert "| 31.12 | 31.5 (n=1) | +1.2% | within |" in out.out
    assert "outside 1, within 1" in out.err
    assert main(["parity", str(path), "--strict", "--csv", str(tmp_path / "p.csv")]) == 1
    assert (tmp_path / "p.csv").read_text().count("\n") == len(table) + 1


def test_the_embedded_grids_have_no_published_numbers(capsys):
    assert main(["parity", str(ROOT / "configs" / "reproduce.yaml")]) == 0
    assert "0 published numbers" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--ppl-rel", "-1"], ["--acc-abs", "nan"]])
def test_a_bad_tolerance_is_one_line(args, tmp_path, capsys):
    assert main(["parity", *args, "--csv", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qbench: error: --") and "accepted: a number >= 0" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "p.csv").exists()
