"""Multiple-choice accuracy: BIG-bench conversion, lm-eval wiring, an independent scorer, CLI.

The BIG-bench sdist is replaced by a small tar.gz fixture built here with the sdist's layout; the
examples are real news sentences (the true next sentence against distractors) so a trained tiny
model has something to score.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from suite.errors import DataError
from suite.evaluation import accuracy, tasks

ROOT = Path(__file__).resolve().parent.parent


def _toy_task(n: int = 24) -> dict:
    """Pick the sentence that follows a news sentence, among it and three random others."""
    from suite.data import load_documents

    sents = [s.strip() + "." for d in load_documents("abcnews-lee")[:40]
             for s in d.split(". ") if 30 < len(s) < 120]
    rng = random.Random(0)
    examples = []
    for i in range(n):
        true = sents[2 * i + 1]
        wrong = rng.sample([s for s in sents if s != true], 3)
        examples.append({"input": sents[2 * i],
                         "target_scores": {true: 1, **{w: 0 for w in wrong}}})
    examples.append({"input": "free text", "target": "no scores"})  # not multiple-choice
    return {"name": "toy", "task_prefix": "Continue the news.\n", "examples": examples}


def _sdist(path: Path, task_files: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, task in task_files.items():
            raw = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture(scope="module")
def toy(qbench_cache, tmp_path_factory) -> str:  # noqa: ANN001
    sdist = _sdist(tmp_path_factory.mktemp("bb") / "bigbench-1.0.0.tar.gz", {"toy": _toy_task()})
    tasks.convert_bigbench(["toy"], sdist=sdist)
    return "bigbench:toy"


def test_formatting_follows_bigbench_json_task():
    task = {"examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0, "3": 0}},
                         {"input": "pick", "target_scores": {"a": 1, "b": 1, "c": 0}}]}
    rows = tasks.format_examples(task)
    perm = np.random.RandomState(42).permutation(["3", "4", "5"])
    assert rows[0]["text"] == "\nQ: 2+2?" + "".join("\n  choice: " + c for c in perm) + "\nA: "
    assert rows[0]["choices"] == ["4", "5", "3"] and rows[0]["gold"] == [0]
    assert rows[1]["gold"] == [0, 1]  # every choice with the top score counts
    custom = {"task_prefix": "T:", "example_input_prefix": "In: ", "example_output_prefix": " Out:",
              "append_choices_to_input": False, "examples": task["examples"][:1]}
    assert tasks.format_examples(custom)[0]["text"] == "T:In: 2+2? Out:"


def test_conversion_writes_a_real_lm_eval_task(toy, qbench_cache, tmp_path):
    jsonl, yml = tasks.bigbench_files("toy")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 24 and sorted(r["idx"] for r in rows) == list(range(24))
    assert [r["idx"] for r in rows] != list(range(24))  # fixed shuffled order
    assert all(r["text"].startswith("Continue the news.\n\nQ: ") for r in rows)
    cfg = yaml.safe_load(yml.read_text())
    assert cfg["dataset_path"] == "json" and cfg["output_type"] == "multiple_choice"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(jsonl)
    fp = tasks.task_fingerprint(toy)
    assert fp["n_examples"] == 24 and len(fp["sha256"]) == 16
    with pytest.raises(DataError, match="bigbench:nope: no such task"):
        tasks.convert_bigbench(["nope"], sdist=_sdist(tmp_path / "s.tar.gz", {}))


def _own_scores(model, tok, row: dict) -> list[float]:  # noqa: ANN001
    """Summed log-probability of each choice after the prompt, one forward per choice."""
    ctx = row["text"].rstrip()
    lead = row["text"][len(ctx):]  # trailing whitespace moves to the continuation (as lm-eval)
    ctx_ids = tok(ctx)["input_ids"]
    out = []
    for choice in row["choices"]:
        ids = tok(ctx + lead + choice)["input_ids"]
        n = len(ids) - len(ctx_ids)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
        out.append(sum(float(logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]])
                       for j in range(n)))
    return out


def test_lm_eval_accuracy_matches_an_independent_scorer(toy, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    spec = {"type": "acc", "task": toy, "shots": 0, "limit": 20, "lm_eval": ""}
    out = accuracy.run_task(model, tok, spec, seed=0)
    accuracy.check_examples(out, 20)
    pids = {"acc": "acc/x/acc", "acc_norm": "acc/x/acc_norm"}
    rows = accuracy.metric_rows(out, pids, 0.0)
    jsonl, _ = tasks.bigbench_files("toy")
    docs = [json.loads(line) for line in jsonl.read_text().splitlines()][:20]
    want, want_norm = [], []
    for doc in docs:
        ll = _own_scores(model, tok, doc)
        lens = [len(c) for c in doc["choices"]]
        want.append(int(int(np.argmax(ll)) in doc["gold"]))
        want_norm.append(int(int(np.argmax(np.array(ll) / lens)) in doc["gold"]))
    acc, acc_norm = rows
    assert acc["outcomes"] == "".join(map(str, want))
    assert acc_norm["outcomes"] == "".join(map(str, want_norm))
    assert acc["value"] == pytest.approx(np.mean(want)) and acc["n_examples"] == 20
    assert acc["se"] == pytest.approx(np.std(want, ddof=1) / np.sqrt(20), rel=1e-6)
    with pytest.raises(DataError, match="scored 20 examples; the protocol asks for 21"):
        accuracy.check_examples(out, 21)


def test_accuracy_protocol_end_to_end_through_the_cli(toy, tiny_llama, tmp_path):
    evals = ("[{type: ppl, corpus: enwiki-gensim, seqlen: 64, windows: 4}, "
             "{type: acc, task: 'bigbench:toy', limit: 16}]")
    args = ["run", str(ROOT / "configs" / "smoke" / "tiny.yaml"), "--out", str(tmp_path / "res"),
            "--set", f"axes.model=[hf:{tiny_llama}]", "--set", f"run.store={tmp_path / 'rec'}",
            "--set", "axes.wbits=[4]", "--set", "axes.group_size=[32]",
            "--set", f"fixed.eval={evals}"]
    proc = subprocess.run([sys.executable, "-m", "suite.cli", *args], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "rec").glob("*.json")]
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs)
    for rec in recs:
        metrics = {m["metric"]: m for m in rec["metrics"]}
        assert set(metrics) == {"ppl", "acc", "acc_norm"}
        assert metrics["acc"]["n_examples"] == 16 and 0 <= metrics["acc"]["value"] <= 1
        assert metrics["acc"]["protocol"].startswith("acc/bigbench:toy/acc/0shot/n16/lm-eval-")
        assert rec["cell"]["evaluator_versions"]["acc"] == accuracy.ACC_VERSION
    table = (tmp_path / "res" / "smoke-tiny.md").read_text()
    assert "acc/bigbench:toy/acc_norm/0shot/n16" in table


def test_hub_task_offline_is_a_one_line_data_error(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    spec = {"type": "acc", "task": "lm-eval:piqa", "shots": 0, "limit": 4, "lm_eval": ""}
    with pytest.raises(DataError, match="lm-eval task 'lm-eval:piqa'") as err:
        accuracy.run_task(model, tok, spec)
    assert "\n" not in str(err.value)
