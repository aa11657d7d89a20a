"""``qbench compare``: paired differences with intervals and verdicts, on synthetic records
whose answer is known, and on the published vision leaderboard."""

from __future__ import annotations

import numpy as np
import pytest

from suite.compare import compare, markdown


def _rec(method: str, seed: int, outcomes: np.ndarray) -> dict:
    """A minimal ok record with one top-1 metric (0/1 outcome per test image)."""
    fmt = {"bits": 2, "group_size": 0, "sym": True, "scale_dtype": "float16"}
    return {"run_key": f"{method}-{seed}", "status": "ok", "abits": 2, "effective_bits": 2.0,
            "cell": {"model": "m@d", "method": method, "format": fmt, "seed": seed,
                     "protocols": {"top1/d/test": {}}},
            "metrics": [{"protocol": "top1/d/test", "metric": "top1", "unit": "accuracy",
                         "higher_is_better": True, "value": float(outcomes.mean()),
                         "outcomes": "".join(str(int(v)) for v in outcomes)}]}


def _outcomes(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(int)


@pytest.mark.parametrize(("p_new", "verdict"), [(0.90, "better"), (0.70, "worse"),
                                                (0.80, "not distinguishable")])
def test_single_seed_bootstrap_verdicts(p_new: float, verdict: str) -> None:
    base = _outcomes(0.80, 4000, 1)
    new = base.copy() if p_new == 0.80 else _outcomes(p_new, 4000, 2)
    table = compare([_rec("a", 0, new), _rec("b", 0, base)], "a", ["b"])
    row = table.iloc[0]
    assert row["verdict"] == verdict and row["n"] == 4000
    assert row["lo95"] <= row["diff"] <= row["hi95"]
    assert "bootstrap" in row["paired_over"]


def test_three_seeds_use_a_t_interval_over_seeds() -> None:
    recs = [_rec(m, s, _outcomes(p, 500, 10 * s + i)) for s in range(3)
            for i, (m, p) in enumerate((("a", 0.95), ("b", 0.60)))]
    row = compare(recs, "a", ["b"]).iloc[0]
    assert row["paired_over"] == "seeds" and row["n"] == 3 and row["verdict"] == "better"
    assert "| m@d | w2a2 per-tensor sym |" in markdown(compare(recs, "a", ["b"]))


def test_unshared_seeds_are_not_compared() -> None:
    recs = [_rec("a", 0, _outcomes(0.9, 100, 0)), _rec("b", 1, _outcomes(0.9, 100, 1))]
    assert compare(recs, "a", ["b"]).empty


@pytest.mark.slow  # preparing the grid needs Fashion-MNIST (an apt fetch on a fresh machine)
def test_cli_on_the_published_vision_grid(capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from suite.cli import main

    root = Path(__file__).resolve().parent.parent
    if not (root / "results" / "reproduce-vision.csv").exists():
        pytest.skip("no published vision leaderboard")
    rc = main(["compare", "tr_scheduling", "--against", "lsq", "--config",
               str(root / "configs" / "reproduce.yaml"), "--grid", "reproduce-vision",
               "--set", f"run.store={root / 'results' / 'records'}"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("| cnn-small@fashion-mnist |") == 3
    assert "not distinguishable" in out
    assert main(["compare", "nope", "--against", "lsq", "--config",
                 str(root / "configs" / "reproduce.yaml")]) == 2


def test_best_of_pairs_each_group_with_its_best_baseline() -> None:
    recs = [_rec(m, s, _outcomes(p, 500, 10 * s + i)) for s in range(3)
            for i, (m, p) in enumerate((("a", 0.80), ("b", 0.60), ("c", 0.85)))]
    separate = compare(recs, "a", ["b", "c"])
    assert list(separate["baseline"]) == ["b", "c"]
    best = compare(recs, "a", ["b", "c"], best_of=True)
    assert list(best["baseline"]) == ["c"] and best.iloc[0]["verdict"] == "worse"
    assert best.iloc[0]["diff"] == separate.iloc[1]["diff"]  # the same pairing as c alone


def test_a_seed_free_record_stands_for_every_seed_of_the_baseline() -> None:
    # rtn declares seed_free: its one record is paired with each of gptq's three seeds
    recs = [_rec("rtn", 0, _outcomes(0.95, 500, 0))]
    recs += [_rec("gptq", s, _outcomes(0.60, 500, 10 + s)) for s in range(3)]
    row = compare(recs, "rtn", ["gptq"]).iloc[0]
    assert row["paired_over"].startswith("seeds") and "repeated" in row["paired_over"]
    assert row["n"] == 3 and row["verdict"] == "better"
    back = compare(recs, "gptq", ["rtn"]).iloc[0]  # either side may be the seed-free one
    assert back["n"] == 3 and back["verdict"] == "worse"


def test_a_seeded_method_with_one_record_is_not_repeated() -> None:
    # awq draws its calibration sample from the seed: one record is one seed, not three
    recs = [_rec("awq", 0, _outcomes(0.95, 500, 0))]
    recs += [_rec("gptq", s, _outcomes(0.60, 500, 10 + s)) for s in range(3)]
    row = compare(recs, "awq", ["gptq"]).iloc[0]
    assert row["paired_over"] == "bootstrap over evaluation units, 1 seed(s)"
    assert row["n"] == 500
