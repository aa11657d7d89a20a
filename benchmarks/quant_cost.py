"""Quantization cost side by side with the reference algorithms, in one run (issue 29):
``results/quant-cost-cpu.csv``.

* GPTQ (W4, act-order, dynamic groups, float32 Hessian and scales, as the reference) against
  :func:`reference_gptq`, a re-implementation of the reference's loop order written from the
  paper's Algorithm 1: per column, quantize, record the loss, spread the error over the block's
  remaining columns with one outer product, then the lazy update of the later blocks. Both
  solve the same H; the Hessian build is excluded from both. Codes must be identical.
* GPTQ with static groups against llm-compressor's ``quantize_weight`` (actorder "weight"),
  the peer a user would pick instead, when ``llmcompressor`` imports (0.14.0.1 runs with this
  torch when installed without its dependencies, e.g. unpacked onto PYTHONPATH; rows are
  skipped without it). It gets qbench's own group scales and zero points, so the dequantized
  weights can be compared entry by entry.
* decoupleQ (W2 / W3 g64, the reference's run_llama.sh settings) against bytedance/decoupleQ's
  own ``startquant``, imported at run time from a checkout named by ``QBENCH_DECOUPLEQ_REF``
  (never vendored; rows are skipped without it). The objective sum_r (w_hat_r - w_r) H
  (w_hat_r - w_r)^T of both is compared.

Each pair runs ``--rounds`` times, alternating which goes first; the median time is kept. H is
built from ``--tokens`` random tokens with per-feature scales.

    python benchmarks/quant_cost.py --threads 2 --out results/quant-cost-cpu.csv
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from baselines.gptq import GPTQConfig, gptq_layer  # noqa: E402
from methods.decoupleq import DecoupleQConfig, decoupleq_layer, make_grid  # noqa: E402
from suite.primitives import PER_CHANNEL, WeightFormat, choose_qparams  # noqa: E402

GPTQ_SHAPES = [(576, 576), (1536, 576), (576, 1536), (1536, 1536), (4096, 4096), (4096, 11008)]
DQ_SHAPES = [(1536, 1536), (4096, 4096)]


def hessian(cols: int, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(1 / n) X^T X of random inputs with per-feature scales 0.1..2, accumulated in float64."""
    gen = torch.Generator().manual_seed(cols)
    H = torch.zeros(cols, cols, dtype=torch.float64)
    scale = torch.linspace(0.1, 2, cols, dtype=torch.float64)
    for start in range(0, tokens, 2048):
        X = torch.randn(min(2048, tokens - start), cols, generator=gen, dtype=torch.float64)
        X *= scale
        H += X.T @ X
    return (2 * H / tokens).to(dtype)


def reference_gptq(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, blocksize: int = 128,
                   percdamp: float = 0.01) -> torch.Tensor:
    """GPTQ in the reference's loop order, act-order with dynamic groups; codes (rows, cols) in
    the original column order."""
    W, H = W.clone().float(), H.clone()
    rows, cols = W.shape
    g = fmt.group_cols(cols)
    fmt_col = dataclasses.replace(fmt, group_size=PER_CHANNEL)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(rows, cols)
    losses = torch.zeros(rows, cols)
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, d = W1[:, i], U1[i, i]
            if (i1 + i) % g == 0:
                scale, zero = choose_qparams(W[:, i1 + i : i1 + i + g], fmt_col)
            q = torch.clamp(torch.round(w[:, None] / scale) + zero, 0, fmt.maxq)
            codes[:, i1 + i] = q[:, 0]
            qd = (scale * (q - zero))[:, 0]
            losses[:, i1 + i] = (w - qd) ** 2 / d**2 / 2
            err = (w - qd) / d
            W1[:, i:] -= err[:, None].matmul(U1[i, i:][None, :])
            E1[:, i] = err
        W[:, i2:] -= E1.matmul(U[i1:i2, i2:])
    return codes[:, torch.argsort(perm)]


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _pair(ours: Callable[[], object], ref: Callable[[], object], rounds: int
          ) -> tuple[float, float, object, object]:
    """Median times of both over ``rounds`` alternating rounds, and their last outputs."""
    t_ours, t_ref = [], []
    for r in range(rounds):
        order = [(ours, t_ours), (ref, t_ref)] if r % 2 == 0 else [(ref, t_ref), (ours, t_ours)]
        for fn, times in order:
            dt, out = _timed(fn)
            times.append(dt)
            if fn is ours:
                o_out = out
            else:
                r_out = out
    return statistics.median(t_ours), statistics.median(t_ref), o_out, r_out


