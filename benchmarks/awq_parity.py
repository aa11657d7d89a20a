"""qbench's AWQ side by side with mit-han-lab/llm-awq on real SmolLM2 blocks (issue 30):
``results/awq-parity-cpu.csv``.

For each chosen decoder block, the block's FP inputs on the grid's calibration windows (64 x 512
tokens of ABC news, the FP model run up to the block, as both implementations propagate) go to

* the reference: ``auto_scale_block`` + ``apply_scale``, then ``auto_clip_block`` +
  ``apply_clip``, exactly as its ``run_awq`` calls them (imported at run time from the checkout
  named by ``QBENCH_AWQ_REF``; never vendored; its CUDA moves are made no-ops), then its
  ``pseudo_quantize_tensor`` on every linear;
* qbench: ``baselines.awq`` on a copy of the same block, then its own quantized state.

Per scale edge the chosen alpha of each (the reference returns only s; its alpha is the grid
point whose candidate s it equals) and the largest relative difference of s; per block the
share of (row, group) clips that agree, and the block output error of both against the FP block
(mean squared error relative to the output's mean square), with plain RTN beside them. qbench
quantizes on the suite's shared grid (float32 scales here, as the reference); the reference's
grid does not widen the range to hold 0, the only difference left in what the two optimise.

    QBENCH_AWQ_REF=/path/to/llm-awq python benchmarks/awq_parity.py --blocks 0 15 29
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import types
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from baselines.awq import AWQConfig, _BlockAWQ, act_scale, candidate_scale, quantize_clipped  # noqa: E402
from suite import data, models  # noqa: E402
from suite.primitives import WeightFormat, quantize_tensor  # noqa: E402
from suite.sequential import block_output  # noqa: E402

MODEL = "smollm2-135m-instruct@gguf-q4_1"


def _reference() -> types.SimpleNamespace:
    """llm-awq's block functions, imported from ``QBENCH_AWQ_REF`` (its CUDA extension stubbed;
    only the pure-PyTorch search code runs)."""
    ref = os.environ.get("QBENCH_AWQ_REF")
    if not ref:
        sys.exit("awq_parity: set QBENCH_AWQ_REF to a checkout of mit-han-lab/llm-awq")
    sys.path.insert(0, ref)
    sys.modules.setdefault("awq_inference_engine", types.ModuleType("awq_inference_engine"))
    from awq.quantize.auto_clip import apply_clip, auto_clip_block
    from awq.quantize.auto_scale import apply_scale, auto_scale_block
    from awq.quantize.quantizer import pseudo_quantize_tensor

    return types.SimpleNamespace(auto_scale_block=auto_scale_block, apply_scale=apply_scale,
                                 auto_clip_block=auto_clip_block, apply_clip=apply_clip,
                                 quantize=pseudo_quantize_tensor)


class _NoCuda:
    """``.cuda()`` on modules and tensors returns them unchanged (the reference moves every
    layer to the GPU and back)."""

    def __enter__(self) -> None:
        self.saved = nn.Module.cuda, torch.Tensor.cuda
        nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        nn.Module.cuda, torch.Tensor.cuda = self.saved  # type: ignore[method-assign]


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def run_reference(ref: types.SimpleNamespace, block: nn.Module, x: torch.Tensor,
                  kwargs: dict[str, Any], fmt: WeightFormat) -> tuple[list, list]:
    """The reference's ``run_awq`` body for one block on inputs x (n, seqlen, d)."""
    q_config = {"zero_point": True, "q_group_size": fmt.group_size}
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in _linears(block)}
    hooks = [m.register_forward_hook(lambda _m, a, _o, n=n: feats[n].append(a[0].detach()))
             for n, m in _linears(block).items()]
    with torch.no_grad():
        block(x, **kwargs)
    for h in hooks:
        h.remove()
    input_feat = {k: torch.cat(v, 0) for k, v in feats.items()}
    with _NoCuda(), torch.no_grad():
        scales = ref.auto_scale_block(block, dict(kwargs), fmt.bits, q_config, input_feat)
        ref.apply_scale(block, scales, input_feat_dict=input_feat)
        clips = ref.auto_clip_block(block, fmt.bits, q_config, input_feat)
        ref.apply_clip(block, clips)
        for lay in _linears(block).values():
            lay.weight.data = ref.quantize(lay.weight.data, n_bit=fmt.bits, **q_config)
    return scales, clips


def _out_err(block: nn.Module, fp_out: list[torch.Tensor], inps: list[torch.Tensor],
             kwargs: dict[str, Any]) -> float:
    """Block output MSE against the FP block, relative to the FP output's mean square."""
    num = den = 0.0
    with torch.no_grad():
        for x, o in zip(inps, fp_out, strict=True):
            num += float((block_output(block, x, kwargs) - o).double().pow(2).sum())
            den += float(o.double().pow(2).sum())
    return num / den


