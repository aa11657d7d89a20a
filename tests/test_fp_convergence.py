"""The FP convergence rule of benchmarks/fp_convergence.py (issue 24): robust to epoch-to-epoch
noise, and None when the curve is still rising at the end of the run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "fp_convergence", Path(__file__).parent.parent / "benchmarks" / "fp_convergence.py")
fp_convergence = importlib.util.module_from_spec(_SPEC)  # type: ignore[arg-type]
_SPEC.loader.exec_module(fp_convergence)  # type: ignore[union-attr]


def test_noisy_plateau_is_found_after_the_rise():
    # measured cnn-small curve (constant LR): rises to ~0.905, then +-0.5 point noise
    curve = [.8838, .8931, .8944, .9044, .8932, .9012, .9050, .9067, .8992, .9095, .9027,
             .9049, .8961, .9024, .9032, .9048]
    assert fp_convergence.convergence_epoch(curve) == 7
    raw_gain_rule = next(e + 1 for e in range(1, len(curve))
                         if curve[e] - curve[e - 1] < 0.002)  # "stop when an epoch gains < 0.2"
    assert raw_gain_rule == 3  # stops before the 1-point jump of epoch 4


def test_a_curve_still_rising_has_no_convergence_epoch():
    assert fp_convergence.convergence_epoch([0.80 + 0.01 * e for e in range(12)]) is None
    assert fp_convergence.convergence_epoch([0.9] * 6) == 1
