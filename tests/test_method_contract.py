"""Contract tests, parametrised over every registered method: the interface holds for all."""

from __future__ import annotations

import pytest
import torch
import yaml

from suite import honesty, models
from suite.interface import METHODS, MethodData, QuantResult, RunContext, Seeds
from suite.primitives import WeightFormat

FMT = WeightFormat(bits=3, group_size=32)


def _run(name: str, model_dir) -> tuple[torch.nn.Module, QuantResult]:  # noqa: ANN001
    src = models.resolve(f"hf:{model_dir}")
    model = models.load_model(src)
    adapter = models.adapter_for(model.config.model_type)
    cls = METHODS.get(name)
    fmt = None if cls.kind == "reference" else FMT
    ctx = RunContext(torch.device("cpu"), Seeds.derive(0), adapter)
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    return model, cls(cls.Config(), fmt).quantize(model, MethodData(calib=calib), ctx)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_returns_honest_result(name, tiny_llama):
    model, res = _run(name, tiny_llama)
    assert isinstance(res, QuantResult)
    adapter = models.adapter_for(model.config.model_type)
    check = honesty.check(res, adapter.target_layers(res.model),
                          None if METHODS.get(name).kind == "reference" else FMT)
    assert check["passed"], check["problems"]
    assert check["n_quantized"] + check["n_fp"] == check["n_targets"] == 14


@pytest.mark.parametrize("name", list(METHODS))
def test_method_is_deterministic(name, tiny_llama):
    _, a = _run(name, tiny_llama)
    _, b = _run(name, tiny_llama)
    assert a.qstate.keys() == b.qstate.keys()
    for k in a.qstate:
        assert torch.equal(a.qstate[k].codes, b.qstate[k].codes)
        assert torch.equal(a.qstate[k].scale, b.qstate[k].scale)


@pytest.mark.parametrize("name", list(METHODS))
def test_config_round_trips_through_yaml(name):
    cls = METHODS.get(name)
    cfg = cls.Config()
    again = cls.Config.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), "methods.x")
    assert again == cfg
    assert isinstance(cls.Config.version, int)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_declares_registry_identity(name):
    cls = METHODS.get(name)
    assert cls.name == name and cls.kind in ("ptq", "qat", "reference")
    assert cls.__doc__ and cls.Config.__doc__
