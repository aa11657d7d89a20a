"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023), faithful to IST-DASLab/gptq ``fasterquant`` (research/methods.md 2.2).

Per layer, minimise ||W X - Q X||_F^2 column by column with the inverse Hessian H^-1 of
H = 2 X X^T (Alg. 1): quantize column j, spread its error over the remaining columns,
err = (w_j - q_j) / [H^-1]_jj;  W_{:, j:} -= err [H^-1]_{j, j:}, using the upper Cholesky factor
U of H^-1 ("Cholesky reformulation") and lazy batch updates over blocks of B columns.
Dead inputs (H_jj = 0) get H_jj = 1 and W_:j = 0; damping lambda = percdamp * mean(diag H).
Groups are re-fitted at each group start on the weights *as the reference sees them*: the outer
W, which holds the lazy updates of earlier blocks but not the in-block updates of the current
block (this matters only when g < B). Act-order permutes columns by descending diag(H); static
groups fit every group on the unpermuted weights up front. When Cholesky fails the damping is
escalated x10 (up to ``max_damp_escalations`` times) and every escalation is recorded.
``hessian_dtype`` is the precision of H's accumulation, damping, Cholesky and inverse; U is cast
to float32 for the column sweep, which stays float32 as in the reference. The default is float64,
where the reference uses float32 (``hessian_dtype: float32`` restores it): float64 makes H's
rounding far smaller than float32's spacing, so the code choices no longer depend on how the
CPU's BLAS splits the sums (on the embedded model W4 g64, 1 vs 2 threads: 38.5% of codes differ
in float32, none in float64).
The model-level pipeline (block inputs, Hessians, re-running quantized blocks) is shared in
``suite.sequential``; rounding and the damped inverse Cholesky factor (``inverse_cholesky``,
also used by decoupleQ) come from ``suite.primitives``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from suite.errors import ConfigError
from suite.interface import METHODS, MethodConfig, MethodData, QuantMethod, QuantResult, RunContext
from suite.kernels.sweep import SweepGrid, sweep_block
from suite.primitives import (
    PER_CHANNEL,
    LayerQState,
    OutlierChannel,
    WeightFormat,
    choose_qparams,
    dequantize,
    inverse_cholesky,
    quantize,
    to_storage,
    write_weight,
)
from suite.sequential import run_sequential, solve_per_group

HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """Defaults are the reference's argparse defaults (``opt.py``), except ``hessian_dtype``."""

    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = False
    max_damp_escalations: int = 4
    # float64 (not the reference's float32): 1 vs 2 threads gave 0 of 106M differing codes on
    # the embedded model against 38.5% in float32 (docs/reproducibility.md)
    hessian_dtype: str = "float64"

    def __post_init__(self) -> None:
        self.check_choices({"hessian_dtype": tuple(HESSIAN_DTYPES)})


