"""GPTQ codes at 1 vs 2 threads: how many differ, what it costs to make them agree, and where
the differences come from (issue 23, "reproducibility off the original machine").

Runs GPTQ W4 g64 act-order on the embedded model (SmolLM2-135M-Instruct) with the calibration
of ``configs/reproduce.yaml`` (64 windows x 512 tokens of abcnews-lee, seed 0), once per
setting (threads x ``hessian_dtype`` x ``MKL_CBWR``), each in its own process (MKL reads
``MKL_CBWR`` when it loads). Each run stores every layer's codes and a hash of every quantity
on the way to them: the block's inputs, H as accumulated, the permuted H that enters the
Cholesky, U, and the codes, so the first quantity that differs between two runs names the
stage the difference comes from (H accumulation, Cholesky, the sweep, or the block forward
that feeds the next block).

Not a unit test and not part of ``nox -s bench``: a measurement, run by hand::

    nice -n 10 .nox/qbench/bin/python benchmarks/gptq_threads.py run-all --blocks 30 \\
        --out /tmp/gptq-threads --setting float32:- --setting float64:- \\
        --setting float32:COMPATIBLE --setting float32:AVX2 --setting float32:AVX2,STRICT
    .nox/qbench/bin/python benchmarks/gptq_threads.py compare /tmp/gptq-threads
    nice -n 10 .nox/qbench/bin/python benchmarks/gptq_threads.py cost --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct@gguf-q4_1"
CBWR_DEFAULT = "-"  # MKL_CBWR unset


def _digest(*tensors: Any) -> str:
    """Hash of the tensors' bytes (bit-identity, not closeness)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class _Trace:
    """Hashes and timings collected by wrapping the pipeline's Hessian and Cholesky steps;
    ``accumulate`` overrides the pipeline's accumulation dtype (H is cast for the solve)."""

    def __init__(self, accumulate: Any = None) -> None:
        self.accumulate = accumulate
        self.inputs: list[str] = []  # per block: hash of its calibration inputs
        self.hessian: dict[str, str] = {}  # per layer: H as accumulated
        self.first_block_h: dict[str, Any] = {}  # block 0's H tensors (for the size of diffs)
        self.chol_in: list[str] = []  # per layer, in order: the permuted H entering Cholesky
        self.chol_out: list[str] = []  # per layer, in order: U (in the Hessian's dtype)
        self.u32: list[str] = []  # per layer, in order: U as float32 (what the sweep uses)
        self.t_hessian = self.t_cholesky = 0.0

    def install(self) -> None:
        """Wrap ``suite.sequential.collect_hessians`` and ``inverse_cholesky`` as GPTQ calls it
        (``baselines.gptq.inverse_cholesky``, imported there from ``suite.primitives``)."""
        import baselines.gptq as gptq
        import suite.sequential as seq

        collect, inverse = seq.collect_hessians, gptq.inverse_cholesky

        def traced_collect(block, layers, inps, kwargs, batch=8, dtype=None):  # noqa: ANN001, ANN202
            self.inputs.append(_digest(*inps))
            t0 = time.perf_counter()
            H = collect(block, layers, inps, kwargs, batch, self.accumulate or dtype)
            self.t_hessian += time.perf_counter() - t0
            for name, h in H.items():
                self.hessian[name] = _digest(h)
                if len(self.inputs) == 1:
                    self.first_block_h[name] = h.clone()
            return H

        def traced_inverse(H, percdamp, max_escalations):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()
            out = inverse(H, percdamp, max_escalations)
            self.t_cholesky += time.perf_counter() - t0
            self.chol_in.append(_digest(H))
            self.chol_out.append(_digest(out[0]))
            self.u32.append(_digest(out[0].float()))
            return out

        seq.collect_hessians, gptq.inverse_cholesky = traced_collect, traced_inverse


class _FirstBlocks:
    """A model adapter that hands the pipeline only the first ``n`` blocks."""

    def __init__(self, adapter: Any, n: int) -> None:
        self.adapter, self.n = adapter, n

    def catch_inputs(self, model: Any, calib: Any) -> Any:
        return self.adapter.catch_inputs(model, calib)

    def pipeline(self, model: Any, true_sequential: bool) -> list:
        return self.adapter.pipeline(model, true_sequential)[: self.n]

    def block_norms(self, block: Any) -> list:
        return self.adapter.block_norms(block)


