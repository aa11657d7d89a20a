"""A plug-in method that fails on purpose (test fixture for the executors and the fault tests).

``tests/test_executors.py`` installs it as a distribution in a temporary directory (module +
``entry_points.txt`` in the ``qbench.methods`` group), so it reaches cell processes exactly the
way a third-party method does. ``kind`` picks the failure; anything else behaves like RTN.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from baselines.rtn import RTN
from suite.interface import METHODS, MethodConfig, MethodData, QuantResult, RunContext
from suite.primitives import CholeskyError
from suite.qat_train import TrainingDiverged

KINDS = ("none", "oom", "numerical", "diverge", "crash", "hang", "flaky", "slow")


@dataclass(frozen=True)
class FaultConfig(MethodConfig):
    """``kind``: which failure; ``marker``: flaky's first-attempt file; ``sleep_s``: slow's."""

    kind: str = "none"
    marker: str = ""
    sleep_s: float = 0.0

    def __post_init__(self) -> None:
        self.check_choices({"kind": KINDS})


@METHODS.register("fault")
class Fault(RTN):
    """RTN, or the failure named by ``kind``."""

    name = "fault"
    Config = FaultConfig

    def quantize(self, model: torch.nn.Module, data: MethodData, ctx: RunContext
                 ) -> QuantResult:
        """Fail as configured, else round to nearest."""
        kind = self.config.kind
        if kind == "oom":
            raise torch.OutOfMemoryError("injected: CUDA out of memory (tried to allocate 1 TiB)")
        if kind == "numerical":
            raise CholeskyError("injected: H + lambda I not positive definite")
        if kind == "diverge":
            raise TrainingDiverged("injected: loss became nan at step 3")
        if kind == "crash" or (kind == "flaky" and not Path(self.config.marker).exists()):
            if kind == "flaky":
                Path(self.config.marker).write_text("first attempt crashed")
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            time.sleep(3600)
        if kind == "slow":
            time.sleep(self.config.sleep_s)
        return super().quantize(model, data, ctx)
