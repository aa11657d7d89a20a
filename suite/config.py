"""Typed, frozen grid configuration: YAML -> validated ``GridConfig`` -> list of ``Cell``.

A grid YAML has these sections::

    name: reproduce
    axes:     {model: [...], method: [fp, rtn, precalibration+gptq], wbits: [4, 3],
               group_size: [64, per-channel], seed: [0], sym: [false],
               calib: [abcnews-lee, enwiki-heldout]}   # calib: optional, corpus ids
    fixed:    {scale_dtype: float16, calib: {...}, eval: [{type: ppl, ...}]}
    methods:  {rtn: {...}}          # per-method parameters, validated by each method's Config
    run:      {store: results/records, timeout_s: 3600, device: cpu, determinism: strict}
    exclude:  [{method: gptq, wbits: 8}]   # optional: drop cells matching every named field

YAML only fills the dataclasses: unknown keys and bad values raise a one-line ConfigError that
names the field and the accepted values. ``--set a.b=value`` overrides (CLI > YAML) are applied
to the raw mapping before validation.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from suite.errors import ConfigError
from suite.primitives import PER_CHANNEL, PER_TENSOR, WeightFormat
from suite.vision.runtime import VisionSetup
from suite.vision.train import TrainSpec

_GROUP_ALIASES = {"per-channel": PER_CHANNEL, "per-tensor": PER_TENSOR}
_TOP = ("name", "description", "axes", "fixed", "methods", "run", "exclude")
_EXCLUDE = ("model", "method", "wbits", "group_size", "seed", "sym", "calib")
_AXES = ("model", "method", "wbits", "group_size", "seed", "sym", "calib")
_FIXED = ("scale_dtype", "calib", "eval", "vision")
_VISION = ("fp_train", "fp_seed", "fp_checkpoint", "fp_sha256", "train", "calib_images")
_EVAL_KEYS = ("corpus", "seqlen", "windows", "task", "shots", "limit", "dataset", "split")


@dataclass(frozen=True)
class CalibSpec:
    """Calibration data for methods that need it (drawn from a corpus disjoint from eval)."""

    corpus: str = "abcnews-lee"
    windows: int = 128
    seqlen: int = 512


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation protocol; ``protocol_id`` is what every metric row carries."""

    type: Literal["ppl"] = "ppl"
    corpus: str = "enwiki-gensim"
    seqlen: int = 512
    windows: int | None = None

    @property
    def protocol_id(self) -> str:
        """E.g. ``ppl/enwiki-gensim/gptq-nonoverlap/seq512/w40`` (``wall`` = every window)."""
        n = "all" if self.windows is None else str(self.windows)
        return f"ppl/{self.corpus}/gptq-nonoverlap/seq{self.seqlen}/w{n}"


@dataclass(frozen=True)
class TaskSpec:
    """A multiple-choice task run through lm-eval; yields one protocol per metric."""

    type: Literal["acc"] = "acc"
    task: str = "bigbench:social_iqa"
    shots: int = 0
    limit: int | None = None  # the first ``limit`` examples of the task's fixed order
    lm_eval: str = ""  # the lm-eval release, filled in at load time (part of the protocol id)

    @property
    def protocol_ids(self) -> tuple[str, ...]:
        """E.g. ``acc/bigbench:social_iqa/acc_norm/0shot/n500/lm-eval-0.4.13``."""
        n = "all" if self.limit is None else str(self.limit)
        return tuple(f"acc/{self.task}/{m}/{self.shots}shot/n{n}/lm-eval-{self.lm_eval}"
                     for m in ("acc", "acc_norm"))

    @property
    def protocol_id(self) -> str:
        """The task's identity across both metrics (used to reject duplicates)."""
        return self.protocol_ids[0].replace("/acc/", "/", 1)


@dataclass(frozen=True)
class Top1Spec:
    """Top-1 accuracy of a vision model on a whole split of its dataset."""

    type: Literal["top1"] = "top1"
    dataset: str = "fashion-mnist"
    split: Literal["test"] = "test"

    @property
    def protocol_id(self) -> str:
        """E.g. ``top1/fashion-mnist/test``."""
        return f"top1/{self.dataset}/{self.split}"

    @property
    def protocol_ids(self) -> tuple[str, ...]:
        """The one protocol id."""
        return (self.protocol_id,)


Evaluation = EvalSpec | TaskSpec | Top1Spec


def metric_of(pid: str) -> str:
    """``ppl/...`` -> ppl; ``acc/<task>/<metric>/<k>shot/n<N>/lm-eval-<v>`` -> the metric."""
    parts = pid.split("/")
    return parts[-4] if parts[0] == "acc" else parts[0]  # task ids may contain "/"


