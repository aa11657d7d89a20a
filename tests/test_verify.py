"""``qbench verify`` and the quick tier: the quick grids are subsets of the published grids
(same cells, so the same run keys), and the verification verdicts on records whose answer is
known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from suite.cli import main
from suite.config import load_grids
from suite.records import Store
from suite.verify import agrees, explain, line_up, markdown

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"reproduce-quick-llm": "precalibration-variants",
         "reproduce-quick-llm-ppl": "llm-ppl-smollm2",
         "reproduce-quick-vision": "reproduce-vision",
         "reproduce-quick-vision-mbv2": "reproduce-vision-mbv2"}


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
    assert methods == {"fp", "rtn", "gptq", "awq", "decoupleq", "precalibration", "lsq",
                       "tr_scheduling"}


def test_quick_machine_bound_cells_have_a_published_seed_spread() -> None:
    """A quick cell whose codes depend on the machine's float rounding (GPTQ, AWQ, decoupleQ,
    QAT: ``aggregate.machine_bound`` of its chain) is verified on another machine
    against its published seed spread; with one published seed only the paired bootstrap is
    left, which reads rounding as ``differs`` (GPTQ W4 g64 on two AMD EPYCs: code perplexity
    11.79 published, 12.13 recomputed). So each such cell has >= 3 published seeds."""
    from dataclasses import replace

    from suite.aggregate import machine_bound

    published = {g.name: g for g in load_grids(ROOT / "configs" / "reproduce.yaml")}
    for g in load_grids(ROOT / "configs" / "reproduce-quick.yaml"):
        full = published[QUICK[g.name]]
        cells = set(full.expand())
        for c in g.expand():
            # the chain decides (the vision FP checkpoint is published, not retrained)
            if machine_bound({"cell": {"method": c.method, "chain": list(c.chain)}}):
                seeds = [s for s in range(10) if replace(c, seed=s) in cells]
                assert len(seeds) >= 3, f"{g.name}: {c.label()}: published seeds {seeds}"


def _rec(key: str, value: float, status: str = "ok", nlls: list[float] | None = None,
         seed: int = 0) -> dict:
    metric = {"protocol": "ppl/x", "metric": "ppl", "value": value}
    if nlls is not None:
        metric["window_nlls"] = nlls
    return {"run_key": key, "status": status, "grid": "g", "cell": {"method": "rtn", "seed": seed},
            "metrics": [metric], "env": {"device_name": "cpu-a", "torch_threads": 2}}


def _ppl(nlls: np.ndarray) -> float:
    return float(np.exp(nlls.mean()))


def _verdict(tmp_path: Path, fresh: dict, published: list[dict]) -> pd.DataFrame:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    a.put(fresh)
    for rec in published:
        b.put(rec)
    return line_up("g", [("cell", fresh["run_key"])], a, b)


@pytest.mark.parametrize(("fresh", "verdict"), [(21.5, "identical"), (21.5001, "within-float"),
                                                (21.6, "differs")])
def test_float_verdicts(tmp_path: Path, fresh: float, verdict: str) -> None:
    table = _verdict(tmp_path, _rec("k1", fresh), [_rec("k1", 21.5)])
    assert table["verdict"].tolist() == [verdict]
    assert agrees(table) == (verdict != "differs")
    assert f"| {verdict} |" in markdown(table)
    if verdict == "differs":  # records without units: no noise estimate to accept it
        assert table["noise"].tolist() == ["no units"]


def test_paired_bootstrap_accepts_noise_and_rejects_a_shift(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.3, 40)
    noisy = base + rng.normal(0, 0.002, 40)  # a perturbed model: no systematic change
    shifted = base + 0.02 + rng.normal(0, 0.002, 40)  # 2% worse perplexity on every window
    pub = _rec("k", _ppl(base), nlls=base.tolist())
    t1 = _verdict(tmp_path / "1", _rec("k", _ppl(noisy), nlls=noisy.tolist()), [pub])
    assert t1["verdict"].tolist() == ["within-noise"]
    assert t1["noise"].iloc[0].startswith("paired-bootstrap(n=40")
    assert t1["noise_lo"].iloc[0] <= t1["diff"].iloc[0] <= t1["noise_hi"].iloc[0]
    t2 = _verdict(tmp_path / "2", _rec("k", _ppl(shifted), nlls=shifted.tolist()), [pub])
    assert t2["verdict"].tolist() == ["differs"]


def test_outcomes_are_paired_example_by_example(tmp_path: Path) -> None:
    def rec(outcomes: str) -> dict:
        r = _rec("k", outcomes.count("1") / len(outcomes))
        r["metrics"][0].update(metric="acc", outcomes=outcomes, protocol="acc/x")
        return r

    pub = "10" * 250
    few = "01" + pub[2:]  # two examples swap: same accuracy, noise
    many = "11" * 60 + pub[120:]  # 60 more right answers out of 500
    assert _verdict(tmp_path / "0", rec(pub), [rec(pub)])["verdict"].tolist() == ["identical"]
    assert _verdict(tmp_path / "1", rec(few), [rec(pub)])["verdict"].tolist() == \
        ["within-noise"]
    flip = "0" + pub[1:]
    assert _verdict(tmp_path / "2", rec(flip), [rec(pub)])["verdict"].tolist() == \
        ["within-noise"]
    assert _verdict(tmp_path / "3", rec(many), [rec(pub)])["verdict"].tolist() == ["differs"]


def test_a_changed_unit_count_differs(tmp_path: Path) -> None:
    nlls = [3.0] * 40
    table = _verdict(tmp_path, _rec("k", 20.0, nlls=nlls[:39]), [_rec("k", 20.1, nlls=nlls)])
    assert table["verdict"].tolist() == ["differs"]
    assert table["noise"].tolist() == ["units 40 -> 39"]


def _trained(rec: dict) -> dict:
    rec["cell"]["method"] = "lsq"  # a QAT method: another machine, another trajectory
    return rec


def test_seed_spread_is_used_with_three_seeds(tmp_path: Path) -> None:
    seeds = [_trained(_rec("k", 21.5)), _trained(_rec("s1", 21.9, seed=1)),
             _trained(_rec("s2", 21.2, seed=2))]
    table = _verdict(tmp_path, _trained(_rec("k", 21.8)), seeds)  # 0.3 apart; seed sd 0.35
    assert table["noise"].iloc[0] == "seed-spread(n=3)"
    assert table["verdict"].tolist() == ["within-noise"]
    far = _verdict(tmp_path / "far", _trained(_rec("k", 30.0)), seeds)
    assert far["verdict"].tolist() == ["differs"]


def test_machine_independent_cells_are_judged_by_their_windows(tmp_path: Path) -> None:
    """An RTN cell's codes do not depend on float rounding: with three published seeds, a 2%
    shift on every window is still caught by the paired bootstrap although the seeds spread
    far wider. The same records as a machine-bound method (GPTQ: a rerun on another CPU is
    another draw, measured moving as far as another seed) or a trained one are judged by the
    seed spread, which lets the shift pass."""
    rng = np.random.default_rng(3)
    base = rng.normal(3.0, 0.3, 40)
    shifted = base + 0.02

    def rec(key: str, nlls: np.ndarray, seed: int = 0) -> dict:
        return _rec(key, _ppl(nlls), nlls=nlls.tolist(), seed=seed)

    seeds = [rec("k", base), rec("s1", base + 0.1, seed=1), rec("s2", base - 0.1, seed=2)]
    table = _verdict(tmp_path, rec("k", shifted), seeds)
    assert table["noise"].iloc[0].startswith("paired-bootstrap")
    assert table["verdict"].tolist() == ["differs"]
    qat = _verdict(tmp_path / "q", _trained(rec("k", shifted)), [_trained(r) for r in seeds])
    assert qat["noise"].iloc[0] == "seed-spread(n=3)"
    assert qat["verdict"].tolist() == ["within-noise"]

    def gptq(r: dict) -> dict:
        r["cell"]["method"] = "gptq"
        return r

    ptq = _verdict(tmp_path / "g", gptq(rec("k", shifted)), [gptq(r) for r in seeds])
    assert ptq["noise"].iloc[0] == "seed-spread(n=3)"
    # seeds published under another grid's name are seeds of the same cell
    other = [gptq(r) for r in seeds]
    for r in other[1:]:
        r["grid"] = "another-grid"
    moved = _verdict(tmp_path / "m", gptq(rec("k", shifted)), other)
    assert moved["noise"].iloc[0] == "seed-spread(n=3)"
    assert ptq["verdict"].tolist() == ["within-noise"]


def _acc(key: str, value: float, seed: int = 0) -> dict:
    rec = _rec(key, value, seed=seed)
    rec["metrics"] = [{"protocol": "top1/x", "metric": "top1", "unit": "accuracy",
                       "value": value}]
    return rec


def test_a_seed_spread_admitting_every_accuracy_is_unjudged(tmp_path: Path) -> None:
    """Seeds 0.90 / 0.10 / 0.89 (one collapse): +-t s sqrt(2) spans more than [0, 1], so the
    check is vacuous and is not reported as an agreement; tight seeds keep a real test."""
    collapsed = [_acc("k", 0.90), _acc("s1", 0.10, seed=1), _acc("s2", 0.89, seed=2)]
    table = _verdict(tmp_path, _acc("k", 0.12), collapsed)
    assert table["verdict"].tolist() == ["unjudged"]
    assert table["noise"].iloc[0] == "seed-spread(n=3), vacuous"
    assert (table["noise_lo"].iloc[0], table["noise_hi"].iloc[0]) == pytest.approx((-0.90, 0.10))
    assert not agrees(table)
    tight = [_acc("k", 0.90), _acc("s1", 0.905, seed=1), _acc("s2", 0.895, seed=2)]
    ok = _verdict(tmp_path / "t", _acc("k", 0.902), tight)
    assert ok["verdict"].tolist() == ["within-noise"] and agrees(ok)
    assert ok["noise_hi"].iloc[0] < 0.10  # cut at 1.0 - 0.90 only when it reaches it
    assert _verdict(tmp_path / "f", _acc("k", 0.12), tight)["verdict"].tolist() == ["differs"]


def test_the_level_is_split_over_the_values_tested(tmp_path: Path) -> None:
    """Bonferroni: the same difference is harder to call ``differs`` among many values."""
    rng = np.random.default_rng(2)
    base = rng.normal(3.0, 0.3, 40)
    moved = base + 0.004 + rng.normal(0, 0.006, 40)
    one = _verdict(tmp_path, _rec("k", _ppl(moved), nlls=moved.tolist()),
                   [_rec("k", _ppl(base), nlls=base.tolist())])
    lo, hi = one["noise_lo"].iloc[0], one["noise_hi"].iloc[0]
    a, b = Store(tmp_path / "ma"), Store(tmp_path / "mb")
    for i in range(20):
        for store, nlls in ((a, moved), (b, base)):
            rec = _rec(f"k{i}", _ppl(nlls), nlls=nlls.tolist())
            rec["cell"]["method"] = f"m{i}"  # 20 different cells
            store.put(rec)
    many = line_up("g", [(f"c{i}", f"k{i}") for i in range(20)], a, b)
    assert many["noise_lo"].iloc[0] < lo and many["noise_hi"].iloc[0] > hi


def test_explain_names_both_values_the_noise_and_the_machines(tmp_path: Path) -> None:
    fresh = _rec("k1", 21.6, nlls=[3.1] * 8)
    fresh["env"] = {"device_name": "cpu-b", "torch_threads": 1}
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    a.put(fresh)
    b.put(_rec("k1", 21.5, nlls=[3.0] * 8))
    table = line_up("g", [("cell", "k1")], a, b)
    text = explain(table, "k1", a, b)
    assert "published 21.5" in text and "fresh 21.6" in text and "verdict: differs" in text
    assert "cpu-a x2" in text and "cpu-b x1" in text and "paired-bootstrap" in text
    assert explain(table, "nope", a, b).startswith("no cell matches")


def test_missing_and_failed_cells_are_listed(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    b.put(_rec("k1", 1.0))
    a.put(_rec("k2", 1.0, status="crashed"))
    b.put(_rec("k2", 1.0))
    table = line_up("g", [("c1", "k1"), ("c2", "k2"), ("c3", "k3")], a, b)
    assert table["verdict"].tolist() == ["no fresh record", "status ok -> crashed",
                                         "no fresh record"]
    assert not agrees(table)


def test_cli_rejects_a_missing_published_store(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ROOT / "configs" / "smoke" / "tiny.yaml"
    assert main(["verify", str(cfg), "--published", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--published" in err
    assert main(["verify", str(cfg), "--alpha", "2"]) == 2


def test_cli_rejects_verifying_a_store_against_itself(capsys: pytest.CaptureFixture[str]) -> None:
    # both paths relative to the working directory, whatever it is
    assert main(["verify", str(ROOT / "configs" / "reproduce.yaml"), "--published",
                 "results/records"]) == 2
    assert "is the published store" in capsys.readouterr().err
