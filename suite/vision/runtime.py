"""The vision track inside the grid runner: model ids, the shared FP checkpoint, the data a
method may use, and top-1 evaluation.

A vision model id is ``<arch>@<dataset>`` (``cnn-small@fashion-mnist``,
``resnet20@torchvision-cifar10:/data``): the architecture trained in floating point by the suite
itself on the dataset's train split, with the grid's ``fixed.vision.fp_train`` recipe and
``fp_seed``. Its path and fingerprint (the hash of everything its weights depend on) are known
without training, so run keys and ``qbench table`` never train; ``qbench run`` trains it once,
in the parent, before the first pending cell (a named stage with a progress bar), and every cell
of every method starts from that same file.

Trained weights depend on the CPU type (issue 24: the same recipe gave mbv2-small FP top-1
0.8925 on an Intel Xeon and 0.8913 on an AMD EPYC, and RTN W2 0.158 vs 0.308 from them), and a
recipe key cannot tell two such files apart. Published grids therefore name a published
checkpoint: ``fixed.vision.fp_checkpoint`` (a file committed under results/vision/fp/) with
its ``fp_sha256``. Every machine then starts from the same bytes; the file is checked (hash,
architecture, dataset, recipe, seed) before any key is made, and the run key names the model by
its content hash (``sha256:<16 hex>``), so cells from two FP files can never share a key.

What a cell's method may see (``MethodData``): PTQ methods that need calibration get
``calib_images`` images drawn from the TRAIN split with the cell's calibration seed (never the
test split that is evaluated); QAT methods get the train split and the grid's training budget
(``fixed.vision.train``: the same epochs, step cap and batch size for every QAT method, so
methods differ only in what they are). Evaluation is top-1 on the whole test split.

FP training, QAT training (``reproducible``, on by default) and evaluation run under
``suite.vision.train.reproducible_kernels``: FP weights and top-1 then do not depend on the
thread count where MKL offers its strict mode (Intel CPUs; a vision process pins MKL before its
first call). QAT may still: ``suite.qat``'s per-tensor activation step size is initialised and
trained through whole-tensor sums, which ATen may split by thread count (a 60-step mbv2-small
LSQ W2A2 run on an AMD EPYC gave the same losses and top-1 with 1 and 2 threads). The published
vision grids run one thread per cell, two cells at once, which is also about 3x the throughput
of one 2-thread cell at a time for these small networks.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suite.assets import sha256_file
from suite.errors import ConfigError
from suite.vision.datasets import VisionData, batches, check_vision_dataset, load_vision
from suite.vision.models import VisionAdapter, adapter_for, build_model, vision_archs
from suite.vision.train import (
    TrainSpec,
    evaluate_top1,
    fp_checkpoint,
    fp_path,
    pin_mkl_cbwr,
)

log = logging.getLogger("qbench.vision")
EVAL_VERSION = 2  # top-1 evaluator version (enters the run key)
# 2: the forward runs under reproducible_kernels (native convs, MKL strict CNR)


@dataclass(frozen=True)
class QATBudget:
    """The training budget every QAT method of a grid gets (the protocol, not the method).

    Attributes:
        epochs: passes over the train split.
        max_steps: cap on optimizer steps (null: the whole epochs); the methods' LR and
            transition-rate schedules span the capped run.
        batch_size: training batch size.
        augment: random crop (pad 4) and horizontal flip.
        reproducible: train with thread-count-independent kernels (``TrainSpec.reproducible``;
            native convolutions, an LSQ W2A2 step of cnn-small about 1.4x the oneDNN one).
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 128
    augment: bool = False
    reproducible: bool = True

    def train_spec(self, **method_fields: Any) -> TrainSpec:
        """A ``TrainSpec`` with this budget and the method's optimizer/schedule fields."""
        return TrainSpec(epochs=self.epochs, max_steps=self.max_steps,
                         batch_size=self.batch_size, augment=self.augment,
                         reproducible=self.reproducible, **method_fields)


