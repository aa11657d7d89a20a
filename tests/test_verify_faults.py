"""``qbench verify`` catches real regressions and passes a harmless re-run.

A small quick tier (the tiny LLaMA: FP, RTN, GPTQ with act-order; a CNN on a synthetic image
set: LSQ at W2A2) is run once as the "published" store at 2 threads. Then:

* each known fault (``tests/faults/sitecustomize.py``: GPTQ without act-order, RTN flooring
  instead of rounding, LSQ with a wrong step-size gradient scale, a perplexity protocol that
  evaluates one window fewer under the same id) is injected into a fresh run of the affected
  cells under unchanged run keys, and verify must class the affected values ``differs``;
* the same cells at 1 thread instead of 2 (a cheap stand-in for another machine's float
  rounding) must come out with no ``differs``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ROOT / "tests" / "faults"


def _llm_grid(model: Path, store: Path) -> dict:
    return {
        "name": "faults-llm",
        "axes": {"model": [f"hf:{model}"], "method": ["fp", "rtn", "gptq"], "wbits": [3],
                 "group_size": [32], "seed": [0]},
        "exclude": [],
        "fixed": {"calib": {"corpus": "abcnews-lee", "windows": 16, "seqlen": 64},
                  "eval": [{"type": "ppl", "corpus": "enwiki-gensim", "seqlen": 64,
                            "windows": 64}]},
        "methods": {"gptq": {"act_order": True}},
        "run": {"store": str(store), "threads": 2},
    }


def _vision_grid(dataset: str, store: Path) -> dict:
    return {
        "name": "faults-vision",
        "axes": {"model": [f"cnn-small@{dataset}"], "method": ["lsq"], "wbits": [2],
                 "group_size": ["per-tensor"], "sym": [True], "seed": [0]},
        "fixed": {"vision": {"fp_train": {"epochs": 2, "batch_size": 32},
                             "train": {"epochs": 1, "max_steps": 30, "batch_size": 32},
                             "calib_images": 32},
                  "eval": [{"type": "top1", "dataset": dataset}]},
        "run": {"store": str(store), "threads": 2},
    }


def _ambiguous_images(root: Path, n_train: int, n_val: int, side: int = 28) -> Path:
    """``root/{train,val}/<class>/*.png``: 3 classes of noisy RGB images, class k brighter in
    channel k by a per-image amount in [0, 24): many images are ambiguous, so top-1 stays far
    from 1 and a change in the quantized model moves individual outcomes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 200, (side, side, 3)).astype(np.int64)
                pixels[..., k] += int(rng.integers(0, 24))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                    root / split / name / f"{i}.png")
    return root


def _qbench(args: list[str], cwd: Path, fault: str | None = None
            ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{FAULTS}{os.pathsep}{ROOT}"}
    env.pop("QBENCH_FAULT", None)
    if fault:
        env["QBENCH_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "suite.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def published(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The two small grids run once into a "published" store, at 2 threads."""
    tmp = tmp_path_factory.mktemp("faults")
    images = _ambiguous_images(tmp / "images", n_train=96, n_val=200)
    store = tmp / "published"
    configs = {}
    for name, raw in (("llm", _llm_grid(tiny_llama, store)),
                      ("vision", _vision_grid(f"imagefolder:{images}?crop=28&resize=28",
                                              store))):
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        proc = _qbench(["run", str(path), "--out", str(tmp / "tables")], tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        configs[name] = path
    return {"tmp": tmp, "store": store, **configs}


def _fresh(pub: dict, track: str, name: str, sets: list[str], fault: str | None = None
           ) -> pd.DataFrame:
    """Run the selected cells into their own store, then verify them against the published."""
    tmp = pub["tmp"]
    over = ["--set", f"run.store={tmp / name}", *sets]
    run = _qbench(["run", str(pub[track]), "--out", str(tmp / f"{name}-tables"), *over], tmp,
                  fault)
    assert run.returncode == 0, run.stderr[-3000:]
    csv = tmp / f"{name}.csv"
    ver = _qbench(["verify", str(pub[track]), "--published", str(pub["store"]), "--csv",
                   str(csv), *over], tmp)
    table = pd.read_csv(csv)
    assert ver.returncode == (0 if table["verdict"].isin(
        ["identical", "within-float", "within-noise"]).all() else 1), ver.stderr[-2000:]
    return table


@pytest.mark.parametrize(("fault", "track", "method"), [
    ("gptq-no-act-order", "llm", "gptq"),
    ("rtn-floor", "llm", "rtn"),
    ("lsq-grad-scale", "vision", "lsq"),
    ("ppl-windows", "llm", "fp"),
])
def test_each_injected_fault_differs(published: dict, fault: str, track: str,
                                     method: str) -> None:
    only = ["--set", f"axes.method=[{method}]"]
    if track == "llm" and method != "gptq":
        only += ["--set", "methods={}"]  # the grid's GPTQ settings name a method not run
    table = _fresh(published, track, fault, only, fault)
    assert len(table) == 1 and table["verdict"].tolist() == ["differs"], table.to_string()


def test_one_thread_rerun_has_no_differs(published: dict) -> None:
    for track in ("llm", "vision"):
        table = _fresh(published, track, f"threads1-{track}", ["--set", "run.threads=1"])
        assert len(table) == (3 if track == "llm" else 1)
        assert "differs" not in set(table["verdict"]), table.to_string()
