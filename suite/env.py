"""Environment capture for records: code version, library versions, hardware."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """Commit sha and dirty flag of the qbench checkout (None outside a git checkout)."""
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no", "--", "suite", "methods",
                 "baselines")
    return {"git_sha": sha, "git_dirty": bool(status) if status is not None else None}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), falling back to the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capture(device: str = "cpu") -> dict[str, Any]:
    """Everything a reader needs to judge whether two records are comparable."""
    import torch

    dev_name = cpu_name()
    if device.startswith("cuda") and torch.cuda.is_available():
        dev_name = torch.cuda.get_device_name(0)
    return {
        **git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "lm_eval": _version("lm_eval"),
        "qbench": _version("qbench"),
        "device": device,
        "device_name": dev_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "platform": platform.platform(),
    }