@dataclass(frozen=True)
class VisionSetup:
    """``fixed.vision`` of a grid.

    Attributes:
        fp_train: how the shared FP checkpoint is trained (a ``TrainSpec``).
        fp_seed: its init and data-order seed (one FP model per grid, not one per cell seed).
        train: the QAT budget.
        calib_images: calibration images for PTQ methods (from the train split).
        fp_checkpoint: a published FP checkpoint (a file written by ``fp_checkpoint``, e.g.
            committed under results/vision/fp/) that every cell starts from instead of one
            trained here; it must have been trained by ``fp_train`` and ``fp_seed``.
        fp_sha256: the sha256 of that file; it names the model in the run key.
    """

    fp_train: TrainSpec = field(default_factory=TrainSpec)
    fp_seed: int = 0
    train: QATBudget = field(default_factory=QATBudget)
    calib_images: int = 1024
    fp_checkpoint: str | None = None
    fp_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (records and run keys)."""
        return dataclasses.asdict(self)


def parse_model_id(model_id: str) -> tuple[str, str] | None:
    """``<arch>@<dataset>`` -> (arch, dataset) when ``arch`` is a vision architecture."""
    arch, sep, dataset = model_id.partition("@")
    return (arch, dataset) if sep and arch in vision_archs() else None


def check_model_id(model_id: str, where: str) -> None:
    """ConfigError unless ``model_id`` is ``<arch>@<dataset>`` with both parts valid."""
    parsed = parse_model_id(model_id)
    if parsed is None:
        raise ConfigError(f"{where}: {model_id!r} is not <arch>@<dataset>; accepted archs: "
                          f"{', '.join(vision_archs())}")
    check_vision_dataset(parsed[1], where)


@dataclass(frozen=True)
class VisionSource:
    """A resolved vision model id: the FP checkpoint every cell starts from (its path and
    fingerprint are known before it is trained)."""

    id: str
    arch: str
    dataset: str
    checkpoint: str
    fingerprint: str
    description: str


def resolve(model_id: str, setup: VisionSetup) -> VisionSource:
    """Where the FP checkpoint of ``model_id`` is: the published file (checked) when the grid
    names one, else the recipe's cache path (trained by :func:`materialise`)."""
    parsed = parse_model_id(model_id)
    assert parsed is not None, model_id
    arch, dataset = parsed
    if setup.fp_checkpoint is not None:
        return _published(model_id, arch, dataset, setup)
    path = fp_path(arch, dataset, setup.fp_train, setup.fp_seed)
    fingerprint = path.stem.rsplit("-", 1)[-1]  # fp_key: arch, data, recipe, seed, code
    desc = (f"{arch} trained by qbench on {dataset} ({setup.fp_train.epochs} epochs "
            f"{setup.fp_train.optimizer}, seed {setup.fp_seed})")
    return VisionSource(model_id, arch, dataset, str(path), fingerprint, desc)


