"""Calibration domain as a grid axis (issue 28): the new corpora (Wikipedia split by article,
Jane Austen from an R data package, Python source from pinned sdists), the calib axis and its
errors, the calib column, and compare's pairing of data-free against calibrated cells."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from suite import compare, data, rdata
from suite.cli import main
from suite.config import parse_grid
from suite.errors import ConfigError, DataError

LM = "smollm2-135m-instruct@gguf-q4_1"


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    from conftest import build_tokenizer

    return build_tokenizer()


# --- corpora ---------------------------------------------------------------------------------


def test_enwiki_split_is_by_article_and_disjoint(tok):
    whole = data.load_documents("enwiki-gensim")
    held, ev = data.load_documents("enwiki-heldout"), data.load_documents("enwiki-eval")
    assert len(held) == len(ev) == len(whole) // 2 and set(ev) == set(whole[0::2])
    odd = sum(map(len, whole[1::2]))
    assert 0.99 * odd < sum(map(len, held)) < odd  # shared spans cut: under 1% of the text
    ids = {c: torch.tensor(tok(data.load_text(c))["input_ids"])
           for c in ("enwiki-heldout", "enwiki-eval")}
    windows = data.calibration_windows(ids["enwiki-heldout"], 256, 128, seed=0)
    assert data.leakage_check(windows, ids["enwiki-eval"]) == 0
    # the guard can fail: windows cut from the evaluation side are caught
    assert data.leakage_check(data.calibration_windows(ids["enwiki-eval"], 4, 128, 0),
                              ids["enwiki-eval"]) == 4


def test_shared_spans_are_cut_into_paragraph_breaks():
    reference = data._sorted_hashes(data._codepoints("..XYZ..abc"), 3)
    assert data._cut_shared("abcdefXYZ", reference, 3) == ("def", True)
    assert data._cut_shared("de XYZ fg", reference, 3) == ("de \n\n fg", True)
    assert data._cut_shared("nothing", reference, 3) == ("nothing", False)


def test_code_corpora_are_real_python_from_disjoint_packages():
    code, code_eval = data.load_documents("code"), data.load_documents("code-eval")
    assert len(code) == 29 and len(code_eval) == 16  # boltons' non-empty modules, click's
    assert all(compile(src, "<corpus>", "exec") for src in code[:3] + code_eval[:3])
    assert "boltons" in data.load_text("code") and "click" in data.load_text("code-eval")
    assert not set(code) & set(code_eval)


def test_austen_is_six_novels_in_paragraphs():
    novels = data.load_documents("austen")
    assert len(novels) == 6 and novels[0].startswith("EMMA")
    assert 3_900_000 < sum(map(len, novels)) < 4_100_000
    assert "It is a truth universally acknowledged" in data.load_text("austen")
    assert all("\n\n" in n and "\n\n\n" not in n for n in novels)


def _r_string_vector(values: list[str]) -> bytes:
    out = struct.pack(">ii", 16, len(values))
    for v in values:
        raw = v.encode()
        out += struct.pack(">ii", 0x00040009, len(raw)) + raw
    return out


def _r_named_list(names: list[str], items: list[bytes]) -> bytes:
    """VECSXP with a names attribute (the layout of an .rdx index entry list)."""
    out = struct.pack(">ii", 0x213, len(items)) + b"".join(items)
    out += struct.pack(">i", 0x402) + struct.pack(">i", 1) + struct.pack(">ii", 0x40009, 5)
    out += b"names" + _r_string_vector(names) + struct.pack(">i", 254)
    return out


def _xdr(body: bytes) -> bytes:
    enc = b"UTF-8"
    return b"X\n" + struct.pack(">iiii", 3, 0x40201, 0x30500, len(enc)) + enc + body


def test_r_lazyload_reader_on_a_hand_built_database(tmp_path: Path):
    objects = {"alpha": ["a line", "", "next"], "beta": ["x"]}
    blob, where = b"", []
    for values in objects.values():
        payload = _xdr(_r_string_vector(values))
        packed = struct.pack(">i", len(payload)) + zlib.compress(payload)
        where.append(struct.pack(">iii", 13, 2, len(blob)) + struct.pack(">i", len(packed)))
        blob += packed
    index = _xdr(_r_named_list(["variables", "references", "compressed"],
                               [_r_named_list(list(objects), where), struct.pack(">i", 254),
                                struct.pack(">iii", 10, 1, 1)]))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    got = rdata.read_lazyload(tmp_path)
    assert {k: v.values for k, v in got.items()} == objects
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index.replace(b"X\n", b"A\n", 1)))
    with pytest.raises(DataError, match="not an XDR serialization"):
        rdata.read_lazyload(tmp_path)


# --- the calib axis --------------------------------------------------------------------------


def _grid(**axes) -> dict:  # noqa: ANN003
    return {"name": "t", "axes": {"model": [LM], "method": ["fp", "rtn", "gptq",
                                                             "precalibration+gptq"],
                                  "wbits": [4], "group_size": [64], **axes},
            "fixed": {"eval": [{"type": "ppl", "corpus": "enwiki-eval", "windows": 4}]}}


def test_calib_axis_multiplies_only_calibrated_chains():
    grid = parse_grid(_grid(calib=["abcnews-lee", "austen", "code"]))
    cells = grid.expand()
    by_method = {m: [c.calib.corpus if c.calib else None for c in cells if c.method == m]
                 for m in ("fp", "rtn", "gptq", "precalibration+gptq")}
    assert by_method == {"fp": [None], "rtn": [None], "gptq": ["abcnews-lee", "austen", "code"],
                         "precalibration+gptq": ["abcnews-lee", "austen", "code"]}
    assert "calib=austen" in next(c for c in cells if c.calib and c.calib.corpus == "austen"
                                  ).label()
    raw = _grid(calib=["abcnews-lee", "austen"])
    raw["exclude"] = [{"method": "gptq", "calib": "austen"}]
    assert len(parse_grid(raw).expand()) == len(cells) - 3


def test_without_a_calib_axis_cells_are_unchanged():
    """Old grids keep their cells (and so their run keys): the axis defaults to
    fixed.calib.corpus."""
    raw = _grid()
    raw["fixed"]["calib"] = {"corpus": "abcnews-lee", "windows": 8, "seqlen": 64}
    (gptq,) = [c for c in parse_grid(raw).expand() if c.method == "gptq"]
    assert (gptq.calib.corpus, gptq.calib.windows, gptq.calib.seqlen) == ("abcnews-lee", 8, 64)


@pytest.mark.parametrize("calib,match", [
    (["abcnews"], r"axes.calib\[0\]: unknown corpus 'abcnews' \(did you mean 'abcnews-lee'\?\)"),
    (["enwiki-eval"], "axes.calib: 'enwiki-eval' shares text with the evaluation corpus"),
    (["austen", "austen"], "axes.calib: duplicate value"),
])
def test_bad_calib_axis_is_one_line(calib, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(_grid(calib=calib))


def test_calib_overlapping_the_evaluation_exits_2(tmp_path: Path, capsys):
    cfg = tmp_path / "g.yaml"
    cfg.write_text(f"name: g\naxes: {{model: [{LM}], method: [gptq], calib: [enwiki-heldout]}}\n"
                   "fixed: {eval: [{type: ppl, corpus: enwiki-gensim}]}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'enwiki-heldout' shares text with" in err[0]
    assert not (tmp_path / "o").exists()


def test_vision_grid_refuses_a_calib_axis():
    with pytest.raises(ConfigError, match="axes.calib: text calibration corpora"):
        parse_grid({"name": "v", "axes": {"model": ["cnn-small@fashion-mnist"],
                                          "method": ["gptq"], "calib": ["austen"]}})


# --- compare over calibration corpora --------------------------------------------------------


def _row(method: str, calib: str, seed: int, nll: float) -> dict:
    return {"model": "m", "method": method, "wbits": 3, "abits": 16, "group_size": "64",
            "sym": False, "calib": calib, "seed": seed, "protocol": "ppl/x", "metric": "ppl",
            "value": float(np.exp(nll)), "stat": nll, "units": None, "higher_is_better": False}


def test_data_free_method_is_compared_under_each_corpus(monkeypatch):
    rows = [_row("precalibration", "", s, 3.0) for s in range(3)]
    rows += [_row("gptq", c, s, 3.0 + d + 0.01 * s) for c, d in (("austen", 0.2),
                                                               ("enwiki-heldout", -0.2))
             for s in range(3)]
    rows += [_row("rtn", "", s, 3.5) for s in range(3)]
    monkeypatch.setattr(compare, "_rows", lambda records: pd.DataFrame(rows))
    table = compare.compare([], "precalibration", ["gptq", "rtn"])
    got = {(r.baseline, r.calib): r.verdict for r in table.itertuples()}
    assert got == {("gptq", "austen"): "better", ("gptq", "enwiki-heldout"): "worse",
                   ("rtn", ""): "better"}


# --- rendering without the inputs ------------------------------------------------------------


def test_table_by_cell_selects_one_record_per_cell_and_refuses_two(tmp_path: Path):
    from suite.commands import keys_by_cell
    from suite.prepare import cell_dict
    from suite.records import Store, write_json_atomic

    grid = parse_grid(_grid(calib=["abcnews-lee", "austen"]))
    cells = grid.expand()
    store = Store(tmp_path)
    for i, cell in enumerate(cells[:-1]):  # the last cell has no record
        write_json_atomic(store.path(f"k{i}"), {"run_key": f"k{i}", "cell": cell_dict(cell)})
    keys = keys_by_cell(grid, store)
    assert keys[:-1] == [f"k{i}" for i in range(len(cells) - 1)]
    assert store.get(keys[-1]) is None  # counted as missing, never invented
    write_json_atomic(store.path("dup"), {"run_key": "dup", "cell": cell_dict(cells[0])})
    with pytest.raises(ConfigError, match="--by-cell: .* has 2 records"):
        keys_by_cell(grid, store)


# --- the calibration-sensitivity table -------------------------------------------------------


def _board_row(method: str, calib: str, protocol: str, value: float) -> dict:
    return {"model": "m", "method": method, "wbits": 3, "abits": 16, "group_size": "64",
            "sym": False, "calib": calib, "protocol": protocol, "value": value,
            "higher_is_better": False}


def test_sensitivity_table_spreads_and_the_matched_corpus(tmp_path: Path):
    from suite import sensitivity

    pid = "ppl/enwiki-eval/gptq-nonoverlap/seq512/w40"
    board = pd.DataFrame([
        _board_row("fp", "", pid, 20.0), _board_row("precalibration", "", pid, 40.0),
        *[_board_row("gptq", c, pid, v) for c, v in (("abcnews-lee", 36.0),
                                                     ("enwiki-heldout", 30.0), ("code", 45.0))]])
    assert sensitivity.applies(board)
    assert not sensitivity.applies(board[board["calib"].isin(["", "code"])])
    sens = sensitivity.table(board).set_index("method")
    assert list(sens.index) == ["precalibration", "gptq"]  # FP is no calibration question
    assert sens.loc["gptq", "spread"] == pytest.approx(45.0 / 30.0)
    assert sens.loc["precalibration", "spread"] == 1.0  # one value by construction
    assert sens.loc["precalibration", "data-free"] == 40.0
    assert math.isnan(sens.loc["gptq", "data-free"])
    assert sens.loc["gptq", "matched"] == "enwiki-heldout"
    md = sensitivity.markdown(sens.reset_index())
    assert "**enwiki-heldout**" in md and "| gptq | W3 g64 |" in md and "1.500x" in md
    sensitivity.plot(sens.reset_index(), tmp_path / "s.png", "t")
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_a_method_under_one_corpus_has_no_spread():
    from suite import sensitivity

    pid = "ppl/enwiki-eval/gptq-nonoverlap/seq512/w40"
    board = pd.DataFrame([_board_row("gptq", c, pid, v) for c, v in (("abcnews-lee", 36.0),
                                                                      ("code", 45.0))]
                         + [_board_row("decoupleq", "abcnews-lee", pid, 33.0)])
    sens = sensitivity.table(board).set_index("method")
    assert math.isnan(sens.loc["decoupleq", "spread"])  # one corpus: no spread, not 1.0
    assert "| decoupleq | W3 g64 | — | 33.00 | — | — |" in sensitivity.markdown(sens.reset_index())


def test_an_sdist_put_in_the_cache_by_hand_is_checked_then_used(tmp_path: Path, monkeypatch):
    """A source that can no longer be downloaded (bigbench 1.0.0) can be supplied by hand:
    the file at the cache path is used once its sha256 matches, refused otherwise."""
    import hashlib

    from suite import assets

    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path))
    blob = b"an archive"
    spec = assets.PypiSdist("gone", "1.0", hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(assets, "_pip_download", lambda *a: (_ for _ in ()).throw(
        DataError("cannot fetch gone==1.0 from PyPI")))
    target = tmp_path / "pypi" / "gone-1.0.tar.gz"
    target.parent.mkdir()
    target.write_bytes(b"something else")
    with pytest.raises(DataError, match="cannot fetch gone==1.0"):
        assets.fetch_sdist(spec)
    target.write_bytes(blob)
    assert assets.fetch_sdist(spec) == target
    assert (tmp_path / "pypi" / "gone-1.0.tar.gz.sha256").read_text().strip() == spec.sha256
