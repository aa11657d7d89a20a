"""Preparing the carry folder on the CPU machine (everything the GPU half reads but the image
and the working tree lack).

Layout of ``.gpu-carry/``::

    wheels/             Python 3.12 manylinux wheels the image lacks (installed with --target)
    tiny-llm/           config.json + tokenizer of the generated model (weights made on the fly)
    grids/lm.yaml       the LM grid (FP, RTN, GPTQ, decoupleQ, pre-calibration, the chain)
    grids/vision.yaml   the vision QAT cells
    cache/              $QBENCH_CACHE of both halves: corpora/, tokens/ (the token streams),
                        datasets/fashion-mnist/, vision-fp/ (the FP checkpoint)
    cpu-records-lm/     the CPU half's records (what the GPU half is verified against)
    cpu-records-vision/
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

from suite.gpucheck import CARRY, carry, tinyllm
from suite.gpucheck.parts import MODEL_DIR


def prepare_carry(root: Path, spec: tinyllm.TinySpec = tinyllm.FULL, wheels: bool = True,
                  vision: bool = True, download: Callable[[list[str]], object] = subprocess.run,
                  ) -> dict[str, object]:
    """Build ``root/.gpu-carry``; returns what went in (wheels, requirements)."""
    home_cache, before = _default_cache(), os.environ.get("QBENCH_CACHE")
    os.environ["QBENCH_CACHE"] = str(root / CARRY / "cache")
    try:
        return _prepare(root, spec, wheels, vision, download, home_cache)
    finally:
        if before is None:
            os.environ.pop("QBENCH_CACHE", None)
        else:
            os.environ["QBENCH_CACHE"] = before


def _prepare(root: Path, spec: tinyllm.TinySpec, wheels: bool, vision: bool,
             download: Callable[[list[str]], object], home_cache: Path) -> dict[str, object]:
    folder = root / CARRY
    cache = folder / "cache"
    tinyllm.write_corpora(spec, cache)
    tinyllm.write_template(spec, cache, folder / "tiny-llm")
    _write_grid(folder / "grids" / "lm.yaml",
                tinyllm.lm_grid(spec, MODEL_DIR, f"{CARRY}/cpu-records-lm"))
    _write_grid(folder / "grids" / "vision.yaml",
                tinyllm.vision_grid(f"{CARRY}/cpu-records-vision"))
    tinyllm.materialise(folder / "tiny-llm", root / MODEL_DIR)
    _prepare_streams(root, folder / "grids" / "lm.yaml")
    if vision:
        _copy_vision(home_cache, cache)
    found: dict[str, object] = {"requirements": [], "wheels": []}
    if wheels:
        used = carry.imported_distributions(root)
        reqs = carry.pinned(carry.missing_from_image(used), root / "constraints.txt")
        found = {"imported": used, "requirements": reqs,
                 "wheels": carry.download_wheels(reqs, folder / "wheels", download)}
    return found


def _default_cache() -> Path:
    """The cache the CPU machine's other runs use (``$QBENCH_CACHE`` or ~/.cache/qbench)."""
    from suite.assets import cache_dir

    return cache_dir()


def _write_grid(path: Path, grid: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(grid, sort_keys=False))


def _prepare_streams(root: Path, config: Path) -> None:
    """Tokenize the corpora once (cached under the carry's cache, keyed by the model)."""
    from suite.config import load_grids
    from suite.prepare import prepare

    here = Path.cwd()
    os.chdir(root)  # the model id is relative to the root, as on the device
    try:
        for grid in load_grids(str(config), []):
            prepare(grid)
    finally:
        os.chdir(here)


def _copy_vision(home: Path, cache: Path) -> None:
    """Fashion-MNIST (verified files) and the FP checkpoints of cnn-small, from the CPU
    machine's cache when there (else the vision grid fetches and trains them itself)."""
    src = home / "datasets" / "fashion-mnist"
    if src.is_dir() and not (cache / "datasets" / "fashion-mnist").is_dir():
        shutil.copytree(src, cache / "datasets" / "fashion-mnist")
    for ckpt in (home / "vision-fp").glob("cnn-small-*.pt"):
        target = cache / "vision-fp" / ckpt.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt, target)