def run_one(threads: int, dtype: str, blocks: int, out: Path) -> None:
    """One setting, in this process: quantize and save codes, hashes and timings to ``out``."""
    import torch

    from baselines.gptq import GPTQ, GPTQConfig
    from suite import data, models
    from suite.interface import MethodData, RunContext, Seeds
    from suite.primitives import WeightFormat

    torch.set_num_threads(threads)
    mixed = dtype == "mixed"  # accumulate float32, solve (damping, Cholesky, inverse) float64
    src = models.resolve(MODEL)
    model = models.load_model(src)
    adapter = models.adapter_for(model.config.model_type)
    ids = data.token_stream("abcnews-lee", models.load_tokenizer(src), models.tokenizer_key(src))
    calib = data.calibration_windows(ids, 64, 512, Seeds.derive(0).calib)
    trace = _Trace(torch.float32 if mixed else None)
    trace.install()
    method = GPTQ(GPTQConfig(act_order=True, hessian_dtype="float64" if mixed else dtype),
                  WeightFormat(4, 64))
    ctx = RunContext(torch.device("cpu"), Seeds.derive(0), _FirstBlocks(adapter, blocks))
    t0, c0 = time.perf_counter(), time.process_time()
    result = method.quantize(model, MethodData(calib=calib), ctx)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.save({
        "threads": torch.get_num_threads(), "dtype": dtype, "blocks": blocks,
        "mkl_cbwr": os.environ.get("MKL_CBWR", CBWR_DEFAULT),
        "windows_fp": data.fingerprint_tokens(calib), "wall_s": wall,
        "cpu_s": cpu,
        "hessian_s": trace.t_hessian, "cholesky_s": trace.t_cholesky,
        "codes": {n: s.codes for n, s in result.qstate.items()},
        "scale": {n: s.scale for n, s in result.qstate.items()},
        "inputs": trace.inputs, "hessian": trace.hessian, "chol_in": trace.chol_in,
        "chol_out": trace.chol_out, "u32": trace.u32, "first_block_h": trace.first_block_h,
    }, out)


def _name(threads: int, dtype: str, cbwr: str) -> str:
    return f"t{threads}-{dtype}-cbwr{cbwr}.pt"


