"""Seeded training and top-1 evaluation of vision models, and the cached FP checkpoints.

``train`` is the one loop the vision track uses: the FP baseline here, and QAT methods (LSQ,
TR scheduling; research/methods.md sections 4-5) through its hooks. A caller may pass its own
optimizer; the LR schedule then scales only the param groups that do not set ``"fixed_lr":
True`` (a group the caller steers itself, e.g. TR scheduling's transition-adaptive rate), and
it scales each scheduled group's ``initial_lr`` (recorded from the group's ``lr`` on first use,
the same key torch's own schedulers use), so groups keep their own base rates.
``on_step(step, loss)`` runs after every optimizer step.

On CPU the same seed gives bit-identical weights and accuracy: the model's init comes from
``build_model(seed=...)`` and the data order and augmentation from one ``torch.Generator``.
With ``TrainSpec.reproducible`` (the default) the FP result also does not depend on the thread
count (:func:`reproducible_kernels`). Measured for cnn-small on Fashion-MNIST (2 Adam epochs,
batch 128, seed 0) at 1 and 2 threads on a 2-core Xeon: without it 22 of 26 tensors differed,
top-1 0.8954 vs 0.8951, 72 of 10k test predictions differed; with it the weights were
bit-identical (top-1 0.8954 both). Two thread-count-dependent reductions were found and removed:
  * oneDNN's convolution weight gradient (its split of the batch over threads): convolutions run
    through ATen's native kernel (im2col + gemm) instead, with oneDNN and NNPACK off;
  * MKL's sgemm (it splits the inner dimension over threads, e.g. the 1568-wide classifier):
    MKL is pinned to its strict conditional-numerical-reproducibility mode on the AVX2 branch
    (:func:`pin_mkl_cbwr`), which Intel documents as bitwise reproducible for ?gemm whatever the
    thread count, on every Intel CPU with AVX2. MKL offers it on Intel CPUs only, and only before
    its first call in the process; ``TrainHistory.numerics`` records what was in force.
What still differs: between CPUs, ATen's own vectorised kernels follow the CPU's capability
(AVX-512 vs AVX2; e.g. the cross-entropy gradient differs in the last bit), and on non-Intel
CPUs MKL's gemm keeps its thread-count-dependent order; in QAT, ``suite.qat``'s per-tensor
activation step size is initialised and trained through whole-tensor sums that ATen splits by
thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from suite.assets import cache_dir
from suite.data import atomic_save
from suite.errors import ConfigError
from suite.vision.datasets import ImageSet, VisionData, batches, load_vision
from suite.vision.models import build_model, check_arch

VISION_TRAIN_VERSION = 3  # in the FP-checkpoint key: bump when the loop or an arch changes
# 2: cnn-small pools after its first conv; 3: reproducible kernels (native convs, MKL strict CNR)
# mkl_service.h: the AVX2 branch, the strict flag, "all settings" (pin_mkl_cbwr asks AVX2,STRICT)
_CBWR_AVX2, _CBWR_STRICT, _CBWR_ALL = 10, 0x10000, -1
_CBWR_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3",
                  7: "SSE4_1", 8: "SSE4_2", 9: "AVX", 10: "AVX2", 12: "AVX512", 14: "AVX512_E1"}
log = logging.getLogger("qbench.vision")
_OPTIMIZERS = ("sgd", "adam")
_SCHEDULES = ("cosine", "step", "constant")
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class TrainSpec:
    """How to train: optimizer, schedule, budget. Defaults fit cnn-small on Fashion-MNIST.

    ``schedule`` multiplies each scheduled group's base LR by a factor of the step: ``cosine``
    decays from 1 to 0 over the run without restarts; ``step`` is 1, 0.1, 0.01 from 50% and 75%
    of the run; ``constant`` is 1. ``warmup_steps`` ramps the factor linearly first.
    ``max_steps`` caps the run (it may end mid-epoch); the schedule spans the capped length.
    ``channels_last`` trains in NHWC memory layout (about 35% faster for cnn-small on CPU; the
    model is returned to the default layout afterwards). It is off by default because code that
    ``.view``s a 4-D weight (e.g. a quantizer) fails on NHWC parameters during training.
    ``reproducible`` trains under :func:`reproducible_kernels`, so that 1 and 2 threads give
    bit-identical FP weights (on Intel CPUs; see the module docstring). A cnn-small step then
    costs about 1.7x the oneDNN one (127 vs 73 ms at 1 thread, batch 128, 2-core Xeon, timed
    interleaved; an LSQ W2A2 step 1.4x); ``false`` trains with oneDNN as before.
    """

    epochs: int = 2
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    augment: bool = False
    eval_batch_size: int = 1000
    max_steps: int | None = None
    channels_last: bool = False
    reproducible: bool = True

    def __post_init__(self) -> None:
        _check(self.optimizer in _OPTIMIZERS, "optimizer", self.optimizer, "sgd, adam")
        _check(self.schedule in _SCHEDULES, "schedule", self.schedule, "cosine, step, constant")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, value, "an integer >= 1")
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps",
               self.warmup_steps, "an integer >= 0")
        _check(self.max_steps is None or (_is_int(self.max_steps) and self.max_steps >= 1),
               "max_steps", self.max_steps, "null or an integer >= 1")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            _check(_is_num(value) and value >= 0 and math.isfinite(value), name, value,
                   "a finite number >= 0")
        _check(_is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1,
               "label_smoothing", self.label_smoothing, "a number in [0, 1)")
        for name in ("nesterov", "augment", "channels_last", "reproducible"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true, false")

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps of the whole run for a train split of ``n_train`` examples."""
        steps = self.epochs * math.ceil(n_train / self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the base LR at 0-based ``step`` of a ``total``-step run."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if self.schedule == "step":
            return 1.0 if t < 0.5 else 0.1 if t < 0.75 else 0.01
        return 1.0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check(ok: bool, name: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"TrainSpec.{name}={value!r}; accepted: {accepted}")


@dataclass(frozen=True)
class EpochRecord:
    """One (possibly partial) epoch: train loss mean and accuracy, test top-1, LR, seconds."""

    epoch: int
    steps: int
    train_loss: float
    train_acc: float
    test_top1: float | None
    lr: float
    wall_s: float
    eval_s: float


@dataclass(frozen=True)
class TrainHistory:
    """What a run did; ``diverged_step`` is the 0-based step whose loss or params went
    non-finite (training stopped there and the model holds those weights). ``numerics`` is
    what the result's float order depended on (:func:`kernel_numerics`)."""

    records: tuple[EpochRecord, ...]
    steps: int
    diverged: bool = False
    diverged_step: int | None = None
    wall_s: float = 0.0
    numerics: dict[str, Any] = field(default_factory=dict)

    @property
    def final_top1(self) -> float | None:
        """Test top-1 of the last evaluated epoch (None if never evaluated)."""
        tops = [r.test_top1 for r in self.records if r.test_top1 is not None]
        return tops[-1] if tops else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for checkpoint metadata and records)."""
        return dataclasses.asdict(self)


@dataclass
class _Loop:
    """Mutable state of one run (not a config): step counter, stream and hooks."""

    spec: TrainSpec
    opt: torch.optim.Optimizer
    groups: list[dict]
    total: int
    gen: torch.Generator
    device: torch.device
    on_step: Callable[[int, float], None] | None
    bar: Any
    step: int = 0
    diverged_step: int | None = None
    sums: list[float] = field(default_factory=lambda: [0.0, 0, 0])  # loss * B, correct, seen


def make_optimizer(spec: TrainSpec, params: Iterable[Any]) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or Adam over ``params`` (tensors or param-group dicts)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                               nesterov=spec.nesterov, weight_decay=spec.weight_decay)
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)


def scheduled_groups(opt: torch.optim.Optimizer) -> list[dict]:
    """The param groups the schedule steers (no ``fixed_lr``), each given ``initial_lr``."""
    groups = [g for g in opt.param_groups if not g.get("fixed_lr", False)]
    for g in groups:
        g.setdefault("initial_lr", g["lr"])
    return groups


class _MKL(NamedTuple):
    """MKL service calls: ``mkl_cbwr_get``/``_set`` and ``mkl_set_num_threads_local``."""

    cbwr_get: Callable[[int], int]
    cbwr_set: Callable[[int], int]
    set_num_threads_local: Callable[[int], int]


@functools.cache
def _mkl_service() -> _MKL | None:
    """MKL's service calls in the MKL torch uses (None when torch has no MKL or hides them).

    Wheels link MKL statically into ``libtorch_cpu`` and export its service layer
    (``mkl_serv_*``, what the public ``mkl_*`` names call); a dynamically linked MKL exports
    the public names."""
    if not torch.backends.mkl.is_available():
        return None
    libs = []
    for path in (None, os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")):
        with contextlib.suppress(OSError, TypeError):  # TypeError: no CDLL(None) on Windows
            libs.append(ctypes.CDLL(path))
    names = ("cbwr_get", "cbwr_set", "set_num_threads_local")
    for lib in libs:
        for prefix in ("mkl_", "mkl_serv_"):
            calls = [getattr(lib, prefix + name, None) for name in names]
            if all(c is not None for c in calls):
                return _MKL(*calls)
    return None


def pin_mkl_cbwr() -> str:
    """Pin MKL's gemm to a thread-count-independent order; returns the mode in force.

    Asks MKL for ``AVX2,STRICT`` (strict conditional numerical reproducibility, AVX2 branch) unless
    ``$MKL_CBWR`` already names a mode, which MKL honours. MKL accepts a change only before its
    first call in the process and strict modes only on Intel CPUs, so callers pin as early as
    they can (the vision runtime does before loading a model) and record the result.

    Returns:
        e.g. ``"AVX2,STRICT"``; ``"OFF"`` (MKL's default, whose order depends on the thread
        count: MKL was already in use, or the CPU is not Intel's); ``"unavailable"`` (no MKL).
    """
    mkl = _mkl_service()
    if mkl is not None and "MKL_CBWR" not in os.environ:
        mkl.cbwr_set(_CBWR_AVX2 | _CBWR_STRICT)  # an error code leaves the mode as it was
    return mkl_cbwr_mode()


def mkl_cbwr_mode() -> str:
    """MKL's reproducibility mode in force (see :func:`pin_mkl_cbwr`), without changing it."""
    mkl = _mkl_service()
    if mkl is None:
        return "unavailable"
    mode = mkl.cbwr_get(_CBWR_ALL)
    name = _CBWR_BRANCHES.get(mode & ~_CBWR_STRICT, str(mode & ~_CBWR_STRICT))
    return f"{name},STRICT" if mode & _CBWR_STRICT else name


def kernel_numerics(reproducible: bool) -> dict[str, Any]:
    """What a CPU result's float order depends on: the kernel choice, the thread count, MKL's
    mode and the CPU capability ATen dispatches its vectorised kernels on."""
    return {"reproducible": reproducible, "threads": torch.get_num_threads(),
            "mkl_cbwr": mkl_cbwr_mode(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


@contextlib.contextmanager
def reproducible_kernels(enabled: bool = True) -> Iterator[None]:
    """Thread-count-independent kernels inside the block (a no-op when not ``enabled``).

    * oneDNN and NNPACK off, so convolutions run through ATen's native im2col + gemm;
    * MKL pinned by :func:`pin_mkl_cbwr`, and single-threaded for calls made by this thread:
      the native weight gradient calls gemm once per image, and with MKL's own threads each
      call is a fork/join; on a 2-core machine with background load a 2-thread step took 6.3x
      the oneDNN step that way and 0.75x with MKL single-threaded (ATen's own parallel loops
      keep their threads; strict CNR makes the result the same either way);
    * ``torch.use_deterministic_algorithms`` on (warn only, as the runner does on GPUs: on CPU
      it changed no result here; it flags ops torch knows to be nondeterministic, and its first
      use in a process costs about 1.5 s of imports).

    The previous settings are restored on exit, so blocks nest.
    """
    if not enabled:
        yield
        return
    pin_mkl_cbwr()
    mkl = _mkl_service()
    mkl_threads = mkl.set_num_threads_local(1) if mkl is not None else None
    mkldnn, det = torch.backends.mkldnn.enabled, torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.backends.mkldnn.enabled = False
    (nnpack,) = torch.backends.nnpack.set_flags(False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.nnpack.set_flags(nnpack)
        torch.backends.mkldnn.enabled = mkldnn
        if mkl is not None:
            mkl.set_num_threads_local(mkl_threads)  # 0: back to the global setting


def _warn_unpinned(numerics: dict[str, Any]) -> None:
    """Say so when a reproducible run's gemm order still depends on the thread count."""
    mode = numerics["mkl_cbwr"]
    if numerics["reproducible"] and mode != "unavailable" and not mode.endswith(",STRICT"):
        log.warning("MKL mode %s (not strict): its gemm order, and so these weights, depend on "
                    "the thread count (%d); MKL was in use before the pin, or the CPU is not "
                    "Intel's", numerics["mkl_cbwr"], numerics["threads"])


def train(model: nn.Module, data: VisionData, spec: TrainSpec, seed: int, *,
          optimizer: torch.optim.Optimizer | None = None,
          param_groups: list[dict] | None = None,
          on_step: Callable[[int, float], None] | None = None,
          progress: Callable[[str], None] | None = None,
          eval_each_epoch: bool = True) -> TrainHistory:
    """Train ``model`` in place on ``data.train`` in a seeded order; see the module docstring.

    Args:
        optimizer: used as given (its groups' ``lr`` are set each step unless ``fixed_lr``);
            else one is built from ``spec`` over ``param_groups`` or ``model.parameters()``.
        on_step: called as ``on_step(step, loss)`` after every optimizer step (0-based step).
        progress: receives a one-line status about ten times per epoch and after each epoch.
        eval_each_epoch: evaluate test top-1 after every epoch (else only the record's None).

    Returns:
        The history; ``diverged`` is True when a loss or parameter went NaN/inf.
    """
    opt = optimizer or make_optimizer(
        spec, param_groups if param_groups is not None else model.parameters())
    device = next(model.parameters()).device
    total = spec.total_steps(len(data.train))
    start, records = time.perf_counter(), []
    if spec.channels_last:  # params keep their identity (optimizers stay valid)
        model.to(memory_format=torch.channels_last)
    with reproducible_kernels(spec.reproducible), tqdm(
            total=total, unit="step", desc="train", dynamic_ncols=True, mininterval=1.0) as bar:
        numerics = kernel_numerics(spec.reproducible)
        _warn_unpinned(numerics)
        loop = _Loop(spec, opt, scheduled_groups(opt), total,
                     torch.Generator().manual_seed(seed), device, on_step, bar)
        for epoch in range(spec.epochs):
            records.append(_epoch(model, data, loop, epoch, progress or _quiet, eval_each_epoch))
            if loop.diverged_step is not None or loop.step >= total:
                break
    if spec.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return TrainHistory(tuple(records), loop.step, loop.diverged_step is not None,
                        loop.diverged_step, time.perf_counter() - start, numerics)


def _layout(spec: TrainSpec) -> torch.memory_format:
    return torch.channels_last if spec.channels_last else torch.contiguous_format


def _quiet(message: str) -> None:
    """Default progress sink (tqdm already shows the counts)."""


def _epoch(model: nn.Module, data: VisionData, loop: _Loop, epoch: int,
           progress: Callable[[str], None], eval_each_epoch: bool) -> EpochRecord:
    """One pass (or until the budget ends or training diverges); evaluates if asked."""
    model.train()
    loop.sums = [0.0, 0, 0]
    t0, first = time.perf_counter(), loop.step
    per_epoch = math.ceil(len(data.train) / loop.spec.batch_size)
    stream = batches(data.train, loop.spec.batch_size, loop.gen, True, data.mean, data.std,
                     augment=loop.spec.augment)
    for xb, yb in stream:
        if loop.step >= loop.total or not _step(model, xb, yb, loop):
            break
        if (loop.step - first) % max(1, per_epoch // 10) == 0:
            progress(f"epoch {epoch + 1}/{loop.spec.epochs} step {loop.step - first}/{per_epoch}"
                     f" loss {loop.sums[0] / max(1, loop.sums[2]):.4f}")
    wall = time.perf_counter() - t0
    top1 = None
    if eval_each_epoch and loop.diverged_step is None:
        top1 = evaluate_top1(model, data.test, data.mean, data.std, loop.spec.eval_batch_size,
                             reproducible=loop.spec.reproducible)["value"]
    record = _record(epoch, loop, loop.step - first, top1, wall, time.perf_counter() - t0 - wall)
    progress(_describe(record, loop.spec.epochs))
    return record


def _step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, loop: _Loop) -> bool:
    """One optimizer step; False (and ``loop.diverged_step`` set) if anything went non-finite."""
    factor = loop.spec.lr_factor(loop.step, loop.total)
    for g in loop.groups:
        g["lr"] = g["initial_lr"] * factor
    xb = xb.to(loop.device, non_blocking=True, memory_format=_layout(loop.spec))
    yb = yb.to(loop.device, non_blocking=True)
    logits = model(xb)  # (B, num_classes)
    loss = F.cross_entropy(logits, yb, label_smoothing=loop.spec.label_smoothing)
    value = loss.item()
    if not math.isfinite(value):
        loop.diverged_step = loop.step
        return False
    loop.opt.zero_grad(set_to_none=True)
    loss.backward()
    loop.opt.step()
    if not _params_finite(model):
        loop.diverged_step = loop.step
        return False
    loop.sums[0] += value * len(yb)
    loop.sums[1] += int((logits.detach().argmax(1) == yb).sum())
    loop.sums[2] += len(yb)
    if loop.on_step is not None:
        loop.on_step(loop.step, value)
    loop.step += 1
    loop.bar.update(1)
    return True


def _params_finite(model: nn.Module) -> bool:
    """One reduction over all parameters (max-abs norm: NaN/inf propagate, no overflow)."""
    params = [p.detach() for p in model.parameters()]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf)))


def _record(epoch: int, loop: _Loop, steps: int, top1: float | None, wall: float,
            eval_s: float) -> EpochRecord:
    loss_sum, correct, seen = loop.sums
    lr = loop.groups[0]["lr"] if loop.groups else loop.opt.param_groups[0]["lr"]
    return EpochRecord(epoch + 1, steps, loss_sum / seen if seen else math.nan,
                       correct / seen if seen else math.nan, top1, float(lr), wall, eval_s)


def _describe(r: EpochRecord, epochs: int) -> str:
    test = "" if r.test_top1 is None else f" test {100 * r.test_top1:.2f}%"
    return (f"epoch {r.epoch}/{epochs}: loss {r.train_loss:.4f} train {100 * r.train_acc:.2f}%"
            f"{test} ({r.wall_s:.1f} s train, {r.eval_s:.1f} s eval)")


def wilson_interval(correct: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends at 0 and n
    return lo, 1.0 if correct == n else min(1.0, centre + half)


@torch.no_grad()
def evaluate_top1(model: nn.Module, split: ImageSet, mean: tuple[float, ...],
                  std: tuple[float, ...], batch_size: int = 1000, *,
                  reproducible: bool = True) -> dict[str, Any]:
    """Top-1 of ``model`` (in eval mode; its mode is restored) over ``split`` in order.

    With ``reproducible`` the forward runs under :func:`reproducible_kernels`: oneDNN's
    convolution forward does not depend on the thread count but does on the CPU's vector ISA
    (AVX-512 and AVX2 gave different outputs for three of cnn-small's four convs), the native
    one did not. It costs about 1.5 s per 10k Fashion-MNIST images at 1 thread (4.2 s vs 2.7 s).

    Returns:
        ``value`` (fraction correct), ``n``, ``correct``, ``ci_lo``/``ci_hi`` (95% Wilson) and
        ``per_example`` (0/1 per example in split order, for paired comparisons).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with reproducible_kernels(reproducible):
        hits = [(model(xb.to(device)).argmax(1).cpu() == yb)  # (B,) bool
                for xb, yb in batches(split, batch_size, None, False, mean, std)]
    model.train(was_training)
    per_example = torch.cat(hits).to(torch.uint8) if hits else torch.zeros(0, dtype=torch.uint8)
    n, correct = len(per_example), int(per_example.sum())
    lo, hi = wilson_interval(correct, n)
    return {"value": correct / n if n else math.nan, "n": n, "correct": correct, "ci_lo": lo,
            "ci_hi": hi, "per_example": per_example.tolist()}


# --- cached FP checkpoints ----------------------------------------------------------------------


def fp_key(arch: str, data: VisionData, spec: TrainSpec, seed: int, device: str) -> str:
    """Short hash of everything the FP weights depend on."""
    payload = {"arch": arch, "dataset": data.dataset_id, "fingerprint": data.fingerprint,
               "spec": dataclasses.asdict(spec), "seed": seed, "torch": str(torch.__version__),
               "device": device, "code": VISION_TRAIN_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def fp_path(arch: str, dataset_id: str, spec: TrainSpec, seed: int, *,
            device: str | torch.device = "cpu") -> Path:
    """Where the FP checkpoint of this recipe lives (whether or not it was trained yet)."""
    check_arch(arch, "arch")
    key = fp_key(arch, load_vision(dataset_id), spec, seed, torch.device(device).type)
    return cache_dir() / "vision-fp" / f"{arch}-{key}.pt"


def fp_checkpoint(arch: str, dataset_id: str, spec: TrainSpec, seed: int, *,
                  device: str | torch.device = "cpu",
                  progress: Callable[[str], None] | None = None) -> Path:
    """Path of the cached FP ``state_dict`` (plus metadata), training it once if missing.

    The model is initialised from ``seed`` and trained with data order from ``seed``; the file
    is ``cache_dir()/vision-fp/<arch>-<fp_key>.pt``, written atomically.

    Raises:
        ConfigError: FP training diverged (lower ``spec.lr``); nothing is cached then.
    """
    path = fp_path(arch, dataset_id, spec, seed, device=device)
    if path.exists():
        return path
    data = load_vision(dataset_id)
    device = torch.device(device)
    model = build_model(arch, data.num_classes, data.in_channels, seed=seed).to(device)
    history = train(model, data, spec, seed, progress=progress, eval_each_epoch=True)
    if history.diverged:
        raise ConfigError(f"TrainSpec.lr={spec.lr}: FP training of {arch} on {dataset_id} "
                          f"diverged at step {history.diverged_step}; accepted: a smaller lr")
    top1 = evaluate_top1(model, data.test, data.mean, data.std, spec.eval_batch_size,
                         reproducible=spec.reproducible)
    meta = {"arch": arch, "dataset_id": dataset_id, "fingerprint": data.fingerprint,
            "spec": dataclasses.asdict(spec), "seed": seed, "torch": str(torch.__version__),
            "device": device.type, "fp_top1": top1, "history": history.to_dict()}
    atomic_save(path, lambda p: torch.save({"state_dict": model.state_dict(), "meta": meta}, p))
    return path


def load_fp(arch: str, dataset_id: str, spec: TrainSpec, seed: int, *,
            device: str | torch.device = "cpu",
            progress: Callable[[str], None] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The trained FP model (eval mode, on ``device``) and its metadata (``fp_top1``,
    ``history``, spec, fingerprint), training and caching it on first use."""
    path = fp_checkpoint(arch, dataset_id, spec, seed, device=device, progress=progress)
    payload = torch.load(path, map_location=device, weights_only=True)
    data = load_vision(dataset_id)
    model = build_model(arch, data.num_classes, data.in_channels, seed=seed).to(device)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["meta"]
