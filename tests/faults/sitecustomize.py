"""Known faults, injected into every Python process of a run (``tests/test_verify_faults.py``).

The fault tests put this directory first on ``PYTHONPATH`` and name one fault in
``QBENCH_FAULT``; each cell process then runs with that bug under an unchanged run key, the
way a regression in the code would reach a re-run of published cells. Without ``QBENCH_FAULT``
nothing is imported or changed.
"""

from __future__ import annotations

import os


def _gptq_without_act_order() -> None:
    import dataclasses

    import baselines.gptq as gptq

    layer = gptq.gptq_layer
    gptq.gptq_layer = lambda W, H, fmt, cfg, init=None: layer(
        W, H, fmt, dataclasses.replace(cfg, act_order=False), init)


def _rtn_floor() -> None:
    import torch

    import suite.primitives as p

    def quantize(w, scale, zero, fmt):  # noqa: ANN001, ANN202
        s = p.expand_to_columns(scale, w.shape, fmt)
        z = p.expand_to_columns(zero, w.shape, fmt)
        return torch.clamp(torch.floor(w.float() / s) + z, 0, fmt.maxq).to(torch.uint8)

    p.quantize = quantize


def _lsq_gradient_scale() -> None:
    import suite.qat as qat

    scale = qat.grad_scale
    qat.grad_scale = lambda x, g: scale(x, 1.0)  # g = 1 instead of 1 / sqrt(N Q_P)


def _ppl_window_count() -> None:
    import suite.data as data

    windows = data.eval_windows
    data.eval_windows = lambda ids, seqlen, n: windows(ids, seqlen, None if n is None else n - 1)


FAULTS = {"gptq-no-act-order": _gptq_without_act_order, "rtn-floor": _rtn_floor,
          "lsq-grad-scale": _lsq_gradient_scale, "ppl-windows": _ppl_window_count}

if os.environ.get("QBENCH_FAULT"):
    FAULTS[os.environ["QBENCH_FAULT"]]()
