"""What the ``cpp-a8`` backend's int8 activations cost in accuracy (issue 29):
``results/a8-accuracy-cpu.csv``.

The embedded model (SmolLM2-135M) quantized by RTN (machine-independent codes) at W4 g64 and
W3 g64 is evaluated on the published perplexity protocol (Wikipedia, 40 windows of 512 tokens)
twice: weight-only (the fake-quant model, which is what every leaderboard row evaluates) and
with every quantized linear computed by ``cpp-a8`` (activations rounded to int8 per 32 columns
at every call). Per format, the layers' output error against the weight-only product on the
first window's real activations is also reported (relative to each layer output's max |y|).

    python benchmarks/a8_accuracy.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from suite import data, models  # noqa: E402
from suite.evaluation.perplexity import window_nlls  # noqa: E402
from suite.kernels.cpu import PackedLinear  # noqa: E402
from suite.kernels.decode import dequantize_model, pack_model, rtn_qstate  # noqa: E402
from suite.primitives import WeightFormat  # noqa: E402

MODEL = "smollm2-135m-instruct@gguf-q4_1"


def ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean token NLL) over the windows (the GPTQ protocol)."""
    with torch.no_grad():
        return math.exp(float(window_nlls(model, windows).mean()))


def layer_errors(packed: torch.nn.Module, fake: torch.nn.Module, window: torch.Tensor
                 ) -> list[float]:
    """Per packed linear: max |a8 - weight-only| / max |weight-only| on the activations the
    fake-quant model feeds that layer for ``window``."""
    inputs: dict[str, torch.Tensor] = {}
    names = [n for n, m in packed.named_modules() if isinstance(m, PackedLinear)]
    hooks = [fake.get_submodule(n).register_forward_hook(
        lambda _m, a, _o, n=n: inputs.__setitem__(n, a[0].detach())) for n in names]
    with torch.no_grad():
        fake(window[None])
        for h in hooks:
            h.remove()
        errs = []
        for n in names:
            x = inputs[n].reshape(-1, inputs[n].shape[-1])
            want = fake.get_submodule(n)(x)
            got = packed.get_submodule(n)(x)
            errs.append(float((got - want).abs().max() / want.abs().max()))
    return errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "results" / "a8-accuracy-cpu.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = models.resolve(MODEL)
    base = models.load_model(src)
    adapter = models.adapter_for(base.config.model_type)
    tok = models.load_tokenizer(src)
    ids = data.token_stream("enwiki-gensim", tok, models.tokenizer_key(src))
    windows = data.eval_windows(ids, 512, args.windows)
    rows = []
    for fmt in (WeightFormat(4, 64), WeightFormat(3, 64)):
        qstate = rtn_qstate(adapter.target_layers(base), fmt)
        fake, packed = copy.deepcopy(base), copy.deepcopy(base)
        dequantize_model(fake, qstate)
        pack_model(packed, qstate, "cpp-a8")
        errs = torch.tensor(layer_errors(packed, fake, windows[0]))
        p_fake, p_a8 = ppl(fake, windows), ppl(packed, windows)
        rows.append({"method": "rtn", "format": fmt.label(), "backend": "cpp-a8",
                     "ppl_weight_only": p_fake, "ppl_a8": p_a8, "ppl_rel_diff": p_a8 / p_fake - 1,
                     "layer_err_median": float(errs.median()), "layer_err_max": float(errs.max()),
                     "windows": args.windows, "threads": args.threads})
        print(rows[-1], flush=True)
    pd.DataFrame(rows).to_csv(args.out, index=False, float_format="%.6g")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
