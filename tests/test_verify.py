"""``qbench verify`` and the quick tier: the quick grids are subsets of the published grids
(same cells, so the same run keys), and the verification verdicts on records whose answer is
known."""

from __future__ import annotations

from pathlib import Path

import pytest

from suite.cli import main
from suite.config import load_grids
from suite.records import Store
from suite.verify import Tolerance, agrees, line_up, markdown

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"reproduce-quick": "reproduce", "reproduce-quick-vision": "reproduce-vision"}


def test_quick_grids_are_subsets_of_the_published_grids() -> None:
    published = {g.name: g for g in load_grids(ROOT / "configs" / "reproduce.yaml")}
    quick = load_grids(ROOT / "configs" / "reproduce-quick.yaml")
    assert {g.name for g in quick} == set(QUICK)
    methods = set()
    for g in quick:
        full = set(published[QUICK[g.name]].expand())
        cells = g.expand()
        assert cells and set(cells) <= full, f"{g.name}: a cell is not a published cell"
        assert g.run.store != published[QUICK[g.name]].run.store  # a fresh store to verify
        methods |= {m.split(":")[0] for c in cells for m in c.chain}  # variants: base id
    # both tracks, every method of the suite
    assert methods == {"fp", "rtn", "gptq", "decoupleq", "precalibration", "lsq",
                       "tr_scheduling"}


def _rec(key: str, value: float, status: str = "ok") -> dict:
    return {"run_key": key, "status": status, "cell": {"method": "rtn"},
            "metrics": [{"protocol": "ppl/x", "metric": "ppl", "value": value}]}


@pytest.mark.parametrize(("fresh", "verdict"), [(21.5, "identical"), (21.51, "within"),
                                                (21.6, "differs")])
def test_verdicts(tmp_path: Path, fresh: float, verdict: str) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    a.put(_rec("k1", fresh))
    b.put(_rec("k1", 21.5))
    table = line_up("g", [("cell", "k1")], a, b, Tolerance(ppl_rel=1e-3))
    assert table["verdict"].tolist() == [verdict]
    assert agrees(table) == (verdict != "differs")
    assert f"| {verdict} |" in markdown(table, Tolerance())


def test_missing_and_failed_cells_are_listed(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    b.put(_rec("k1", 1.0))
    a.put(_rec("k2", 1.0, status="crashed"))
    b.put(_rec("k2", 1.0))
    table = line_up("g", [("c1", "k1"), ("c2", "k2"), ("c3", "k3")], a, b, Tolerance())
    assert table["verdict"].tolist() == ["no fresh record", "status ok -> crashed",
                                         "no fresh record"]
    assert not agrees(table)


def test_cli_rejects_a_missing_published_store(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ROOT / "configs" / "smoke" / "tiny.yaml"
    assert main(["verify", str(cfg), "--published", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--published" in err
    assert main(["verify", str(cfg), "--ppl-rel", "-1"]) == 2


def test_cli_rejects_verifying_a_store_against_itself(capsys: pytest.CaptureFixture[str]) -> None:
    # both paths relative to the working directory, whatever it is
    assert main(["verify", str(ROOT / "configs" / "reproduce.yaml"), "--published",
                 "results/records"]) == 2
    assert "is the published store" in capsys.readouterr().err


def test_accuracies_are_compared_in_points() -> None:
    tol = Tolerance(acc_abs=0.4)
    assert tol.within("acc", 0.500, 0.504) and not tol.within("acc", 0.500, 0.506)
    assert not Tolerance().within("acc", 0.500, 0.502)  # default: exact
    assert Tolerance().within("ppl", 21.67, 21.68) and not Tolerance().within("ppl", 21.67, 21.7)
