"""Environment capture (suite.env): the lock hash, installed versions, and naming differences."""

from __future__ import annotations

import re
from pathlib import Path

from suite import env

ROOT = Path(__file__).resolve().parent.parent


def _env(**changes: object) -> dict:
    base = {
        "python": "3.11.7", "torch": "2.14.1+cu130", "transformers": "5.23.0",
        "lm_eval": "0.4.13", "qbench": "0.1.0", "lock": "0123456789abcdef",
        "packages": {"numpy": "2.4.6", "torch": "2.14.1", "transformers": "5.23.0"},
        "device": "cpu", "device_name": "AMD EPYC", "torch_threads": 2,
    }
    return {**base, **changes}


def test_identical_envs_have_no_differences():
    assert env.version_differences(_env(), _env()) == []


def test_changed_transformers_is_named_once():
    fresh = _env(transformers="5.25.0",
                 packages={"numpy": "2.4.6", "torch": "2.14.1", "transformers": "5.25.0"})
    assert env.version_differences(fresh, _env()) == ["transformers 5.23.0 -> 5.25.0"]


def test_every_differing_package_is_named_published_to_fresh():
    fresh = _env(packages={"numpy": "2.5.0", "torch": "2.14.1", "transformers": "5.23.0",
                           "ray": "2.60.0"})
    assert env.version_differences(fresh, _env()) == ["numpy 2.4.6 -> 2.5.0",
                                                      "ray absent -> 2.60.0"]


def test_without_packages_dicts_the_top_level_keys_are_compared():
    fresh = _env(torch="2.14.1+cpu", python="3.12.1",
                 packages={"numpy": "9.9.9", "torch": "2.14.1", "transformers": "5.23.0"})
    published = {k: v for k, v in _env().items() if k != "packages"}
    assert env.version_differences(fresh, published) == ["python 3.11.7 -> 3.12.1",
                                                         "torch 2.14.1+cu130 -> 2.14.1+cpu"]


def test_lock_device_and_threads_are_named():
    fresh = _env(lock="fedcba9876543210", device_name="Intel Xeon", torch_threads=4)
    assert env.version_differences(fresh, _env(lock=None)) == [
        "lock absent -> fedcba9876543210", "cpu AMD EPYC -> Intel Xeon", "torch_threads 2 -> 4"]


def test_a_change_of_device_kind_names_both_kinds():
    fresh = _env(device="cuda:0", device_name="NVIDIA H200")
    assert env.version_differences(fresh, _env()) == ["device cpu AMD EPYC -> cuda NVIDIA H200"]


def test_capture_has_the_lock_hash_and_every_package():
    captured = env.capture()
    assert captured["lock"] == env.lock_hash(ROOT / "constraints.txt")
    assert re.fullmatch(r"[0-9a-f]{16}", captured["lock"])
    packages = captured["packages"]
    assert "torch" in packages and packages == dict(sorted(packages.items()))
    assert isinstance(captured["torch_threads"], int)


def test_lock_hash_is_none_without_a_lock(tmp_path):
    assert env.lock_hash(tmp_path / "constraints.txt") is None


def test_lock_pins_from_an_index_only():
    """No editable, URL or local-path lines (they do not install on another machine)."""
    lines = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9._-]+==\S+", ln) for ln in lines)
    assert not any(ln.lower().startswith(("qbench==", "pip==")) for ln in lines)


def test_a_record_names_the_code_it_imported_and_flags_later_changes(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """The commit is taken when the cell process starts (``git_state``, cached); a commit or an
    edit under suite/ before the record is written is flagged by ``code_moved``."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "a.py").write_text("x = 1\n")
    (tmp_path / "docs.md").write_text("d\n")
    git("add", ".")
    git("commit", "-qm", "one")
    monkeypatch.setattr(env, "_REPO", tmp_path)
    env.git_state.cache_clear()
    try:
        start = env.git_state()["git_sha"]
        assert start == git("rev-parse", "HEAD") and env.code_moved(start) is False
        (tmp_path / "docs.md").write_text("e\n")  # not code
        git("commit", "-qam", "docs")
        assert env.code_moved(start) is False and env.git_state()["git_sha"] == start
        (tmp_path / "suite" / "a.py").write_text("x = 2\n")
        assert env.code_moved(start) is True  # an edit
        git("commit", "-qam", "code")
        assert env.code_moved(start) is True  # a later commit
        assert env.git_state()["git_sha"] == start  # still the code the process imported
    finally:
        env.git_state.cache_clear()


def test_tables_name_a_cpu_by_its_isa_and_a_gpu_by_its_name():
    """Two CPUs sold under one name differ in float results when their ISAs differ, so a
    table's machine is the CPU with its ISA; a GPU run is named by the GPU alone."""
    from suite.aggregate import machine

    avx2, avx512 = _env(cpu_capability="AVX2"), _env(cpu_capability="AVX512")
    assert env.machine_name(avx2) == "AMD EPYC [AVX2]"
    assert machine({"env": avx2}) != machine({"env": avx512})
    assert machine({"env": avx512, "determinism": {"threads": 1}}) == "AMD EPYC [AVX512] x1"
    assert env.machine_name(_env()) == "AMD EPYC"  # an old record without the ISA
    gpu = _env(device="cuda:0", device_name="NVIDIA H200", cpu_capability="AVX512")
    assert env.machine_name(gpu) == "NVIDIA H200" and env.machine_name({}) == "?"
