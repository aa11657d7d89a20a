"""Paper-scale configs (configs/paper/): each loads, validates (methods, formats, protocols,
budgets) and expands offline, with the same code as the embedded default; none is run here
(they need the hub or local datasets and GPUs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from suite.config import load_grids

PAPER = sorted((Path(__file__).resolve().parent.parent / "configs" / "paper").glob("*.yaml"))


def test_the_paper_configs_cover_the_issue() -> None:
    names = {p.stem for p in PAPER}
    assert {"opt-gptq", "llama2-7b-gptq", "llama2-7b-decoupleq", "llama2-7b-precalibration",
            "resnet20-cifar10-qat", "resnet20-cifar100-qat", "resnet18-imagenet-qat"} <= names


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_loads_validates_and_expands(path: Path) -> None:
    grids = load_grids(str(path), [], None)
    assert grids
    for grid in grids:
        cells = grid.expand()
        assert cells, grid.name
        assert len({c.label() for c in cells}) == len(cells)  # no duplicate cells
        assert grid.run.device == "cuda"