def protocol_ids(spec: Evaluation) -> tuple[str, ...]:
    """Every protocol id an evaluation produces a metric row for."""
    return spec.protocol_ids if isinstance(spec, TaskSpec | Top1Spec) else (spec.protocol_id,)


EXECUTORS = ("local", "slurm", "ray")
RETRYABLE = ("crashed", "oom", "timeout", "failed")


@dataclass(frozen=True)
class SlurmSpec:
    """``run.slurm``: submitit job arrays, one array per resource class of the pending cells.
    ``cluster: local`` runs the same submitit code path as local processes (what the tests
    use); ``cpus_per_task`` is also the cell's torch thread count unless ``run.threads`` is
    set; ``gpus_per_task`` null means 1 for cuda grids and 0 for cpu ones."""

    cluster: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    array_parallelism: int = 64
    cpus_per_task: int = 4
    gpus_per_task: int | None = None
    mem_gb: int = 32
    folder: str | None = None  # default <store>/.submitit


@dataclass(frozen=True)
class RaySpec:
    """``run.ray``: each cell a Ray task with ``num_cpus`` / ``num_gpus`` resources, on the
    cluster at ``address`` (null: start a local Ray instance for this run)."""

    address: str | None = None
    num_cpus: int = 1
    num_gpus: float | None = None  # null: 1 for cuda grids, 0 for cpu ones


@dataclass(frozen=True)
class RunSpec:
    """How cells execute; none of this enters the run key (it cannot change a result).

    ``slots``: cells run at once by the local executor (null: one per visible GPU for cuda
    grids, 1 on cpu; cpu threads are split between slots unless ``threads`` is set).
    ``retries`` re-runs of a cell whose attempt ended in one of ``retry_on`` (transient
    failures), waiting ``retry_backoff_s`` x 2^attempt before each. ``exclusive`` cells run
    alone (nothing else on the machine while they run: kernel timing). ``stale_claim_s``: a
    claim whose worker stopped heart-beating this long ago is taken over. ``worker: warm``
    forks cpu cells from a slot process that has imported torch and the suite once (saves
    ~5 s per cell); ``fresh`` starts each cell in a new interpreter (cuda cells always do).
    ``keep_qstate``: each ok language-model cell also leaves its quantized state in
    ``$QBENCH_CACHE/qstate/<run key>.pt``, which ``qbench export`` reads instead of re-running
    the cell (``suite.qstate_cache``; about 70 MB per 4-bit SmolLM2 cell)."""

    store: str = "results/records"
    timeout_s: int = 3600
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    determinism: Literal["strict", "fast"] = "strict"
    threads: int | None = None
    executor: Literal["local", "slurm", "ray"] = "local"
    slots: int | None = None
    retries: int = 2
    retry_backoff_s: float = 5.0
    retry_on: tuple[str, ...] = ("crashed",)
    exclusive: bool = False
    stale_claim_s: int = 300
    worker: Literal["warm", "fresh"] = "warm"
    keep_qstate: bool = False
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    ray: RaySpec = field(default_factory=RaySpec)


@dataclass(frozen=True)
class Cell:
    """One (model, method chain, format, seed) point of a grid: the unit of execution."""

    model: str
    chain: tuple[str, ...]
    fmt: WeightFormat | None
    seed: int
    method_params: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    calib: CalibSpec | None
    evals: tuple[Evaluation, ...]
    vision: VisionSetup | None = None

    @property
    def method(self) -> str:
        """Registry id of the chain, e.g. ``precalibration+gptq``."""
        return "+".join(self.chain)

    def params_of(self, method: str) -> dict[str, Any]:
        """The validated parameters of one method of the chain."""
        return dict(dict(self.method_params)[method])

    def label(self) -> str:
        """Short label for progress bars and logs (the calibration corpus when it is not the
        default one)."""
        fmt = f" {self.fmt.label()}" if self.fmt else ""
        calib = (f" calib={self.calib.corpus}" if self.calib is not None
                 and self.calib.corpus != CalibSpec.corpus else "")
        return f"{self.model} {self.method}{fmt}{calib} seed={self.seed}"


