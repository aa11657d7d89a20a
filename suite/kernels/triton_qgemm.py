"""Triton weight-only GEMM/GEMV over int32 code words with per-group scale and offset.

Imported only by ``suite.kernels.gpu`` when the ``triton`` backend is used (this module imports
triton; ``gpu`` itself imports on any machine). Under ``TRITON_INTERPRET=1`` (set before this
module is imported: triton decides at ``@triton.jit`` time) the same kernel runs on CPU tensors
through triton's interpreter, which is how it is tested on machines without a GPU.

Layout (built by ``gpu.pack_words``; N = output rows, K = input columns, K padded with zero
codes to whole words):
  * b in {2, 4, 8}: ``words`` int32 (ceil(K * b / 32), N); column k of row n is bits
    ``(k % (32 / b)) * b ..`` of ``words[k // (32 / b), n]``. N is the contiguous dimension,
    so neighbouring programs' lanes read neighbouring words.
  * b = 3: two bit planes in that layout, the low two bits (a 2-bit plane) and the high bit
    (a 1-bit plane): exactly 3 bits per code, no code straddles a word.
  * ``scale`` / ``offset``: float32 (groups, N); ``w[n, k] = scale[g, n] * q + offset[g, n]``
    with ``g = k // group``.

Math per K block (which never straddles a group, see ``gpu.block_k``): the block's partial
product is taken over the raw codes, ``x_blk @ q_blk`` (codes <= 255 are exact in fp16 / bf16,
accumulated in float32), then ``acc += partial * scale + rowsum(x_blk) * offset``. The weight is
therefore never rounded to the activation dtype; only the activations (already in that dtype)
and the final store are. ``USE_DOT`` picks ``tl.dot`` (M > 4, tensor cores for fp16 / bf16,
IEEE fp32 for fp32 activations) or a broadcast-multiply-and-sum GEMV path (M <= 4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _codes(qa_ptr, qb_ptr, offs_k, offs_n, N, mask, BITS: tl.constexpr):
    """int32 codes (BLOCK_K, BLOCK_N) of columns ``offs_k`` and rows ``offs_n``."""
    if BITS == 3:
        lo_w = tl.load(qa_ptr + (offs_k // 16)[:, None] * N + offs_n[None, :], mask=mask,
                       other=0)
        hi_w = tl.load(qb_ptr + (offs_k // 32)[:, None] * N + offs_n[None, :], mask=mask,
                       other=0)
        lo = (lo_w >> ((offs_k % 16) * 2)[:, None]) & 3
        hi = (hi_w >> (offs_k % 32)[:, None]) & 1
        q = lo | (hi << 2)
    else:
        CPW: tl.constexpr = 32 // BITS
        w = tl.load(qa_ptr + (offs_k // CPW)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        q = (w >> ((offs_k % CPW) * BITS)[:, None]) & ((1 << BITS) - 1)
    return q


@triton.jit
def qgemm_kernel(x_ptr, qa_ptr, qb_ptr, s_ptr, o_ptr, y_ptr, M, N, K, GROUP, stride_xm,
                 stride_ym, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """y (M, N) = x (M, K) @ w.T for the packed weight ``w``; grid (N / BLOCK_N, M / BLOCK_M)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        q = _codes(qa_ptr, qb_ptr, offs_k, offs_n, N, k_ok[:, None] & n_ok[None, :], BITS)
        g = k0 // GROUP  # the whole block lies in this group
        s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0)
        o = tl.load(o_ptr + g * N + offs_n, mask=n_ok, other=0.0)
        xf = x.to(tl.float32)
        if USE_DOT:
            if IEEE:
                part = tl.dot(x, q.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(x, q.to(tl.float32).to(x.dtype))
        else:
            part = tl.sum(xf[:, :, None] * q.to(tl.float32)[None, :, :], axis=1)
        acc += part * s[None, :] + tl.sum(xf, axis=1)[:, None] * o[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def launch(x: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor, scale: torch.Tensor,
           offset: torch.Tensor, y: torch.Tensor, group: int, bits: int,
           blocks: tuple[int, int, int], use_dot: bool, num_warps: int = 4) -> None:
    """Run ``qgemm_kernel`` on contiguous ``x`` (M, K) into ``y`` (M, N); ``qb`` is the 1-bit
    plane for 3-bit codes (any int32 tensor otherwise, never read)."""
    m, k = x.shape
    n = y.shape[1]
    bm, bn, bk = blocks
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    qgemm_kernel[grid](x, qa, qb, scale, offset, y, m, n, k, group, x.stride(0), y.stride(0),
                       BITS=bits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot,
                       IEEE=x.dtype == torch.float32, num_warps=num_warps)