def _alpha_of(s: torch.Tensor, s_x: torch.Tensor, n_grid: int) -> float:
    """The grid point whose candidate scale is closest to s."""
    dist = [float((candidate_scale(s_x, k / n_grid) - s).abs().max()) for k in range(n_grid)]
    return dist.index(min(dist)) / n_grid


def parity_block(i: int, fp_block: nn.Module, inps: list[torch.Tensor], kwargs: dict[str, Any],
                 adapter: models.ModelAdapter, fmt: WeightFormat, ref: types.SimpleNamespace
                 ) -> list[dict[str, Any]]:
    """Both implementations on a copy of block i; one row per scale edge."""
    with torch.no_grad():
        fp_out = [block_output(fp_block, x, kwargs) for x in inps]
    ref_block, ours_block, rtn_block = (copy.deepcopy(fp_block) for _ in range(3))
    scales, clips = run_reference(ref, ref_block, torch.cat(inps), kwargs, fmt)
    cfg = AWQConfig()
    awq = _BlockAWQ(adapter, fmt, cfg)
    with torch.no_grad():
        awq(i, ours_block, inps, kwargs)
    prefix = f"{adapter.blocks}.{i}."
    for name, lay in _linears(ours_block).items():
        lay.weight.data = quantize_clipped(lay.weight.data, awq.clips.get(prefix + name),
                                           fmt).dequantize()
    for lay in _linears(rtn_block).values():
        lay.weight.data = quantize_tensor(lay.weight.data, fmt).dequantize()
    clip_agree = _clip_agreement(clips, awq.clips, prefix, ours_block)
    errs = {k: _out_err(b, fp_out, inps, kwargs)
            for k, b in (("ref", ref_block), ("qbench", ours_block), ("rtn", rtn_block))}
    rows = []
    for prev, layers, s_ref in scales:
        st = awq.stats[prefix + prev]
        xs = [_input_of(fp_block, layers[0], x, kwargs) for x in inps]
        s_ours = candidate_scale(act_scale(xs), st["alpha"])
        rows.append({"block": i, "edge": f"{prev} -> {','.join(layers)}", "format": fmt.label(),
                     "alpha_ref": _alpha_of(s_ref, act_scale(xs), cfg.n_grid),
                     "alpha_qbench": st["alpha"],
                     "scale_max_rel_diff": float(((s_ours - s_ref) / s_ref).abs().max()),
                     "clip_agree": clip_agree, "out_err_ref": errs["ref"],
                     "out_err_qbench": errs["qbench"], "out_err_rtn": errs["rtn"]})
    return rows


def _input_of(block: nn.Module, name: str, x: torch.Tensor, kwargs: dict[str, Any]
              ) -> torch.Tensor:
    got: list[torch.Tensor] = []
    h = block.get_submodule(name).register_forward_hook(lambda _m, a, _o: got.append(a[0]))
    with torch.no_grad():
        block_output(block, x, kwargs)
    h.remove()
    return got[0]


def _clip_agreement(ref_clips: list, ours: dict[str, torch.Tensor | None], prefix: str,
                    block: nn.Module) -> float:
    """Share of (row, group) clip maxima that are equal (relative difference below 1e-4)."""
    same = total = 0
    for name, max_ref in ref_clips:
        mine = ours.get(prefix + name)
        if mine is None:
            continue
        max_ref = max_ref.reshape(mine.shape)
        same += int(((max_ref - mine).abs() <= 1e-4 * mine.abs()).sum())
        total += mine.numel()
    return same / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "awq-parity-cpu.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = _reference()
    src = models.resolve(MODEL)
    model = models.load_model(src)
    adapter = models.adapter_for(model.config.model_type)
    tok = models.load_tokenizer(src)
    ids = data.token_stream("abcnews-lee", tok, models.tokenizer_key(src))
    calib = data.calibration_windows(ids, args.windows, 512, seed=0)
    inps, kwargs = adapter.catch_inputs(model, calib)
    fmt = WeightFormat(args.bits, args.group_size, scale_dtype="float32")
    rows: list[dict[str, Any]] = []
    for i, block in enumerate(adapter.block_list(model)):
        if i in args.blocks:
            rows += parity_block(i, block, inps, kwargs[i], adapter, fmt, ref)
            print(pd.DataFrame(rows).tail(4).to_string(index=False), flush=True)
        if i >= max(args.blocks):
            break
        with torch.no_grad():
            inps = [block_output(block, x, kwargs[i]) for x in inps]
    pd.DataFrame(rows).to_csv(args.out, index=False, float_format="%.6g")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
