"""The method interface every quantization method and baseline implements.

A method receives the model, the data it is allowed to see (``MethodData``) and the run
context; it returns a ``QuantResult`` whose ``qstate`` lets the runner verify (and later
re-apply) every quantized layer. The runner never branches on a method's name.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from suite.errors import ConfigError
from suite.primitives import LayerQState, WeightFormat
from suite.registry import Registry

log = logging.getLogger("qbench")

if TYPE_CHECKING:
    from suite.models import ModelAdapter


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen config; subclasses add typed fields with defaults.

    ``version`` is bumped by a method author whenever results change for the same config; it
    enters the run key so stale records are never reused.
    """

    version: ClassVar[int] = 1
    # Fields added after records were published whose default reproduces the results from
    # before they existed: at that default they are left out of ``to_dict``, so the run keys of
    # existing records stay valid (a new option need not re-run a grid that never set it).
    added_later: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> MethodConfig:
        """Build from a YAML mapping; unknown keys and wrong types are one-line ConfigErrors."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                accepted = ", ".join(fields) or "(none)"
                raise ConfigError(f"{where}.{key}: unknown parameter; accepted: {accepted}")
        for key, value in raw.items():
            _check_type(f"{where}.{key}", value, fields[key].default)
        try:
            return cls(**raw)
        except ConfigError as e:  # a value check in __post_init__: say where it came from
            raise ConfigError(f"{where}.{e}") from e

    def check_choices(self, choices: dict[str, tuple[str, ...]]) -> None:
        """One-line ConfigError for a string field whose value is not among its choices."""
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ConfigError(f"{name}: got {getattr(self, name)!r}; "
                                  f"accepted: {', '.join(accepted)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for records and run keys); an ``added_later`` field at its
        default is left out."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not (k in self.added_later and v == defaults[k])}


def _check_type(where: str, value: Any, default: Any) -> None:
    """Reject a YAML value whose type differs from the field default's type."""
    if default is dataclasses.MISSING or default is None:
        return
    expected: tuple[type, ...] = (float, int) if isinstance(default, float) else (type(default),)
    wrong_bool = isinstance(value, bool) and not isinstance(default, bool)
    if wrong_bool or not isinstance(value, expected):
        raise ConfigError(
            f"{where}: got {value!r} ({type(value).__name__}); accepted: a {type(default).__name__}"
        )


@dataclass(frozen=True)
class Seeds:
    """Per-purpose seeds derived from the cell seed, so e.g. calibration sampling and
    initialisation never share a random stream."""

    base: int
    calib: int
    init: int
    train: int
    eval: int

    @classmethod
    def derive(cls, seed: int) -> Seeds:
        """Deterministic sub-seeds: base*1000 + purpose index (readable in records)."""
        return cls(seed, seed * 1000 + 1, seed * 1000 + 2, seed * 1000 + 3, seed * 1000 + 4)


@dataclass
class RunContext:
    """What a method may know about where and how it runs (never about evaluation)."""

    device: torch.device
    seeds: Seeds
    adapter: ModelAdapter
    determinism: Literal["strict", "fast"] = "strict"
    scratch_dir: Path | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("qbench.method"))
    progress: Callable[[str], None] = lambda stage: None


@dataclass
class MethodData:
    """The data a method may use. Calibration-free methods ignore it.

    Attributes:
        calib: calibration token windows (n, seqlen) int64, drawn from the calibration corpus
            (never the evaluation corpus), or None.
        train_data / train_budget: for QAT methods (vision track), the dataset (a
            ``VisionData``: its train split is trained on, never its test split) and the
            grid's training budget (a ``QATBudget``: epochs, step cap, batch size).
        init_qstate: in a chain (``precalibration+gptq``), the layer states of the methods
            before this one, for a method that declares ``accepts_init``; else None.
    """

    calib: torch.Tensor | None = None
    train_data: Any = None
    train_budget: Any = None
    init_qstate: dict[str, LayerQState] | None = None