@dataclass(frozen=True)
class GridConfig:
    """A validated grid."""

    name: str
    description: str
    models: tuple[str, ...]
    chains: tuple[tuple[str, ...], ...]
    wbits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    syms: tuple[bool, ...]
    scale_dtype: str
    calib: CalibSpec
    evals: tuple[Evaluation, ...]
    method_params: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    run: RunSpec
    calib_corpora: tuple[str, ...] = ()  # the calib axis; () = just calib.corpus
    exclude: tuple[tuple[tuple[str, Any], ...], ...] = ()
    vision: VisionSetup | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def domain(self) -> str:
        """``vision`` when the grid's models are ``<arch>@<dataset>`` ids, else ``lm``."""
        return "vision" if self.vision is not None else "lm"

    def expand(self) -> list[Cell]:
        """All cells: reference chains (``fp``) once per model x seed, others per format."""
        from suite.interface import method_class

        cells: list[Cell] = []
        for model, chain, seed in itertools.product(self.models, self.chains, self.seeds):
            methods = [method_class(m) for m in chain]
            params = tuple(p for p in self.method_params if p[0] in chain)
            needs_calib = any(m.needs_calibration for m in methods)
            evals = self._evals_of(model)
            if all(m.kind == "reference" for m in methods):
                cell = Cell(model, chain, None, seed, params, None, evals, self.vision)
                cells += [] if self._excluded(cell) else [cell]
                continue
            for calib, bits, gs, sym in itertools.product(
                    self.calib_specs(needs_calib), self.wbits, self.group_sizes, self.syms):
                fmt = WeightFormat(bits, gs, sym, self.scale_dtype)  # type: ignore[arg-type]
                cell = Cell(model, chain, fmt, seed, params, calib, evals, self.vision)
                if not self._excluded(cell):
                    cells.append(cell)
        return cells

    def _evals_of(self, model: str) -> tuple[Evaluation, ...]:
        """A vision model is evaluated only by the top-1 protocols of its own dataset."""
        if self.vision is None:
            return self.evals
        return tuple(e for e in self.evals if isinstance(e, Top1Spec)
                     and model.partition("@")[2] == e.dataset)

    def _excluded(self, cell: Cell) -> bool:
        """Whether an ``exclude`` rule matches every field it names (a reference cell has no
        format: only rules naming none of wbits / group_size / sym can drop it)."""
        fields: dict[str, Any] = {"model": cell.model, "method": cell.method, "seed": cell.seed}
        if cell.calib is not None:
            fields["calib"] = cell.calib.corpus
        if cell.fmt is not None:
            fields.update(wbits=cell.fmt.bits, group_size=cell.fmt.group_size, sym=cell.fmt.sym)
        return any(all(k in fields and fields[k] == v for k, v in rule) for rule in self.exclude)

    def calib_specs(self, needs_calib: bool) -> tuple[CalibSpec | None, ...]:
        """The calibration sets a chain runs under: every corpus of the calib axis for a chain
        that calibrates, one ``None`` for a data-free one (its cells exist once, not per
        corpus: they read no calibration text)."""
        if not needs_calib or self.vision is not None:
            return (None,)
        return tuple(dataclasses.replace(self.calib, corpus=c) for c in self.calib_corpora)


