"""Warm cell processes: import torch, transformers and the suite once, then fork one child per
cell. A fresh ``python -m suite.runner`` spends about 5 s of a short cell importing; a fork of
an interpreter that has already imported costs milliseconds, and the child is still its own
process (its own memory, its own crash, killed on timeout), exactly like a fresh one.

Protocol (one warm process per local slot, driven by ``WarmProcess``): the slot writes one JSON
line ``{"argv": [PAYLOAD, STAGE], "log": LOG}``; the warm process forks, answers
``{"pid": N}``, waits and answers ``{"rc": R}`` (negative: killed by signal -R), like
``subprocess.Popen.returncode``.

Only cpu cells use it: CUDA does not survive a fork, so cuda cells always start fresh. The warm
parent never runs a cell, a torch op or a thread pool itself, so its children start as clean
as a fresh interpreter (seeds are set per cell from the record's seed).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any


def _preload() -> None:
    """Import what every cell imports (the lazy transformers modules included)."""
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM, OPTForCausalLM  # noqa: F401

    import suite.runner  # noqa: F401
    from suite.env import git_state
    from suite.interface import METHODS

    list(METHODS)  # registers the built-in methods and plug-ins
    git_state()  # children inherit the commit of the code imported here (suite.env.code_moved)


def _child(argv: list[str], log: str) -> None:
    """In the forked child: log to ``log``, die with the warm parent, run the cell, exit."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from suite import runner

    runner.die_with_parent(os.getppid())
    rc = 1
    try:
        rc = runner.main(argv)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)


def serve() -> int:
    """The warm process: preload, then fork a child per request line until stdin closes."""
    from suite import runner

    runner.die_with_parent(int(os.environ.get("QBENCH_PARENT_PID", os.getppid())))
    proto = os.fdopen(os.dup(1), "w")  # answers go here; stray prints go to stderr
    os.dup2(2, 1)

    def answer(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    _preload()
    answer({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            proto.close()
            _child(req["argv"], req["log"])
        answer({"pid": pid})
        _, status = os.waitpid(pid, 0)
        answer({"rc": os.waitstatus_to_exitcode(status)})
    return 0


class WarmProcess:
    """The slot side: a warm process and the cells it forks, one at a time."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "suite.warm"], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True)
        self._read(None)  # {"ready": true}: imports done

    def _read(self, timeout: float | None) -> dict[str, Any] | None:
        out: IO[str] = self.proc.stdout  # type: ignore[assignment]
        if timeout is not None and not select.select([out], [], [], timeout)[0]:
            return None
        line = out.readline()
        if not line:
            raise RuntimeError(f"warm cell process exited with code {self.proc.wait()}")
        return json.loads(line)

    def alive(self) -> bool:
        """Whether the warm process can take a cell."""
        return self.proc.poll() is None

    def run(self, argv: list[str], log: Path, timeout: float, poll: Any) -> int | str:
        """Fork a cell; call ``poll()`` every 0.5 s; its exit code, or ``timeout``."""
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        pid, t0 = self._read(None)["pid"], time.monotonic()  # type: ignore[index]
        while (msg := self._read(0.5)) is None:
            poll()
            if time.monotonic() - t0 > timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._read(None)
                return "timeout"
        return msg["rc"]

    def close(self) -> None:
        """End the warm process."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


if __name__ == "__main__":
    sys.exit(serve())
