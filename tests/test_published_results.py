"""The committed leaderboard in results/ is what its committed records aggregate to, and it
shows the properties the embedded default promises (checked on the data, so it can fail)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from suite import aggregate
from suite.records import run_key

RESULTS = Path(__file__).resolve().parent.parent / "results"
RECORDS = sorted((RESULTS / "records").glob("*.json"))

pytestmark = pytest.mark.skipif(not (RESULTS / "reproduce.csv").exists(),
                                reason="no published leaderboard yet")


def _records(grid: str | None = None) -> list[dict]:
    recs = [json.loads(p.read_text()) for p in RECORDS]
    return [r for r in recs if grid is None or r["grid"] == grid]


@pytest.mark.parametrize("grid", ["reproduce", "reproduce-vision", "reproduce-vision-mbv2"])
def test_csv_equals_aggregate_of_committed_records(grid):
    board = aggregate.leaderboard(aggregate.tidy(_records(grid)))
    published = pd.read_csv(RESULTS / f"{grid}.csv", keep_default_na=False, na_values=[""])
    assert len(published) == len(board) > 0
    for col in ("value", "effective_bits", "lo95", "ci95"):
        pd.testing.assert_series_equal(published[col], board[col].astype(float),
                                       rtol=1e-9, check_names=False)


def test_records_are_keyed_honest_and_ok():
    for path, rec in zip(RECORDS, _records(), strict=True):
        assert path.stem == rec["run_key"]
        assert rec["status"] == "ok", rec.get("error")
        assert rec["honesty"]["passed"] and rec["env"]["git_sha"]
        payload = {"cell": rec["cell"], "model_fingerprint": rec["inputs"]["model_fingerprint"],
                   "data": rec["inputs"]["data"]}
        assert run_key(payload) == rec["run_key"]


def _board() -> pd.DataFrame:
    return pd.read_csv(RESULTS / "reproduce.csv", keep_default_na=False, na_values=[""])


def _ppl(board: pd.DataFrame) -> pd.DataFrame:
    return board[board["protocol"].str.startswith("ppl/")]


def _need(board: pd.Series | pd.DataFrame, *keys: tuple) -> None:
    """Skip, naming the rows, while cells of the table are being regenerated under new code
    (``nox -s reproduce -- full`` resumes them; the table's caveats count them)."""
    missing = [k for k in keys if k not in board.index]
    if missing:
        pytest.skip(f"published rows pending regeneration: {missing}")


def test_rtn_monotone_in_bits_and_w8_within_one_percent_of_fp():
    board = _ppl(_board())
    fp = board.loc[board["method"] == "fp", "value"].item()
    rtn = board[board["method"] == "rtn"]
    for _, g in rtn.groupby("group_size"):
        values = g.sort_values("wbits", ascending=False)["value"].tolist()
        assert values == sorted(values), values
        assert abs(values[0] - fp) / fp < 0.01


def test_gptq_below_rtn_at_w4_and_w3():
    board = _ppl(_board()).set_index(["method", "wbits", "group_size"])["value"]
    _need(board, *[(m, b, g) for m in ("gptq", "rtn") for b in (4, 3)
                   for g in ("64", "per-channel")])
    for bits in (4, 3):
        for gs in ("64", "per-channel"):
            assert board[("gptq", bits, gs)] < board[("rtn", bits, gs)], (bits, gs)


def test_accuracy_rows_are_complete_and_fp_is_above_chance():
    board = _board()
    acc = board[board["unit"] == "accuracy"]
    if acc.empty:
        pytest.skip("the published grid has no accuracy protocol")
    n_cells = len(_ppl(board))
    for _, g in acc.groupby("protocol"):
        assert len(g) == n_cells and g["value"].between(0, 1).all()
    fp = acc[(acc["method"] == "fp") & (acc["metric"] == "acc")]
    # unit_identification has 3 choices; the lower end of FP's 95% interval is above chance
    unit = fp[fp["protocol"].str.contains("unit_identification")]
    assert (unit["lo95"] > 1 / 3).all()


def test_decoupleq_below_gptq_below_rtn_at_w3_and_w2_g64():
    """The decoupleQ paper's ordering, on the same calibration windows and seed."""
    board = _ppl(_board()).set_index(["method", "wbits", "group_size"])["value"]
    _need(board, *[(m, b, "64") for m in ("decoupleq", "gptq", "rtn") for b in (3, 2)])
    for bits in (3, 2):
        key = (bits, "64")
        assert board[("decoupleq", *key)] < board[("gptq", *key)] < board[("rtn", *key)], key


def test_decoupleq_pays_for_its_float_offsets_in_effective_bits():
    board = _ppl(_board()).set_index(["method", "wbits", "group_size"])["effective_bits"]
    _need(board, ("gptq", 2, "64"), ("gptq", 3, "64"))
    for bits, gs, g in ((2, "32", 32), (2, "64", 64), (3, "64", 64)):
        assert board[("decoupleq", bits, gs)] == pytest.approx(bits + 32 / g)  # fp16 s and z
        if gs != "32":
            assert board[("decoupleq", bits, gs)] > board[("gptq", bits, gs)]


def test_precalibration_beats_rtn_at_w3_g64_and_w4_per_channel_and_counts_its_outliers():
    """The issue's acceptance claim, and the side channel's cost is visible in effective bits."""
    board = _ppl(_board()).set_index(["method", "wbits", "group_size"])
    keys = ((4, "64"), (3, "64"), (4, "per-channel"), (3, "per-channel"), (2, "64"))
    _need(board, *[(m, *k) for m in ("precalibration", "rtn") for k in keys])
    for key in ((3, "64"), (4, "per-channel")):
        assert board.loc[("precalibration", *key), "value"] < board.loc[("rtn", *key), "value"]
    for key in ((4, "64"), (3, "64"), (4, "per-channel"), (3, "per-channel"), (2, "64")):
        pre, rtn = (board.loc[(m, *key), "effective_bits"] for m in ("precalibration", "rtn"))
        assert pre > rtn + 0.1, key  # ~1% outliers: positions, codes and second grids


def test_precalibration_then_gptq_beats_gptq_alone():
    """"Pre-calibration, then calibration": GPTQ started from the pre-calibrated grid and
    outlier split (on the original weights) is below GPTQ alone in every published format."""
    board = _ppl(_board()).set_index(["method", "wbits", "group_size"])["value"]
    keys = ((4, "64"), (4, "per-channel"), (3, "64"), (3, "per-channel"), (2, "64"))
    _need(board, *[(m, *k) for m in ("precalibration+gptq", "gptq", "precalibration")
                   for k in keys])
    for key in keys:
        assert board[("precalibration+gptq", *key)] < board[("gptq", *key)], key
        assert board[("precalibration+gptq", *key)] < board[("precalibration", *key)], key


# --- the vision grid ----------------------------------------------------------------------


VISION = ["reproduce-vision", "reproduce-vision-mbv2"]  # cnn-small, mbv2-small


def _vision(grid: str = "reproduce-vision") -> pd.DataFrame:
    path = RESULTS / f"{grid}.csv"
    if not path.exists():
        pytest.skip("no published vision leaderboard yet")
    board = pd.read_csv(path, keep_default_na=False, na_values=[""])
    return board.set_index(["method", "wbits", "abits"])


QAT_ROWS = ("lsq", "lsq:sgd-lr3e-2", "lsq:adam", "lsq:adam-lr3e-3", "tr_scheduling",
            "tr_scheduling:adamt")


@pytest.mark.parametrize("grid", VISION)
def test_vision_rows_complete_with_seed_counts(grid):
    board = _vision(grid)
    assert (board["status"] == "ok").all()
    seeded = board.drop(index=["fp", "rtn"], level="method")  # no random stream: one seed
    assert (seeded["n_seeds"] == 3).all() and seeded["ci95"].notna().all()
    qat = QAT_ROWS  # LSQ's LR sweep and both TR optimizers (issue 24)
    for bits in (4, 3, 2):
        for m in qat:
            assert (m, bits, bits) in board.index  # WbAb: activations quantized too
        for m in ("rtn", "gptq", "decoupleq"):
            assert (m, bits, 16) in board.index  # weight-only


def test_vision_fp_is_trained_and_w4_is_near_fp():
    """cnn-small's W4 rows are within 1.5 points of FP (mbv2-small's are not: per-tensor
    activations cost its depthwise layers 1-2 points at W4A4, and that is what it shows)."""
    board = _vision()["value"]
    fp = board[("fp", 16, 16)]
    assert fp > 0.85  # a real Fashion-MNIST model (chance is 0.10)
    for m in QAT_ROWS:
        assert board[(m, 4, 4)] > fp - 0.015, m
    for m in ("gptq", "decoupleq"):
        assert board[(m, 4, 16)] > fp - 0.005, m


@pytest.mark.parametrize("grid", VISION)
def test_no_vision_row_beats_fp_beyond_its_interval(grid):
    """Issue 24: QAT starts from a converged FP model, so a row above FP's 95% interval would
    measure extra training, not recovery from quantization."""
    board = _vision(grid)
    fp_hi = board.loc[("fp", 16, 16), "hi95"]
    above = board[board["value"] > fp_hi]
    assert above.empty, above[["value"]]


def test_vision_gptq_and_decoupleq_rescue_rtn_at_w2():
    board = _vision()["value"]
    assert board[("rtn", 2, 16)] < 0.75  # RTN collapses at 2 bits per channel
    for m in ("gptq", "decoupleq"):
        assert board[(m, 2, 16)] > board[("rtn", 2, 16)] + 0.15, m
        assert board[(m, 3, 16)] > board[("rtn", 3, 16)], m


@pytest.mark.parametrize("grid", VISION)
def test_every_tr_record_tracks_its_target_rate(grid):
    """Issue 24's acceptance: median windowed k/R over 10%-90% of training in [0.67, 1.5],
    on every published TR record (3 seeds x W2A2/W3A3/W4A4 x SGDT/AdamT per network)."""
    records = [r for r in _records(grid) if r["cell"]["method"].startswith("tr_scheduling")]
    assert len(records) == 18, len(records)
    for rec in records:
        stats = rec["stats"][rec["cell"]["method"]]  # keyed by the entry (variant) name
        median = stats["tr_tracking"]["global"]["median"]
        assert 0.67 <= median <= 1.5, (rec["run_key"], median)
