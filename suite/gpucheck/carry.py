"""The carry folder: which wheels the GPU image lacks, the 64 MiB size check, the device command.

Wheels: the GPU half's third-party imports are measured. A subprocess imports every module the
GPU half runs (``GPU_HALF_MODULES``, with the libraries its cells import lazily), and the
top-level modules then in ``sys.modules`` that qbench's own code imports by name (an AST scan of
suite/, methods/, baselines/; what a library imports only because it happens to be installed,
such as pandas' pyarrow, is not a need) are mapped to their distributions. The image's own
distributions (``IMAGE``: the packages it ships and what they require) are taken off; what is
left is downloaded as Python 3.12 manylinux wheels, ``--no-deps``, at the lock's versions.
Optional paths the GPU half avoids on purpose (lm-eval tasks, the GGUF model, gensim corpora,
Hugging Face datasets, Slurm / Ray, torchvision models, matplotlib plots) are never imported
there, so they are never carried.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from suite.gpucheck import CARRY

LIMIT_BYTES = 64 << 20  # the working tree plus the carried files
DEVICE_TIMEOUT_S = 540  # the device command's own limit (the machine allows 600 per call)
COMMAND_MAX_CHARS = 2000
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
# The GPU image: Python 3.12, torch 2.11, transformers, triton, pandas, pytest,
# pytest-benchmark, pyyaml, and what those require (normalised distribution names).
IMAGE = frozenset({
    "torch", "triton", "transformers", "pandas", "pytest", "pytest-benchmark", "pyyaml",
    # torch
    "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
    "fsspec", "setuptools",
    # transformers
    "huggingface-hub", "numpy", "packaging", "regex", "requests", "safetensors", "tokenizers",
    "tqdm", "hf-xet", "httpx", "typer-slim", "charset-normalizer", "idna", "urllib3",
    "certifi", "anyio", "httpcore", "h11", "sniffio", "click", "shellingham",
    # pandas
    "python-dateutil", "pytz", "tzdata", "six",
    # pytest, pytest-benchmark
    "iniconfig", "pluggy", "pygments", "py-cpuinfo",
})
# Every module the GPU half imports (the cell subprocesses, the kernel table, the cost part).
GPU_HALF_MODULES = (
    "suite.cli", "suite.commands", "suite.executor", "suite.runner", "suite.worker",
    "suite.prepare", "suite.verify", "suite.aggregate", "suite.render", "suite.leaderboard",
    "suite.speed", "suite.kernels.gpu", "suite.kernels.gpu_bench", "suite.vision.runtime",
    "suite.vision.train", "suite.gpucheck.parts", "methods", "baselines",
    # imported lazily by the cells and the kernel parts
    "transformers", "tokenizers", "safetensors", "triton",
)
PACKAGES = ("suite", "methods", "baselines")
_AUDIT = """
import importlib, importlib.metadata as md, json, sys
for m in sys.argv[1:]:
    importlib.import_module(m)
dists = md.packages_distributions()
tops = {name.split('.')[0] for name in list(sys.modules)}
print(json.dumps({t: dists[t] for t in sorted(tops) if t in dists}))
"""


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def own_imports(root: Path) -> set[str]:
    """Top-level module names that qbench's own code imports (any statement, any depth)."""
    names: set[str] = set()
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def imported_distributions(root: Path, python: str = sys.executable) -> list[str]:
    """Distributions the GPU half needs: the modules loaded by importing it (a fresh
    interpreter) that qbench's code imports by name."""
    out = subprocess.run([python, "-c", _AUDIT, *GPU_HALF_MODULES], capture_output=True,
                         text=True, check=True, cwd=root)
    loaded: dict[str, list[str]] = json.loads(out.stdout.strip().splitlines()[-1])
    own = own_imports(root)
    used = {normalise(d) for top, dists in loaded.items() if top in own for d in dists}
    return sorted(used - {"qbench"})


def missing_from_image(used: list[str]) -> list[str]:
    """The distributions of ``used`` the GPU image does not ship."""
    return sorted(d for d in used if normalise(d) not in IMAGE)


def pinned(dists: list[str], lock: Path) -> list[str]:
    """``name==version`` from the lock (``constraints.txt``) for each distribution."""
    pins = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[normalise(name)] = version.strip()
    missing = [d for d in dists if normalise(d) not in pins]
    if missing:
        raise ValueError(f"not in {lock.name}: {missing}")
    return [f"{d}=={pins[normalise(d)]}" for d in dists]


def download_command(requirements: list[str], dest: Path) -> list[str]:
    """``pip download`` of manylinux wheels for the image's Python, without dependencies."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    return [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
            "--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms,
            "--no-deps", "-d", str(dest), *requirements]


def download_wheels(requirements: list[str], dest: Path,
                    run: Callable[[list[str]], object] = subprocess.run) -> list[Path]:
    """Fetch the wheels into ``dest`` (emptied first); returns the wheel files."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    if requirements:
        run(download_command(requirements, dest))
    return sorted(dest.glob("*.whl"))


def _git_files(root: Path, *args: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True,
                         check=True).stdout.decode()
    return [root / p for p in out.split("\0") if p]


def tree_bytes(root: Path) -> int:
    """Bytes the device machine receives with the working tree: tracked files as they are now
    plus untracked files git does not ignore."""
    files = _git_files(root) + _git_files(root, "--others", "--exclude-standard")
    return sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())


def folder_bytes(path: Path) -> int:
    """Bytes of every regular file under ``path`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def size_report(root: Path, carry: Path) -> dict[str, int]:
    """{"tree", "carry", "total", "limit"} in bytes; ok when total < limit."""
    tree, extra = tree_bytes(root), folder_bytes(carry)
    return {"tree": tree, "carry": extra, "total": tree + extra, "limit": LIMIT_BYTES}


def device_command(timeout_s: int = DEVICE_TIMEOUT_S) -> str:
    """The one bash line to run from the repository root on the device machine: install the
    carried wheels (if any) into a folder on PYTHONPATH, then the GPU half into ``$OUT``."""
    env = (f"export PYTHONPATH=$PWD:$PWD/{CARRY}/site QBENCH_CACHE=$PWD/{CARRY}/cache "
           "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false")
    py = "PY=$(command -v python3 || command -v python)"
    wheels = (f"if ls {CARRY}/wheels/*.whl >/dev/null 2>&1; then $PY -m pip install -q "
              f"--no-index --no-deps --target {CARRY}/site {CARRY}/wheels/*.whl; fi")
    body = (f"timeout -k 10 {timeout_s} $PY -m suite.gpucheck gpu --out $OUT "
            f"--budget {timeout_s - 15}")
    return f"{env}; {py}; {wheels}; {body}"


def carry_paths() -> list[str]:
    """The ignored paths the device call must carry (the run tool's ``carry`` argument)."""
    return [CARRY]