def gptq_rows(tokens: int, rounds: int) -> list[dict]:
    rows = []
    for shape in GPTQ_SHAPES:
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
        H = hessian(shape[1], tokens, torch.float32)
        fmt = WeightFormat(4, 128 if shape[1] % 128 == 0 else 64, scale_dtype="float32")
        cfg = GPTQConfig(act_order=True, hessian_dtype="float32")
        t_o, t_r, (state, _), codes = _pair(partial(gptq_layer, W, H, fmt, cfg),
                                            partial(reference_gptq, W, H, fmt), rounds)
        same = torch.equal(state.codes.float(), codes)
        rows.append(_row("gptq", shape, fmt, t_o, t_r, 0.0 if same else float("nan"),
                         f"codes identical: {same}"))
        print(rows[-1], flush=True)
    return rows


def _objective(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """sum_r (w_hat_r - w_r) H (w_hat_r - w_r)^T in float64."""
    D = (What - W).double()
    return float(((D @ H.double()) * D).sum())


def _llmcompressor(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """llm-compressor's GPTQ on qbench's min-max group grid (int4 zero points are signed
    there: zero - 8); the dequantized weight."""
    from compressed_tensors.quantization import QuantizationArgs  # noqa: PLC0415
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight  # noqa: PLC0415

    s, z = choose_qparams(W, fmt)
    args = QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=False, strategy="group",
                            group_size=fmt.group_size, actorder="weight")
    half = 2 ** (fmt.bits - 1)
    return quantize_weight(W[None].clone(), H[None].clone(), s[None],
                           (z - half).to(torch.int8)[None], None, args)[0][0]


def llmcompressor_rows(tokens: int, rounds: int) -> list[dict]:
    try:
        import llmcompressor  # noqa: F401, PLC0415
    except ImportError:
        print("llm-compressor not importable: its rows are skipped", flush=True)
        return []
    rows = []
    for shape in GPTQ_SHAPES:
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
        H = hessian(shape[1], tokens, torch.float32)
        fmt = WeightFormat(4, 128 if shape[1] % 128 == 0 else 64, scale_dtype="float32")
        cfg = GPTQConfig(act_order=True, static_groups=True, hessian_dtype="float32")
        t_o, t_r, (state, _), w_lc = _pair(partial(gptq_layer, W, H, fmt, cfg),
                                           partial(_llmcompressor, W, H, fmt), rounds)
        ours = state.dequantize()
        differ = float((ours != w_lc).float().mean())
        rows.append(_row("gptq:static", shape, fmt, t_o, t_r,
                         _objective(W, ours, H) / _objective(W, w_lc, H) - 1,
                         f"vs llm-compressor 0.14 quantize_weight; entries differing {differ:.1e}"))
        print(rows[-1], flush=True)
    return rows


def _ref_decoupleq(W: torch.Tensor, H: torch.Tensor, bits: int) -> torch.Tensor:
    """bytedance/decoupleQ's startquant with run_llama.sh settings; the dequantized weight."""
    sys.path.insert(0, os.environ["QBENCH_DECOUPLEQ_REF"])
    from decoupleQ.moq_quant import Quantizer  # noqa: PLC0415
    from decoupleQ.quant import decoupleQ as RefLayer  # noqa: PLC0415

    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    ref = RefLayer(lin)
    ref.H, ref.nsamples = H.clone(), 1
    ref.quantizer = Quantizer()
    ref.quantizer.configure(bits, perchannel=True, sym=False)
    with contextlib.redirect_stdout(io.StringIO()):
        ref.startquant(groupsize=64, symmetric=False, max_iter_num=4, inner_iters_for_round=5,
                       iters_before_round=200, dev="cpu", lr=1e-3, actorder=True,
                       round_fn="gptq")
    return lin.weight.data


def decoupleq_rows(tokens: int, rounds: int, cases: list[str] | None = None) -> list[dict]:
    """Side by side with the reference on each of ``DQ_SHAPES`` x W2/W3 g64, or only the
    ``cases`` named as "ROWSxCOLS:BITS" (e.g. "4096x4096:3")."""
    rows = []
    for shape in DQ_SHAPES:
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
        H = hessian(shape[1], tokens, torch.float64)
        for bits in (2, 3):
            if cases and f"{shape[0]}x{shape[1]}:{bits}" not in cases:
                continue
            fmt, cfg = WeightFormat(bits, 64, scale_dtype="float32"), DecoupleQConfig()
            t_o, t_r, (_, stats), w_ref = _pair(partial(decoupleq_layer, W, H, fmt, cfg),
                                                partial(_ref_decoupleq, W, H, bits), rounds)
            ref_loss = float(make_grid(W, H, fmt, cfg).error(w_ref).sum())
            rows.append(_row("decoupleq", shape, fmt, t_o, t_r,
                             stats["loss"] / ref_loss - 1, "objective vs the reference's"))
            print(rows[-1], flush=True)
    return rows


def _row(method: str, shape: tuple[int, int], fmt: WeightFormat, ours: float, ref: float,
         obj: float, note: str) -> dict:
    return {"method": method, "shape": f"{shape[0]}x{shape[1]}", "format": fmt.label(),
            "qbench_s": round(ours, 3), "reference_s": round(ref, 3),
            "ratio": round(ours / ref, 3), "objective_rel_diff": obj, "note": note,
            "threads": torch.get_num_threads()}


def _inputs(cols: int, tokens: int) -> torch.Tensor:
    """(tokens, cols) random activations with per-feature scales 0.1..2 (as ``hessian``)."""
    gen = torch.Generator().manual_seed(cols + 1)
    return torch.randn(tokens, cols, generator=gen) * torch.linspace(0.1, 2, cols)


def _awq_layer(W: torch.Tensor, X: torch.Tensor, fmt: WeightFormat) -> None:
    """AWQ on one linear read by nothing else (f = the linear: the o / down edges): the scale
    search, the fold, the clip search on the scaled inputs and the final quantization."""
    from baselines.awq import AWQConfig, awq_linear

    awq_linear(W, X, fmt, AWQConfig())


def _gptq_with_hessian(W: torch.Tensor, X: torch.Tensor, fmt: WeightFormat) -> None:
    from suite.sequential import HessianAccumulator

    acc = HessianAccumulator(W.shape[1], W.device, torch.float64)
    for x in X.split(2048):
        acc.add(x[None])
    gptq_layer(W, acc.H, fmt, GPTQConfig(act_order=True))


def speed_rows(tokens: int, rounds: int) -> list[dict]:
    """The pre-calibration papers' speed claim ("at least 10x faster than AWQ") on one
    4096x4096 layer at W4 g128, each method as the suite runs it by default, with what it
    needs from data included (GPTQ: its Hessian; AWQ: its inputs' statistics and Gram).
    ``reference_s`` is pre-calibration's time in the same run, ``ratio`` the method's / it."""
    from methods.precalibration import PreCalibrationConfig, precalibrate_layer

    shape, fmt = (4096, 4096), WeightFormat(4, 128)
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.02
    X = _inputs(shape[1], tokens)
    runs = {"precalibration": partial(precalibrate_layer, W, fmt, PreCalibrationConfig()),
            "awq": partial(_awq_layer, W, X, fmt),
            "gptq": partial(_gptq_with_hessian, W, X, fmt)}
    times: dict[str, list[float]] = {m: [] for m in runs}
    for r in range(rounds):
        for m in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[m].append(_timed(runs[m])[0])
    med = {m: statistics.median(t) for m, t in times.items()}
    rows = [_row(m, shape, fmt, med[m], med["precalibration"], float("nan"),
                 f"speed claim, {tokens} tokens: reference_s is pre-calibration's time")
            for m in runs]
    for r in rows:
        print(r, flush=True)
    return rows


PARTS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "gptq": lambda a: gptq_rows(a.tokens, a.rounds),
    "llm-compressor": lambda a: llmcompressor_rows(a.tokens, a.rounds),
    "decoupleq": lambda a: decoupleq_rows(a.tokens, a.dq_rounds, a.dq_case)
    if os.environ.get("QBENCH_DECOUPLEQ_REF") else [],
    "speed-claim": lambda a: speed_rows(a.tokens, a.rounds),
}
_PART_OF_METHOD = {"gptq": "gptq", "gptq:static": "llm-compressor", "decoupleq": "decoupleq"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dq-rounds", type=int, default=1)
    ap.add_argument("--dq-case", action="append", metavar="ROWSxCOLS:BITS",
                    choices=[f"{r}x{c}:{b}" for r, c in DQ_SHAPES for b in (2, 3)],
                    help="decoupleQ: run only these layer cases (repeatable)")
    ap.add_argument("--only", choices=PARTS, action="append",
                    help="run these parts only (repeatable); their rows replace the rows of "
                         "--out with the same part, method, shape and format, the others stay")
    ap.add_argument("--out", default=str(ROOT / "results" / "quant-cost-cpu.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.only or list(PARTS)
    rows = [{"part": part, **r} for part in parts for r in PARTS[part](args)]
    table = pd.DataFrame(rows)
    out = Path(args.out)
    if args.only and out.exists():
        old = pd.read_csv(out)
        if "part" not in old:  # files written before the column: the part from the method
            old.insert(0, "part", old["method"].map(_PART_OF_METHOD))
        key = ["part", "method", "shape", "format"]
        fresh = list(map(tuple, table[key].values)) if len(table) else []
        table = pd.concat([old[~pd.MultiIndex.from_frame(old[key]).isin(fresh)], table])
    table.to_csv(out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
