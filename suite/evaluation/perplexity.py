"""Perplexity under the GPTQ-paper protocol (research/methods.md section 2.4).

The evaluation corpus is joined with "\\n\\n", tokenized once, cut into non-overlapping
windows of ``seqlen`` tokens (remainder dropped); each window's loss is the mean token NLL over
its ``seqlen - 1`` shifted targets; PPL = exp(mean of the window losses). A model family that
needs its BOS token at position 0 (``ModelAdapter.bos_per_window``: Gemma) reads BOS + window
and is scored on the same ``seqlen - 1`` targets. When the grid asks for
fewer windows than the stream holds, they are spread evenly over the stream (the window count
is part of the protocol id). The standard error over windows is reported on the NLL scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PPL_VERSION = 1


@torch.no_grad()
def window_nlls(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    bos_id: int | None = None,
) -> torch.Tensor:
    """Mean next-token NLL of each window; ``windows`` is (n, seqlen) int64 -> (n,) float64.
    With ``bos_id`` the model reads BOS + window; the targets are the same."""
    device = next(model.parameters()).device
    out = []
    first = 0 if bos_id is None else 1  # logits position predicting the window's 2nd token
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size]  # (b, seqlen)
        inp = x if bos_id is None else torch.cat([torch.full_like(x[:, :1], bos_id), x], 1)
        logits = model(input_ids=inp.to(device), use_cache=False).logits.float()
        nll = F.cross_entropy(
            logits[:, first:-1].reshape(-1, logits.shape[-1]), x[:, 1:].to(device).reshape(-1),
            reduction="none",
        ).view(x.shape[0], -1)  # (b, seqlen - 1)
        out.append(nll.mean(dim=1).double().cpu())
        if progress is not None:
            progress(min(i + batch_size, len(windows)), len(windows))
    return torch.cat(out)


def summarize(nlls: torch.Tensor) -> dict[str, Any]:
    """PPL, mean NLL, its standard error over windows and a 95% interval for the PPL."""
    n = len(nlls)
    mean = float(nlls.mean())
    se = float(nlls.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    finite = math.isfinite(mean)
    return {
        "value": math.exp(mean) if finite and mean < 700 else float("inf"),
        "nll": mean,
        "se_nll": se,
        "ppl_lo95": math.exp(mean - 1.96 * se) if finite and mean < 700 else float("inf"),
        "ppl_hi95": math.exp(mean + 1.96 * se) if finite and mean < 700 else float("inf"),
        "n_windows": n,
        "window_nlls": [float(x) for x in nlls],  # for paired comparisons across methods
    }
