"""nox sessions: tests, reproduce, lint, bench, kernels.

All sessions share ONE virtualenv, ``.nox/qbench``, created and filled here (nox's own per-session
venvs would install torch and torchvision, several GB, once per session). Dependencies are
installed once and re-installed only when pyproject.toml changes (or ``QBENCH_REINSTALL=1``);
the project is installed editable, so code changes need no reinstall.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent
VENV = ROOT / ".nox" / "qbench"
BIN = VENV / "bin"
# torch / torchvision pinned to the releases this project is tested with.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _venv(session: nox.Session) -> dict[str, str]:
    """Create/refresh the shared venv; return the environment that activates it."""
    if not (BIN / "python").exists():
        session.run(sys.executable, "-m", "venv", str(VENV), external=True)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / f".deps-{digest}"
    if not stamp.exists() or os.environ.get("QBENCH_REINSTALL"):
        pip = [str(BIN / "python"), "-m", "pip", "install", "-q"]
        session.run(*pip, *TORCH, external=True)
        session.run(*pip, "-e", ".[dev]", external=True)
        stamp.touch()
    return {"VIRTUAL_ENV": str(VENV), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """CPU test suite (excludes `slow` and `gpu`); pass pytest args after `--`."""
    env = {**_venv(session), **OFFLINE}
    args = session.posargs or ["-m", "not slow and not gpu"]
    session.run(str(BIN / "pytest"), "-q", *args, env=env, external=True)


@nox.session(venv_backend="none")
def reproduce(session: nox.Session) -> None:
    """Run the embedded default grid (or the config given after `--`) and write results/.

    `-- quick`: the quick tier instead (configs/reproduce-quick.yaml, about 18 minutes from
    nothing cached on 2 cores): a subset of the published cells run into results/quick/
    (its own store), then `qbench verify` checks every fresh number against the published
    record of the same cell."""
    env = {**_venv(session), **OFFLINE}
    qbench = str(BIN / "qbench")
    config = session.posargs[0] if session.posargs else "configs/reproduce.yaml"
    if config == "quick":
        quick = "configs/reproduce-quick.yaml"
        session.run(qbench, "run", quick, "--out", "results/quick", env=env, external=True)
        session.run(qbench, "verify", quick, "--csv", "results/quick/verify.csv", env=env,
                    external=True)
        return
    session.run(qbench, "run", config, env=env, external=True)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    env = _venv(session)
    session.run(str(BIN / "ruff"), "check", ".", env=env, external=True)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """pytest-benchmark suites (speed and memory goals live here, never in unit tests)."""
    env = {**_venv(session), **OFFLINE}
    session.run(str(BIN / "pytest"), "-q", "benchmarks", "--benchmark-only", *session.posargs,
                env=env, external=True)


@nox.session(venv_backend="none")
def kernels(session: nox.Session) -> None:
    """Regenerate results/kernels-cpu.csv, kernels-cpu-ladder.csv and decode-cpu.csv (about 23
    minutes on 2 cores; the decode table needs the embedded model, fetched by a reproduce run)."""
    env = {**_venv(session), **OFFLINE, "QBENCH_KERNEL_TABLE": "1"}
    session.run(str(BIN / "pytest"), "-q", "benchmarks/test_bench_kernels.py",
                "benchmarks/test_bench_decode.py", "-k", "write_", *session.posargs, env=env,
                external=True)