def _col_params(scale: torch.Tensor, zero: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    """Per-row qparams of one group as (rows, 1) columns (per-tensor params are broadcast)."""
    return scale.expand(rows, 1).contiguous(), zero.expand(rows, 1).contiguous()


def gptq_layer(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, cfg: GPTQConfig,
               init: LayerQState | None = None) -> tuple[LayerQState, dict]:
    """Quantize one weight matrix W (rows, cols) given its Hessian H (cols, cols).

    ``init`` (a chain such as ``precalibration+gptq``) fixes the grid: its scale / zero per
    group are used as static groups, and its outlier positions are re-quantized in the sweep
    on its side channel (second grid or float16) instead of the main grid.

    H is cast to ``cfg.hessian_dtype`` for the damping, Cholesky and inverse; the sweep runs
    in float32.

    Returns:
        The layer state (codes in the original column order) and stats (damping used, loss).
    """
    rows, cols = W.shape
    W = W.detach().float().clone()  # (rows, cols)
    H = H.detach().to(HESSIAN_DTYPES[cfg.hessian_dtype], copy=True)  # (cols, cols)
    fmt_col = dataclasses.replace(fmt, group_size=PER_CHANNEL)  # quantizes one (rows, 1) column
    grouped = fmt.group_size > 0
    g = fmt.group_cols(cols)
    if not grouped:
        s_cur, z_cur = _col_params(*choose_qparams(W, fmt), rows)  # fit on the original W
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = [choose_qparams(W[:, c : c + g], fmt_col) for c in range(0, cols, g)] \
        if grouped and cfg.static_groups else None
    if init is not None:  # the previous method's grid, fixed
        static = [(init.scale[:, k : k + 1], init.zero[:, k : k + 1])
                  for k in range(cols // g)] if grouped else None
        if not grouped:
            s_cur, z_cur = _col_params(init.scale, init.zero, rows)
    perm = torch.argsort(torch.diag(H), descending=True) if cfg.act_order else \
        torch.arange(cols, device=W.device)
    sweep = _OutlierSweep(init.outliers, perm, fmt, (rows, cols)) \
        if init is not None and init.outliers is not None else None
    W, H = W[:, perm], H[perm][:, perm]
    U, damp, escalations = inverse_cholesky(H, cfg.percdamp, cfg.max_damp_escalations)
    U = U.float()  # the sweep is float32

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    cg = _ColumnGrid(W, fmt_col, g, grouped, static, perm, s_cur if not grouped else None,
                     z_cur if not grouped else None)
    loss = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (rows, B)
        U1 = U[i1:i2, i1:i2]  # (B, B)
        if sweep is None:  # Alg. 1 lines 4-8 for the whole block, row by row
            S1, Z1 = cg.block(i1, i2)
            Q1, E1, _ = sweep_block(W1, S1, Z1, U1, SweepGrid(0, fmt.maxq), loss)
            codes[:, i1:i2] = Q1.to(torch.uint8)
        else:  # outliers re-quantized on their side channel: column by column
            E1 = _sweep_columns(W1, U1, i1, cg, sweep, codes, loss)
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of the remaining columns
    scale, zero, g_idx, s_cur, z_cur = cg.scale, cg.zero, cg.g_idx, cg.s_cur, cg.z_cur
    state = _layer_state(codes, scale, zero, g_idx, perm, fmt, s_cur if not grouped else None,
                         z_cur if not grouped else None)
    if sweep is not None:
        state.outliers = sweep.channel()
    return state, {
        "percdamp_used": damp, "damp_escalations": escalations, "loss": float(loss.sum())}


@dataclass
class _ColumnGrid:
    """The grid each (permuted) column is rounded on, and the layer's group parameters as the
    sweep fixes them: per channel, static groups, or dynamic groups re-fitted at each group
    start on the outer W (which a block's own sweep does not change)."""

    W: torch.Tensor  # (rows, cols) permuted; its lazy updates land in place
    fmt_col: WeightFormat
    g: int
    grouped: bool
    static: list[tuple[torch.Tensor, torch.Tensor]] | None
    perm: torch.Tensor
    s_cur: torch.Tensor | None  # (rows, 1), the current column's grid
    z_cur: torch.Tensor | None
    gi: int = 0

    def __post_init__(self) -> None:
        rows, cols = self.W.shape
        self.scale = torch.zeros(rows, cols // self.g, device=self.W.device)
        self.zero = torch.zeros(rows, cols // self.g, device=self.W.device)
        self.g_idx = torch.zeros(cols, dtype=torch.long, device=self.W.device)

    def column(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, z) of column c, each (rows, 1); call in column order."""
        if self.grouped:
            if self.static is not None:
                self.gi = int(self.perm[c]) // self.g
                self.s_cur, self.z_cur = self.static[self.gi]
            elif c % self.g == 0:
                self.gi = c // self.g
                self.s_cur, self.z_cur = choose_qparams(self.W[:, c : c + self.g], self.fmt_col)
            self.scale[:, self.gi], self.zero[:, self.gi] = self.s_cur[:, 0], self.z_cur[:, 0]
            self.g_idx[c] = self.gi
        assert self.s_cur is not None and self.z_cur is not None
        return self.s_cur, self.z_cur

    def block(self, i1: int, i2: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column (S, Z) of columns i1..i2, each (rows, i2 - i1)."""
        pairs = [self.column(c) for c in range(i1, i2)]
        return torch.cat([p[0] for p in pairs], 1), torch.cat([p[1] for p in pairs], 1)


def _sweep_columns(W1: torch.Tensor, U1: torch.Tensor, i1: int, cg: _ColumnGrid,
                   sweep: _OutlierSweep, codes: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Alg. 1 lines 4-8 one column at a time, with outlier positions re-quantized on their side
    channel (a chain's starting state); returns the block's scaled errors."""
    E1 = torch.zeros_like(W1)
    for j in range(W1.shape[1]):
        c = i1 + j
        s_cur, z_cur = cg.column(c)
        w = W1[:, j]  # (rows,)
        q_code = quantize(w[:, None], s_cur, z_cur, cg.fmt_col)  # (rows, 1)
        q = sweep.apply(c, w, dequantize(q_code, s_cur, z_cur, cg.fmt_col)[:, 0])
        codes[:, c] = q_code[:, 0]
        d = U1[j, j]
        loss += (w - q) ** 2 / d**2 / 2
        err = (w - q) / d
        W1[:, j:] -= err[:, None] * U1[j, j:][None, :]  # rank-1 update inside the block
        E1[:, j] = err
    return E1


class _OutlierSweep:
    """Outlier positions of a starting state, re-quantized on their side channel as GPTQ's
    column sweep reaches them (so their error feeds back like any other weight's).

    The side channel's grid is laid out once per (permuted) position, so each column costs a
    few whole-column operations and a ``where`` (the sweep visits every column of every
    layer; per-column index bookkeeping would cost more than GPTQ itself)."""

    def __init__(self, ch: OutlierChannel, perm: torch.Tensor, fmt: WeightFormat,
                 shape: tuple[int, int]) -> None:
        rows, cols = shape
        mask = torch.zeros(rows * cols, dtype=torch.bool, device=ch.idx.device)
        mask[ch.idx] = True
        self.mask = mask.view(rows, cols)[:, perm]  # (rows, cols), permuted like W
        self.ch, self.perm, self.fmt, self.shape = ch, perm, fmt, shape
        self.fmt_col = dataclasses.replace(fmt, group_size=PER_CHANNEL)
        self.out = torch.zeros(rows, cols, device=ch.idx.device)  # codes or values, permuted
        if ch.codes is not None:  # the second grid's scale / zero at every permuted position
            gi = perm // fmt.group_cols(cols) if ch.scale.shape[1] > 1 else \
                torch.zeros_like(perm)  # (cols,): group of each permuted column
            self.S = ch.scale[:, gi].expand(rows, cols)  # (rows, cols)
            self.Z = ch.zero[:, gi].expand(rows, cols)

    def apply(self, c: int, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``q`` with the outliers of (permuted) column ``c`` replaced by their channel's."""
        m = self.mask[:, c]  # (rows,)
        if self.ch.codes is None:
            v = to_storage(w, self.fmt)
            self.out[:, c] = torch.where(m, v, 0.0)
            return torch.where(m, v, q)
        s, z = self.S[:, c : c + 1], self.Z[:, c : c + 1]  # (rows, 1)
        code = quantize(w[:, None], s, z, self.fmt_col)
        self.out[:, c] = torch.where(m, code[:, 0].float(), 0.0)
        return torch.where(m, dequantize(code, s, z, self.fmt_col)[:, 0], q)

    def channel(self) -> OutlierChannel:
        """The updated side channel, in the original column order."""
        flat = self.out[:, torch.argsort(self.perm)].reshape(-1)[self.ch.idx]
        if self.ch.codes is None:
            return OutlierChannel(self.ch.idx, values=flat, index=self.ch.index)
        return OutlierChannel(self.ch.idx, codes=flat.to(torch.uint8), scale=self.ch.scale,
                              zero=self.ch.zero, index=self.ch.index)


def _layer_state(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 g_idx: torch.Tensor, perm: torch.Tensor, fmt: WeightFormat,
                 s_pc: torch.Tensor | None, z_pc: torch.Tensor | None) -> LayerQState:
    """Undo the act-order permutation and package codes / qparams in the original order."""
    invperm = torch.argsort(perm)
    codes = codes[:, invperm]
    if s_pc is not None:  # per-channel / per-tensor: one group per row
        if fmt.group_size == 0:
            return LayerQState(codes, s_pc[:1, :1].clone(), z_pc[:1, :1].clone(), fmt)
        return LayerQState(codes, s_pc, z_pc, fmt)
    g_idx = g_idx[invperm]
    g = fmt.group_size
    contiguous = torch.equal(g_idx, torch.arange(len(g_idx), device=g_idx.device) // g)
    if contiguous:
        return LayerQState(codes, scale, zero, fmt)
    # act-order with dynamic groups: each input column needs its group index at inference
    return LayerQState(codes, scale, zero, fmt, g_idx=g_idx, extra_bits=32 * len(g_idx))


@METHODS.register("gptq")
class GPTQ(QuantMethod):
    """GPTQ: Hessian-aware column-by-column quantization with error feedback."""

    name = "gptq"
    kind = "ptq"
    Config = GPTQConfig
    needs_calibration = True
    accepts_init = True

    def quantize(self, model: nn.Module, data: MethodData, ctx: RunContext) -> QuantResult:
        """Run the shared sequential pipeline with :func:`gptq_layer` on every target linear."""
        assert self.fmt is not None and data.calib is not None
        cfg: GPTQConfig = self.config  # type: ignore[assignment]
        qstate: dict[str, LayerQState] = {}
        layer_stats: dict[str, dict] = {}
        t0 = time.perf_counter()

        def quantize_group(_i: int, layers: dict[str, nn.Linear], H: dict[str, torch.Tensor]
                           ) -> None:
            for name, layer in layers.items():
                init = (data.init_qstate or {}).get(name)
                if init is not None and H[name].dim() == 3:
                    raise ConfigError(f"{name}: a grouped conv cannot start from a chained "
                                      "method's grid; accepted: gptq alone on grouped convs")
                W = layer.weight.flatten(1)  # (rows, cols); conv: (C_out, C_in/groups*kh*kw)
                qstate[name], layer_stats[name] = solve_per_group(  # grouped convs: per group
                    W, H[name], lambda w, h, init=init: gptq_layer(w, h, self.fmt, cfg, init))
                write_weight(layer, qstate[name])

        timings: dict[str, float] = {}
        run_sequential(model, ctx.adapter, data.calib.to(ctx.device), quantize_group,
                       cfg.true_sequential, ctx.progress,
                       hessian_dtype=HESSIAN_DTYPES[cfg.hessian_dtype], timings=timings)
        escalated = {n: {"escalations": s["damp_escalations"], "percdamp_used": s["percdamp_used"]}
                     for n, s in layer_stats.items() if s["damp_escalations"]}
        stats = {"quant_time_s": time.perf_counter() - t0,
                 "calib_tokens": int(data.calib.numel()),
                 "damp_escalations": escalated,
                 "layer_loss_sum": sum(s["loss"] for s in layer_stats.values()),
                 **timings}  # hessian_time_s, forward_time_s
        return QuantResult(model, qstate, stats=stats)
