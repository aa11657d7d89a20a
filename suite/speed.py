"""Speed join: each leaderboard row's weight-only GEMV speedup over fp32 on one device.

The kernels table (``results/kernels-<device>.csv``, written by ``suite.kernels.bench``) times
every (shape, format, M, backend). A row's ``speedup`` is model-level, for one decoded token
(M = 1), over the model's quantized linears as declared in ``MODEL_LINEARS``::

    speedup = sum_l n_l * t_fp32(l) / sum_l n_l * t_fmt(l)

where ``l`` runs over the declared linear shapes that the table times (it has an ok fp32
``dense`` row at M = 1 for that (out, in)), ``n_l`` is how many of them the model holds, and
``t_fmt(l)`` is the median time of the fastest backend whose status is ``ok`` for that
(shape, format label, M = 1). ``speed_coverage`` is the fraction of the model's quantized
weights those shapes hold. The speedup is empty (NaN) when the model's shapes are not declared
(e.g. the vision CNNs: convolutions), when the table times none of them, when any timed shape
lacks an ok row of the row's format, or when the row also quantizes activations (the table
times weight-only kernels). FP rows are the reference: 1.0. Nothing here is estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from suite.aggregate import FP_BITS
from suite.primitives import PER_CHANNEL, PER_TENSOR, WeightFormat

SPEED_COLUMNS = ["speedup", "speed_backend", "speed_device", "speed_coverage"]
# the second speedup columns: filled from results/gpu/kernels-cuda.csv (the GPU check) when it
# exists, empty otherwise
SECOND_DEVICE = "cuda"
GEMV_M = 1


@dataclass(frozen=True)
class Linear:
    """One kind of quantized linear: its weight shape and how many a decoder block holds."""

    name: str
    out_features: int
    in_features: int
    per_block: int = 1


@dataclass(frozen=True)
class ModelLinears:
    """The quantized linears of a model: ``blocks`` decoder blocks of ``linears`` each."""

    blocks: int
    linears: tuple[Linear, ...]

    def weights(self, linear: Linear) -> int:
        """Weight elements of every ``linear`` of the model together."""
        return self.blocks * linear.per_block * linear.out_features * linear.in_features


# Keyed by model name (the model id without its ``@revision``): the shapes follow the model's
# config, not the revision of its weights. Checked against the adapter's target_shapes in
# tests/test_speed.py when the model is cached.
MODEL_LINEARS: dict[str, ModelLinears] = {
    # SmolLM2-135M (llama adapter): d = 576, 9 query heads and 3 key/value heads of 64
    # (grouped-query attention: k_proj, v_proj are 192 x 576), ffn 1536, 30 blocks.
    "smollm2-135m-instruct": ModelLinears(blocks=30, linears=(
        Linear("self_attn.q_proj", 576, 576),
        Linear("self_attn.k_proj", 192, 576),
        Linear("self_attn.v_proj", 192, 576),
        Linear("self_attn.o_proj", 576, 576),
        Linear("mlp.gate_proj", 1536, 576),
        Linear("mlp.up_proj", 1536, 576),
        Linear("mlp.down_proj", 576, 1536),
    )),
}


# Methods whose packed storage carries a side channel the kernels table does not time.
UNTIMED_SIDE_CHANNELS: dict[str, str] = {
    "precalibration": "its outlier side channel (a sparse CSR correction added to the "
                      "product) is not in the timed kernels, so the plain format's speedup "
                      "is an upper bound.",
}


@dataclass(frozen=True)
class Speed:
    """The speed of one (model, format) on one device, or why there is none."""

    speedup: float = math.nan
    backend: str = ""
    coverage: float = math.nan
    reason: str = ""
    subject: str = ""
    untimed: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpeedJoin:
    """The leaderboard with ``SPEED_COLUMNS`` appended, and one caveat line per finding."""

    board: pd.DataFrame
    caveats: list[str]


def model_name(model_id: str) -> str:
    """``smollm2-135m-instruct@gguf-q4_1`` -> ``smollm2-135m-instruct``."""
    return model_id.partition("@")[0]


def format_label(wbits: int, group_size: object, sym: object) -> str:
    """The kernel table's label (``WeightFormat.label``) of a leaderboard row's format."""
    gs = {"per-channel": PER_CHANNEL, "per-tensor": PER_TENSOR}.get(str(group_size))
    return WeightFormat(int(wbits), int(group_size) if gs is None else gs,
                        sym=str(sym) == "True").label()


Times = dict[tuple[int, int, str], tuple[float, str]]


def gemv_times(kernels: pd.DataFrame) -> Times:
    """(out, in, format) -> (median us, backend) of the fastest ok backend at M = 1; the fp32
    baseline is format ``fp32`` (backend ``dense``; bf16 dense rows are not a format)."""
    k = kernels[(kernels["M"] == GEMV_M) & (kernels["status"] == "ok")]
    k = k[k["median_us"].notna() & ((k["backend"] != "dense") | (k["format"] == "fp32"))]
    best = k.sort_values(["median_us", "backend"], kind="stable")
    best = best.drop_duplicates(["out", "in", "format"], keep="first")
    return {(int(o), int(i), str(f)): (float(us), str(b)) for o, i, f, us, b in zip(
        best["out"], best["in"], best["format"], best["median_us"], best["backend"],
        strict=True)}


def model_speed(name: str, linears: ModelLinears, t: Times, label: str) -> Speed:
    """Count-weighted speedup of format ``label`` over fp32 for the model ``linears``."""
    timed = [lin for lin in linears.linears
             if (lin.out_features, lin.in_features, "fp32") in t]
    if not timed:
        return Speed(reason="the kernels table times none of the model's linear shapes",
                     subject=name)
    fp32 = packed = 0.0
    backends = set()
    for lin in timed:
        key = (lin.out_features, lin.in_features)
        if (*key, label) not in t:
            return Speed(reason=f"the kernels table has no ok M = {GEMV_M} row of the "
                         "format for a timed shape of the model", subject=label)
        us, backend = t[(*key, label)]
        n = linears.blocks * lin.per_block
        fp32 += n * t[(*key, "fp32")][0]
        packed += n * us
        backends.add(backend)
    total = sum(linears.weights(lin) for lin in linears.linears)
    coverage = sum(linears.weights(lin) for lin in timed) / total
    untimed = tuple(f"{lin.name} ({lin.out_features} x {lin.in_features})"
                    for lin in linears.linears if lin not in timed)
    return Speed(fp32 / packed, "+".join(sorted(backends)), coverage, subject=name,
                 untimed=untimed)


def row_speed(row: pd.Series, times: Times) -> Speed:
    """The speed of one leaderboard row (FP: the 1.0 reference)."""
    if row["method"] == "fp" or int(row["wbits"]) >= FP_BITS:
        return Speed(1.0, "dense", 1.0)
    if int(row["abits"]) < FP_BITS:
        return Speed(reason="activations quantized too; the table times weight-only kernels",
                     subject=f"W{row['wbits']}A{row['abits']}")
    name = model_name(row["model"])
    linears = MODEL_LINEARS.get(name)
    if linears is None:
        return Speed(reason="no linear shapes declared in suite/speed.py MODEL_LINEARS "
                     "(convolutions are not timed)", subject=name)
    return model_speed(name, linears, times,
                       format_label(row["wbits"], row["group_size"], row["sym"]))


def join(board: pd.DataFrame, kernels_csv: Path, device: str) -> SpeedJoin:
    """Append ``SPEED_COLUMNS`` to ``board`` from ``kernels_csv`` measured on ``device``.

    Example:
        >>> joined = join(board, Path("results/kernels-cpu.csv"), "cpu")
        >>> joined.board[["method", "wbits", "group_size", "speedup"]]
    """
    out = board.copy()
    if not kernels_csv.exists():
        for col in SPEED_COLUMNS:
            out[col] = math.nan if col in ("speedup", "speed_coverage") else ""
        return SpeedJoin(out, [f"Speedup: empty, no kernels table `{kernels_csv.name}` for "
                               f"device {device}."])
    times = gemv_times(pd.read_csv(kernels_csv))
    speeds = [row_speed(r, times) for _, r in out.iterrows()]
    out["speedup"] = [s.speedup for s in speeds]
    out["speed_backend"] = [s.backend for s in speeds]
    out["speed_device"] = [device if not math.isnan(s.speedup) else "" for s in speeds]
    out["speed_coverage"] = [s.coverage for s in speeds]
    methods = set(out.loc[out["speedup"].notna(), "method"])
    return SpeedJoin(out, _caveats(speeds, methods, kernels_csv.name, device))


def _caveats(speeds: list[Speed], methods: set[str], table: str, device: str) -> list[str]:
    lines = [f"Speedup: model-level weight-only GEMV (M = {GEMV_M}, one decoded token) time "
             f"of the fp32 linears over the format's, {device}, fastest ok backend per shape "
             f"(`{table}`); the quantized linears only (embeddings, lm_head, attention "
             f"excluded); 1.00 = FP. Whole-model decode tokens/s: `decode-{device}.csv`."]
    partial = {(s.subject, s.coverage, s.untimed) for s in speeds if s.untimed}
    lines += [f"Speedup of {name}: the timed shapes hold {cov:.2%} of its quantized weights; "
              f"{', '.join(untimed)} have no timing and are left out of both sums, not "
              "estimated (column speed_coverage)." for name, cov, untimed in sorted(partial)]
    why: dict[str, list[str]] = {}
    for s in speeds:
        if s.reason and s.subject not in why.setdefault(s.reason, []):
            why[s.reason].append(s.subject)
    lines += [f"Speedup empty ({r}): {', '.join(sorted(subjects))}."
              for r, subjects in sorted(why.items())]
    return lines + _untimed_side_channels(methods)


def _untimed_side_channels(methods: set[str]) -> list[str]:
    """A caveat per timed method (or chain member) whose storage adds work the table's plain
    format kernels do not time."""
    members = {m for chain in methods for m in chain.split("+")}
    found = sorted(members & UNTIMED_SIDE_CHANNELS.keys())
    return [f"Speedup of {m} rows: {UNTIMED_SIDE_CHANNELS[m]}" for m in found]


def pareto_front(speedup: list[float], value: list[float], higher_is_better: bool) -> list[bool]:
    """Whether each point is Pareto-optimal: no other point is at least as fast and at least as
    good with one of the two strictly better (duplicates of an optimal point stay optimal)."""
    sign = 1.0 if higher_is_better else -1.0
    pts = [(x, sign * y) for x, y in zip(speedup, value, strict=True)]
    return [not any(xo >= x and yo >= y and (xo > x or yo > y) for xo, yo in pts)
            for x, y in pts]


SECOND_COLUMNS = tuple(f"{c}_{SECOND_DEVICE}" for c in ("speedup", "speed_backend",
                                                            "speed_coverage"))


def join_second(first: SpeedJoin, kernels_csv: Path | None, device: str = SECOND_DEVICE
                ) -> SpeedJoin:
    """Append ``speedup_<device>``, ``speed_backend_<device>`` and ``speed_coverage_<device>``
    from a second device's kernels table (``results/gpu/kernels-cuda.csv``); empty columns when
    that table does not exist or is None (the leaderboard schema declares them either way)."""
    out = first.board.copy()
    if kernels_csv is None or not kernels_csv.exists():
        for col in ("speedup", "speed_backend", "speed_coverage"):
            out[f"{col}_{device}"] = "" if col == "speed_backend" else math.nan
        return SpeedJoin(out, first.caveats)
    second = join(first.board[[c for c in first.board.columns if c not in SPEED_COLUMNS]],
                  kernels_csv, device)
    for col in ("speedup", "speed_backend", "speed_coverage"):
        out[f"{col}_{device}"] = second.board[col].to_numpy()
    return SpeedJoin(out, first.caveats + [f"Second speedup column (`speedup_{device}`): "
                                           + second.caveats[0]])