def load_grids(path: str | Path, overrides: list[str] | None = None,
               select: str | None = None) -> list[GridConfig]:
    """Read, override and validate every grid of a YAML file (one grid per YAML document,
    e.g. the language and the vision grids of ``configs/reproduce.yaml``).

    Args:
        path: the YAML file.
        overrides: ``dotted.key=yaml-value`` strings applied to every selected document before
            validation.
        select: keep only the grid of this ``name``.

    Returns:
        The validated, frozen grids in file order (all are validated before any is returned).

    Raises:
        ConfigError: one line naming the field and the accepted values.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    text = p.read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {p} is not valid YAML: {yaml_reason(e, text)}") from None
    if not docs:
        raise ConfigError(f"config: {p.name} holds no grid")
    names = [d.get("name", "grid") if isinstance(d, dict) else None for d in docs]
    if select is not None:
        if select not in names:
            raise ConfigError(f"--grid: got {select!r}; accepted: {', '.join(map(str, names))}")
        docs = [d for d, n in zip(docs, names, strict=True) if n == select]
    elif len(set(names)) != len(names):
        raise ConfigError(f"name: two grids of {p.name} share a name ({names}); names must differ")
    for ov in overrides or []:
        docs = [apply_override(d, ov) for d in docs]
    return [parse_grid(d) for d in docs]


def yaml_reason(e: yaml.YAMLError, text: str) -> str:
    """The parser's reason with the line it points at, e.g. ``line 4, column 9: expected ','
    or ']', but got ':': `method: [rtn]` (in the flow sequence starting at line 3: `model:
    [a, b`)``.

    The parser marks where it noticed the problem; for an unclosed bracket or quote that is
    after the line at fault, which its context mark (where the construct opened) names. A
    ``key value`` line missing its colon is read as text continuing onto the next line, whose
    colon is then reported: the line above is named as the likely culprit.
    """
    lines = text.splitlines()
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    if mark is None:
        return problem
    out = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if _line(lines, mark.line):
        out += f": `{_line(lines, mark.line)}`"
    ctx = " ".join((getattr(e, "context", None) or "").split())
    if context is not None and ctx and context.line != mark.line:
        what = ctx.removeprefix("while parsing ").removeprefix("while scanning ")
        what = what.removeprefix("a ").removeprefix("an ")
        out += f" (in the {what} starting at line {context.line + 1}: " \
               f"`{_line(lines, context.line)}`)"
    elif problem.startswith("mapping values are not allowed") and mark.line > 0:
        prev = next((i for i in range(mark.line - 1, -1, -1)
                     if lines[i].strip() and not lines[i].lstrip().startswith("#")), None)
        if prev is not None and ":" not in lines[prev]:
            out += f" (line {prev + 1} `{_line(lines, prev)}` has no ':' after its key)"
    return out


def _line(lines: list[str], i: int) -> str:
    """Line ``i`` (0-based) of the text, stripped and shortened for a one-line message."""
    text = lines[i].strip() if 0 <= i < len(lines) else ""
    return text if len(text) <= 60 else text[:57] + "..."


def load_grid(path: str | Path, overrides: list[str] | None = None) -> GridConfig:
    """The one grid of a single-document YAML file (see :func:`load_grids`)."""
    grids = load_grids(path, overrides)
    if len(grids) != 1:
        raise ConfigError(f"config: {Path(path).name} holds {len(grids)} grids; select one by "
                          "name (--grid)")
    return grids[0]


def apply_override(raw: Any, override: str) -> dict:
    """Set ``a.b.c=value`` (value parsed as YAML) in a copy of the raw mapping."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set: {override!r} is not of the form dotted.key=value")
    out = dict(raw) if isinstance(raw, dict) else {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", None) or "unparsable").split())
        raise ConfigError(f"--set {key}: value {value!r} is not valid YAML ({problem}); e.g. "
                          f"{key}=[4, 3] or {key}=per-channel") from None
    return out


def parse_grid(raw: Any) -> GridConfig:
    """Validate a raw mapping into a ``GridConfig`` (see module docstring for the schema)."""
    top = _mapping(raw, "config", _TOP)
    axes = _mapping(top.get("axes"), "axes", _AXES, required=("model", "method"))
    fixed = _mapping(top.get("fixed", {}), "fixed", _FIXED)
    name = top.get("name", "grid")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"name: got {name!r}; accepted: letters, digits, '-' and '_'")
    chains = _chains(axes["method"])
    model_ids = _models(axes["model"])
    vision = _vision_setup(fixed, model_ids)
    params, param_warnings = _method_params(top.get("methods", {}), chains)
    calib = _calib(fixed.get("calib", {}))
    grid = GridConfig(
        name=name,
        description=str(top.get("description", "")),
        models=model_ids,
        chains=chains,
        wbits=_int_list(axes.get("wbits", [4]), "axes.wbits", lo=2, hi=8),
        group_sizes=_group_sizes(axes.get("group_size", [PER_CHANNEL])),
        seeds=_int_list(axes.get("seed", [0]), "axes.seed", lo=0, hi=2**31 - 1),
        syms=_bool_list(axes.get("sym", [False]), "axes.sym"),
        scale_dtype=_choice(fixed.get("scale_dtype", "float16"), "fixed.scale_dtype",
                            ("float16", "bfloat16", "float32")),
        calib=calib,
        calib_corpora=_calib_axis(axes.get("calib"), calib, vision is not None),
        evals=_evals(fixed.get("eval", _default_eval(model_ids) if vision else [{"type": "ppl"}])),
        method_params=params,
        run=_run(top.get("run", {})),
        exclude=_exclude(top.get("exclude", [])),
        vision=vision,
    )
    _check_domain(grid)
    _check_calib_disjoint(grid)
    _check_method_domains(grid)
    _check_formats(grid)
    _check_local_models(grid)
    if not grid.expand():
        raise ConfigError(f"exclude: the rules remove every cell of grid {grid.name!r}; "
                          "accepted: rules that leave at least one cell to run")
    return dataclasses.replace(grid, warnings=param_warnings + _degenerate_warnings(grid))


def _default_eval(model_ids: tuple[str, ...]) -> list[dict[str, str]]:
    """Top-1 on the test split of every dataset the grid's vision models use."""
    datasets = dict.fromkeys(m.partition("@")[2] for m in model_ids)
    return [{"type": "top1", "dataset": d} for d in datasets]


