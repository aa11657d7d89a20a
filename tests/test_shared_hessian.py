"""Linears that read one input tensor (LLaMA's q/k/v, gate/up) share its Hessian product in
``collect_hessians``: the accumulated H must equal one product per layer bit for bit, the
product must be computed once per distinct input, and an input changed in place between two
readers must not be reused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from suite import models
from suite.sequential import HessianAccumulator, collect_hessians


class _Fork(nn.Module):
    """q, k, v read x; o reads their sum (a different tensor); ``poke`` edits x in place
    between k and v (a reader that changes its input)."""

    def __init__(self, poke: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8, bias=False) for _ in range(4))
        self.poke = poke

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.q(x), self.k(x)
        if self.poke:
            x.mul_(2.0)
        return self.o(a + b + self.v(x))


def _separately(inps: list[torch.Tensor], layer: str, dtype: torch.dtype, batch: int,
                poke: bool = False) -> torch.Tensor:
    """H of one layer hooked alone: nothing to share, one product per batch."""
    mod = _Fork(poke)
    return collect_hessians(mod, {layer: getattr(mod, layer)}, [x.clone() for x in inps], {},
                            batch=batch, dtype=dtype)[layer]


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = HessianAccumulator._product

    def counted(self: HessianAccumulator, x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return real(self, x)

    monkeypatch.setattr(HessianAccumulator, "_product", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_products_give_bit_identical_hessians(monkeypatch: pytest.MonkeyPatch,
                                                     dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    inps = [torch.randn(1, 16, 8, generator=gen) for _ in range(5)]
    mod = _Fork()
    calls = _counting(monkeypatch)
    H = collect_hessians(mod, {n: getattr(mod, n) for n in "qkvo"}, inps, {}, batch=2,
                         dtype=dtype)
    assert calls[0] == 2 * 3  # 3 chunks of (q/k/v shared, o)
    for n in "qkvo":
        assert torch.equal(H[n], _separately(inps, n, dtype, 2)), n
    assert H["q"] is not H["k"]  # separate tensors: a method may damp one in place


def test_an_input_changed_in_place_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(2)
    inps = [torch.randn(1, 16, 8, generator=gen) for _ in range(2)]
    mod = _Fork(poke=True)
    calls = _counting(monkeypatch)
    H = collect_hessians(mod, {n: getattr(mod, n) for n in "qkv"}, [x.clone() for x in inps], {},
                         batch=1)
    assert calls[0] == 2 * 2  # per window: q/k share; v sees the edited x
    assert torch.equal(H["v"], _separately(inps, "v", torch.float32, 1, poke=True))
    assert torch.allclose(H["v"], 4 * H["q"])


def test_a_llama_block_computes_one_product_per_input(monkeypatch: pytest.MonkeyPatch,
                                                      tiny_llama) -> None:
    model = models.load_model(models.resolve(f"hf:{tiny_llama}"))
    adapter = models.adapter_for(model.config.model_type)
    calib = torch.randint(0, model.config.vocab_size, (3, 32),
                          generator=torch.Generator().manual_seed(0))
    inps, kwargs = adapter.catch_inputs(model, calib)
    kwargs = kwargs[0] if isinstance(kwargs, list) else kwargs
    block, groups = adapter.pipeline(model, False)[0]
    layers = {n: m for g in groups for n, m in g.items()}
    calls = _counting(monkeypatch)
    H = collect_hessians(block, layers, inps, kwargs, batch=1)
    assert len(layers) == 7 and calls[0] == 3 * 4  # q/k/v, o, gate/up, down per window
    names = sorted(layers)
    q, k, v = (next(n for n in names if n.endswith(s)) for s in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(H[q], H[k]) and torch.equal(H[q], H[v])
