"""A newcomer's method as one new file: copied into a temporary copy of the project's packages
(methods/ as shipped, plus methods/mine.py), it is found by name with no other edit, runs
through configs/try-method.yaml narrowed with `--set 'axes.method=[rtn,mine]'` (both grids:
a decoder LM and a CNN), and `qbench compare mine --against rtn` reads its records from the
store without repeating that override. The tiny fixtures stand in for the embedded model and
Fashion-MNIST, which a test machine may not have cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent

MINE = '''"""A newcomer's method: round-to-nearest of the weights shrunk by 1%."""

from dataclasses import dataclass

import torch

from suite.interface import METHODS, MethodConfig, QuantMethod, QuantResult
from suite.primitives import quantize_tensor, write_weight


@dataclass(frozen=True)
class MineConfig(MethodConfig):
    shrink: float = 0.99


@METHODS.register("mine")
class Mine(QuantMethod):
    """Shrunk round-to-nearest (test fixture)."""

    name = "mine"
    kind = "ptq"
    Config = MineConfig

    @torch.no_grad()
    def quantize(self, model, data, ctx):  # noqa: ANN001, ANN201
        qstate = {}
        for name, layer in ctx.adapter.target_layers(model).items():
            w = layer.weight.flatten(1) * self.config.shrink  # (out, in) for linears and convs
            qstate[name] = quantize_tensor(w, self.fmt)
            write_weight(layer, qstate[name])
        return QuantResult(model, qstate)
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the packages and configs with methods/mine.py added, nothing else edited."""
    root = tmp_path_factory.mktemp("clone")
    for name in ("suite", "methods", "baselines", "configs"):
        shutil.copytree(ROOT / name, root / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "methods" / "mine.py").write_text(MINE)
    return root


def _qbench(project: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m suite.cli ARGS`` in the copy (its packages shadow the installed ones)."""
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([sys.executable, "-m", "suite.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)


def test_a_new_file_in_methods_is_a_method(project: Path) -> None:
    assert (project / "methods" / "__init__.py").read_bytes() == \
        (ROOT / "methods" / "__init__.py").read_bytes()  # no import list was edited
    proc = _qbench(project, "list", "methods")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln.split() for ln in proc.stdout.splitlines()]
    assert ["mine", "ptq", "Shrunk", "round-to-nearest", "(test", "fixture)."] in lines
    assert "mine" not in _qbench(ROOT, "list", "methods").stdout.split()  # only in the copy


def test_try_method_grid_and_compare(project: Path, tiny_llama: Path, tiny_imagefolder: str
                                     ) -> None:
    config = "configs/try-method.yaml"
    narrow = "axes.method=[rtn,mine]"
    # the two grids of the file, on the tiny fixtures instead of the embedded assets
    stand_in = {
        "try-method": [f"axes.model=[hf:{tiny_llama}]"],
        "try-method-vision": [
            f"axes.model={json.dumps([f'cnn-small@{tiny_imagefolder}'])}",
            f"fixed.eval={json.dumps([{'type': 'top1', 'dataset': tiny_imagefolder}])}",
            "fixed.vision.fp_train.batch_size=16", "fixed.vision.calib_images=16"],
    }
    for grid, models in stand_in.items():
        sets = [a for s in [*models, narrow] for a in ("--set", s)]
        run = _qbench(project, "run", config, "--grid", grid, "--out", "build/out", *sets)
        assert run.returncode == 0, run.stderr[-3000:]
        board = pd.read_csv(project / "build" / "out" / f"{grid}.csv")
        assert sorted(board["method"]) == ["mine", "rtn"] and set(board["status"]) == {"ok"}
        md = (project / "build" / "out" / f"{grid}.md").read_text()
        assert f"--set '{narrow}'" in md  # "regenerate with" names the overrides
        # compare: the grid as shipped lists rtn, not mine; mine comes from the store
        sets = [a for s in models for a in ("--set", s)]
        cmp = _qbench(project, "compare", "mine", "--against", "rtn", "--config", config,
                      "--grid", grid, *sets)
        assert cmp.returncode == 0, cmp.stderr[-3000:]
        rows = [ln for ln in cmp.stdout.splitlines() if "| mine | rtn |" in ln]
        assert len(rows) == 1 and rows[0].split("|")[-2].strip() in (
            "better", "worse", "not distinguishable")
    nope = _qbench(project, "compare", "mien", "--against", "rtn", "--config", config,
                   "--grid", "try-method", *("--set", stand_in["try-method"][0]))
    assert nope.returncode == 2
    assert "'mien' is not a method of the grid(s) or of their records (did you mean " \
           "'mine'?)" in nope.stderr


def test_store_records_keep_the_newest_record_of_each_cell(tmp_path: Path) -> None:
    from suite.commands import _store_records
    from suite.records import Store

    store = Store(tmp_path)
    fmt = {"bits": 3, "group_size": 64, "sym": False, "scale_dtype": "float16"}

    def put(key: str, grid: str, method: str, started: str, status: str = "ok") -> None:
        store.put({"run_key": key, "grid": grid, "status": status, "started_at": started,
                   "cell": {"model": "m", "method": method, "format": fmt, "seed": 0}})

    put("a1", "g", "mine", "2026-01-02T00:00:00+00:00")  # newer, other parameters
    put("a0", "g", "mine", "2026-01-01T00:00:00+00:00")
    put("b0", "g", "rtn", "2026-01-01T00:00:00+00:00")
    put("c0", "other", "mine", "2026-01-03T00:00:00+00:00")  # another grid's
    put("d0", "g", "mine2", "2026-01-03T00:00:00+00:00", status="failed")
    by_method, dropped = _store_records(store, "g")
    assert {m: [r["run_key"] for r in recs] for m, recs in by_method.items()} == \
        {"mine": ["a1"], "rtn": ["b0"]}
    assert dropped == {"mine": 1}
