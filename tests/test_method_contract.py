"""Contract tests, parametrised over every registered method: the interface holds for all, on
every kind of model the method declares (``domains``): a tiny LLaMA for ``lm``, cnn-small on a
tiny image task for ``vision``."""

from __future__ import annotations

import pytest
import torch
import yaml

from suite import honesty, models
from suite.interface import METHODS, MethodData, QuantResult, RunContext, Seeds
from suite.primitives import PER_CHANNEL, PER_TENSOR, WeightFormat

FMT = WeightFormat(bits=3, group_size=32)
LM_METHODS = [n for n, c in METHODS.items() if "lm" in c.domains]
VISION_METHODS = [n for n, c in METHODS.items() if "vision" in c.domains]


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


@pytest.mark.parametrize("name", LM_METHODS)
def test_method_returns_honest_result(name, tiny_llama):
    model, res = _run(name, tiny_llama)
    assert isinstance(res, QuantResult)
    adapter = models.adapter_for(model.config.model_type)
    check = honesty.check(res, adapter.target_layers(res.model),
                          None if METHODS.get(name).kind == "reference" else FMT)
    assert check["passed"], check["problems"]
    assert check["n_quantized"] + check["n_fp"] == check["n_targets"] == 14


@pytest.mark.parametrize("name", LM_METHODS)
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


def _vision_run(name: str) -> tuple[torch.nn.Module, QuantResult, WeightFormat | None]:
    from suite.vision.datasets import ImageSet, VisionData
    from suite.vision.models import adapter_for, build_model
    from suite.vision.runtime import QATBudget

    g = torch.Generator().manual_seed(0)
    split = ImageSet(torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (64,), generator=g))
    data = VisionData("noise", split, split, 10, (0.5,), (0.25,), "0" * 16, "noise")
    model = build_model("cnn-small", 10, 1, seed=0).eval()
    cls = METHODS.get(name)
    fmt = {"reference": None, "qat": WeightFormat(3, PER_TENSOR, sym=True)}.get(
        cls.kind, WeightFormat(3, PER_CHANNEL))
    calib = torch.randn(32, 1, 28, 28, generator=g)
    ctx = RunContext(torch.device("cpu"), Seeds.derive(0), adapter_for("cnn-small"))
    md = MethodData(calib=calib, train_data=data, train_budget=QATBudget(1, 3, 16))
    torch.manual_seed(0)
    return model, cls(cls.Config(), fmt).quantize(model, md, ctx), fmt


@pytest.mark.parametrize("name", VISION_METHODS)
def test_method_returns_honest_result_on_a_cnn(name):
    from suite.vision.models import adapter_for

    _, res, fmt = _vision_run(name)
    check = honesty.check(res, adapter_for("cnn-small").target_layers(res.model), fmt)
    assert check["passed"], check["problems"]
    assert check["n_quantized"] + check["n_fp"] == check["n_targets"] == 3
    a, b = _vision_run(name)[1], res
    for k in a.qstate:
        assert torch.equal(a.qstate[k].codes, b.qstate[k].codes)


def test_every_method_runs_somewhere():
    assert set(LM_METHODS) | set(VISION_METHODS) == set(METHODS)
    assert {"lsq", "tr_scheduling"} <= set(VISION_METHODS) - set(LM_METHODS)


# --- seed_free: one record stands for every seed in ``qbench compare`` ------------------------

SEED_FREE = [n for n, c in METHODS.items() if c.seed_free]


def _qstate_under_seed(cls: type, seed: int, model_dir) -> dict:  # noqa: ANN001
    """The method's qstate under cell seed ``seed``: its sub-seeds, a calibration sample drawn
    from it and the global torch seed all change with it."""
    model = models.load_model(models.resolve(f"hf:{model_dir}"))
    ctx = RunContext(torch.device("cpu"), Seeds.derive(seed), models.adapter_for(
        model.config.model_type))
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    fmt = None if cls.kind == "reference" else FMT
    return cls(cls.Config(), fmt).quantize(model, MethodData(calib=calib), ctx).qstate


def _same_qstate(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].codes, b[k].codes) and torch.equal(a[k].scale, b[k].scale)
        and torch.equal(a[k].zero, b[k].zero) for k in a)


@pytest.mark.parametrize("name", SEED_FREE)
def test_seed_free_methods_ignore_the_seed(name, tiny_llama):
    cls = METHODS.get(name)
    assert _same_qstate(_qstate_under_seed(cls, 0, tiny_llama),
                        _qstate_under_seed(cls, 5, tiny_llama))


def test_seed_free_check_catches_a_method_that_draws_from_the_seed(tiny_llama):
    rtn = METHODS.get("rtn")

    class Seeded(rtn):  # injected fault: claims seed_free, perturbs W with its init seed
        def quantize(self, model, data, ctx):  # noqa: ANN001, ANN202
            g = torch.Generator().manual_seed(ctx.seeds.init)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-2 * torch.randn(p.shape, generator=g))
            return super().quantize(model, data, ctx)

    assert {"fp", "rtn", "precalibration"} <= set(SEED_FREE)
    assert not _same_qstate(_qstate_under_seed(Seeded, 0, tiny_llama),
                            _qstate_under_seed(Seeded, 5, tiny_llama))