@dataclass
class QuantResult:
    """What a method returns.

    Attributes:
        model: the quantized model (weights already replaced by their dequantized values).
        qstate: per quantized layer (dotted module name) its codes, scales and zeros.
        fp_layers: target layers the method deliberately kept in floating point, with reasons.
        stats: cost and numerics (wall time, peak memory, calibration tokens, fallbacks fired).
        abits: the bits of the quantized layers' input activations (None: weight-only).
    """

    model: nn.Module
    qstate: dict[str, LayerQState]
    fp_layers: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    abits: int | None = None


class QuantMethod(ABC):
    """A quantization method or baseline.

    Subclasses set ``name`` (stable registry id), ``kind`` and ``Config``, register with
    ``@METHODS.register(name)``, and implement :meth:`quantize`. ``domains`` names the model
    kinds the method runs on: ``lm`` (decoder LMs) and ``vision`` (CNNs); QAT methods train
    through the vision loop and declare ``("vision",)``.
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["ptq", "qat", "reference"]]
    Config: ClassVar[type[MethodConfig]]
    needs_calibration: ClassVar[bool] = False
    accepts_init: ClassVar[bool] = False  # may follow another method in a chain
    domains: ClassVar[tuple[str, ...]] = ("lm", "vision")  # model kinds it can quantize
    # True when the codes do not depend on float rounding (no data-dependent float sums,
    # exact tie-breaks): the same on any CPU and thread count; a test checks it per method
    machine_independent: ClassVar[bool] = False
    # True when the output cannot depend on the cell's seed (no random draws, no calibration
    # sample): one record stands for every seed in ``qbench compare``; a test checks it
    seed_free: ClassVar[bool] = False

    @classmethod
    def check_format(cls, fmt: WeightFormat, config: MethodConfig) -> None:
        """Raise a one-line ConfigError if the method cannot produce ``fmt`` (checked for
        every cell before anything runs); the default accepts every format."""
        return None

    def __init__(self, config: MethodConfig, fmt: WeightFormat | None) -> None:
        self.config = config
        self.fmt = fmt

    @abstractmethod
    def quantize(self, model: nn.Module, data: MethodData, ctx: RunContext) -> QuantResult:
        """Quantize ``model``'s target layers to ``self.fmt`` and return the result."""


PLUGIN_GROUP = "qbench.methods"  # entry points: name = module that registers the method(s)
# The packages whose every module is imported on the first registry lookup: a new file there
# (``methods/mine.py`` with ``@METHODS.register("mine")``) is a method, with no list to edit.
BUILTIN_PACKAGES = ("baselines", "methods")


def builtin_modules(packages: tuple[str, ...] = BUILTIN_PACKAGES) -> list[str]:
    """The dotted names of every module and sub-package in ``packages`` (sorted; names
    starting with ``_`` are private helpers and are not scanned)."""
    names = []
    for package in packages:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
            if not info.name.rpartition(".")[2].startswith("_"):
                names.append(info.name)
    return sorted(names)


def _builtin_methods() -> None:
    """Import every module of the method packages so their registry decorators run, then the
    plug-ins. The packages are found by name at run time (no import list, and no import of
    them from this module: they import it)."""
    for name in builtin_modules():
        importlib.import_module(name)
    load_plugins()


def load_plugins(group: str = PLUGIN_GROUP) -> list[str]:
    """Import every installed package's entry point in ``group`` (a module whose
    ``@METHODS.register`` decorators run on import); returns the entry point names loaded.
    A plug-in that fails to import is reported in one line and skipped, so one broken
    package does not take the suite down; its methods are then unknown ids in grids."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - third-party code: report, keep going
            log.warning("qbench: plug-in %r (%s) failed to load: %s", ep.name, ep.value,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            continue
        loaded.append(ep.name)
    return loaded


METHODS: Registry[type[QuantMethod]] = Registry("method", base=QuantMethod,
                                                loader=_builtin_methods)


def method_class(entry: str, field: str | None = None) -> type[QuantMethod]:
    """The class of a grid's method entry: a registry id, or ``<id>:<variant>`` for a named
    variant with its own parameters (e.g. ``lsq:adam`` beside ``lsq`` in one grid; its
    parameters are ``methods.lsq:adam`` and do not inherit those of ``methods.lsq``)."""
    base, sep, variant = entry.partition(":")
    if sep and not variant.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"{field or 'method'}: variant label of {entry!r} must be letters, "
                          "digits, '-' or '_'")
    return METHODS.get(base, field)
