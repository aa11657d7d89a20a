"""End-to-end decode speed: a causal LM with its quantized linears computed from packed storage
(``PackedLinear``) against the same model in float32.

``pack_model`` swaps every linear named in a qstate for a ``PackedLinear`` built from that
state, so the packed model computes the quantized weights the leaderboard row evaluated.
``decode_rate`` times greedy generation with the KV cache: the time of ``n + 1`` new tokens
minus that of 1 new token, over ``n``, so the prompt's prefill is not counted; the median of
``reps`` repetitions. ``interleaved_rates`` times several models in turn over rounds, so that a
slow stretch of a shared machine hits a whole round rather than one model (what
``benchmarks/test_bench_decode.py`` uses for ``results/decode-cpu.csv``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from suite.kernels.cpu import PackedLinear
from suite.kernels.packing import from_qstate
from suite.primitives import LayerQState, WeightFormat, quantize_tensor


def rtn_qstate(layers: dict[str, nn.Linear], fmt: WeightFormat) -> dict[str, LayerQState]:
    """Round-to-nearest states of ``layers`` (the RTN baseline's weights), layers untouched."""
    return {name: quantize_tensor(lin.weight.detach(), fmt) for name, lin in layers.items()}


def pack_model(model: nn.Module, qstate: dict[str, LayerQState], backend: str = "auto") -> int:
    """Replace each linear named in ``qstate`` by a ``PackedLinear`` of its state, in place;
    returns how many were replaced."""
    for name, qs in qstate.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"qstate: {name!r} is a {type(lin).__name__}, not a Linear")
        setattr(parent, child, PackedLinear(from_qstate(qs), lin.bias, backend))
    return len(qstate)


def dequantize_model(model: nn.Module, qstate: dict[str, LayerQState]) -> None:
    """The fake-quant model: each linear named in ``qstate`` gets the state's weight."""
    with torch.no_grad():
        for name, qs in qstate.items():
            model.get_submodule(name).weight.copy_(qs.dequantize())


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation with the KV cache: (1, prompt + new_tokens) token ids."""
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, num_beams=1, pad_token_id=0)


def decode_rate(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32, reps: int = 3
                ) -> float:
    """Decode tokens/s: (time of new_tokens + 1 tokens - time of 1 token) / new_tokens, the
    median of ``reps`` repetitions after a warm-up."""
    greedy(model, prompt, 2)  # warm-up (kernels built, caches allocated)
    return statistics.median(_one_rate(model, prompt, new_tokens) for _ in range(reps))


def interleaved_rates(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int = 32,
                      rounds: int = 5) -> dict[str, list[float]]:
    """Per model, its decode tokens/s in each of ``rounds`` rounds; a round times every model
    once, in turn (after one warm-up each), so per-round ratios between models are taken
    under the same machine state."""
    for model in models.values():
        greedy(model, prompt, 2)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            rates[name].append(_one_rate(model, prompt, new_tokens))
    return rates


def rate_rows(rates: dict[str, list[float]], baseline: str = "fp32/dense"
              ) -> list[dict[str, float | str]]:
    """One row per ``"format/backend"`` key of ``interleaved_rates``: median tokens/s and the
    median of the per-round ratios to ``baseline`` (same round, same machine state)."""
    base = torch.tensor(rates[baseline])
    rows: list[dict[str, float | str]] = []
    for key, r in rates.items():
        fmt, backend = key.split("/")
        t = torch.tensor(r)
        rows.append({"format": fmt, "backend": backend, "tokens_per_s": float(t.median()),
                     "speedup_vs_fp32": float((t / base).median())})
    return rows


def _one_rate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter()
    greedy(model, prompt, 1)
    t1 = time.perf_counter()
    greedy(model, prompt, new_tokens + 1)
    t2 = time.perf_counter()
    return new_tokens / max((t2 - t1) - (t1 - t0), 1e-9)


@dataclass(frozen=True)
class Agreement:
    """How closely the packed model follows the fake-quant one on the same prompt."""

    logits_rel_err: float  # max |packed - fake| / max |fake| over the prompt's logits
    same_tokens: float  # fraction of greedy continuation tokens that agree


@torch.no_grad()
def agreement(packed: nn.Module, fake: nn.Module, prompt: torch.Tensor, new_tokens: int
              ) -> Agreement:
    """Compare logits and greedy continuations of the packed and fake-quant models."""
    a, b = packed(prompt).logits, fake(prompt).logits
    ta, tb = greedy(packed, prompt, new_tokens), greedy(fake, prompt, new_tokens)
    n = prompt.shape[1]
    same = (ta[0, n:] == tb[0, n:]).float().mean().item()
    return Agreement(float((a - b).abs().max() / b.abs().max()), same)
