"""The GPU check's CPU half (issue 25): the carry folder's wheels and size, the device command,
the seeded tiny model, the tiny grid on the CPU at reduced size (the same code as the full
check), the GPU half's verify step, its clean skip without CUDA, and the second speedup column.
About 45 s on 2 cores, most of it the 11-cell grid."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from suite import speed
from suite.gpucheck import CARRY, build, carry, parts, tinyllm
from suite.models import dir_fingerprint
from suite.primitives import WeightFormat

ROOT = Path(__file__).resolve().parent.parent


def test_device_command_fits_the_machine() -> None:
    cmd = carry.device_command()
    assert len(cmd) <= carry.COMMAND_MAX_CHARS
    limits = [int(t) for t in re.findall(r"timeout(?: -k \d+)? (\d+)", cmd)]
    assert limits and max(limits) <= 540
    assert "--no-index --no-deps" in cmd and "$OUT" in cmd
    assert "-m suite.gpucheck gpu" in cmd
    budget = int(re.search(r"--budget (\d+)", cmd).group(1))
    assert budget < max(limits)
    assert carry.carry_paths() == [CARRY]


def test_gpu_half_boxes_fit_its_budget() -> None:
    assert sum(parts.BOXES.values()) <= carry.DEVICE_TIMEOUT_S - 15


def test_wheels_are_what_the_image_lacks_at_the_locked_versions(tmp_path: Path) -> None:
    assert carry.missing_from_image(["torch", "gguf", "lm_eval", "PyYAML", "submitit"]) == [
        "gguf", "lm_eval", "submitit"]
    reqs = carry.pinned(["gguf", "lm_eval"], ROOT / "constraints.txt")
    assert all(re.fullmatch(r"[\w-]+==[\w.]+", r) for r in reqs)
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str]) -> None:
        calls.append(cmd)
        (tmp_path / "gguf-0.19.0-py3-none-any.whl").write_bytes(b"wheel")

    wheels = carry.download_wheels(reqs, tmp_path, fake_pip)
    assert [w.name for w in wheels] == ["gguf-0.19.0-py3-none-any.whl"]
    cmd = calls[0]
    assert cmd[cmd.index("--python-version") + 1] == "3.12"
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert "manylinux2014_x86_64" in cmd and cmd[-len(reqs):] == reqs
    assert carry.download_wheels([], tmp_path, fake_pip) == [] and len(calls) == 1


def test_gpu_half_needs_nothing_the_image_lacks() -> None:
    """Measured: the GPU half imports no lm-eval, gguf, gensim, datasets, submitit or plots."""
    used = carry.imported_distributions(ROOT)
    assert {"torch", "pandas", "pyyaml"} <= set(used)
    assert not {"lm-eval", "gguf", "gensim", "datasets", "submitit", "matplotlib"} & set(used)
    assert carry.missing_from_image(used) == []


def test_size_report_counts_tree_and_carry_not_ignored_files(tmp_path: Path) -> None:
    git = ["git", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / ".gitignore").write_text("build/\n.gpu-carry/\n")
    (tmp_path / "tracked.py").write_bytes(b"x" * 1000)
    subprocess.run([*git, "add", "tracked.py", ".gitignore"], check=True)
    (tmp_path / "untracked.txt").write_bytes(b"y" * 300)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "big.bin").write_bytes(b"z" * 5000)  # ignored: not sent
    (tmp_path / CARRY / "wheels").mkdir(parents=True)
    (tmp_path / CARRY / "wheels" / "a.whl").write_bytes(b"w" * 700)
    size = carry.size_report(tmp_path, tmp_path / CARRY)
    gitignore = (tmp_path / ".gitignore").stat().st_size
    assert size["tree"] == 1000 + 300 + gitignore
    assert size["carry"] == 700 and size["total"] == size["tree"] + 700
    assert size["limit"] == 64 << 20


def test_seeded_model_is_byte_identical_and_loads(tmp_path: Path) -> None:
    spec = tinyllm.TinySpec(hidden=32, ffn=64, blocks=1, heads=2, vocab=300)
    template = tmp_path / "template"
    template.mkdir()
    (template / "config.json").write_text(json.dumps(spec.config()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (template / name).write_text("{}")
    a = tinyllm.materialise(template, tmp_path / "a")
    b = tinyllm.materialise(template, tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert dir_fingerprint(a) == dir_fingerprint(b)
    from safetensors.torch import load_file

    tensors = load_file(a / "model.safetensors")
    assert set(tensors) == set(tinyllm.weight_shapes(spec.config()))
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (32, 64)
    std = tensors["model.layers.0.mlp.gate_proj.weight"].std().item()
    assert 0.7 / 32**0.5 < std < 1.3 / 32**0.5


@pytest.fixture(scope="module")
def small_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the carry prepared at reduced size and the CPU half's LM grid run."""
    root = tmp_path_factory.mktemp("gpucheck-root")
    shutil.copyfile(ROOT / "constraints.txt", root / "constraints.txt")
    build.prepare_carry(root, tinyllm.SMALL, wheels=False, vision=False)
    parts.cpu_half(root, root / "build" / "gpucheck", vision=False)
    return root