def _vision_setup(fixed: dict[str, Any], model_ids: tuple[str, ...]) -> VisionSetup | None:
    """``fixed.vision`` for a grid of vision models; language and vision models never mix."""
    from suite.vision.runtime import parse_model_id

    vision = [parse_model_id(m) is not None for m in model_ids]
    if any(vision) and not all(vision):
        raise ConfigError("axes.model: mixes language models and vision models "
                          "(<arch>@<dataset>); put them in separate grids (YAML documents)")
    if not any(vision):
        if "vision" in fixed:
            raise ConfigError("fixed.vision: only for grids of vision models (<arch>@<dataset>)")
        return None
    if "calib" in fixed:
        raise ConfigError("fixed.calib: text calibration; a vision grid sets "
                          "fixed.vision.calib_images instead")
    return _parse_vision(fixed.get("vision", {}))


def _parse_vision(raw: Any) -> VisionSetup:
    from suite.vision.runtime import QATBudget, VisionSetup

    m = _mapping(raw, "fixed.vision", _VISION)
    fp_train = _dataclass_from(TrainSpec, m.get("fp_train", {}), "fixed.vision.fp_train")
    budget = _dataclass_from(QATBudget, m.get("train", {}), "fixed.vision.train")
    for name in ("epochs", "batch_size"):
        _positive(getattr(budget, name), f"fixed.vision.train.{name}")
    _positive(budget.max_steps, "fixed.vision.train.max_steps", allow_none=True)
    if not isinstance(budget.augment, bool):
        raise ConfigError(f"fixed.vision.train.augment: got {budget.augment!r}; "
                          "accepted: true, false")
    seed = _int_list([m.get("fp_seed", 0)], "fixed.vision.fp_seed", lo=0, hi=2**31 - 1)[0]
    n = _positive(m.get("calib_images", 1024), "fixed.vision.calib_images")
    ckpt, sha = _published_fp(m)
    return VisionSetup(fp_train, seed, budget, n, fp_checkpoint=ckpt, fp_sha256=sha)


def _published_fp(m: dict[str, Any]) -> tuple[str | None, str | None]:
    """``fixed.vision.fp_checkpoint`` and ``fp_sha256``: both or neither."""
    ckpt, sha = m.get("fp_checkpoint"), m.get("fp_sha256")
    if ckpt is None and sha is None:
        return None, None
    if not isinstance(ckpt, str) or not ckpt:
        raise ConfigError(f"fixed.vision.fp_checkpoint: got {ckpt!r}; accepted: the path of a "
                          "published FP checkpoint (.pt), given together with fp_sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ConfigError(f"fixed.vision.fp_sha256: got {sha!r}; accepted: the 64 lowercase hex "
                          "digits of the fp_checkpoint file's sha256")
    return ckpt, sha


def _dataclass_from(cls: type, raw: Any, where: str) -> Any:
    """``cls(**raw)`` with unknown keys and invalid values as one-line ConfigErrors."""
    names = tuple(f.name for f in dataclasses.fields(cls))
    m = _mapping(raw, where, names)
    try:
        return cls(**m)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def _check_formats(grid: GridConfig) -> None:
    """Every method of every cell can produce the cell's format (e.g. QAT step sizes are
    per tensor and symmetric)."""
    from suite.interface import method_class

    seen = set()
    for cell in grid.expand():
        for m in cell.chain:
            if cell.fmt is not None and (m, cell.fmt) not in seen:
                seen.add((m, cell.fmt))
                cls = method_class(m)
                cls.check_format(cell.fmt, cls.Config(**cell.params_of(m)))


def _check_method_domains(grid: GridConfig) -> None:
    """Every method of the grid runs on the grid's kind of model."""
    from suite.interface import METHODS, method_class

    for chain in grid.chains:
        for m in chain:
            if grid.domain not in method_class(m).domains:
                ok = sorted(n for n, c in METHODS.items() if grid.domain in c.domains)
                raise ConfigError(f"axes.method: {m!r} does not run on {grid.domain} models; "
                                  f"accepted: {', '.join(ok)}")


def _check_local_models(grid: GridConfig) -> None:
    """An ``hf:`` model written as a local path names an existing folder (checked after the
    rest of the grid, which is what the other messages describe)."""
    from suite.models import check_hf_location

    for model in grid.models:
        if model.startswith("hf:"):
            check_hf_location(model, "axes.model")


def _check_domain(grid: GridConfig) -> None:
    """Vision grids evaluate top-1 only, and every vision model has its dataset's protocol."""
    top1 = [e for e in grid.evals if isinstance(e, Top1Spec)]
    if grid.vision is None:
        if top1:
            raise ConfigError("fixed.eval: type top1 needs vision models (<arch>@<dataset>)")
        return
    if len(top1) != len(grid.evals):
        raise ConfigError("fixed.eval: a vision grid accepts type top1 only")
    for model in grid.models:
        if not grid._evals_of(model):
            raise ConfigError(f"fixed.eval: no top1 protocol for {model}'s dataset "
                              f"{model.partition('@')[2]!r}")


