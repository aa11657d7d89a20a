"""Plug-in methods: a third-party package registers a method through the ``qbench.methods``
entry point group, without editing qbench. The package here is written to a temporary
directory as an installed distribution (module + ``.dist-info`` with ``entry_points.txt``),
then picked up by fresh interpreters: ``qbench list``, the contract tests and a grid run whose
leaderboard holds its rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke" / "tiny.yaml"

PLUGIN = '''"""A third-party qbench method (test fixture): round-to-nearest under its own id."""
from baselines.rtn import RTN
from suite.interface import METHODS


@METHODS.register("demo-rtn")
class DemoRTN(RTN):
    """RTN, registered by a plug-in package."""

    name = "demo-rtn"
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    (site / "qbench_demo_plugin").mkdir()
    (site / "qbench_demo_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "qbench_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qbench-demo-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text("[qbench.methods]\ndemo-rtn = qbench_demo_plugin\n")
    return site


def _run(args: list[str], plugin_path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugin_path)])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_plugin_is_listed(plugin_path: Path, tmp_path: Path) -> None:
    proc = _run(["-m", "suite.cli", "list"], plugin_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo-rtn" in proc.stdout


def test_plugin_passes_the_contract_tests(plugin_path: Path, tmp_path: Path) -> None:
    proc = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "demo-rtn",
                 str(ROOT / "tests" / "test_method_contract.py")], plugin_path, ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    assert int(proc.stdout.split(" passed")[0].split()[-1]) >= 3  # honest, deterministic, yaml


def test_plugin_runs_in_a_grid_and_lands_in_the_leaderboard(plugin_path: Path, tmp_path: Path,
                                                            tiny_llama: Path) -> None:
    out = tmp_path / "results"
    proc = _run(["-m", "suite.cli", "run", str(SMOKE), "--out", str(out),
                 "--set", f"axes.model=[hf:{tiny_llama}]", "--set", "axes.method=[fp, demo-rtn]",
                 "--set", "axes.wbits=[4]", "--set", "axes.group_size=[32]",
                 "--set", f"run.store={tmp_path / 'records'}"], plugin_path, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = pd.read_csv(out / "smoke-tiny.csv")
    assert set(board["method"]) == {"fp", "demo-rtn"}
    assert set(board["status"]) == {"ok"}


def test_a_broken_plugin_is_reported_not_fatal(tmp_path: Path) -> None:
    site = tmp_path / "site"
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qbench.methods]\nbroken = no_such_module_here\n")
    proc = _run(["-m", "suite.cli", "list"], site, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "plug-in 'broken' (no_such_module_here) failed to load" in proc.stderr
    assert "rtn" in proc.stdout
