"""Environment capture for records: code version, library versions, lock, hardware.

``capture()`` is what a record stores under ``env``; ``version_differences()`` names, in
words, what differs between two such captures (verify prints it beside a fresh run).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
# the dependency lock nox installs from (pip freeze of the shared venv; `nox -s lock`)
LOCK = _REPO / "constraints.txt"
# versions every record carries at top level, compared even when a record has no `packages`
_TOP_LEVEL = ("python", "torch", "transformers", "lm_eval", "qbench")


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
    status = run("status", "--porcelain", "--untracked-files=no", "--", *_CODE)
    return {"git_sha": sha, "git_dirty": bool(status) if status is not None else None}


_CODE = ("suite", "methods", "baselines")


def code_moved(sha: str | None) -> bool | None:
    """Whether the suite's code on disk differs from commit ``sha`` now (later commits or
    edits under suite/, methods/, baselines/). ``git_state`` is first taken when a cell
    process starts (a warm slot: when it preloads), so a record names the code it imported;
    modules imported lazily later would come from the disk as it is then, which this flags."""
    if sha is None:
        return None
    try:
        out = subprocess.run(["git", "diff", "--quiet", sha, "--", *_CODE], cwd=_REPO,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {0: False, 1: True}.get(out.returncode)


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _canonical(name: str) -> str:
    """PEP 503 normalised name: ``PyYAML`` -> ``pyyaml``, ``lm_eval`` -> ``lm-eval``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_hash(path: Path = LOCK) -> str | None:
    """First 16 hex digits of the lock file's sha256; None when there is no lock file."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


@lru_cache(maxsize=1)
def installed_packages() -> dict[str, str]:
    """Version of every installed distribution, by canonical name, sorted by name.

    Where a name is installed twice on ``sys.path`` the first one wins, as it does for import.
    """
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_canonical(name), dist.version)
    return dict(sorted(found.items()))


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), falling back to the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector ISA ATen dispatches its CPU kernels to (``AVX2``, ``AVX512``, ...): two CPUs
    with one model name (a cloud's "AMD EPYC") may differ here, and so in float results."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_type(env: dict[str, Any] | None = None) -> str:
    """A CPU type as records name it: model name and ATen's ISA (``AMD EPYC [AVX2]``), of
    ``env`` (a record's; an old record without the ISA gives the name alone) or of this
    machine."""
    if env is None:
        return f"{cpu_name()} [{cpu_capability()}]"
    isa = env.get("cpu_capability")
    return f"{env.get('device_name')}" + (f" [{isa}]" if isa else "")


def machine_name(env: dict[str, Any]) -> str:
    """The machine a record's numbers come from, as tables name it: for a CPU run its CPU type
    with ATen's ISA (``AMD EPYC [AVX512]``: float results follow the ISA, not the model name),
    for a GPU run the GPU's name; ``?`` when the record does not say."""
    if not env.get("device_name"):
        return "?"
    return cpu_type(env) if env.get("device", "cpu") == "cpu" else str(env["device_name"])


def capture(device: str = "cpu") -> dict[str, Any]:
    """Everything a reader needs to judge whether two records are comparable."""
    import torch

    dev_name = cpu_name()
    if device.startswith("cuda") and torch.cuda.is_available():
        dev_name = torch.cuda.get_device_name(0)
    git = git_state()
    return {
        **git,
        "git_code_moved": code_moved(git["git_sha"]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "lm_eval": _version("lm_eval"),
        "qbench": _version("qbench"),
        "lock": lock_hash(),
        "packages": installed_packages(),
        "device": device,
        "device_name": dev_name,
        "cpu_capability": cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "platform": platform.platform(),
    }


def _shown(value: Any) -> str:
    return "absent" if value is None else str(value)


def _changed(label: str, published: Any, fresh: Any) -> list[str]:
    """``["<label> <published> -> <fresh>"]`` when the two differ, else ``[]``."""
    return [] if published == fresh else [f"{label} {_shown(published)} -> {_shown(fresh)}"]


def _package_differences(fresh: dict[str, str], published: dict[str, str]) -> list[str]:
    """Distributions whose version differs or that one side lacks (top-level ones aside)."""
    skip = {_canonical(k) for k in _TOP_LEVEL}
    names = sorted((set(fresh) | set(published)) - skip)
    return [line for n in names for line in _changed(n, published.get(n), fresh.get(n))]


def _device_kind(env: dict[str, Any]) -> str:
    return str(env.get("device") or "device").split(":")[0]


def _hardware_differences(fresh: dict[str, Any], published: dict[str, Any]) -> list[str]:
    """Device name (labelled with the device kind, e.g. ``cpu``) and torch thread count."""
    kind_f, kind_p = _device_kind(fresh), _device_kind(published)
    if kind_f == kind_p:
        lines = _changed(kind_f, published.get("device_name"), fresh.get("device_name"))
        if published.get("cpu_capability") and fresh.get("cpu_capability"):
            lines += _changed("cpu ISA", published["cpu_capability"], fresh["cpu_capability"])
    else:
        lines = _changed("device", f"{kind_p} {_shown(published.get('device_name'))}",
                         f"{kind_f} {_shown(fresh.get('device_name'))}")
    return lines + _changed("torch_threads", published.get("torch_threads"),
                            fresh.get("torch_threads"))


def version_differences(fresh_env: dict[str, Any], published_env: dict[str, Any]) -> list[str]:
    """One line per version (or lock, device, thread count) that differs, published -> fresh.

    Python, torch, transformers, lm_eval and qbench are compared from the top-level keys every
    record has (torch's there keeps its build label, e.g. ``+cu130``); every other installed
    distribution from the ``packages`` dicts when both records have one. Then the lock hash,
    the device name and the torch thread count. A value one side lacks is shown as ``absent``.

    Example:
        >>> version_differences({"transformers": "5.25.0"}, {"transformers": "5.23.0"})
        ['transformers 5.23.0 -> 5.25.0']
    """
    lines = [line for key in _TOP_LEVEL
             for line in _changed(key, published_env.get(key), fresh_env.get(key))]
    fresh_pkgs, published_pkgs = fresh_env.get("packages"), published_env.get("packages")
    if fresh_pkgs is not None and published_pkgs is not None:
        lines += _package_differences(fresh_pkgs, published_pkgs)
    lines += _changed("lock", published_env.get("lock"), fresh_env.get("lock"))
    return lines + _hardware_differences(fresh_env, published_env)