def _degenerate_warnings(grid: GridConfig) -> tuple[str, ...]:
    """Warn about cells whose format reproduces the grid the model's weights already lie on
    (cells removed by ``exclude`` are not warned about)."""
    from suite.models import degenerate_format

    out: dict[str, None] = {}
    for cell in grid.expand():
        if cell.fmt is not None and degenerate_format(cell.model, cell.fmt):
            out[f"{cell.model} {cell.fmt.label()}: the shipped weights already lie on this "
                "grid, so quantizing cannot change them (marked in the leaderboard)"] = None
    return tuple(out)


def _mapping(raw: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
             ) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(allowed)}; "
                          f"got {type(raw).__name__}")
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key; accepted: {', '.join(allowed)}")
    for key in required:
        if key not in raw:
            raise ConfigError(f"{where}.{key}: missing; it is required")
    return raw


def _list(raw: Any, where: str) -> list:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ConfigError(f"{where}: empty list; give at least one value")
    seen = [repr(x) for x in items]
    dup = next((x for x in seen if seen.count(x) > 1), None)
    if dup is not None:
        raise ConfigError(f"{where}: duplicate value {dup}")
    return items


def _int_list(raw: Any, where: str, lo: int, hi: int) -> tuple[int, ...]:
    out = []
    for v in _list(raw, where):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ConfigError(f"{where}: got {v!r}; accepted: integers {lo}..{hi}")
        out.append(v)
    return tuple(out)


def _bool_list(raw: Any, where: str) -> tuple[bool, ...]:
    items = _list(raw, where)
    for v in items:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: got {v!r}; accepted: true, false")
    return tuple(items)


def _group_sizes(raw: Any) -> tuple[int, ...]:
    out = []
    for v in _list(raw, "axes.group_size"):
        v = _GROUP_ALIASES.get(v, v)
        if isinstance(v, bool) or not isinstance(v, int) or v < -1:
            raise ConfigError(f"axes.group_size: got {v!r}; accepted: a positive integer "
                              "(input columns per group), per-channel or per-tensor")
        out.append(v)
    return tuple(out)


def _choice(v: Any, where: str, accepted: tuple[str, ...]) -> str:
    if v not in accepted:
        raise ConfigError(f"{where}: got {v!r}; accepted: {', '.join(accepted)}")
    return v


def _models(raw: Any) -> tuple[str, ...]:
    from suite.models import MODELS

    out = []
    for v in _list(raw, "axes.model"):
        if not isinstance(v, str):
            raise ConfigError(f"axes.model: got {v!r}; accepted: a model id (see `qbench list`)")
        if not v.startswith("hf:") and v not in MODELS and not _is_vision_id(v):
            raise ConfigError(MODELS.unknown_message(v, "axes.model") + ", hf:<repo-or-dir>, "
                              "<vision-arch>@<dataset>")
        out.append(v)
    return tuple(out)


def _is_vision_id(model_id: str) -> bool:
    """Whether ``model_id`` is a valid ``<arch>@<dataset>`` (a malformed dataset raises)."""
    from suite.vision.runtime import check_model_id, parse_model_id

    if parse_model_id(model_id) is None:
        return False
    check_model_id(model_id, "axes.model")
    return True


def _chains(raw: Any) -> tuple[tuple[str, ...], ...]:
    from suite.interface import METHODS, method_class

    chains = []
    for v in _list(raw, "axes.method"):
        chain = tuple(v) if isinstance(v, list) else tuple(str(v).split("+"))
        for m in chain:
            method_class(m, field="axes.method")
        kinds = {method_class(m).kind for m in chain}
        if "reference" in kinds and len(chain) > 1:
            raise ConfigError(f"axes.method: {'+'.join(chain)!r} chains a reference method; "
                              "'fp' must stand alone")
        for m in chain[1:]:
            if not method_class(m).accepts_init:
                ok = sorted(n for n, c in METHODS.items() if c.accepts_init)
                raise ConfigError(f"axes.method: {'+'.join(chain)!r}: {m!r} cannot start from "
                                  f"a previous method's result; accepted after '+': "
                                  f"{', '.join(ok) or '(none)'}")
        chains.append(chain)
    return tuple(chains)


