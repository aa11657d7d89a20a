"""Registry: duplicates raise, unknown names get did-you-mean and the accepted list."""

from __future__ import annotations

import pytest

from suite.errors import ConfigError
from suite.interface import METHODS
from suite.registry import Registry


def test_duplicate_raises_and_unknown_suggests():
    reg: Registry[type] = Registry("widget", base=object)
    reg.register("alpha")(int)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(float)
    with pytest.raises(ConfigError, match=r"axes.x: unknown widget 'alpah' \(did you mean "
                                          r"'alpha'\?\); accepted: alpha"):
        reg.get("alpah", field="axes.x")


def test_base_class_enforced():
    with pytest.raises(TypeError, match="must subclass QuantMethod"):
        METHODS.register("not-a-method")(dict)


def test_lean_import_has_no_cuda_or_lm_eval():
    import subprocess
    import sys

    code = ("import sys, suite, suite.config, suite.records, suite.primitives; "
            "assert 'lm_eval' not in sys.modules; import torch; "
            "assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)
