"""``qbench export`` end to end: a grid run on the tiny LLaMA, each cell re-created from its
run key and written as GGUF and compressed-tensors; bad inputs fail in one line, exit 2 and
write nothing (issue 27). The writers' formats are tested in test_export_gguf.py and
test_export_ctensors.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from suite.cli import main
from suite.records import Store

GRID = """
name: export-tiny
description: tiny LLaMA cells for the export tests
axes:
  model: [hf:{model}]
  method: [fp, rtn, gptq, "gptq:static", decoupleq]
  wbits: [4, 3]
  group_size: [64]   # the W4 g64 cells of the published export grids
  seed: [0]
exclude:
  - {{method: rtn, wbits: 3}}
  - {{method: "gptq:static", wbits: 3}}
  - {{method: decoupleq, wbits: 3}}
fixed:
  calib: {{corpus: abcnews-lee, windows: 8, seqlen: 64}}
  eval:
    - {{type: ppl, corpus: enwiki-gensim, seqlen: 64, windows: 8}}
methods:
  gptq: {{act_order: true}}
  "gptq:static": {{act_order: true, static_groups: true}}
  decoupleq: {{max_iter_num: 2, blockwise_epochs: 1}}  # (trained norms: not only layer states)
run:
  store: {store}
  threads: 2
  timeout_s: 600
"""


@pytest.fixture(scope="module")
def grid(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Store]:
    """The tiny grid, run once: its YAML and its store."""
    root = tmp_path_factory.mktemp("export")
    cfg = root / "grid.yaml"
    cfg.write_text(GRID.format(model=tiny_llama, store=root / "records"))
    assert main(["run", str(cfg), "--out", str(root / "tables")]) == 0
    return cfg, Store(root / "records")


def _key(store: Store, method: str, bits: int | None) -> str:
    for rec in store.all():
        fmt = rec["cell"]["format"]
        if rec["cell"]["method"] == method and (fmt["bits"] if fmt else None) == bits:
            return rec["run_key"]
    raise AssertionError(f"no {method} w{bits} record")


def _export(grid: tuple[Path, Store], key: str, fmt: str, out: Path, *extra: str) -> int:
    cfg, store = grid
    return main(["export", key, "--format", fmt, "--out", str(out), "--store", str(store.root),
                 "--config", str(cfg), *extra])


@pytest.mark.parametrize(("method", "fmt"), [
    ("rtn", "gguf"), ("rtn", "compressed-tensors"), ("gptq:static", "gguf"),
    ("gptq:static", "compressed-tensors"), ("decoupleq", "gguf")])
def test_export_recreates_the_cell_and_checks_it(grid, tmp_path: Path, method: str, fmt: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    key = _key(grid[1], method, 4)
    out = tmp_path / "out"
    assert _export(grid, key, fmt, out) == 0
    report = json.loads((out / "qbench-export.json").read_text())
    assert report["qbench.run_key"] == key and report["qbench.format"] == "w4g64"
    assert report["how"] in ("re-ran the cell", "cached re-run")
    # same machine, same thread count: the re-run is the published model, bit for bit
    assert [c["verdict"] for c in report["check"]] == ["identical"]
    assert "perplexity vs the record: identical" in capsys.readouterr().out
    files = {p.suffix for p in out.iterdir()}
    assert (".gguf" in files) if fmt == "gguf" else (".safetensors" in files)
    assert _provenance(out, fmt)["qbench.run_key"] == key
    _check_logits(grid, key, fmt, out)


def _provenance(out: Path, fmt: str) -> dict[str, object]:
    """The ``qbench.*`` keys as the file itself holds them (GGUF metadata, safetensors header);
    for compressed-tensors, config.json's ``qbench`` object must say the same."""
    if fmt == "gguf":
        from gguf import GGUFReader

        fields = GGUFReader(next(out.glob("*.gguf"))).fields
        return {k: f.contents() for k, f in fields.items() if k.startswith("qbench.")}
    from safetensors import safe_open

    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        header = {k: v for k, v in f.metadata().items() if k.startswith("qbench.")}
    config = json.loads((out / "config.json").read_text())["qbench"]
    assert header == {f"qbench.{k}": str(v) for k, v in config.items()}
    return header


