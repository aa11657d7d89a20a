"""The published leaderboard CSV (results/leaderboard/<track>.csv): its declared, versioned schema
holds for the committed files, and a column change without a version bump fails here."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from suite import leaderboard
from suite.cli import main
from suite.records import STATUSES

RESULTS = Path(__file__).resolve().parent.parent / "results"
TRACKS = ["reproduce", "reproduce-vision", "reproduce-vision-mbv2"]
# the column fingerprint of each schema version: changing a column's name, order or dtype
# changes the fingerprint, and must come with SCHEMA_VERSION + 1 and a new line here
PINNED = {1: "725306e87e3298b6", 2: "8f8dcd892394e53d", 3: "572f30e52f5ed6d1",
          4: "f2347991606f4d7e"}
KEY = ["model", "method", "wbits", "abits", "group_size", "sym", "calib", "protocol"]


def test_the_schema_version_pins_its_columns():
    assert PINNED[leaderboard.SCHEMA_VERSION] == leaderboard.schema_fingerprint()
    assert leaderboard.NAMES[0] == "schema_version"
    assert len(set(leaderboard.NAMES)) == len(leaderboard.NAMES)


@pytest.mark.parametrize("track", TRACKS)
def test_committed_leaderboard_follows_the_schema(track):
    df = pd.read_csv(RESULTS / "leaderboard" / f"{track}.csv", keep_default_na=False,
                     na_values=[""], dtype={"group_size": "string"})
    assert tuple(df.columns) == leaderboard.NAMES
    assert set(df["schema_version"]) == {leaderboard.SCHEMA_VERSION}
    for col in leaderboard.COLUMNS:
        values = df[col.name].dropna()
        if col.dtype == "int":
            assert pd.api.types.is_integer_dtype(df[col.name]), col.name
        elif col.dtype == "float":
            assert pd.api.types.is_numeric_dtype(values), col.name
        elif col.dtype == "bool":
            assert set(values) <= {True, False}, col.name
    assert not df.duplicated(subset=KEY).any()  # one row per model x method x format x protocol
    assert set(df["status"]) <= set(STATUSES)


@pytest.mark.parametrize("track", TRACKS)
def test_committed_leaderboard_is_the_published_table(track):
    """The leaderboard rows are the committed table's rows (whose equality with the committed
    records' aggregate tests/test_published_results.py checks), in schema order."""
    table = pd.read_csv(RESULTS / f"{track}.csv", keep_default_na=False, na_values=[""])
    board = pd.read_csv(RESULTS / "leaderboard" / f"{track}.csv", keep_default_na=False,
                        na_values=[""])
    expected = leaderboard.frame(table).reset_index(drop=True)
    pd.testing.assert_frame_equal(board, expected, check_dtype=False)


def test_a_column_the_schema_does_not_declare_is_refused():
    board = pd.DataFrame({name: [1] for name in leaderboard.NAMES[1:]}).assign(extra=[2])
    with pytest.raises(ValueError, match="extra \\['extra'\\]"):
        leaderboard.frame(board)
    with pytest.raises(ValueError, match="missing \\['value'\\]"):
        leaderboard.frame(board.drop(columns=["extra", "value"]))


def test_schema_markdown_lists_every_column():
    text = (RESULTS / "leaderboard" / "SCHEMA.md").read_text()
    assert text == leaderboard.schema_markdown()
    assert all(f"| `{name}` |" in text for name in leaderboard.NAMES)


def test_leaderboard_command_with_a_missing_config(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qbench: error: ") and "does not exist" in err
    assert not (tmp_path / "o").exists()