def _positive(v: Any, where: str, allow_none: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        extra = " or null (all)" if allow_none else ""
        raise ConfigError(f"{where}: got {v!r}; accepted: a positive integer{extra}")
    return v


def _calib(raw: Any) -> CalibSpec:
    from suite.data import check_corpus

    m = _mapping(raw, "fixed.calib", ("corpus", "windows", "seqlen"))
    spec = CalibSpec(**m)
    check_corpus(spec.corpus, "fixed.calib.corpus")
    _positive(spec.windows, "fixed.calib.windows")
    _positive(spec.seqlen, "fixed.calib.seqlen")
    return spec


def _calib_axis(raw: Any, calib: CalibSpec, vision: bool) -> tuple[str, ...]:
    """``axes.calib``: calibration corpus ids (default: ``fixed.calib.corpus`` alone)."""
    from suite.data import check_corpus

    if raw is None:
        return (calib.corpus,)
    if vision:
        raise ConfigError("axes.calib: text calibration corpora; a vision grid calibrates on "
                          "fixed.vision.calib_images of its own dataset")
    ids = _list(raw, "axes.calib")
    for i, corpus in enumerate(ids):
        check_corpus(corpus, f"axes.calib[{i}]")
    if not ids or len(set(ids)) != len(ids):
        raise ConfigError(f"axes.calib: got {ids!r}; accepted: a non-empty list of distinct "
                          "corpus ids")
    return tuple(ids)


def _check_calib_disjoint(grid: GridConfig) -> None:
    """A calibration corpus must not share text with an evaluation corpus (the 32-token
    leakage check confirms it on the actual windows when a cell is prepared)."""
    from suite.data import shares_text

    where = ("fixed.calib.corpus" if grid.calib_corpora == (grid.calib.corpus,)
             else "axes.calib")
    for corpus in grid.calib_corpora if grid.vision is None else ():
        for e in grid.evals:
            if isinstance(e, EvalSpec) and shares_text(corpus, e.corpus):
                raise ConfigError(f"{where}: {corpus!r} shares text with the evaluation corpus "
                                  f"{e.corpus!r}; accepted: a corpus disjoint from every "
                                  "fixed.eval corpus (e.g. enwiki-heldout with enwiki-eval)")


def _evals(raw: Any) -> tuple[Evaluation, ...]:
    out: list[Evaluation] = []
    for i, item in enumerate(_list(raw, "fixed.eval")):
        where = f"fixed.eval[{i}]"
        kind = _mapping(item, where, ("type", *_EVAL_KEYS)).get("type", "ppl")
        _choice(kind, f"{where}.type", ("ppl", "acc", "top1"))
        parse = {"ppl": _ppl_spec, "acc": _task_spec, "top1": _top1_spec}[kind]
        out.append(parse(item, where))
    ids = [e.protocol_id for e in out]
    if len(set(ids)) != len(ids):
        raise ConfigError("fixed.eval: two entries have the same protocol id")
    return tuple(out)


def _ppl_spec(item: dict[str, Any], where: str) -> EvalSpec:
    from suite.data import check_corpus

    spec = EvalSpec(**_mapping(item, where, ("type", "corpus", "seqlen", "windows")))
    check_corpus(spec.corpus, f"{where}.corpus")
    _positive(spec.seqlen, f"{where}.seqlen")
    _positive(spec.windows, f"{where}.windows", allow_none=True)
    return spec


def _top1_spec(item: dict[str, Any], where: str) -> Top1Spec:
    from suite.vision.datasets import check_vision_dataset

    spec = Top1Spec(**_mapping(item, where, ("type", "dataset", "split")))
    check_vision_dataset(spec.dataset, f"{where}.dataset")
    _choice(spec.split, f"{where}.split", ("test",))
    return spec


def _task_spec(item: dict[str, Any], where: str) -> TaskSpec:
    from suite.evaluation.accuracy import lm_eval_version
    from suite.evaluation.tasks import check_task

    m = _mapping(item, where, ("type", "task", "shots", "limit"), required=("task",))
    spec = TaskSpec(**m, lm_eval=lm_eval_version())
    check_task(spec.task, f"{where}.task")
    if not isinstance(spec.shots, int) or isinstance(spec.shots, bool) or spec.shots < 0:
        raise ConfigError(f"{where}.shots: got {spec.shots!r}; accepted: an integer >= 0")
    if spec.task.startswith("bigbench:") and spec.shots:
        raise ConfigError(f"{where}.shots: got {spec.shots}; accepted: 0 for bigbench tasks "
                          "(they have no separate few-shot split)")
    _positive(spec.limit, f"{where}.limit", allow_none=True)
    return spec


def _method_params(raw: Any, chains: tuple[tuple[str, ...], ...]
                   ) -> tuple[tuple[tuple[str, tuple[tuple[str, Any], ...]], ...], tuple[str, ...]]:
    """The validated parameters of every method of the grid, and the warnings.

    Parameters of a registered method (or variant) that is not in ``axes.method`` are ignored
    with a one-line warning, so a grid narrowed with ``--set 'axes.method=[rtn,mine]'`` still
    loads; a key naming no registered method is an error (a typo), as is any bad parameter of
    a method the grid runs.
    """
    from suite.interface import METHODS, method_class

    used = sorted({m for c in chains for m in c})
    m = raw if isinstance(raw, dict) else _mapping(raw, "methods", tuple(used))  # (raises)
    unused = [str(k) for k in m if k not in used]
    for key in unused:
        if key.partition(":")[0] not in METHODS:
            raise ConfigError(METHODS.unknown_message(key.partition(":")[0], f"methods.{key}"))
    out = []
    for name in used:
        cfg = method_class(name).Config.from_dict(m.get(name) or {}, f"methods.{name}")
        out.append((name, tuple(sorted(cfg.to_dict().items()))))
    warnings = (f"methods: parameters of {', '.join(unused)} ignored (not in axes.method)",)
    return tuple(out), warnings if unused else ()


def _exclude(raw: Any) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """``exclude: [{method: gptq, wbits: 8}, ...]``: drop the cells matching all named fields."""
    if not isinstance(raw, list):
        raise ConfigError(f"exclude: got {type(raw).__name__}; accepted: a list of mappings")
    rules = []
    for i, rule in enumerate(raw):
        m = _mapping(rule, f"exclude[{i}]", _EXCLUDE)
        if "group_size" in m:
            m = {**m, "group_size": _GROUP_ALIASES.get(m["group_size"], m["group_size"])}
        rules.append(tuple(sorted(m.items())))
    return tuple(rules)


def _run(raw: Any) -> RunSpec:
    names = tuple(f.name for f in dataclasses.fields(RunSpec))
    m = dict(_mapping(raw, "run", names))
    m["slurm"] = _slurm(m.get("slurm", {}))
    m["ray"] = _ray(m.get("ray", {}))
    if "retry_on" in m:
        m["retry_on"] = tuple(_choice(v, "run.retry_on", RETRYABLE)
                              for v in _list(m["retry_on"], "run.retry_on"))
    spec = RunSpec(**m)
    if not isinstance(spec.store, str) or not spec.store:
        raise ConfigError(f"run.store: got {spec.store!r}; accepted: a directory path")
    _positive(spec.timeout_s, "run.timeout_s")
    _choice(spec.device, "run.device", ("cpu", "cuda", "auto"))
    _choice(spec.determinism, "run.determinism", ("strict", "fast"))
    _positive(spec.threads, "run.threads", allow_none=True)
    _choice(spec.executor, "run.executor", EXECUTORS)
    _positive(spec.slots, "run.slots", allow_none=True)
    _non_negative(spec.retries, "run.retries")
    _non_negative(spec.retry_backoff_s, "run.retry_backoff_s", number=True)
    _bool(spec.exclusive, "run.exclusive")
    _bool(spec.keep_qstate, "run.keep_qstate")
    _positive(spec.stale_claim_s, "run.stale_claim_s")
    _choice(spec.worker, "run.worker", ("warm", "fresh"))
    return spec


def _slurm(raw: Any) -> SlurmSpec:
    spec = SlurmSpec(**_mapping(raw, "run.slurm", tuple(f.name for f in
                                                         dataclasses.fields(SlurmSpec))))
    _choice(spec.cluster, "run.slurm.cluster", ("slurm", "local"))
    for name in ("array_parallelism", "cpus_per_task", "mem_gb"):
        _positive(getattr(spec, name), f"run.slurm.{name}")
    if spec.gpus_per_task is not None:
        _non_negative(spec.gpus_per_task, "run.slurm.gpus_per_task")
    return spec


def _ray(raw: Any) -> RaySpec:
    spec = RaySpec(**_mapping(raw, "run.ray", tuple(f.name for f in dataclasses.fields(RaySpec))))
    _positive(spec.num_cpus, "run.ray.num_cpus")
    if spec.num_gpus is not None:
        _non_negative(spec.num_gpus, "run.ray.num_gpus", number=True)
    return spec


def _non_negative(v: Any, where: str, number: bool = False) -> None:
    kinds = (int, float) if number else (int,)
    if isinstance(v, bool) or not isinstance(v, kinds) or v < 0:
        what = "a number >= 0" if number else "an integer >= 0"
        raise ConfigError(f"{where}: got {v!r}; accepted: {what}")


def _bool(v: Any, where: str) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: got {v!r}; accepted: true, false")
