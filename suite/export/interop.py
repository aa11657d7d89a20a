"""llama.cpp as an independent evaluator and speed anchor (``nox -s interop``, issue 27).

Every number qbench publishes is computed by qbench's own code. Here an engine nobody here
wrote reads the exported GGUF of a published cell and computes the same perplexity protocol:
the same token windows (ids fed directly, no tokenizer in between), the mean next-token NLL of
each window from llama.cpp's logits, exp of their mean. ``results/interop-cpu.csv`` puts its
value next to the record's; a difference beyond llama.cpp's own arithmetic (it multiplies in
8-bit blocks with float16 activations quantized on the fly, where qbench's fake-quant model
multiplies in float32) would mean the exported file is not the model qbench measured.

The same run times greedy decoding (tokens/s, 2 threads) of llama.cpp and of qbench's packed
kernels side by side, in interleaved rounds (``suite.kernels.decode.interleaved_rates``):
``results/interop-decode-cpu.csv``, and llama.cpp rows in ``results/decode-cpu.csv``.

The same file is also read by transformers (its own GGUF loader): its logits on the first
window's first 128 tokens against qbench's fake-quant model (``hf_logits_rel``) and against that
model with every layer set to what the file stores (``hf_logits_rel_stored``: the float16
rounding of Q4_1's offsets is the one expected difference, so this column should be 0).

Cells: the published cells (``results/records``, grid ``reproduce``), GPTQ's static-groups
cells and decoupleQ W4 g64 (``configs/export.yaml``) whose format GGUF holds exactly
(``suite.export.command.precheck``), plus the FP row (the shipped Q4_1 file itself). A
cell the writer refuses after its re-run (GPTQ's act-order groups need ``g_idx``) is listed
with the refusal, never dropped silently.

A cell whose record was made on another CPU type and whose re-run here differs from it (GPTQ's
codes depend on the CPU's float arithmetic) is exported as this machine's re-run (``qbench
export --other-cpu``; ``rebuild_check`` says ``other-cpu``): the comparison is then between
the two engines on that file's model, ``qbench_ppl`` is qbench's value for it and
``record_ppl`` the published one. For every other row the two are equal.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from suite.errors import DataError, ExportRefused, QbenchError

THREADS = 2
DECODE_PROMPT = "The history of the city begins in the early"  # as benchmarks/test_bench_decode
DECODE_NEW_TOKENS = 32
DECODE_ROUNDS = 5
HF_TOKENS = 128  # tokens of the first window for the transformers logits check
CSV = Path("results/interop-cpu.csv")
DECODE_CSV = Path("results/interop-decode-cpu.csv")
COLUMNS = ["model", "method", "format", "run_key", "gguf_types", "protocol", "n_windows",
           "qbench_ppl", "record_ppl", "llamacpp_ppl", "rel_diff", "rebuild", "rebuild_check",
           "llamacpp_s",
           "hf_logits_rel", "hf_logits_rel_stored", "note"]


class LlamaCppLM:
    """A GGUF file in llama.cpp behind the two calls qbench's decode helpers make:
    ``generate`` (greedy) and ``__call__`` (logits of every position)."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int = THREADS) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                         n_threads=threads, n_threads_batch=threads, logits_all=True,
                         verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits of a fresh sequence."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def __call__(self, prompt: torch.Tensor) -> Any:
        return _Out(torch.from_numpy(self.logits(prompt[0].tolist()))[None])

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **_: Any) -> torch.Tensor:
        ids = prompt[0].tolist()
        self.llm.reset()
        self.llm.eval(ids)
        for _ in range(max_new_tokens):
            ids.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval(ids[-1:])
        return torch.tensor([ids])


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