def run_all(settings: list[tuple[str, str]], blocks: int, out_dir: Path) -> None:
    """Each (dtype, MKL_CBWR) at 1 and 2 threads, one child process per run, one at a time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for (dtype, cbwr), threads in itertools.product(settings, (1, 2)):
        path = out_dir / _name(threads, dtype, cbwr)
        if path.exists():
            continue
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": str(ROOT)}
        env.pop("MKL_CBWR", None)
        if cbwr != CBWR_DEFAULT:
            env["MKL_CBWR"] = cbwr
        cmd = [sys.executable, __file__, "run", "--threads", str(threads), "--dtype", dtype,
               "--blocks", str(blocks), "--out", str(path)]
        print(f"{path.name} ...", flush=True)
        subprocess.run(cmd, env=env, check=True)


def _first_difference(a: dict, b: dict, layer: str, index: int, block: int) -> str:
    """The earliest stage at which layer ``layer`` (``index``-th solved) differs."""
    stages = [("block inputs", a["inputs"][block], b["inputs"][block]),
              ("H accumulation", a["hessian"][layer], b["hessian"][layer]),
              ("permuted H", a["chol_in"][index], b["chol_in"][index]),
              ("U (Hessian dtype)", a["chol_out"][index], b["chol_out"][index]),
              ("U as float32", a["u32"][index], b["u32"][index]),
              ("codes (sweep)", _digest(a["codes"][layer]), _digest(b["codes"][layer]))]
    return next((name for name, x, y in stages if x != y), "identical")


def compare(a: dict, b: dict, blocks: int | None = None) -> dict[str, Any]:
    """Share of differing codes between two runs (over their first ``blocks`` blocks), per
    block, the stage at which each layer first differs, and how far block 0's H differ."""
    layers = list(a["codes"])
    per_block = len(layers) // len(a["inputs"])
    n_blocks = min(blocks or len(a["inputs"]), len(a["inputs"]), len(b["inputs"]))
    layers = layers[: n_blocks * per_block]
    diff = {n: int((a["codes"][n] != b["codes"][n]).sum()) for n in layers}
    total = sum(a["codes"][n].numel() for n in layers)
    origin = {n: _first_difference(a, b, n, i, i // per_block) for i, n in enumerate(layers)}
    first = next((n for n in layers if diff[n]), None)
    h_rel = {n: float((a["first_block_h"][n].double() - b["first_block_h"][n].double()).abs()
                      .max() / a["first_block_h"][n].double().abs().max())
             for n in a["first_block_h"]}
    by_block = [layers[k : k + per_block] for k in range(0, len(layers), per_block)]
    return {
        "blocks_compared": n_blocks, "codes": total, "differing": sum(diff.values()),
        "share": sum(diff.values()) / total,
        "share_by_block": [round(sum(diff[n] for n in blk)
                                 / sum(a["codes"][n].numel() for n in blk), 4)
                           for blk in by_block],
        "layers_differing": sum(v > 0 for v in diff.values()), "layers": len(layers),
        "first_block_differs": any(diff[n] for n in layers[:per_block]),
        "first_block_h_identical": all(v == 0.0 for v in h_rel.values()),
        "first_block_h_max_rel_diff": max(h_rel.values()),
        "first_layer_with_differing_codes": first and f"{first}: from {origin[first]}",
        "first_stage_that_differs": {  # per layer (all layers, codes differing or not)
            o: sum(v == o for v in origin.values()) for o in sorted(set(origin.values()))},
    }


def report(out_dir: Path, blocks: int | None = None) -> list[dict[str, Any]]:
    """1 vs 2 threads for every setting found in ``out_dir``, plus wall times."""
    import torch

    rows = []
    for one in sorted(out_dir.glob("t1-*.pt")):
        two = one.with_name("t2" + one.name[2:])
        if not two.exists():
            continue
        a, b = torch.load(one), torch.load(two)
        assert a["windows_fp"] == b["windows_fp"]
        rows.append({"setting": one.name[3:-3], "blocks": a["blocks"],
                     "wall_s_1t": round(a["wall_s"], 1), "wall_s_2t": round(b["wall_s"], 1),
                     "cpu_s_1t": round(a["cpu_s"], 1), "cpu_s_2t": round(b["cpu_s"], 1),
                     "hessian_s_1t": round(a["hessian_s"], 1),
                     "hessian_s_2t": round(b["hessian_s"], 1),
                     "cholesky_s_1t": round(a["cholesky_s"], 2),
                     "cholesky_s_2t": round(b["cholesky_s"], 2), **compare(a, b, blocks)})
    return rows


def cost(repeats: int) -> list[dict[str, Any]]:
    """What float64 adds per layer, in this process's threads: H accumulation over 64 x 512
    tokens (8 batches of 8 windows, as the pipeline) and damping + Cholesky + inverse, for
    SmolLM2-135M's two input widths; median over ``repeats`` interleaved rounds. CPU time as
    well as wall time, since the machine may be shared."""
    import statistics

    import torch

    from baselines.gptq import HESSIAN_DTYPES
    from suite.primitives import inverse_cholesky
    from suite.sequential import HessianAccumulator

    gen = torch.Generator().manual_seed(0)
    rows = []
    for cols in (576, 1536):
        batches = [torch.randn(8, 512, cols, generator=gen) * torch.linspace(0.1, 2, cols)
                   for _ in range(8)]
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(repeats):
            for name, dtype in HESSIAN_DTYPES.items():
                acc = HessianAccumulator(cols, torch.device("cpu"), dtype)
                with _timed(times, name, "accumulate"):
                    for x in batches:
                        acc.add(x)
                with _timed(times, name, "cholesky"):
                    inverse_cholesky(acc.H, 0.01, 4)[0].float()
        for (name, stage), ts in sorted(times.items()):
            rows.append({"cols": cols, "dtype": name, "stage": stage,
                         "threads": torch.get_num_threads(),
                         "wall_ms": round(1e3 * statistics.median(t[0] for t in ts), 1),
                         "cpu_ms": round(1e3 * statistics.median(t[1] for t in ts), 1)})
    return rows


@contextlib.contextmanager
def _timed(times: dict, name: str, stage: str) -> Iterator[None]:
    """Appends (wall, cpu) seconds of the ``with`` body to ``times[(name, stage)]``."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    times.setdefault((name, stage), []).append(
        (time.perf_counter() - t0, time.process_time() - c0))


def main(argv: list[str] | None = None) -> None:
    """``run`` (one setting, this process), ``run-all`` (child processes), ``compare``, ``pair``,
    ``cost`` (float64's extra time per layer)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("run")
    one.add_argument("--threads", type=int, required=True)
    one.add_argument("--dtype", choices=("float32", "float64", "mixed"), required=True,
                     help="hessian_dtype, or mixed: accumulate float32, solve float64")
    one.add_argument("--blocks", type=int, default=30)
    one.add_argument("--out", type=Path, required=True)
    every = sub.add_parser("run-all")
    every.add_argument("--blocks", type=int, default=30)
    every.add_argument("--out", type=Path, required=True)
    every.add_argument("--setting", action="append",
                       help="dtype:MKL_CBWR ('-' = unset), repeatable; default float32:- and "
                            "float64:-")
    cmp = sub.add_parser("compare")
    cmp.add_argument("out", type=Path)
    cmp.add_argument("--blocks", type=int, help="compare only the first N blocks")
    pair = sub.add_parser("pair", help="compare two runs (e.g. two MKL_CBWR branches)")
    pair.add_argument("a", type=Path)
    pair.add_argument("b", type=Path)
    pair.add_argument("--blocks", type=int)
    cst = sub.add_parser("cost")
    cst.add_argument("--threads", type=int, default=1)
    cst.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.cmd == "cost":
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(cost(args.repeats), indent=1))
    elif args.cmd == "run":
        run_one(args.threads, args.dtype, args.blocks, args.out)
    elif args.cmd == "run-all":
        settings = [tuple(s.split(":")) for s in args.setting or ("float32:-", "float64:-")]
        run_all(settings, args.blocks, args.out)  # type: ignore[arg-type]
    elif args.cmd == "pair":
        import torch

        print(json.dumps(compare(torch.load(args.a), torch.load(args.b), args.blocks), indent=1))
    else:
        print(json.dumps(report(args.out, args.blocks), indent=1))


if __name__ == "__main__":
    main()
