"""The honesty check catches methods that cheat, in isolation and through the runner."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from suite import honesty, models
from suite.interface import METHODS, MethodConfig, MethodData, QuantMethod, QuantResult, RunContext
from suite.primitives import LayerQState, WeightFormat, quantize_tensor, write_weight

FMT = WeightFormat(bits=2, group_size=32)


def _targets(model_dir):  # noqa: ANN001, ANN202
    model = models.load_model(models.resolve(f"hf:{model_dir}"))
    return model, models.adapter_for(model.config.model_type).target_layers(model)


def test_rtn_style_result_passes(tiny_llama):
    model, targets = _targets(tiny_llama)
    qstate = {}
    for name, layer in targets.items():
        qstate[name] = quantize_tensor(layer.weight.detach(), FMT)
        write_weight(layer, qstate[name])
    check = honesty.check(QuantResult(model, qstate), targets, FMT)
    assert check["passed"] and check["n_quantized"] == 14
    assert check["effective_bits"] == pytest.approx(2 + 18 / 32)


def test_weights_left_fp_while_claiming_codes_is_flagged(tiny_llama):
    model, targets = _targets(tiny_llama)
    before = honesty.weight_fingerprints(targets)
    qstate = {n: quantize_tensor(m.weight.detach(), FMT) for n, m in targets.items()}
    check = honesty.check(QuantResult(model, qstate), targets, FMT, before)
    assert not check["passed"]
    assert check["n_problems"] == 14
    assert "evaluated weight != dequantize(qstate)" in check["problems"][0]
    assert check["quantized_layers_unchanged"] == 14


def test_undeclared_fp_layer_is_flagged(tiny_llama):
    model, targets = _targets(tiny_llama)
    first = next(iter(targets))
    qstate = {}
    for name, layer in list(targets.items())[1:]:
        qstate[name] = quantize_tensor(layer.weight.detach(), FMT)
        write_weight(layer, qstate[name])
    check = honesty.check(QuantResult(model, qstate), targets, FMT)
    assert not check["passed"] and "without being declared" in check["problems"][0]
    declared = honesty.check(QuantResult(model, qstate, fp_layers={first: "kept FP by recipe"}),
                             targets, FMT)
    assert declared["passed"] and declared["n_fp"] == 1


def test_out_of_range_codes_and_wrong_format_are_flagged(tiny_llama):
    model, targets = _targets(tiny_llama)
    qstate = {}
    for name, layer in targets.items():
        qs = quantize_tensor(layer.weight.detach(), WeightFormat(bits=4, group_size=32))
        qstate[name] = LayerQState(qs.codes, qs.scale, qs.zero, FMT)  # claims 2 bits
        write_weight(layer, qstate[name])
    check = honesty.check(QuantResult(model, qstate), targets, FMT)
    assert not check["passed"]
    assert any("codes outside [0, 3]" in p for p in check["problems"])
    wrong = honesty.check(QuantResult(model, qstate), targets, WeightFormat(3, 32))
    assert any("layer format w2g32 != cell format w3g32" in p for p in wrong["problems"])


@dataclass(frozen=True)
class _CheatConfig(MethodConfig):
    """No parameters."""


class _Cheat(QuantMethod):
    """Claims RTN codes but evaluates the FP weights."""

    name = "cheat"
    kind = "ptq"
    Config = _CheatConfig

    def quantize(self, model, data: MethodData, ctx: RunContext) -> QuantResult:  # noqa: ANN001
        qstate = {n: quantize_tensor(m.weight.detach(), self.fmt)
                  for n, m in ctx.adapter.target_layers(model).items()}
        return QuantResult(model, qstate)


@pytest.fixture
def cheat_registered():
    METHODS.register("cheat")(_Cheat)
    yield
    METHODS._items.pop("cheat")


def test_runner_marks_cheating_cell_invalid(cheat_registered, tiny_llama, tmp_path):
    from suite.config import parse_grid
    from suite.prepare import prepare
    from suite.runner import run_cell

    grid = parse_grid({
        "axes": {"model": [f"hf:{tiny_llama}"], "method": ["cheat"], "wbits": [2],
                 "group_size": [32]},
        "fixed": {"eval": [{"type": "ppl", "corpus": "enwiki-gensim", "seqlen": 64,
                            "windows": 2}]},
        "run": {"store": str(tmp_path)},
    })
    (cell,) = prepare(grid)
    record = run_cell(cell.payload)
    assert record["status"] == "invalid"
    assert "honesty check failed" in record["error"]
    assert record["metrics"] == []
    assert "no-quantized-weight-changed" in record["notes"]
