"""The speed join (leaderboard x kernels table), the Pareto frontier and the Pareto PNG."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from suite import aggregate, commands, render, speed
from suite.config import load_grids

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
PID = "ppl/enwiki-gensim/gptq-nonoverlap/seq512/w40"
TOY = speed.ModelLinears(blocks=2, linears=(
    speed.Linear("a", 8, 8, per_block=3), speed.Linear("b", 16, 8)))
KERNEL_COLUMNS = ["shape", "out", "in", "M", "format", "backend", "status", "median_us"]
KERNELS = [  # (out, in, M, format, backend, status, median_us)
    (8, 8, 1, "fp32", "dense", "ok", 10.0),
    (8, 8, 1, "bf16", "dense", "ok", 5.0),         # faster, but not the baseline
    (8, 8, 1, "w4g8", "cpp", "ok", 4.0),
    (8, 8, 1, "w4g8", "torch-int4", "ok", 2.0),    # the fastest ok backend
    (8, 8, 1, "w4g8", "broken", "failed", 1.0),    # not ok: ignored
    (8, 8, 16, "w4g8", "cpp", "ok", 0.5),          # M = 16: ignored
    (16, 8, 1, "fp32", "dense", "ok", 30.0),
    (16, 8, 1, "w4g8", "cpp", "ok", 6.0),
    (16, 8, 1, "w4g8", "torch-int4", "ok", 12.0),
    (8, 8, 1, "w3g8", "cpp", "ok", 3.0),           # w3g8 has no (16, 8) row
]


def _kernels(tmp_path: Path, rows: list[tuple] = KERNELS) -> Path:
    path = tmp_path / "kernels-toy.csv"
    pd.DataFrame([(f"{o}x{i}", o, i, *rest) for o, i, *rest in rows],
                 columns=KERNEL_COLUMNS).to_csv(path, index=False)
    return path


def _rec(model: str, method: str, bits: int | None, gs: int = 8, value: float = 30.0,
         abits: int | None = None) -> dict:
    fmt = None if bits is None else {"bits": bits, "group_size": gs, "sym": False,
                                     "scale_dtype": "float16"}
    return {"run_key": f"{model}{method}{bits}{gs}{abits}", "status": "ok", "abits": abits,
            "cell": {"model": model, "method": method, "format": fmt, "seed": 0,
                     "protocols": {PID: {}}},
            "metrics": [{"protocol": PID, "metric": "ppl", "unit": "ppl",
                         "higher_is_better": False, "value": value,
                         "lo95": value * 0.9, "hi95": value * 1.1}],
            "effective_bits": None if bits is None else bits + 0.5,
            "honesty": {"passed": True}, "cost": {"quant_s": 1.0, "wall_s": 2.0}}


RECORDS = [
    _rec("toy@v1", "fp", None, value=20.0),
    _rec("toy@v1", "rtn", 4, value=30.0),
    _rec("toy@v1", "gptq", 4, value=25.0),
    _rec("toy@v1", "rtn", 3, value=60.0),             # w3g8: a timed shape lacks it
    _rec("toy@v1", "rtn", 4, gs=-1, value=40.0),      # w4pc: not in the table
    _rec("toy@v1", "lsq", 4, value=28.0, abits=4),    # activations quantized
    _rec("other@v1", "rtn", 4, value=35.0),           # no declared shapes
]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(speed.MODEL_LINEARS, "toy", TOY)


def _row(board: pd.DataFrame, model: str, method: str, wbits: int, gs: str = "8",
         abits: int = 16) -> pd.Series:
    sel = ((board["model"] == model) & (board["method"] == method) & (board["wbits"] == wbits)
           & (board["group_size"] == gs) & (board["abits"] == abits))
    return board[sel].iloc[0]


def test_join_by_hand(toy, tmp_path):
    board = aggregate.leaderboard(aggregate.tidy(RECORDS))
    joined = speed.join(board, _kernels(tmp_path), "toy").board
    assert list(joined.columns) == aggregate.LEADERBOARD_COLUMNS + speed.SPEED_COLUMNS
    # per block: 3 x a (fp32 10, fastest ok w4g8 2) + 1 x b (fp32 30, fastest ok 6)
    w4 = _row(joined, "toy@v1", "rtn", 4)
    assert w4["speedup"] == pytest.approx((3 * 10 + 30) / (3 * 2 + 6))
    assert w4["speed_backend"] == "cpp+torch-int4" and w4["speed_device"] == "toy"
    assert w4["speed_coverage"] == 1.0
    assert _row(joined, "toy@v1", "gptq", 4)["speedup"] == pytest.approx(5.0)
    fp = joined[joined["method"] == "fp"].iloc[0]
    assert fp["speedup"] == 1.0 and fp["speed_backend"] == "dense"
    for r in (_row(joined, "toy@v1", "rtn", 3), _row(joined, "toy@v1", "rtn", 4, "per-channel"),
              _row(joined, "toy@v1", "lsq", 4, abits=4), _row(joined, "other@v1", "rtn", 4)):
        assert math.isnan(r["speedup"]) and r["speed_device"] == ""


def test_join_caveats_say_why(toy, tmp_path):
    board = aggregate.leaderboard(aggregate.tidy(RECORDS))
    text = "\n".join(speed.join(board, _kernels(tmp_path), "toy").caveats)
    assert "w3g8, w4pc." in text and "W4A4" in text and "MODEL_LINEARS" in text
    assert "other" in text


def test_untimed_shape_is_left_out_and_counted_in_coverage(monkeypatch, tmp_path):
    linears = speed.ModelLinears(blocks=1, linears=(*TOY.linears, speed.Linear("c", 4, 8)))
    monkeypatch.setitem(speed.MODEL_LINEARS, "toy", linears)
    board = aggregate.leaderboard(aggregate.tidy(RECORDS[:2]))
    joined = speed.join(board, _kernels(tmp_path), "toy")
    w4 = _row(joined.board, "toy@v1", "rtn", 4)
    assert w4["speedup"] == pytest.approx(5.0)
    assert w4["speed_coverage"] == pytest.approx((3 * 64 + 128) / (3 * 64 + 128 + 32))
    assert any("c (4 x 8)" in c for c in joined.caveats)


def test_no_kernels_table_gives_empty_columns(toy, tmp_path):
    board = aggregate.leaderboard(aggregate.tidy(RECORDS))
    joined = speed.join(board, tmp_path / "kernels-none.csv", "none")
    assert list(joined.board.columns) == aggregate.LEADERBOARD_COLUMNS + speed.SPEED_COLUMNS
    assert joined.board["speedup"].isna().all() and "no kernels table" in joined.caveats[0]


def test_pareto_front():
    # (speedup, perplexity): lower is better
    x = [1.0, 2.0, 2.0, 3.0, 1.5, 3.0]
    y = [10., 12., 15., 20., 11., 20.]
    assert speed.pareto_front(x, y, higher_is_better=False) == [
        True, True, False, True, True, True]  # (2, 15) dominated by (2, 12); duplicates stay
    assert speed.pareto_front(x, y, higher_is_better=True) == [
        False, False, False, True, False, True]


def test_tables_gain_speed_columns_and_pareto_png(toy, tmp_path):
    class Store:
        def get(self, key: str) -> dict | None:
            return {r["run_key"]: r for r in RECORDS}.get(key)

    grid = load_grids(ROOT / "configs" / "smoke" / "tiny.yaml")[0]
    out = tmp_path / "results"
    commands._write_tables(grid, [r["run_key"] for r in RECORDS], Store(), out, "c.yaml",
                           _kernels(tmp_path))
    csv = pd.read_csv(out / f"{grid.name}.csv", keep_default_na=False, na_values=[""])
    assert list(csv.columns) == [*aggregate.LEADERBOARD_COLUMNS, *speed.SPEED_COLUMNS,
                                 *speed.SECOND_COLUMNS]
    md = (out / f"{grid.name}.md").read_text()
    assert "| speedup |" in md and " 5.00× |" in md and "Speedup: model-level" in md
    assert (out / f"{grid.name}-pareto.png").stat().st_size > 10_000
    assert "Speedup (`speedup`" in (out / "README.md").read_text()


def test_no_pareto_png_without_a_timed_quantized_row(tmp_path):
    board = aggregate.leaderboard(aggregate.tidy(RECORDS))
    joined = speed.join(board, _kernels(tmp_path), "toy").board  # toy not declared here
    path = tmp_path / "p.png"
    assert not render.plot_pareto(joined, path, "t") and not path.exists()
    assert not render.plot_pareto(board, path, "t")  # no speed columns at all


@pytest.mark.skipif(not (RESULTS / "kernels-cpu.csv").exists(), reason="no kernels table")
def test_published_leaderboard_joins_every_timed_format():
    board = pd.read_csv(RESULTS / "reproduce.csv", keep_default_na=False, na_values=[""])
    kernels = pd.read_csv(RESULTS / "kernels-cpu.csv")
    joined = speed.join(board[aggregate.LEADERBOARD_COLUMNS], RESULTS / "kernels-cpu.csv",
                        "cpu").board
    ok = kernels[(kernels["M"] == 1) & (kernels["status"] == "ok")
                 & kernels["shape"].str.startswith("smollm2-")]
    per_format = ok.groupby("format")["shape"].nunique()
    timed = set(per_format[per_format == ok["shape"].nunique()].index)  # on every shape
    labels = [speed.format_label(r.wbits, r.group_size, r.sym) if r.method != "fp" else "fp"
              for r in joined.itertuples()]
    present = set(labels) & timed
    assert {"w4g64", "w3g64", "w2g64"} <= present
    for label, s in zip(labels, joined["speedup"], strict=True):
        assert (label in present or label == "fp") == (not math.isnan(s)), label
    assert (joined.loc[joined["method"] == "fp", "speedup"] == 1.0).all()


def _expected(declared: speed.ModelLinears, blocks: str = "model.layers") -> dict:
    return {f"{blocks}.{i}.{lin.name}": (lin.out_features, lin.in_features)
            for i in range(declared.blocks) for lin in declared.linears}


def test_declared_shapes_are_checked_against_the_adapter(tiny_llama):
    """The check below, on the tiny LLaMA fixture every machine has (hidden 64, ffn 128, two
    of four heads for k/v, 2 blocks): a declaration that differs in one shape fails it."""
    from suite import models

    _, shapes = models.target_shapes(models.resolve(f"hf:{tiny_llama}"))
    linears = (("self_attn.q_proj", 64, 64), ("self_attn.k_proj", 32, 64),
               ("self_attn.v_proj", 32, 64), ("self_attn.o_proj", 64, 64),
               ("mlp.gate_proj", 128, 64), ("mlp.up_proj", 128, 64), ("mlp.down_proj", 64, 128))
    declared = speed.ModelLinears(2, tuple(speed.Linear(*lin) for lin in linears))
    assert shapes == _expected(declared)
    wrong = speed.ModelLinears(2, (speed.Linear("mlp.down_proj", 128, 64), *declared.linears[:6]))
    assert shapes != _expected(wrong)


def test_declared_shapes_match_the_adapter_for_the_embedded_model(user_cache):
    """speed.MODEL_LINEARS against the converted SmolLM2 in the user's cache (the tests' own
    cache is a temp folder, so this reads the one `nox -s reproduce` fills)."""
    from suite import models

    found = sorted((user_cache / "models").glob("smollm2-135m-instruct-gguf-q4_1-*"))
    if not found or not (found[-1] / "config.json").exists():
        pytest.skip(f"the embedded model is not converted in {user_cache} yet (`nox -s "
                    "reproduce` converts it)")
    src = models.ModelSource("smollm2-135m-instruct@gguf-q4_1", str(found[-1]), None, "", None,
                             "")
    _, shapes = models.target_shapes(src)
    assert shapes == _expected(speed.MODEL_LINEARS["smollm2-135m-instruct"])