def _check_logits(grid: tuple[Path, Store], key: str, fmt: str, out: Path) -> None:
    """transformers loads the export; its logits vs the re-created fake-quant model: equal for
    compressed-tensors (1e-4); for GGUF, every loaded weight is the file's d * q + m exactly,
    so the float16 rounding of m is the only difference (logits within 1e-2, measured 2-3e-3
    in test_export_gguf.py)."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from suite.export import rebuild, to_gguf

    ref = rebuild.rebuild(grid[1].get(key), configs=(str(grid[0]),)).model
    ids = torch.arange(1, 33)[None]
    if fmt == "gguf":
        path = next(out.glob("*.gguf"))
        got = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32)
        for name, layer in to_gguf.read_qstate(path).items():
            w = layer.d.repeat(32, 1) * layer.codes + (0 if layer.m is None else
                                                       layer.m.repeat(32, 1))
            assert torch.equal(got.get_submodule(name).weight, torch.from_numpy(w).float())
        tol = 1e-2
    else:
        got = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
        tol = 1e-4
    with torch.no_grad():
        a, b = got(ids).logits, ref(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) <= tol


def test_a_second_export_reuses_the_re_run(grid, tmp_path: Path) -> None:
    key = _key(grid[1], "rtn", 4)
    assert _export(grid, key, "gguf", tmp_path / "a") == 0
    assert _export(grid, key, "compressed-tensors", tmp_path / "b") == 0
    report = json.loads((tmp_path / "b" / "qbench-export.json").read_text())
    assert report["how"] == "cached re-run"
    assert [c["verdict"] for c in report["check"]] == ["identical"]


def test_a_grid_that_keeps_its_states_needs_no_re_run(tiny_llama: Path, tmp_path: Path
                                                     ) -> None:
    """``run.keep_qstate``: the runner leaves each cell's state behind; export uses it (no
    re-run), still checks it against the record, and says so. Seed 1: keys of their own."""
    from suite import qstate_cache

    cfg = tmp_path / "keep.yaml"
    text = GRID.format(model=tiny_llama, store=tmp_path / "records").replace(
        "seed: [0]", "seed: [1]").replace("timeout_s: 600", "timeout_s: 600\n  keep_qstate: true")
    cfg.write_text(text.replace('method: [fp, rtn, gptq, "gptq:static", decoupleq]',
                                "method: [fp, rtn, decoupleq]"))
    assert main(["run", str(cfg), "--out", str(tmp_path / "tables")]) == 0
    store = Store(tmp_path / "records")
    assert not qstate_cache.path_for(_key(store, "fp", None)).exists()  # nothing to keep
    for method in ("rtn", "decoupleq"):
        key = _key(store, method, 4)
        assert qstate_cache.load(qstate_cache.path_for(key))[2] == "kept by the run"
        assert _export((cfg, store), key, "gguf", tmp_path / method) == 0
        report = json.loads((tmp_path / method / "qbench-export.json").read_text())
        assert report["how"] == "kept by the run"
        assert [c["verdict"] for c in report["check"]] == ["identical"]


def _one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> None:
    """One ``qbench: error:`` line, the last one (model-loading progress bars may precede it)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert sum(line.startswith("qbench: error") for line in err) == 1, err
    assert err[-1].startswith("qbench: error: ") and all(w in err[-1] for w in words), err


