"""The vision track through the grid: config validation, the shared FP checkpoint, every method
on a CNN (PTQ through the sequential pipeline, QAT through the training loop), honest records,
divergence as a record, bit-identical QAT on CPU, TR trajectories in records and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from suite.config import load_grids, parse_grid
from suite.errors import ConfigError

PTQ = ["rtn", "gptq", "decoupleq", "precalibration"]
QAT = ["lsq", "tr_scheduling"]


def vision_grid(dataset: str, store: Path, methods: list[str], **over) -> dict:
    """A small vision grid: QAT per-tensor symmetric, PTQ per-channel asymmetric."""
    qat = [m for m in methods if m.split(":")[0] in QAT]
    exclude = [{"method": m, "group_size": "per-channel" if m in qat else "per-tensor"}
               for m in methods if m != "fp"]
    exclude += [{"method": m, "sym": m not in qat} for m in methods if m != "fp"]
    raw = {
        "name": "vtest",
        "axes": {"model": [f"cnn-small@{dataset}"], "method": methods, "wbits": [2],
                 "group_size": ["per-tensor", "per-channel"], "sym": [True, False],
                 "seed": [0]},
        "exclude": exclude,
        "fixed": {"vision": {"fp_train": {"epochs": 3, "batch_size": 16},
                             "train": {"epochs": 1, "max_steps": 4, "batch_size": 16},
                             "calib_images": 16},
                  "eval": [{"type": "top1", "dataset": dataset}]},
        "methods": {"tr_scheduling": {"first_last_bits": 8}} if "tr_scheduling" in methods
        else {},
        "run": {"store": str(store)},
    }
    raw.update(over)
    return raw


def test_vision_grid_validates_and_expands(tmp_path: Path) -> None:
    grid = parse_grid(vision_grid("fashion-mnist", tmp_path, ["fp", "rtn", "lsq", "lsq:adam"]))
    assert grid.domain == "vision" and grid.vision.train.max_steps == 4
    labels = [c.label() for c in grid.expand()]
    assert labels == ["cnn-small@fashion-mnist fp seed=0",
                      "cnn-small@fashion-mnist rtn w2pc seed=0",
                      "cnn-small@fashion-mnist lsq w2pt-sym seed=0",
                      "cnn-small@fashion-mnist lsq:adam w2pt-sym seed=0"]
    assert [e.protocol_id for e in grid.evals] == ["top1/fashion-mnist/test"]


@pytest.mark.parametrize(("change", "pattern"), [
    (lambda r: r["axes"].update(model=["cnn-small@fashion-mnist", "hf:x"]), "mixes language"),
    (lambda r: r["axes"].update(model=["cnn-tiny@fashion-mnist"]), "axes.model.*<vision-arch>"),
    (lambda r: r["axes"].update(model=["cnn-small@mnist"]), "unknown vision dataset"),
    (lambda r: r["fixed"]["vision"].update(lr=1), r"fixed.vision.lr: unknown key; accepted: fp_"),
    (lambda r: r["fixed"]["vision"]["fp_train"].update(optimizer="lamb"),
     "fixed.vision.fp_train.*sgd, adam"),
    (lambda r: r["fixed"]["vision"]["train"].update(max_steps=0), "fixed.vision.train.max_steps"),
    (lambda r: r["fixed"].update(eval=[{"type": "ppl"}]), "vision grid accepts type top1"),
    (lambda r: r["fixed"].update(eval=[{"type": "top1", "dataset": "imagefolder:/x"}]),
     "no top1 protocol for cnn-small@fashion-mnist"),
    (lambda r: r["fixed"].update(calib={"windows": 4}), "fixed.calib: text calibration"),
    (lambda r: r["axes"].update(method=["lsq:a.b"]), "variant label"),
    (lambda r: r["methods"].update({"lsq:adam": {"optimizer": "adamw"}}), "methods.lsq:adam"),
    (lambda r: r.update(exclude=[]), "lsq trains symmetric per-tensor step sizes; got w2pt;"),
])
def test_vision_config_errors_are_one_line(tmp_path: Path, change, pattern) -> None:  # noqa: ANN001
    raw = vision_grid("fashion-mnist", tmp_path, ["fp", "lsq", "lsq:adam"])
    change(raw)
    with pytest.raises(ConfigError, match=pattern) as e:
        parse_grid(raw)
    assert "\n" not in str(e.value)


def test_qat_methods_refuse_language_grids(tiny_llama: Path) -> None:
    raw = {"axes": {"model": [f"hf:{tiny_llama}"], "method": ["lsq"]}}
    with pytest.raises(ConfigError, match="'lsq' does not run on lm models; accepted: .*gptq"):
        parse_grid(raw)


def test_multi_document_config_and_selection(tmp_path: Path) -> None:
    docs = [vision_grid("fashion-mnist", tmp_path, ["fp"]),
            {**vision_grid("fashion-mnist", tmp_path, ["rtn"]), "name": "second"}]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    assert [g.name for g in load_grids(path)] == ["vtest", "second"]
    assert [g.name for g in load_grids(path, select="second")] == ["second"]
    with pytest.raises(ConfigError, match="--grid: got 'third'; accepted: vtest, second"):
        load_grids(path, select="third")
    path.write_text(yaml.safe_dump_all([docs[0], docs[0]]))
    with pytest.raises(ConfigError, match="share a name"):
        load_grids(path)


def _records(store: Path) -> dict[str, dict]:
    out = {}
    for f in store.rglob("*.json"):
        rec = json.loads(f.read_text())
        if "cell" in rec:
            out[rec["cell"]["method"]] = rec
    return out


def test_every_method_runs_on_a_cnn_end_to_end(tiny_imagefolder: str, tmp_path: Path) -> None:
    from suite.cli import main

    store, out = tmp_path / "store", tmp_path / "out"
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump(vision_grid(tiny_imagefolder, store, ["fp", *PTQ, *QAT])))
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    recs = _records(store)
    assert set(recs) == {"fp", *PTQ, *QAT}
    fp_top1 = recs["fp"]["metrics"][0]["value"]
    assert fp_top1 > 0.6  # the fixture is learnable: the FP checkpoint was really trained
    for name, rec in recs.items():
        assert rec["status"] == "ok", (name, rec["error"])
        assert rec["metrics"][0]["protocol"] == f"top1/{tiny_imagefolder}/test"
        assert len(rec["metrics"][0]["outcomes"]) == 36  # one 0/1 per test image
        assert rec["fp_modules"] == ["block1.conv", "head.fc", "*bn"]
        if name != "fp":
            assert rec["honesty"]["passed"] and rec["honesty"]["n_quantized"] == 3
    for name in QAT:
        assert recs[name]["abits"] == 2 and recs[name]["stats"][name]["train_steps"] == 4
        assert recs[name]["stats"][name]["edge_layers"] == {"block1.conv": "W8A8",
                                                           "head.fc": "W8A8"}
    assert recs["rtn"]["abits"] is None
    hist = recs["tr_scheduling"]["stats"]["tr_scheduling"]["tr_history"]["global"]
    assert set(hist) == {"k", "K", "R", "U", "k_window"} and len(hist["U"]) == 4
    tr_stats = recs["tr_scheduling"]["stats"]["tr_scheduling"]
    assert tr_stats["signal"]["name"] == "k/R" and "median" in tr_stats["tr_tracking"]["global"]
    assert (out / "vtest-tr.png").stat().st_size > 0
    table = (out / "vtest.md").read_text()
    assert "| abits |" in table and "top-1 accuracy" in table


def _payload(tiny_imagefolder: str, tmp_path: Path, method: str, **methods) -> dict:  # noqa: ANN003
    from suite.prepare import materialise, prepare

    raw = vision_grid(tiny_imagefolder, tmp_path / "s", [method])
    raw["methods"] = methods
    grid = parse_grid(raw)
    cells = prepare(grid)
    materialise(grid, cells)
    return cells[0].payload


def test_keys_and_tables_never_train(tiny_imagefolder: str, tmp_path: Path) -> None:
    """Run keys are computable from the FP recipe alone: `qbench table` trains nothing."""
    from suite.cli import main
    from suite.prepare import prepare

    raw = vision_grid(tiny_imagefolder, tmp_path / "s", ["fp"])
    raw["fixed"]["vision"]["fp_seed"] = 12345  # a recipe no other test trains
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["table", str(cfg), "--out", str(tmp_path / "out")]) == 0
    ckpt = Path(prepare(parse_grid(raw))[0].payload["model"]["location"])
    assert not ckpt.exists()


def test_qat_cell_is_bit_identical_on_cpu(tiny_imagefolder: str, tmp_path: Path) -> None:
    from suite.runner import run_cell

    payload = _payload(tiny_imagefolder, tmp_path, "lsq")
    a, b = run_cell(payload), run_cell(payload)
    assert a["status"] == b["status"] == "ok"
    assert a["metrics"][0]["outcomes"] == b["metrics"][0]["outcomes"]
    losses = [[(e["train_loss"], e["train_acc"]) for e in r["stats"]["lsq"]["train"]["records"]]
              for r in (a, b)]
    assert losses[0] == losses[1]


def test_diverging_qat_becomes_a_diverged_record(tiny_imagefolder: str, tmp_path: Path) -> None:
    from suite.runner import run_cell

    payload = _payload(tiny_imagefolder, tmp_path, "lsq", lsq={"lr": 1e30, "momentum": 0.0})
    rec = run_cell(payload)
    assert rec["status"] == "diverged" and "diverged at step" in rec["error"]
    assert rec["metrics"] == []


def test_a_published_checkpoint_is_checked_and_keyed_by_content(tiny_imagefolder: str,
                                                                tmp_path: Path) -> None:
    """``fixed.vision.fp_checkpoint``: cells start from that file (not a retrained one), the
    run key names it by its content hash, and a file that is not the one the grid names (other
    bytes, another recipe) is a one-line ConfigError before any key is made."""
    import shutil

    from suite.assets import sha256_file
    from suite.prepare import prepare
    from suite.runner import run_cell

    trained = _payload(tiny_imagefolder, tmp_path, "fp")
    published = tmp_path / "pub" / "cnn-small.pt"
    published.parent.mkdir()
    shutil.copy(trained["model"]["location"], published)
    sha = sha256_file(published)

    def grid(**vision: object) -> dict:
        raw = vision_grid(tiny_imagefolder, tmp_path / "s", ["fp"])
        raw["fixed"]["vision"].update(vision)
        return raw

    payload = prepare(parse_grid(grid(fp_checkpoint=str(published), fp_sha256=sha)))[0].payload
    assert payload["key_payload"]["model_fingerprint"] == f"sha256:{sha[:16]}"
    assert payload["model"]["location"] == str(published.resolve())
    assert payload["key_payload"] != trained["key_payload"]  # named by content, not recipe
    assert (run_cell(payload)["metrics"][0]["outcomes"]
            == run_cell(trained)["metrics"][0]["outcomes"])

    faults = [({"fp_checkpoint": str(published)}, "fixed.vision.fp_sha256: got None"),
              ({"fp_checkpoint": str(published), "fp_sha256": "0" * 64}, "has sha256"),
              ({"fp_checkpoint": str(tmp_path / "no.pt"), "fp_sha256": sha}, "does not exist"),
              ({"fp_checkpoint": str(published), "fp_sha256": sha, "fp_seed": 7},
               "trained by fixed.vision.fp_train and fp_seed")]
    for vision, pattern in faults:
        with pytest.raises(ConfigError, match=pattern) as e:
            prepare(parse_grid(grid(**vision)))
        assert "\n" not in str(e.value)
    with published.open("ab") as fh:  # one byte more: another file
        fh.write(b"\0")
    with pytest.raises(ConfigError, match="has sha256"):
        prepare(parse_grid(grid(fp_checkpoint=str(published), fp_sha256=sha)))