def test_cpu_half_runs_every_ptq_path(small_check: Path) -> None:
    table = pd.read_csv(small_check / "build" / "gpucheck" / "tables-lm-cpu" / "gpucheck-lm.csv")
    assert set(table["method"]) == {"fp", "rtn", "gptq", "decoupleq", "precalibration",
                                    "precalibration+gptq"}
    assert len(table) == 11 and (table["status"] == "ok").all()
    assert table["protocol"].str.startswith("ppl/local:gpucheck-eval/").all()
    fp = float(table.loc[table["method"] == "fp", "value"].iloc[0])
    assert (table["value"] != fp).sum() == 10  # every quantized cell moved the model
    carried = small_check / CARRY
    assert len(list((carried / "cpu-records-lm").glob("*.json"))) == 11
    assert list((carried / "cache" / "tokens").glob("*.pt"))  # no tokenizer needed there


def test_gpu_half_verify_step_lines_up_with_the_cpu_records(small_check: Path,
                                                           tmp_path: Path) -> None:
    """The lm-grid part's commands (run on the CPU here): every cell found done, then verify
    classes each value against the carried CPU records (identical on the same machine)."""
    out = tmp_path / "gpu"
    shutil.copytree(small_check / CARRY / "cpu-records-lm", out / "records-lm-cpu")
    status = parts.run_part("lm-grid", small_check, out, 300, device="cpu")
    assert status == "ok"
    verdicts = pd.read_csv(out / "lm-agreement.csv")
    assert len(verdicts) == 11 and (verdicts["verdict"] == "identical").all()
    with (out / "parts.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert row["part"] == "lm-grid" and row["status"] == "ok" and row["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_half_skips_cleanly_without_cuda(tmp_path: Path) -> None:
    assert parts.gpu_half(ROOT, tmp_path, 100) == 0
    rows = pd.read_csv(tmp_path / "parts.csv")
    assert list(rows["part"]) == list(parts.BOXES)
    assert (rows["status"] == "skipped (no CUDA device)").all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_part_on_cuda(tmp_path: Path) -> None:
    """One shape of the GPU kernel table (the full table is the GPU check's own part)."""
    from suite.kernels import gpu_bench

    rows = gpu_bench.shape_rows("256x512", (256, 512), [WeightFormat(4, 64)], (1,),
                                gpu_bench.read_bandwidth(1 << 26))
    assert {r["status"] for r in rows} == {"ok"}
    assert gpu_bench.copy_bandwidth(1 << 26) > 0


def _board(formats: list[tuple[int, str]]) -> pd.DataFrame:
    return pd.DataFrame([{"model": "smollm2-135m-instruct@gguf-q4_1", "method": m, "wbits": b,
                          "abits": 16, "group_size": g, "sym": False} for m, b, g in
                         [("fp", 16, "")] + [("rtn", b, g) for b, g in formats]])


def _kernels(path: Path, fp32_us: float, w4_us: float) -> Path:
    label = WeightFormat(4, 64).label()
    rows = [{"out": o, "in": i, "M": 1, "format": f, "backend": "cublas" if f == "fp32" else
             "triton-bf16", "status": "ok", "median_us": us}
            for o, i in ((576, 576), (192, 576), (1536, 576), (576, 1536))
            for f, us in (("fp32", fp32_us), (label, w4_us))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_second_speedup_column_joins_only_when_the_gpu_table_exists(tmp_path: Path) -> None:
    first = speed.join(_board([(4, "64"), (3, "64")]), _kernels(tmp_path / "cpu.csv", 8, 2),
                       "cpu")
    same = speed.join_second(first, tmp_path / "gpu" / "kernels-cuda.csv")
    assert list(same.board.columns) == [*first.board.columns, *speed.SECOND_COLUMNS]
    assert same.board["speedup_cuda"].isna().all()  # absent: declared, empty
    gpu = speed.join_second(first, _kernels(tmp_path / "gpu" / "kernels-cuda.csv", 10, 1))
    board = gpu.board
    assert board["speedup"].tolist()[:2] == [1.0, 4.0]
    assert board["speedup_cuda"].tolist()[:2] == [1.0, 10.0]
    assert pd.isna(board["speedup_cuda"].iloc[2])  # W3 g64 not in the GPU table
    assert "speedup_cuda" in gpu.caveats[-1]