def window_nlls(lm: LlamaCppLM, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window, as ``suite.evaluation.perplexity.window_nlls``."""
    out = []
    for w in windows:  # (seqlen,)
        logits = lm.logits(w.tolist()).astype(np.float64)  # (seqlen, vocab)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        tgt = w[1:].numpy()
        nll = logz[:-1] - logits[np.arange(len(tgt)), tgt]  # (seqlen - 1,)
        out.append(float(nll.mean()))
    return torch.tensor(out, dtype=torch.float64)


# --- start-up check ------------------------------------------------------------------------


def smoke(path: Path) -> None:
    """Load ``path`` and decode a few tokens in a child process: a build that crashes at the
    first inference (the native build on an AMX Xeon segfaulted) fails here, in one line."""
    code = ("import sys, torch; from suite.export.interop import LlamaCppLM; "
            "m = LlamaCppLM(sys.argv[1], 64); m.generate(torch.tensor([[1, 2, 3]]), 4)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else \
            (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]
        raise DataError(f"llama.cpp: the build fails at its first inference ({why}); rebuild "
                        "it with the flags in noxfile.py (LLAMA_CMAKE_ARGS)")


# --- the perplexity table ------------------------------------------------------------------


SOURCES = (("results/records", "reproduce"),
           ("results/export/records", "export-static-groups"),
           ("results/export/records", "export-decoupleq"))


def exportable_cells(sources: tuple[tuple[str, str], ...] = SOURCES) -> list[dict[str, Any]]:
    """The ok records of each (store, grid) whose format GGUF holds (by format alone), FP
    first, one per quantization identity (a cell run by two grids is exported once)."""
    from suite.export.command import precheck
    from suite.export.rebuild import quant_identity
    from suite.records import Store

    out, seen = [], set()
    for store, grid in sources:
        for rec in Store(store).all() if Path(store).is_dir() else []:
            ident = quant_identity(rec["cell"], rec["inputs"])
            if rec["grid"] != grid or rec["status"] != "ok" or ident in seen:
                continue
            try:
                precheck(rec, "gguf")
            except ExportRefused:
                continue
            seen.add(ident)
            out.append(rec)
    return sorted(out, key=lambda r: (r["cell"]["format"] is not None, r["cell"]["method"],
                                      str(r["cell"]["format"])))


def _ppl_protocol(rec: dict[str, Any]) -> tuple[str, dict[str, Any], float]:
    m = next(m for m in rec["metrics"] if m["metric"] == "ppl")
    return m["protocol"], rec["cell"]["protocols"][m["protocol"]], m["value"]


def _windows(rec: dict[str, Any], spec: dict[str, Any]) -> torch.Tensor:
    from suite import data, models

    src = models.resolve(rec["model"]["id"])
    return data.eval_windows(data.token_stream(spec["corpus"], None, models.tokenizer_key(src)),
                             spec["seqlen"], spec["windows"])


def _gguf_of(rec: dict[str, Any], work: Path) -> tuple[Path, dict[str, Any]]:
    """The GGUF of a record: the shipped file for the FP row, else ``qbench export``'s."""
    from suite.export.command import export
    from suite.models import MODELS

    if rec["cell"]["format"] is None:
        spec = MODELS.get(rec["model"]["id"], field="models")
        if spec.gguf_source is None:
            raise ExportRefused(f"{rec['model']['id']}: no shipped GGUF for its FP row")
        return spec.gguf_source(), {"how": "the shipped file", "check": [], "summary": {}}
    out = work / rec["run_key"]
    export(rec["run_key"], "gguf", str(out), force=True, other_cpu=True)
    report = json.loads((out / "qbench-export.json").read_text())
    return next(out.glob("*.gguf")), report


def gguf_types(path: Path) -> str:
    """The tensor types a GGUF file holds, read from the file: ``"F32:61 Q4_1:210"``."""
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


@torch.no_grad()
def hf_logit_diffs(rec: dict[str, Any], path: Path, tokens: torch.Tensor) -> dict[str, float]:
    """transformers' reading of the file vs qbench's model, relative max logit difference on
    ``tokens`` (1, n): against the fake-quant model (``hf_logits_rel``; the FP row: the model
    qbench loads) and against it with every layer set to what the file stores, float16 offsets
    included (``hf_logits_rel_stored``; 0 when the file is the model up to that rounding)."""
    from transformers import AutoModelForCausalLM

    from suite.export import rebuild, to_gguf
    from suite.models import load_model, resolve

    got = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=torch.float32).eval()(tokens).logits
    if rec["cell"]["format"] is None:
        ref = load_model(resolve(rec["model"]["id"])).eval()
        rel = _rel(got, ref(tokens).logits)
        return {"hf_logits_rel": rel, "hf_logits_rel_stored": rel}
    built = rebuild.rebuild(rec)
    model = built.model.eval()
    out = {"hf_logits_rel": _rel(got, model(tokens).logits)}
    for name, qs in built.qstate.items():
        layer = model.get_submodule(name)
        layer.weight.copy_(to_gguf.stored_weight(qs).reshape(layer.weight.shape))
    return {**out, "hf_logits_rel_stored": _rel(got, model(tokens).logits)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ppl_row(rec: dict[str, Any], work: Path) -> dict[str, Any]:
    """One row of the interop table (a refusal is a row with its reason)."""
    from suite.primitives import WeightFormat

    pid, spec, published = _ppl_protocol(rec)
    fmt = rec["cell"]["format"]
    row = {"model": rec["model"]["id"], "method": rec["cell"]["method"],
           "format": WeightFormat(**fmt).label() if fmt else "fp", "run_key": rec["run_key"],
           "protocol": pid, "n_windows": spec["windows"], "qbench_ppl": published}
    try:
        path, report = _gguf_of(rec, work)
    except ExportRefused as e:
        return {**row, "note": f"refused: {e}"}
    except DataError as e:  # e.g. the re-run is not the published model on this machine
        return {**row, "note": f"not exported: {' '.join(str(e).split())}"}
    windows = _windows(rec, spec)
    t0 = time.perf_counter()
    nll = window_nlls(LlamaCppLM(path, spec["seqlen"]), windows)
    ppl = math.exp(float(nll.mean()))
    seconds = time.perf_counter() - t0
    checks = "; ".join(f"{c['verdict']} ({c['rel_diff']:.1e})" for c in report["check"])
    # the file's own model: on another CPU type (check other-cpu) this machine's re-run
    mine = next((c["fresh"] for c in report["check"] if c["protocol"] == pid), published)
    return {**row, "qbench_ppl": mine, "record_ppl": published, "gguf_types": gguf_types(path),
            "llamacpp_ppl": ppl, "rel_diff": ppl / mine - 1, "rebuild": report["how"],
            "rebuild_check": checks, "llamacpp_s": seconds,
            **hf_logit_diffs(rec, path, windows[:1, :HF_TOKENS]), "note": ""}


# --- decode speed, in one run --------------------------------------------------------------


def decode_rows(fp_gguf: Path, w4_gguf: Path | None, rounds: int = DECODE_ROUNDS
                ) -> pd.DataFrame:
    """tokens/s of qbench fp32, qbench packed W4 g64 (RTN), llama.cpp on the shipped Q4_1 and
    on the exported W4 g64 file, timed in interleaved rounds in this process."""
    import copy

    from suite import models
    from suite.kernels import cpu, decode
    from suite.primitives import WeightFormat

    src = models.resolve("smollm2-135m-instruct@gguf-q4_1")
    model = models.load_model(src)
    prompt = models.load_tokenizer(src)(DECODE_PROMPT, return_tensors="pt").input_ids
    fmt = WeightFormat(4, 64)
    qstate = decode.rtn_qstate(models.adapter_for(model.config.model_type)
                               .target_layers(model), fmt)
    packed = copy.deepcopy(model)
    decode.pack_model(packed, qstate)
    backend = "+".join(sorted({m.backend for m in packed.modules()
                               if isinstance(m, cpu.PackedLinear)}))
    runs: dict[str, Any] = {"fp32/dense": model, f"w4g64/{backend}": packed,
                            "fp-q4_1/llama.cpp": LlamaCppLM(fp_gguf, 64)}
    if w4_gguf is not None:
        runs["w4g64/llama.cpp"] = LlamaCppLM(w4_gguf, 64)
    rates = decode.interleaved_rates(runs, prompt, DECODE_NEW_TOKENS, rounds)
    rows = [{"model": src.id, **row, "rounds": rounds, "new_tokens": DECODE_NEW_TOKENS,
             "threads": torch.get_num_threads()} for row in decode.rate_rows(rates)]
    return pd.DataFrame(rows)


def _merge_decode_table(df: pd.DataFrame, path: Path = Path("results/decode-cpu.csv")) -> None:
    """Replace the llama.cpp rows of the decode table with this run's."""
    table = pd.read_csv(path)
    table = table[table["backend"] != "llama.cpp"]
    new = df[df["backend"] == "llama.cpp"].reindex(columns=table.columns)
    pd.concat([table, new]).to_csv(path, index=False, float_format="%.6g")


# --- entry point ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m suite.export.interop", description=__doc__
                                .split("\n\n")[0])
    p.add_argument("--keys", nargs="*", default=None, metavar="KEY",
                   help="run keys to export (default: every published cell GGUF holds); their rows "
                   "replace those of the same keys in the table, the others stay")
    p.add_argument("--work", default=None, help="folder for the exported files (default: the "
                   "qbench cache)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode-speed table")
    p.add_argument("--rounds", type=int, default=DECODE_ROUNDS, help="decode timing rounds")
    return p


