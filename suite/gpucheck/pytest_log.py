"""pytest plugin of the GPU check: one CSV row per test as it finishes (``$QBENCH_PYTEST_CSV``),
so a part cut off by its time box still leaves the tests that ran."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Append the test's outcome (its call, or the setup that skipped or failed it)."""
    path = os.environ.get("QBENCH_PYTEST_CSV")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    from suite.gpucheck.parts import append_row

    message = "" if report.passed else str(report.longrepr)[-300:].replace("\n", " ")
    append_row(Path(path), {"test": report.nodeid, "when": report.when,
                            "outcome": report.outcome, "seconds": f"{report.duration:.3f}",
                            "message": message})