def test_gguf_refuses_act_order_groups_after_the_re_run(grid, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _export(grid, _key(grid[1], "gptq", 4), "gguf", out) == 2
    _one_line_error(capsys, "static_groups")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing, not even a temp folder


def test_gguf_refuses_3_bit_before_loading_anything(grid, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _export(grid, _key(grid[1], "gptq", 3), "gguf", out) == 2
    _one_line_error(capsys, "w3g64", "Q4_1")
    assert "re-creating" not in capsys.readouterr().err and not out.exists()


def test_bad_inputs_fail_in_one_line_and_write_nothing(grid, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    key = _key(grid[1], "rtn", 4)
    cases = [("0123456789abcdef0123", "gguf", "none of the stores"),
             ("12ab", "gguf", "at least 6"),
             ("xyz123456", "gguf", "20 hex digits")]
    for k, fmt, words in cases:
        assert _export(grid, k, fmt, tmp_path / "o") == 2
        _one_line_error(capsys, words)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert _export(grid, key, "gguf", full) == 2
    _one_line_error(capsys, "--force")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "o").exists()


def test_a_failed_record_is_refused(grid, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    rec = dict(grid[1].get(_key(grid[1], "rtn", 4)))
    rec.update(run_key="f" * 20, status="crashed")
    store.put(rec)
    assert main(["export", "f" * 20, "--format", "gguf", "--out", str(tmp_path / "o"),
                 "--store", str(store.root)]) == 2
    _one_line_error(capsys, "crashed")


@pytest.mark.parametrize("cpu", ["another", "this"])
def test_other_cpu_exports_this_machines_re_run_only_for_a_record_from_another_cpu(
        grid, tmp_path: Path, capsys: pytest.CaptureFixture[str], cpu: str) -> None:
    """A record 1% off its re-run: refused, naming --other-cpu when it was made on another CPU
    type; with --other-cpu exported as this machine's model (check other-cpu, in the files).
    The same difference on this CPU type is refused even with --other-cpu (a real mismatch)."""
    from suite.env import cpu_name

    cfg, src = grid
    store = Store(tmp_path / "store")
    rec = json.loads(json.dumps(src.get(_key(src, "rtn", 4))))
    rec["env"]["device_name"] = "Another CPU(R) 9000" if cpu == "another" else cpu_name()
    for m in rec["metrics"]:
        m["value"] *= 1.01
    store.put(rec)
    args = ["export", rec["run_key"], "--format", "gguf", "--store", str(store.root),
            "--config", str(cfg)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("qbench: error:") and "would not be the published model" in err
    assert ("--other-cpu" in err) == (cpu == "another")
    code = main([*args, "--out", str(tmp_path / "o2"), "--other-cpu"])
    if cpu == "this":
        assert code == 2 and not (tmp_path / "o2").exists()
        return
    assert code == 0
    report = json.loads((tmp_path / "o2" / "qbench-export.json").read_text())
    assert {c["verdict"] for c in report["check"]} == {"other-cpu"}
    assert report["qbench.check"] == "other-cpu"
    pid = report["check"][0]["protocol"]
    assert report[f"qbench.check_metric.{pid}"] * 1.01 == pytest.approx(
        report[f"qbench.metric.{pid}"], rel=1e-4)


def test_the_fp_cell_has_nothing_to_compress(grid, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert _export(grid, _key(grid[1], "fp", None), "compressed-tensors", tmp_path / "o") == 2
    _one_line_error(capsys, "no quantized layer")


class _HFAsEngine:
    """The tiny model behind the one call the interop NLL makes of llama.cpp (``logits``)."""

    def __init__(self, model, shift: int = 0) -> None:  # noqa: ANN001
        self.model, self.shift = model, shift

    def logits(self, ids: list[int]):  # noqa: ANN201 - np.ndarray
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        return out if not self.shift else out[[*range(self.shift, len(ids)), *range(self.shift)]]


def test_interop_nll_is_the_leaderboard_protocol(tiny_llama: Path) -> None:
    """llama.cpp's logits go through the same window NLL as qbench's perplexity; checked here
    with the model's own logits standing in for llama.cpp's (and a shifted-target fault)."""
    import torch
    from transformers import AutoModelForCausalLM

    from suite.evaluation.perplexity import window_nlls as qbench_nlls
    from suite.export.interop import window_nlls

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    windows = torch.randint(0, model.config.vocab_size, (3, 32),
                            generator=torch.Generator().manual_seed(0))
    want = qbench_nlls(model, windows)
    assert torch.allclose(window_nlls(_HFAsEngine(model), windows), want, rtol=1e-6, atol=0)
    assert not torch.allclose(window_nlls(_HFAsEngine(model, shift=1), windows), want,
                              rtol=1e-3, atol=0)


def test_compressed_tensors_refuses_decoupleq_float_offsets(grid, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    """compressed-tensors holds integer zero points only; decoupleQ's offsets are floats."""
    out = tmp_path / "out"
    assert _export(grid, _key(grid[1], "decoupleq", 4), "compressed-tensors", out) == 2
    _one_line_error(capsys, "float offsets", "w4g64")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_interop_keeps_going_when_a_cell_is_not_the_published_model(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A re-run that fails the check (another CPU type) is a row saying why, not an abort that
    loses the rows already measured."""
    from suite.errors import DataError
    from suite.export import interop

    def fails(rec, work):  # noqa: ANN001, ANN202
        raise DataError("export: the re-run of abc gives ppl = 26.97, the record 26.94")

    monkeypatch.setattr(interop, "_gguf_of", fails)
    pid = "ppl/x"
    rec = {"model": {"id": "m"}, "run_key": "abc", "metrics": [
        {"metric": "ppl", "protocol": pid, "value": 26.94}],
        "cell": {"method": "gptq", "format": None, "protocols": {pid: {"windows": 40}}}}
    row = interop.ppl_row(rec, tmp_path)
    assert row["note"].startswith("not exported: export: the re-run of abc")
    assert "llamacpp_ppl" not in row