def _published(model_id: str, arch: str, dataset: str, setup: VisionSetup) -> VisionSource:
    """The grid's published FP checkpoint, checked: its sha256 is ``fp_sha256`` and its
    metadata names this architecture, dataset, recipe and seed. The run key names the model
    by the content hash, so no two FP files can share a key."""
    assert setup.fp_checkpoint is not None and setup.fp_sha256 is not None
    path = Path(setup.fp_checkpoint).resolve()
    where = "fixed.vision.fp_checkpoint"
    if not path.is_file():
        raise ConfigError(f"{where}: {setup.fp_checkpoint} does not exist; accepted: a published "
                          "FP checkpoint (git checkout results/vision/fp)")
    digest = sha256_file(path)
    if digest != setup.fp_sha256:
        raise ConfigError(f"fixed.vision.fp_sha256: {setup.fp_checkpoint} has sha256 {digest}, "
                          f"not {setup.fp_sha256}; accepted: the published file unchanged")
    meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
    made = (meta["arch"], meta["dataset_id"], meta["spec"], meta["seed"])
    want = (arch, dataset, dataclasses.asdict(setup.fp_train), setup.fp_seed)
    if made != want:
        raise ConfigError(f"{where}: {setup.fp_checkpoint} is {made[0]}@{made[1]} trained with "
                          f"{made[2]} (seed {made[3]}); accepted: the checkpoint of {model_id} "
                          "trained by fixed.vision.fp_train and fp_seed")
    desc = (f"{arch} trained by qbench on {dataset} ({setup.fp_train.epochs} epochs "
            f"{setup.fp_train.optimizer}, seed {setup.fp_seed}; published checkpoint "
            f"{path.name}, sha256 {digest[:16]})")
    return VisionSource(model_id, arch, dataset, str(path), f"sha256:{digest[:16]}", desc)


def materialise(src: VisionSource, setup: VisionSetup) -> float:
    """Train (once; cached) the FP checkpoint of ``src``; returns its test top-1. A published
    checkpoint (``setup.fp_checkpoint``, checked by :func:`resolve`) is only read."""
    if setup.fp_checkpoint is not None:
        return _fp_top1(Path(src.checkpoint))
    log.info("stage: FP training of %s on %s (cached after the first run)", src.arch,
             src.dataset)
    pin_mkl_cbwr()  # before MKL's first call in this process, or it can no longer be pinned
    path = fp_checkpoint(src.arch, src.dataset, setup.fp_train, setup.fp_seed)
    assert str(path) == src.checkpoint, (path, src.checkpoint)
    return _fp_top1(path)


def _fp_top1(path: Path) -> float:
    meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
    return float(meta["fp_top1"]["value"])


def target_shapes(src: VisionSource) -> dict[str, tuple[int, int]]:
    """(rows, cols) of every target layer's flattened weight."""
    data = load_vision(src.dataset)
    model = build_model(src.arch, data.num_classes, data.in_channels)
    return {n: tuple(m.weight.flatten(1).shape)
            for n, m in adapter_for(src.arch).target_layers(model).items()}


def load(model_info: dict[str, Any]) -> tuple[nn.Module, VisionAdapter, VisionData]:
    """The FP model of a cell (eval mode, CPU), its adapter and its data.

    Pins MKL's reduction order first (:func:`~suite.vision.train.pin_mkl_cbwr`): this is the
    first thing a vision cell does, before anything calls MKL."""
    pin_mkl_cbwr()
    arch, dataset = model_info["arch"], model_info["dataset"]
    data = load_vision(dataset)
    model = build_model(arch, data.num_classes, data.in_channels)
    state = torch.load(Path(model_info["location"]), map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    return model.eval(), adapter_for(arch), data


def calib_images(data: VisionData, n: int, seed: int) -> torch.Tensor:
    """``n`` normalised train images (n, C, H, W), a seeded sample without replacement."""
    if n > len(data.train):
        raise ConfigError(f"fixed.vision.calib_images: got {n}; accepted: 1..{len(data.train)}")
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n]
    subset = data.train.subset(idx.sort().values)
    return torch.cat([x for x, _ in batches(subset, 256, None, False, data.mean, data.std)])


def evaluate(model: nn.Module, data: VisionData, pid: str) -> dict[str, Any]:
    """Top-1 over the whole test split as a metric row (Wilson 95% interval, per-example
    outcomes for paired comparisons)."""
    res = evaluate_top1(model, data.test, data.mean, data.std)
    outcomes = "".join(str(v) for v in res["per_example"])
    return {"protocol": pid, "metric": "top1", "unit": "accuracy", "higher_is_better": True,
            "value": res["value"], "lo95": res["ci_lo"], "hi95": res["ci_hi"],
            "n_examples": res["n"], "outcomes": outcomes}
