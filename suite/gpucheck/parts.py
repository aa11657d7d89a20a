"""The two halves of the GPU check, and the parts of the GPU half with their time boxes.

CPU half (``cpu``): the LM grid and the vision grid on the CPU through ``qbench run``; their
records go into the carry folder, so the GPU half can verify its own against them.

GPU half (``gpu``): each part runs in its own subprocess with its own time box, in this order,
and writes its CSV into ``<out>/gpu/`` as it goes (a part that times out leaves what it had
written; ``parts.csv`` says how each part ended):

====================  =====  ===============================================================
part                  box s  writes
====================  =====  ===============================================================
``kernels``           110    ``kernels-cuda.csv``: W4/W3/W2 x g64/g128/per-channel at M = 1,
                             16, 128 on 4096x4096, 4096x11008, 8192x8192 (and the embedded
                             model's shapes at M = 1, for the leaderboard's speedup join)
                             against cuBLAS fp32/fp16/bf16 and tinygemm; achieved bandwidth as
                             a fraction of a device-to-device copy timed in the same run
``pytest``            100    ``pytest-gpu.csv``: one row per ``-m gpu`` test (as it finishes)
``quant-cost``        70     ``quant-cost-cuda.csv``: GPTQ (W4 g64) and decoupleQ (W2 g64)
                             seconds per layer at 4096x4096 and 11008x4096, H from 8192
                             random tokens (the CPU benchmarks' formats)
``lm-grid``           150    ``lm-agreement.csv``: the tiny LLM grid on cuda, classed by
                             ``qbench verify`` against the CPU half's records
``vision``            70     ``vision-agreement.csv``: LSQ and TR, 50 steps, on cuda, likewise
====================  =====  ===============================================================

Every CSV carries the device name and the torch, CUDA and driver versions. Without a CUDA
device every part records ``skipped (no CUDA device)``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from suite.gpucheck import CARRY

BOXES = {"kernels": 110, "pytest": 100, "quant-cost": 70, "lm-grid": 150, "vision": 70}
GRIDS = {"lm-grid": "lm", "vision": "vision"}
MIN_BOX_S = 15  # a part with less time left than this is not started
KERNEL_SHAPES = (  # (name, (out, in), M values): the embedded model's shapes for the join
    ("4096x4096", (4096, 4096), (1, 16, 128)),
    ("smollm2-qo", (576, 576), (1,)), ("smollm2-kv", (192, 576), (1,)),
    ("smollm2-up", (1536, 576), (1,)), ("smollm2-down", (576, 1536), (1,)),
    ("4096x11008", (4096, 11008), (1, 16, 128)),
    ("8192x8192", (8192, 8192), (1, 16, 128)),
)
COST_SHAPES = ((4096, 4096), (11008, 4096))
COST_TOKENS = 8192


def cuda_ready() -> bool:
    """Whether a CUDA device is visible (no context is created)."""
    import torch

    return torch.cuda.is_available()


def device_info() -> dict[str, str]:
    """Device name, torch / CUDA / driver / triton versions (``-`` where there is none)."""
    import torch

    info = {"device": "cpu", "torch": torch.__version__, "cuda": torch.version.cuda or "-",
            "driver": "-", "triton": "-"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else "?"
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "?"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def write_rows(path: Path, rows: list[dict], extra: dict[str, str]) -> None:
    """(Re)write ``path`` with ``rows``, each extended by ``extra`` (the device columns)."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([{**r, **extra} for r in rows])
    tmp = path.with_suffix(".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)


def append_row(path: Path, row: dict) -> None:
    """Append one row to a CSV (header first when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


# --- the parts (each runs in its own process: ``python -m suite.gpucheck part NAME``) --------

def part_kernels(out: Path) -> None:
    """The GPU kernel table, rewritten after each shape."""
    from suite.kernels import gpu_bench
    from suite.primitives import PER_CHANNEL, WeightFormat

    info = device_info()
    formats = [WeightFormat(b, g) for b in (4, 3, 2) for g in (64, 128, PER_CHANNEL)]
    read_bw, copy_bw = gpu_bench.read_bandwidth(), gpu_bench.copy_bandwidth()
    extra = {**info, "read_bw_GBps": read_bw / 1e9, "copy_bw_GBps": copy_bw / 1e9}
    rows: list[dict] = []
    for name, shape, ms in KERNEL_SHAPES:
        for r in gpu_bench.shape_rows(name, shape, formats, ms, read_bw):
            if r.get("achieved_GBps") is not None:
                r["fraction_of_copy_bw"] = r["achieved_GBps"] * 1e9 / copy_bw
            rows.append(r)
        write_rows(out / "kernels-cuda.csv", rows, extra)
        print(f"gpu-check: kernels {name}: {len(rows)} rows", file=sys.stderr, flush=True)


def part_quant_cost(out: Path) -> None:
    """GPTQ and decoupleQ per-layer seconds on cuda, one row as each finishes."""
    import torch

    info = device_info()
    for rows, cols in COST_SHAPES:
        W, H = _cost_problem(rows, cols)
        for method in ("gptq", "decoupleq"):
            seconds, loss = _time_layer(method, W, H)
            append_row(out / "quant-cost-cuda.csv",
                       {"method": method, "format": _COST_FORMAT[method], "rows": rows,
                        "cols": cols, "tokens": COST_TOKENS, "seconds": f"{seconds:.4g}",
                        "loss": f"{loss:.6g}", **info})
            print(f"gpu-check: {method} {rows}x{cols}: {seconds:.2f} s", file=sys.stderr,
                  flush=True)
        del W, H
        torch.cuda.empty_cache()


_COST_FORMAT = {"gptq": "int4-g64", "decoupleq": "int2-g64"}


def _cost_problem(rows: int, cols: int):  # noqa: ANN202 - (W, H) cuda tensors
    """W (rows, cols) and H from ``COST_TOKENS`` random tokens with per-feature scales, as the
    CPU benchmarks build them, on cuda."""
    import torch

    from suite.sequential import HessianAccumulator

    gen = torch.Generator().manual_seed(0)
    W = (torch.randn(rows, cols, generator=gen) * 0.02).cuda()
    acc = HessianAccumulator(cols, torch.device("cuda"), torch.float64)
    scale = torch.linspace(0.1, 2, cols, device="cuda")
    for _ in range(COST_TOKENS // 2048):
        acc.add(torch.randn(1, 2048, cols, generator=gen).cuda() * scale)
    return W, acc.H


def _time_layer(method: str, W, H) -> tuple[float, float]:  # noqa: ANN001 - cuda tensors
    import torch

    from baselines.gptq import GPTQConfig, gptq_layer
    from methods.decoupleq import DecoupleQConfig, decoupleq_layer
    from suite.primitives import WeightFormat

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if method == "gptq":
        _, stats = gptq_layer(W, H, WeightFormat(4, 64), GPTQConfig())
    else:
        _, stats = decoupleq_layer(W, H, WeightFormat(2, 64, scale_dtype="float32"),
                                   DecoupleQConfig())
    torch.cuda.synchronize()
    return time.perf_counter() - t0, float(stats.get("loss", float("nan")))


PARTS = {"kernels": part_kernels, "quant-cost": part_quant_cost}


# --- running the parts -----------------------------------------------------------------------

CODE_ROOT = Path(__file__).resolve().parents[2]  # this checkout (on the device: the root)


def _python_env(root: Path) -> dict[str, str]:
    """Subprocess environment: this checkout's code first, the carry's cache, offline."""
    path = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "QBENCH_CACHE": str(root / CARRY / "cache"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def part_commands(name: str, root: Path, out: Path, device: str) -> list[list[str]]:
    """The command lines of one part (run in turn, in ``root``)."""
    py = sys.executable
    if name in PARTS:
        return [[py, "-m", "suite.gpucheck", "part", name, "--out", str(out)]]
    if name == "pytest":
        return [[py, "-m", "pytest", "-q", "-m", "gpu", "-p", "suite.gpucheck.pytest_log",
                 "-p", "no:cacheprovider", "tests/test_kernels_gpu.py"]]
    grid = GRIDS[name]
    config = str(root / CARRY / "grids" / f"{grid}.yaml")
    store = str(out / f"records-{grid}-{device}")
    sets = ["--set", f"run.device={device}", "--set", f"run.store={store}"]
    return [[py, "-m", "suite.cli", "run", config, *sets, "--out", str(out / f"tables-{grid}")],
            [py, "-m", "suite.cli", "verify", config, *sets, "--published",
             str(root / CARRY / f"cpu-records-{grid}"), "--csv",
             str(out / f"{grid}-agreement.csv")]]


def run_part(name: str, root: Path, out: Path, box_s: float, device: str = "cuda") -> str:
    """Run one part within ``box_s`` seconds; returns its status (also appended to
    ``parts.csv``)."""
    env = {**_python_env(root), "QBENCH_PYTEST_CSV": str(out / "pytest-gpu.csv")}
    t0 = time.perf_counter()
    status = "ok"
    for cmd in part_commands(name, root, out, device):
        left = box_s - (time.perf_counter() - t0)
        try:
            rc = subprocess.run(cmd, cwd=root, env=env, timeout=max(left, 1)).returncode
        except subprocess.TimeoutExpired:
            status = f"timeout ({box_s:.0f} s box)"
            break
        if rc:
            status = f"exit {rc}"
    append_row(out / "parts.csv", {"part": name, "status": status, "box_s": f"{box_s:.0f}",
                                   "seconds": f"{time.perf_counter() - t0:.1f}",
                                   **device_info()})
    return status


def gpu_half(root: Path, out: Path, budget_s: float, parts: list[str] | None = None) -> int:
    """Every part in order, each in its box (cut to what is left of ``budget_s``); 0 when all
    ended ok."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + budget_s
    names = parts or list(BOXES)
    if not cuda_ready():
        for name in names:
            append_row(out / "parts.csv", {"part": name, "status": "skipped (no CUDA device)",
                                           "box_s": BOXES[name], "seconds": 0, **device_info()})
        return 0
    _materialise_model(root)
    bad = 0
    for name in names:
        left = deadline - time.perf_counter()
        if left < MIN_BOX_S:
            append_row(out / "parts.csv", {"part": name, "status": "not started (budget)",
                                           "box_s": 0, "seconds": 0, **device_info()})
            bad += 1
            continue
        status = run_part(name, root, out, min(BOXES[name], left - 2))
        print(f"gpu-check: {name}: {status}", file=sys.stderr, flush=True)
        bad += status != "ok"
    return 1 if bad else 0


def cpu_half(root: Path, out: Path, vision: bool = True) -> dict[str, float]:
    """The LM grid (and the vision grid) on the CPU into the carried stores; seconds per grid.
    Raises RuntimeError when a cell is not ok."""
    _materialise_model(root)
    env = _python_env(root)
    seconds = {}
    for grid in ("lm", "vision") if vision else ("lm",):
        config = str(root / CARRY / "grids" / f"{grid}.yaml")
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "suite.cli", "run", config, "--out",
                             str(out / f"tables-{grid}-cpu")], cwd=root, env=env).returncode
        seconds[grid] = time.perf_counter() - t0
        if rc:
            raise RuntimeError(f"gpu-check: the CPU half's {grid} grid exited {rc}")
    return seconds


def _materialise_model(root: Path) -> None:
    from suite.gpucheck import tinyllm

    tinyllm.materialise(root / CARRY / "tiny-llm", root / MODEL_DIR)


MODEL_DIR = "build/gpucheck/tiny-llama"  # relative to the root on both machines

