"""decoupleQ (Guo et al., "decoupleQ: Towards 2-bit Post-Training Uniform Quantization via
decoupling Parameters into Integer and Floating Points", arXiv 2404.12759), faithful to
bytedance/decoupleQ (``quant.py`` startquant / minimize_block, ``moq_quant.py``;
research/methods.md section 3).

The integer codes Q and the float parameters (s, z) are independent variables of

    min_{Q in [alpha, beta], s, z}  sum_r (s_r * Q_r + z_r - w_r) H (s_r * Q_r + z_r - w_r)^T    (1)

with the signed grid [alpha, beta] = [-2^(b-1), 2^(b-1) - 1], a float scale s and a float offset
z per row (per-channel) or per group of g contiguous input columns, and H = (1/N) sum x x^T
(float64 accumulation; only its scale differs from GPTQ's 2/n, which no step depends on) plus
0.01 * mean(diag H) I. Layer-wise stage (``decoupleq_layer``):

  1. min-max (s, z); Q by round-half-up; err_r = row error of (1).
  2. GPTQ pass on the min-max grid in act-order (error feedback through the upper Cholesky
     factor of H^-1, damping escalated 0.01, 0.1, 1, 10, 100 x mean diag until it factors).
  3. (max_iter_num - 1) times, alternately
     a. integers given floats: ``gptq`` rounding, or ``train``: projected Adam on the
        box-relaxed weights, then column-by-column rounding with inner projected steps (the
        reference's first and second approximation levels); the first iteration's floats
        come from the H-weighted shrink grid search followed by step b;
     b. floats given integers: the closed-form least squares of (1) per row (a 2G x 2G linear
        system for G groups; 2 x 2 per channel), solved in float64.
     Every candidate is accepted per row only if that row's error drops; the loop stops
     early when fewer than ``min_accept_rate`` of the rows improve.

Block-wise stage (``minimize_block``, optional): with the codes frozen, train every scale,
offset and the block's norm weights with Adam against the FP block's outputs on the same
(quantized-prefix) inputs, then bake the float parameters back into the layer states.

Deviations from the reference, all numerical plumbing with the same minimiser: GPTQ rounding
uses lazy column blocks (the reference updates all remaining columns after each column);
row errors are computed as sum((D H) * D) instead of diag(D H D^T); a singular least-squares
system is damped for the failing rows only (the reference damps every row of the layer once
any row fails); the per-channel system is solved by the same batched solver as the grouped
one (the reference's 2 x 2 Cramer's rule clamps |det| < 1e-5, an absolute threshold).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from suite.errors import ConfigError
from suite.interface import METHODS, MethodConfig, MethodData, QuantMethod, QuantResult, RunContext
from suite.kernels import shrink as shrink_kernel
from suite.kernels.sweep import SweepGrid, sweep_block
from suite.primitives import (
    LayerQState,
    WeightFormat,
    check_divides,
    inverse_cholesky,
    quantize_signed,
    signed_grid,
    to_storage,
    write_weight,
)
from suite.sequential import (
    BlockwiseAdapter,
    block_output,
    forward_all,
    run_sequential,
    solve_per_group,
    timed,
)

_CHOICES = {"round_fn": ("gptq", "train"), "rounding": ("half-up", "half-even")}


@dataclass(frozen=True)
class DecoupleQConfig(MethodConfig):
    """Defaults are the reference's ``run_llama.sh`` (LLaMA, 128 x 2048 C4 tokens).

    Attributes:
        max_iter_num: 1 = min-max + GPTQ pass only; n > 1 adds n - 1 alternating iterations.
        round_fn: integer solver given floats: ``gptq`` (run_llama.sh) or ``train``
            (projected Adam + column-wise rounding; run_resnet.sh and the argparse default).
        iters_before_round: projected Adam steps on the relaxed weights (``train`` only).
        inner_iters_for_round: projected steps after each column is rounded (``train`` only).
        lr: Adam learning rate of the ``train`` solver.
        act_order: process columns by descending diag(H) in the integer solvers.
        percdamp: damping added to H, times mean(diag H).
        max_damp_escalations: extra x10 damping tries of the GPTQ pass's Cholesky (4 = up to
            100, as in the reference).
        shrink_grid / max_shrink: the first iteration's range search p = 1 - i / shrink_grid,
            i < max_shrink * shrink_grid.
        rounding: ``half-up`` (the reference's ``my_round``) or PyTorch's ``half-even``.
        min_accept_rate: stop iterating when a step improves fewer rows than this fraction.
        true_sequential: re-collect H after each sub-group of a block (run_llama.sh).
        blockwise: run the block-wise minimisation of the float parameters.
        blockwise_lr / blockwise_epochs / blockwise_wd: its Adam settings (betas (0.9, 0.99),
            eps 2e-5, one calibration sequence per step, sequences in fixed order).
        train_norm: also train the block's norm weights (``--train-LN``).
        train_bias: also train linear biases (``--train-bias``).
        ls_chunk_mb: memory bound of the grouped least-squares assembly (rows per chunk).
    """

    version = 1

    max_iter_num: int = 4
    round_fn: str = "gptq"
    iters_before_round: int = 200
    inner_iters_for_round: int = 5
    lr: float = 1e-3
    act_order: bool = True
    percdamp: float = 0.01
    max_damp_escalations: int = 4
    shrink_grid: int = 200
    max_shrink: float = 0.8
    rounding: str = "half-up"
    min_accept_rate: float = 1e-4
    true_sequential: bool = True
    blockwise: bool = True
    blockwise_lr: float = 1e-5
    blockwise_epochs: int = 4
    blockwise_wd: float = 1e-6
    train_norm: bool = True
    train_bias: bool = False
    ls_chunk_mb: int = 256

    def __post_init__(self) -> None:
        self.check_choices(_CHOICES)
        for name in ("max_iter_num", "blockwise_epochs", "iters_before_round",
                     "inner_iters_for_round", "shrink_grid"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: got {getattr(self, name)!r}; "
                                  "accepted: an integer >= 0")


# --------------------------------------------------------------------------- the grid


@dataclass
class Grid:
    """The layer's quantization problem: weights, damped Hessian and the signed grid."""

    W: torch.Tensor  # (rows, cols) float32
    H: torch.Tensor  # (cols, cols) float32, damped
    H64: torch.Tensor  # the same in float64 (least squares)
    g: int  # columns per group
    alpha: int
    beta: int
    sym: bool
    half_up: bool
    bits: int

    @property
    def groups(self) -> int:
        """G, groups per row."""
        return self.W.shape[1] // self.g

    def expand(self, p: torch.Tensor) -> torch.Tensor:
        """Per-group parameters (rows, G) -> per-column (rows, cols)."""
        return p.repeat_interleave(self.g, dim=1)

    def encode(self, W: torch.Tensor, S: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
        """q = clamp(round((w - z) / s), alpha, beta) on per-column S, Z (float codes)."""
        return quantize_signed(W, S, Z, self.bits, self.half_up)

    def error(self, What: torch.Tensor) -> torch.Tensor:
        """err_r = (w_hat_r - w_r) H (w_hat_r - w_r)^T, per row (the objective (1))."""
        D = What - self.W  # (rows, cols)
        return ((D @ self.H) * D).sum(dim=1)

    def dequant(self, Q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """w_hat = s * q + z."""
        return self.expand(s) * Q + self.expand(z)


def minmax_floats(grid: Grid, shrink: float | torch.Tensor = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max (s, z) per group over the range shrunk by ``shrink`` (research/methods.md 3.2).

    xmin = min(0, min w), xmax = max(0, max w) (+-1 if both 0); s = (xmax - xmin) / (beta -
    alpha); z = xmin - s * alpha, so code alpha maps to xmin (symmetric: +-max|w|, z = 0).
    """
    rows, cols = grid.W.shape
    wg = grid.W.reshape(rows, cols // grid.g, grid.g)  # (rows, G, g)
    xmin = wg.amin(dim=-1).clamp(max=0)
    xmax = wg.amax(dim=-1).clamp(min=0)
    if grid.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin) * shrink
    xmax = torch.where(dead, 1.0, xmax) * shrink
    s = (xmax - xmin) / (grid.beta - grid.alpha)
    z = torch.zeros_like(s) if grid.sym else xmin - s * grid.alpha
    return s, z


def rtn_codes(grid: Grid, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Nearest codes of W on the grid (s, z)."""
    return grid.encode(grid.W, grid.expand(s), grid.expand(z))


def shrink_search(grid: Grid, steps: int, max_shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the min-max range shrink p = 1 - i / steps (i < max_shrink * steps) minimising
    the H-weighted RTN error (``get_scale_and_zero``; all groups of a row share p; the first p
    attaining the minimum wins, as in the reference's strict-improvement loop).

    The errors come from :func:`shrink_errors`, which updates them incrementally.
    """
    ps = [1 - i / steps for i in range(int(max_shrink * steps))]  # ps[0] = 1: min-max itself
    best = shrink_errors(grid, ps).argmin(dim=0)  # (rows,), first minimum
    p = torch.tensor(ps, dtype=grid.W.dtype, device=grid.W.device)[best][:, None]  # (rows, 1)
    return minmax_floats(grid, p)


def shrink_errors(grid: Grid, ps: list[float]) -> torch.Tensor:
    """err_r(p) of RTN on the min-max grid shrunk by each p, (len(ps), rows), float64.

    Shrinking scales both floats, s(p) = p s(1) and z(p) = p z(1), so w_hat(p) = p V(p) with
    V(p) = s(1) q(p) + z(1), and

        err(p) = p^2 V H V^T - 2 p V H w^T + w H w^T.

    As p falls, (w - z(p)) / s(p) moves monotonically, so each code changes at most
    2^b - 1 times over the whole search: A = V H is kept up to date with the few changed
    entries (A += dV H) instead of a dense (rows x cols x cols) product per p (the reference's
    cost). Codes q(p) are those of the direct evaluation; accumulation is float64.
    """
    s1, z1 = minmax_floats(grid)
    S1, Z1 = grid.expand(s1).double(), grid.expand(z1).double()  # (rows, cols)
    W = grid.W.double()
    WH = W @ grid.H64  # (rows, cols)
    wHw = (WH * W).sum(1)
    Q = V = A = None
    dV = torch.empty_like(S1)
    out = []
    for p in ps:
        s, z = minmax_floats(grid, p)
        if Q is None:
            Q = rtn_codes(grid, s, z).double()
            V = S1 * Q + Z1
            A = V @ grid.H64
        else:
            Q = _shrink_step(grid, s, z, Q, S1, V, A, dV)
        out.append(p * p * (A * V).sum(1) - 2 * p * (V * WH).sum(1) + wHw)
    return torch.stack(out)


def _shrink_step(grid: Grid, s: torch.Tensor, z: torch.Tensor, Q: torch.Tensor,
                 S1: torch.Tensor, V: torch.Tensor, A: torch.Tensor, dV: torch.Tensor
                 ) -> torch.Tensor:
    """The codes on the grid (s, z); V += dV and A += dV H in place, dV = S1 (q - q_prev).

    The compiled step (``suite.kernels.shrink``) computes the codes, V and dV's nonzeros in one
    pass; without it, torch ops do the same arithmetic. Either way A's update is the same
    product (dense, or sparse from the same CSR arrays)."""
    csr = shrink_kernel.step(grid.W, s, z, grid.g, grid.alpha, grid.beta, grid.half_up, Q, S1,
                             V, dV)
    if csr is None:
        Qp = rtn_codes(grid, s, z).double()
        _update(A, V, S1 * (Qp - Q), grid.H64)
        return Qp
    if csr[2].numel() * 8 > dV.numel():  # dense change: one matmul is cheaper
        A += dV @ grid.H64
        return Q
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        A += torch.sparse.mm(torch.sparse_csr_tensor(*csr, dV.shape), grid.H64)
    return Q


def _update(A: torch.Tensor, V: torch.Tensor, dV: torch.Tensor, H: torch.Tensor) -> None:
    """V += dV and A += dV H, in place; dV is mostly zeros, so the product is sparse x dense."""
    V += dV
    if torch.count_nonzero(dV) * 8 > dV.numel():  # dense change: one matmul is cheaper
        A += dV @ H
        return
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        A += torch.sparse.mm(dV.to_sparse_csr(), H)


# --------------------------------------------------------------------------- floats | integers


def solve_floats(grid: Grid, Q: torch.Tensor, chunk_mb: int = 256
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form least squares of (1) for (s, z) given the codes Q, per row.

    With A_g = Q_r masked to group g and I_g the indicator of group g, the normal equations are

        [[A H A^T, A H I^T], [I H A^T, I H I^T]] [s; z] = [A H w^T; I H w^T]      (2G x 2G)

    (symmetric grid: only the A H A^T s = A H w^T block). Assembled and solved in float64,
    ``chunk_mb`` bounding the (rows, cols, G) intermediate.
    """
    rows, cols = Q.shape
    G, g = grid.groups, grid.g
    per_row = cols * G * 8 * 2
    step = max(1, min(rows, (chunk_mb << 20) // per_row))
    Hs = grid.H64.reshape(cols, G, g).sum(-1)  # (cols, G): sum_{j in group h} H_ij
    P22 = Hs.reshape(G, g, G).sum(1)  # (G, G): I H I^T
    out = [_solve_rows(grid, Q[r : r + step].double(), grid.W[r : r + step].double(), Hs, P22)
           for r in range(0, rows, step)]
    s = torch.cat([o[0] for o in out]).float()
    z = torch.cat([o[1] for o in out]).float()
    return s, z


def _solve_rows(grid: Grid, Q: torch.Tensor, W: torch.Tensor, Hs: torch.Tensor,
                P22: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = Q.shape
    G, g = grid.groups, grid.g
    Qg = Q.reshape(rows, G, g)  # (rows, G, g)
    T = torch.einsum("ihk,rhk->rih", grid.H64.reshape(cols, G, g), Qg)  # (rows, cols, G): H A^T
    P11 = torch.einsum("rgk,rgkh->rgh", Qg, T.reshape(rows, G, g, G))  # A H A^T
    WH = (W @ grid.H64).reshape(rows, G, g)  # w H, (rows, G, g)
    up = (WH * Qg).sum(-1)  # A H w^T, (rows, G)
    if grid.sym:
        return _solve_spd(P11, up), torch.zeros(rows, G, dtype=Q.dtype, device=Q.device)
    P12 = torch.einsum("rgk,gkh->rgh", Qg, Hs.reshape(G, g, G))  # A H I^T, (rows, G, G)
    P = torch.cat([torch.cat([P11, P12], 2),
                   torch.cat([P12.transpose(1, 2), P22.expand(rows, G, G)], 2)], 1)
    x = _solve_spd(P, torch.cat([up, WH.sum(-1)], 1))  # (rows, 2G)
    return x[:, :G], x[:, G:]


def _solve_spd(P: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batched solve of the symmetrised systems; rows whose LU fails get +0.01 mean(diag P)."""
    P = (P + P.transpose(1, 2)) / 2
    x, info = torch.linalg.solve_ex(P, y)
    bad = info != 0
    if bad.any():
        Pb = P[bad]
        diag = torch.diagonal(Pb, dim1=1, dim2=2)
        diag += 0.01 * diag.mean(dim=1, keepdim=True)
        x[bad] = torch.linalg.solve_ex(Pb, y[bad])[0]
    return x


# --------------------------------------------------------------------------- integers | floats


def gptq_round(W: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, U: torch.Tensor, grid: Grid,
               blocksize: int = 128) -> torch.Tensor:
    """GPTQ rounding of W (permuted, rows x cols) on the fixed per-column grid (S, Z).

    Column j is rounded, its error e = (w_j - q_j) / U_jj is fed back into the columns after it
    through the upper Cholesky factor U of H^-1; lazy blocks of ``blocksize`` columns, each
    swept by the shared ``sweep_block``. Returns the float codes (rows, cols).
    """
    W = W.clone()
    Q = torch.empty_like(W)
    cols = W.shape[1]
    rule = SweepGrid(grid.alpha, grid.beta, float_offset=True, half_up=grid.half_up)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        Q[:, i1:i2], E1, _ = sweep_block(W[:, i1:i2].clone(), S[:, i1:i2], Z[:, i1:i2],
                                         U[i1:i2, i1:i2], rule)
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q


class _Adam:
    """Adam on a (rows, cols) tensor whose trailing columns are optimised (``MyAdam``)."""

    def __init__(self, like: torch.Tensor, lr: float, eps: float) -> None:
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t, self.lr, self.eps, self.b1, self.b2 = 0, lr, eps, 0.9, 0.999

    def step(self, param: torch.Tensor, grad: torch.Tensor, start: int = 0) -> None:
        """param[:, start:] -= Adam update of ``grad`` (columns start: of the moments)."""
        self.t += 1
        m, v = self.m[:, start:], self.v[:, start:]
        m.lerp_(grad, 1 - self.b1)
        v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        denom = (v.sqrt() / math.sqrt(1 - self.b2**self.t)).add_(self.eps)
        param.addcdiv_(m, denom, value=-self.lr / (1 - self.b1**self.t))


def train_round(W: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, H: torch.Tensor, grid: Grid,
                cfg: DecoupleQConfig) -> torch.Tensor:
    """The reference's ``train`` solver on permuted W, S, Z, H; returns float codes.

    First-level approximation: relax q to the box [l, r] = [min, max](s alpha + z, s beta + z)
    and run projected Adam on f(w) = (w - w0) H (w - w0)^T (gradient (w - w0) H).
    Second-level: for each column in order, round it onto the grid and freeze it, then take
    ``inner_iters_for_round`` projected Adam steps (eps 1e-4) on the columns after it.
    """
    lo = torch.minimum(grid.alpha * S + Z, grid.beta * S + Z)
    hi = torch.maximum(grid.alpha * S + Z, grid.beta * S + Z)
    w = W.clone()
    adam = _Adam(w, cfg.lr, eps=1e-5)
    for _ in range(cfg.iters_before_round):
        adam.step(w, (w - W) @ H)
        w.clamp_(lo, hi)
    adam.eps = 1e-4
    for i in range(W.shape[1] - 1):
        w[:, i] = S[:, i] * grid.encode(w[:, i], S[:, i], Z[:, i]) + Z[:, i]
        rest = w[:, i + 1 :]
        for _ in range(cfg.inner_iters_for_round):
            adam.step(rest, (w - W) @ H[:, i + 1 :], start=i + 1)
            torch.max(torch.min(rest, hi[:, i + 1 :]), lo[:, i + 1 :], out=rest)
    return grid.encode(w, S, Z)


@dataclass
class _Rounder:
    """Integer solver of one layer: act-order permutation and the cached Cholesky factor."""

    grid: Grid
    cfg: DecoupleQConfig
    perm: torch.Tensor
    U: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, grid: Grid, cfg: DecoupleQConfig) -> _Rounder:
        cols = grid.W.shape[1]
        perm = torch.argsort(torch.diag(grid.H), descending=True) if cfg.act_order else \
            torch.arange(cols, device=grid.W.device)
        Hp = grid.H64[perm][:, perm]
        U, damp, esc = inverse_cholesky(Hp, cfg.percdamp, cfg.max_damp_escalations)
        return cls(grid, cfg, perm, U.float(), {"percdamp_used": damp, "damp_escalations": esc})

    def __call__(self, s: torch.Tensor, z: torch.Tensor, fn: str) -> torch.Tensor:
        """Codes of W on the grid (s, z) by ``fn`` (``gptq`` | ``train``), original order."""
        p, grid = self.perm, self.grid
        S, Z, W = grid.expand(s)[:, p], grid.expand(z)[:, p], grid.W[:, p]
        if fn == "gptq":
            Qp = gptq_round(W, S, Z, self.U, grid)
        else:
            Qp = train_round(W, S, Z, grid.H[p][:, p], grid, self.cfg)
        return Qp[:, torch.argsort(p)]


# --------------------------------------------------------------------------- the layer


@dataclass
class LayerSolution:
    """Result of the layer-wise stage: codes, floats, and the per-row error after each stage."""

    Q: torch.Tensor  # (rows, cols) float codes in [alpha, beta]
    s: torch.Tensor  # (rows, G)
    z: torch.Tensor  # (rows, G)
    err: torch.Tensor  # (rows,)
    trace: list[tuple[str, torch.Tensor]]  # (stage, per-row error after it)
    accept: list[tuple[str, float]]  # (stage, fraction of rows improved)
    stats: dict[str, Any]


def _accept(sol: LayerSolution, stage: str, err: torch.Tensor, Q: torch.Tensor | None = None,
            s: torch.Tensor | None = None, z: torch.Tensor | None = None) -> float:
    """Per row, take the candidate where its error is lower; record the stage."""
    take = err < sol.err
    if Q is not None:
        sol.Q = torch.where(take[:, None], Q, sol.Q)
    if s is not None:
        sol.s = torch.where(take[:, None], s, sol.s)
        sol.z = torch.where(take[:, None], z, sol.z)
    sol.err = torch.where(take, err, sol.err)
    rate = float(take.float().mean())
    sol.trace.append((stage, sol.err.clone()))
    sol.accept.append((stage, rate))
    return rate


def make_grid(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, cfg: DecoupleQConfig
              ) -> Grid:
    """The layer problem: W as float32, H + percdamp * mean(diag H) I (float64 and float32)."""
    rows, cols = W.shape
    check_divides(fmt, cols, "<decoupleq layer>")
    H64 = H.detach().double().clone()
    H64.diagonal().add_(cfg.percdamp * H64.diagonal().mean())
    alpha, beta = signed_grid(fmt.bits)
    return Grid(W.detach().float().reshape(rows, cols), H64.float(), H64, fmt.group_cols(cols),
                alpha, beta, fmt.sym, cfg.rounding == "half-up", fmt.bits)


def solve_layer(grid: Grid, cfg: DecoupleQConfig) -> LayerSolution:
    """The alternating minimisation of (1) (``startquant``); see the module docstring."""
    s, z = minmax_floats(grid)  # step 1
    Q = rtn_codes(grid, s, z)
    sol = LayerSolution(Q, s, z, grid.error(grid.dequant(Q, s, z)), [], [], {})
    sol.trace.append(("minmax", sol.err.clone()))
    if cfg.max_iter_num < 1:
        return sol
    rounder = _Rounder.build(grid, cfg)
    sol.stats.update(rounder.stats)
    Q = rounder(s, z, "gptq")  # step 2
    _accept(sol, "gptq-init", grid.error(grid.dequant(Q, s, z)), Q=Q)
    for it in range(cfg.max_iter_num - 1):  # step 3
        if it == 0:  # 3a, first iteration: shrink search, then floats for its RTN codes
            s0, z0 = shrink_search(grid, cfg.shrink_grid, cfg.max_shrink)
            s0, z0 = solve_floats(grid, rtn_codes(grid, s0, z0), cfg.ls_chunk_mb)
        else:
            s0, z0 = sol.s, sol.z
        Q = rounder(s0, z0, cfg.round_fn)  # 3b: integers given floats
        if _accept(sol, f"iter{it}-int", grid.error(grid.dequant(Q, s0, z0)), Q, s0, z0) \
                < cfg.min_accept_rate:
            break
        s1, z1 = solve_floats(grid, sol.Q, cfg.ls_chunk_mb)  # 3c: floats given integers
        if _accept(sol, f"iter{it}-float", grid.error(grid.dequant(sol.Q, s1, z1)),
                   s=s1, z=z1) < cfg.min_accept_rate:
            break
    return sol


def to_state(grid: Grid, Q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, fmt: WeightFormat,
             meta: dict[str, Any] | None = None) -> LayerQState:
    """Package codes and floats: unsigned codes u = q - alpha, (s, z) rounded to storage."""
    codes = (Q - grid.alpha).to(torch.uint8)
    return LayerQState(codes, to_storage(s, fmt), to_storage(z, fmt), fmt, zero_kind="float",
                       meta=meta or {})


def decoupleq_layer(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, cfg: DecoupleQConfig
                    ) -> tuple[LayerQState, dict[str, Any]]:
    """The layer-wise stage on one weight (rows, cols) (conv weights flattened by the caller).

    Returns:
        The layer state and stats: the summed objective (1) after each stage (``loss_trace``;
        the last entry with s, z rounded to their storage dtype), acceptance rates, damping.
    """
    grid = make_grid(W, H, fmt, cfg)
    sol = solve_layer(grid, cfg)
    state = to_state(grid, sol.Q, sol.s, sol.z, fmt)
    stored = grid.error(state.dequantize().to(grid.W.device))
    trace = [(name, float(e.sum())) for name, e in sol.trace] + [("stored", float(stored.sum()))]
    return state, {**sol.stats, "loss_trace": trace, "accept": sol.accept,
                   "loss": trace[-1][1]}


# --------------------------------------------------------------------------- block-wise stage


class _DecoupledWeight(nn.Module):
    """Parametrisation w = s * q + z with frozen codes q and trainable floats (s, z)."""

    def __init__(self, state: LayerQState, shape: torch.Size, train_zero: bool) -> None:
        super().__init__()
        alpha, _ = signed_grid(state.fmt.bits)
        self.register_buffer("q", state.codes.float() + alpha)  # (rows, cols)
        self.s = nn.Parameter(state.scale.clone())  # (rows, G)
        self.z = nn.Parameter(state.zero.clone(), requires_grad=train_zero)
        self.g, self.shape = state.codes.shape[1] // state.scale.shape[1], shape

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        s = self.s.repeat_interleave(self.g, dim=1)
        z = self.z.repeat_interleave(self.g, dim=1)
        return (s * self.q + z).reshape(self.shape)


def _trainable_extras(norms: list[nn.Module], layers: dict[str, nn.Module],
                      cfg: DecoupleQConfig) -> list[nn.Parameter]:
    """Norm weights/biases (``train_norm``) and layer biases (``train_bias``) of the block."""
    mods = norms if cfg.train_norm else []
    out = [p for m in mods for p in (getattr(m, "weight", None), getattr(m, "bias", None))
           if isinstance(p, nn.Parameter)]
    if cfg.train_bias:
        out += [m.bias for m in layers.values() if getattr(m, "bias", None) is not None]
    return out


@torch.enable_grad()
def minimize_block(block: nn.Module, layers: dict[str, nn.Module],
                   states: dict[str, LayerQState], inps: list[torch.Tensor],
                   targets: list[torch.Tensor], kwargs: dict[str, Any],
                   norms: list[nn.Module], cfg: DecoupleQConfig) -> list[float]:
    """Train (s, z) of every layer and the block's norm parameters with frozen codes so that
    the block's outputs match ``targets`` (MSE); update ``states`` and the layer weights.

    Args:
        layers / states: the block's quantized layers and their states, by the same keys.
        norms: the block's normalisation layers (LayerNorm/RMSNorm, or BatchNorm in a CNN).
        inps / targets: per calibration sequence, the block input and the FP block's output.

    Returns:
        The mean loss of each epoch.
    """
    flags = {p: p.requires_grad for p in block.parameters()}
    block.requires_grad_(False)
    params = []
    for key, layer in layers.items():
        pw = _DecoupledWeight(states[key], layer.weight.shape, not states[key].fmt.sym)
        parametrize.register_parametrization(layer, "weight", pw, unsafe=True)
        params += [pw.s] + ([pw.z] if pw.z.requires_grad else [])
    extras = _trainable_extras(norms, layers, cfg)
    for p in extras:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params + extras, lr=cfg.blockwise_lr, betas=(0.9, 0.99), eps=2e-5,
                           weight_decay=cfg.blockwise_wd)
    losses = []
    try:
        for _ in range(cfg.blockwise_epochs):
            total = 0.0
            for x, y in zip(inps, targets, strict=True):
                loss = torch.nn.functional.mse_loss(block_output(block, x, kwargs), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            losses.append(total / len(inps))
    finally:
        for key, layer in layers.items():
            pw = layer.parametrizations.weight[0]
            states[key].scale = to_storage(pw.s.detach(), states[key].fmt)
            states[key].zero = to_storage(pw.z.detach(), states[key].fmt)
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            write_weight(layer, states[key])
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return losses


# --------------------------------------------------------------------------- the method


@METHODS.register("decoupleq")
class DecoupleQ(QuantMethod):
    """decoupleQ: alternating integer / float optimisation per layer, then block-wise tuning."""

    name = "decoupleq"
    kind = "ptq"
    Config = DecoupleQConfig
    needs_calibration = True

    def quantize(self, model: nn.Module, data: MethodData, ctx: RunContext) -> QuantResult:
        """The shared sequential pipeline (float64 H) with :func:`decoupleq_layer` per linear
        and, when enabled, :func:`minimize_block` after each block."""
        assert self.fmt is not None and data.calib is not None
        run = _Run(self.config, self.fmt, ctx.adapter)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        run_sequential(model, ctx.adapter, data.calib.to(ctx.device), run.quantize_group,
                       run.cfg.true_sequential, ctx.progress, hessian_dtype=torch.float64,
                       before_block=run.before_block if run.cfg.blockwise else None,
                       after_block=run.after_block if run.cfg.blockwise else None,
                       timings=run.timings)
        return QuantResult(model, run.qstate, stats={
            "quant_time_s": time.perf_counter() - t0, "calib_tokens": int(data.calib.numel()),
            **run.summary()})


@dataclass
class _Run:
    """Per-run state shared by the pipeline callbacks."""

    cfg: DecoupleQConfig
    fmt: WeightFormat
    adapter: BlockwiseAdapter
    qstate: dict[str, LayerQState] = field(default_factory=dict)
    block_layers: dict[str, nn.Module] = field(default_factory=dict)  # the current block's
    layer_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    block_losses: list[list[float]] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    layer_time_s: float = 0.0
    block_time_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # the pipeline's Hessians, forwards

    def quantize_group(self, _i: int, layers: dict[str, nn.Module], H: dict[str, torch.Tensor]
                       ) -> None:
        t0 = time.perf_counter()
        for name, layer in layers.items():
            W = layer.weight.detach().flatten(1)  # conv: (C_out, C_in / groups * kh * kw)
            self.qstate[name], self.layer_stats[name] = solve_per_group(  # grouped: per group
                W, H[name], lambda w, h: decoupleq_layer(w, h, self.fmt, self.cfg))
            write_weight(layer, self.qstate[name])
            self.block_layers[name] = layer
        self.layer_time_s += time.perf_counter() - t0

    def before_block(self, _i: int, block: nn.Module, inps: list[torch.Tensor],
                     kwargs: dict[str, Any]) -> None:
        with timed(self.timings, "target_time_s"):
            self.targets = forward_all(block, inps, kwargs, 8)  # the FP block's outputs

    def after_block(self, _i: int, block: nn.Module, inps: list[torch.Tensor],
                    kwargs: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        layers, self.block_layers = self.block_layers, {}
        states = {n: self.qstate[n] for n in layers}
        self.block_losses.append(minimize_block(block, layers, states, inps, self.targets,
                                                kwargs, self.adapter.block_norms(block), self.cfg))
        self.targets = []
        self.block_time_s += time.perf_counter() - t0

    def summary(self) -> dict[str, Any]:
        """Record stats: objective sums per stage, damping fallbacks, block-wise losses."""
        stages: dict[str, float] = {}
        for st in self.layer_stats.values():
            for name, v in st["loss_trace"]:
                stages[name] = stages.get(name, 0.0) + v
        return {
            "layer_time_s": self.layer_time_s, "blockwise_time_s": self.block_time_s,
            **self.timings,  # hessian_time_s, forward_time_s, target_time_s
            "layer_loss_by_stage": stages,
            "damp_escalations": {n: s["damp_escalations"] for n, s in self.layer_stats.items()
                                 if s.get("damp_escalations")},
            "blockwise_loss_first_last_epoch": [[b[0], b[-1]] for b in self.block_losses if b],
        }
