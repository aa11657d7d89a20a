"""Compile a C++ source of this package once per machine (``torch.utils.cpp_extension``).

The build directory is keyed by the source, torch's version, the CPU (what ``-march=native``
targets: a cache shared by machines of different CPUs must not hand one's binary to another)
and the flags, under ``$QBENCH_CACHE/torch-ext``. Used by the packed GEMM kernels
(``cpu.py``) and the fused QAT fake quantizer (``fakequant.py``).
"""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("qbench.kernels")


def load_cpp(stem: str, source: Path, cflags: list[str], ldflags: list[str]) -> Any | None:
    """The compiled module of ``source``, or None (logged once by the caller's cache) when it
    cannot be built (no compiler, no headers)."""
    try:
        from torch.utils.cpp_extension import load

        from suite.assets import cache_dir

        tag = hashlib.sha256(source.read_bytes() + torch.__version__.encode()
                             + cpu_id().encode() + " ".join(cflags).encode()).hexdigest()[:12]
        build = cache_dir() / "torch-ext" / f"{stem}-{tag}"
        build.mkdir(parents=True, exist_ok=True)
        return load(name=f"qbench_{stem}_{tag}", sources=[str(source)],
                    build_directory=str(build), extra_cflags=cflags, extra_ldflags=ldflags,
                    verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no headers: fall back, say so once
        log.warning("qbench: C++ extension %s unavailable (%s)", stem,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def cpu_id() -> str:
    """What ``-march=native`` compiles for: the processor and its instruction-set flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in info.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.processor() + platform.machine() + flags
