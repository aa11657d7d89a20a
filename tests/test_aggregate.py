"""Aggregation: records -> tidy -> leaderboard, against hand numbers and a golden CSV."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pandas as pd
import pytest

from suite import aggregate, render

GOLDEN = Path(__file__).parent / "golden" / "leaderboard.csv"
PID = "ppl/enwiki-gensim/gptq-nonoverlap/seq512/w40"


def _rec(method: str, bits: int | None, gs: int, seed: int, value: float | None,
         status: str = "ok", notes: tuple[str, ...] = ()) -> dict:
    fmt = None if bits is None else {"bits": bits, "group_size": gs, "sym": False,
                                     "scale_dtype": "float16"}
    metrics = [] if value is None else [{
        "protocol": PID, "metric": "ppl", "unit": "ppl", "higher_is_better": False,
        "value": value, "ppl_lo95": value * 0.9, "ppl_hi95": value * 1.1}]
    return {"run_key": f"{method}{bits}{gs}{seed}", "status": status, "notes": list(notes),
            "cell": {"model": "m", "method": method, "format": fmt, "seed": seed,
                     "protocols": {PID: {}}},
            "metrics": metrics, "effective_bits": None if bits is None else bits + 20 / 64,
            "honesty": {"passed": True}, "cost": {"quant_s": 1.0, "wall_s": 2.0}}


RECORDS = [
    _rec("fp", None, 0, 0, 20.0),
    _rec("rtn", 4, 64, 0, 30.0), _rec("rtn", 4, 64, 1, 32.0), _rec("rtn", 4, 64, 2, 34.0),
    _rec("rtn", 3, 64, 0, 100.0),
    _rec("rtn", 2, 64, 0, None, status="failed"),
    _rec("rtn", 4, 32, 0, 20.0, notes=("format-reproduces-source-grid",)),
]


def test_leaderboard_hand_numbers():
    board = aggregate.leaderboard(aggregate.tidy(RECORDS))
    assert list(board["method"]) == ["fp", "rtn", "rtn", "rtn", "rtn"]
    assert list(board["wbits"]) == [16, 4, 4, 3, 2]
    w4 = board[(board["wbits"] == 4) & (board["group_size"] == "64")].iloc[0]
    assert w4["value"] == pytest.approx(32.0) and w4["n_seeds"] == 3
    # t_{0.975, 2} = 4.302653; sd = 2; half-width = 4.302653 * 2 / sqrt(3)
    assert w4["ci95"] == pytest.approx(4.302653 * 2 / math.sqrt(3), rel=1e-6)
    assert math.isnan(w4["lo95"])
    w2 = board[board["wbits"] == 2].iloc[0]
    assert w2["status"] == "failed" and w2["n_seeds"] == 0 and math.isnan(w2["value"])
    fp = board[board["method"] == "fp"].iloc[0]
    assert fp["effective_bits"] == 16 and fp["lo95"] == pytest.approx(18.0)


def test_leaderboard_order_does_not_depend_on_record_order():
    recs = [*RECORDS, _rec("gptq", 4, 64, 0, 25.0), _rec("gptq", 3, 64, 0, 50.0)]
    want = aggregate.leaderboard(aggregate.tidy(recs))
    for seed in range(5):
        shuffled = recs[:]
        random.Random(seed).shuffle(shuffled)
        got = aggregate.leaderboard(aggregate.tidy(shuffled))
        pd.testing.assert_frame_equal(got, want)
    assert want["method"].iloc[0] == "fp"
    w4 = want[(want["wbits"] == 4) & (want["group_size"] == "64")]
    assert list(w4["method"]) == ["gptq", "rtn"]  # ties broken by method name


def test_the_grids_first_protocol_leads_else_perplexity_then_name():
    """A grid evaluating on two perplexity protocols shows the one it lists first (its
    headline) first; without that, perplexity protocols come first in name order."""
    second = "ppl/code-eval/gptq-nonoverlap/seq512/w40"  # sorts before PID
    recs = []
    for r in RECORDS[:2]:
        twin = {**r, "metrics": [{**m, "protocol": second} for m in r["metrics"]],
                "cell": {**r["cell"], "protocols": {second: {}}}}
        recs += [r, {**twin, "run_key": r["run_key"] + "c"}]
    assert aggregate.leaderboard(aggregate.tidy(recs))["protocol"].iloc[0] == second
    board = aggregate.leaderboard(aggregate.tidy(recs), first=PID)
    assert list(board["protocol"]) == [PID, PID, second, second]


def test_golden_csv(tmp_path):
    board = aggregate.leaderboard(aggregate.tidy(RECORDS))
    render.write_csv(board, tmp_path / "b.csv")
    got = pd.read_csv(tmp_path / "b.csv", keep_default_na=False, na_values=[""])
    want = pd.read_csv(GOLDEN, keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(got, want, rtol=1e-9, check_dtype=False)


def test_markdown_marks_degenerate_and_failed():
    board = aggregate.leaderboard(aggregate.tidy(RECORDS))
    md = render.markdown(board, "t", ["c"])
    assert "20.00 [18.00, 22.00] †" in md
    assert "32.00 ± 4.97" in md
    assert "| failed |" in md