def main(argv: list[str] | None = None) -> int:
    """Build check, perplexity table, decode table; one line and exit 2 on a user error."""
    from suite.assets import cache_dir
    from suite.export.rebuild import locate
    from suite.models import MODELS

    args = _parser().parse_args(argv)
    torch.set_num_threads(THREADS)
    try:
        fp_gguf = MODELS.get("smollm2-135m-instruct@gguf-q4_1").gguf_source()
        smoke(fp_gguf)
        recs = [locate(k) for k in args.keys] if args.keys else exportable_cells()
        work = Path(args.work) if args.work else cache_dir() / "interop"
        work.mkdir(parents=True, exist_ok=True)
        rows = [_progress(ppl_row(r, work)) for r in recs]
    except QbenchError as e:
        print(f"interop: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    if args.keys and CSV.exists():  # named cells replace their rows; the others stay
        old = pd.read_csv(CSV)
        table = pd.concat([old[~old["run_key"].isin(table["run_key"])], table])
    table.to_csv(CSV, index=False, float_format="%.6g")
    print(table.to_string(index=False))
    if not args.no_decode:
        w4 = next((work / r["run_key"] for r in rows if r["method"] == "rtn"
                   and r["format"] == "w4g64" and not r.get("note")), None)
        dec = decode_rows(fp_gguf, next(w4.glob("*.gguf")) if w4 else None, args.rounds)
        dec.to_csv(DECODE_CSV, index=False, float_format="%.6g")
        _merge_decode_table(dec)
        print(dec.to_string(index=False))
    return 0


def _progress(row: dict[str, Any]) -> dict[str, Any]:
    print(f"interop: {row['method']} {row['format']}: qbench {row['qbench_ppl']:.4f}, "
          f"llama.cpp {row.get('llamacpp_ppl', float('nan')):.4f} {row.get('note', '')}",
          file=sys.stderr, flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
