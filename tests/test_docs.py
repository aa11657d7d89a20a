"""The documentation cannot drift from the code or the data.

Every config key and CLI argument has documentation text (the reference pages are generated
from them); README.md is a front page of at most 250 lines whose headline table is what
results/ gives; every fenced Python example of README.md and docs/ runs (README's example
method on an LLM and on a CNN, whose conv weights are 4-D); every generated page and marker
renders. No mkdocs and no network needed: the site build itself is ``nox -s docs`` (CI).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _docgen():  # noqa: ANN202 - the docgen package, loaded from the repository by path
    """Import ``docgen`` (documentation tooling beside suite/, not an installed package)
    without putting the repository root on sys.path."""
    if "docgen" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "docgen", ROOT / "docgen" / "__init__.py",
            submodule_search_locations=[str(ROOT / "docgen")])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["docgen"] = module
        spec.loader.exec_module(module)
    return sys.modules["docgen"]


_docgen()
from docgen import examples, front, reference, results  # noqa: E402

# ---------------------------------------------------------------------------------------------
# the reference pages cover every config key and CLI argument


def test_every_config_key_has_documentation_text():
    missing = reference.undocumented_config_keys()
    assert not missing, (
        f"config keys without documentation text: {missing}. Add an attribute docstring, an "
        "'Attributes:' entry or a '#' comment to the field in its dataclass.")


def test_every_cli_command_and_argument_has_help():
    missing = reference.undocumented_cli()
    assert not missing, f"qbench commands / arguments without help text: {missing}"


def test_docs_tooling_text_is_used():
    """Text kept in docgen/fields.py for fields whose code has none must still be needed."""
    assert reference.unused_supplement() == []
    assert reference.unused_cli_supplement() == []


def test_field_docs_reads_every_kind_of_field_text():
    @dataclasses.dataclass(frozen=True)
    class Demo:
        """A demo.

        ``mentioned``: named by the class docstring.

        Attributes:
            listed: from the Attributes section, which may
                continue on a second line.
            a / b: one entry for two fields.
        """

        listed: int = 1
        a: int = 2
        b: int = 3
        attr: int = 4
        """From an attribute docstring."""
        commented: int = 5  # from a comment
        mentioned: int = 6
        bare: int = 7

    docs = reference.field_docs(Demo)
    assert docs["listed"][0] == ("from the Attributes section, which may continue on a "
                                 "second line.")
    assert docs["a"][0] == docs["b"][0] == "one entry for two fields."
    assert docs["attr"] == ("From an attribute docstring.", "attribute docstring")
    assert docs["commented"] == ("from a comment", "comment")
    assert "named by the class docstring" in docs["mentioned"][0]
    assert "bare" not in docs  # what undocumented_config_keys reports


def test_reference_pages_render():
    config = reference.config_page()
    for key in ("## run.slurm", "`timeout_s`", "### methods.gptq", "`hessian_dtype`"):
        assert key in config
    assert "**undocumented**" not in config
    assert "float32, float64" in config  # accepted values come from the validators
    cli = reference.cli_page()
    assert "## qbench run" in cli and "`--retry-failed`" in cli
    assert "**undocumented**" not in cli
    assert "| `schema_version` |" in reference.schema_page()
    assert "opt-gptq" in reference.paper_configs()


# ---------------------------------------------------------------------------------------------
# the front page


def test_readme_is_a_front_page_of_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_readme_headline_table_is_what_results_gives():
    text = (ROOT / "README.md").read_text()
    assert front.render(text) == text, "stale README table: run `python -m docgen.front`"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "nox -s tests" in ci
    assert "nox -s tests\n" in (ROOT / "README.md").read_text()


def _copy_results(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    for path in (ROOT / "results").glob("*"):
        if path.is_file():
            shutil.copy(path, out / path.name)
    return out


def test_headline_picks_rows_by_method_and_format_not_position(tmp_path):
    """A regenerated CSV (rows reordered, a new method variant, more seeds) renders without a
    code change, with every value taken from its own row."""
    out = _copy_results(tmp_path)
    before = results.headline(out)
    vision = out / "reproduce-vision.csv"
    board = pd.read_csv(vision, dtype={"group_size": str})
    extra = board[board["method"] == "lsq"].assign(method="lsq:sgd-lr1e-1", n_seeds=3,
                                                   value=0.8123, ci95=0.004)
    pd.concat([board, extra]).sample(frac=1.0, random_state=0).to_csv(vision, index=False)
    llm = out / f"{results.FRONT_GRIDS[0]}.csv"  # the front page's LLM grid
    pd.read_csv(llm, dtype={"group_size": str}).iloc[::-1].to_csv(llm, index=False)
    after = results.headline(out)
    assert "| `lsq:sgd-lr1e-1` |" in after and "81.2 ± 0.4" in after
    assert after.replace("| 3 |", "") != before
    for line in before.splitlines():  # every row of before is still there, unchanged
        assert line in after


# ---------------------------------------------------------------------------------------------
# the examples run


RUNNABLE = [e for e in examples.python_examples() if e.run]


@pytest.fixture
def fresh_methods(monkeypatch):  # noqa: ANN201 - a private method registry for one example
    """Examples register methods; give each its own registry so nothing leaks into the
    session's (and the built-in ids stay taken by the built-ins)."""
    import suite.interface as interface
    from suite.registry import Registry

    registry = Registry("method", interface.QuantMethod)
    monkeypatch.setattr(interface, "METHODS", registry)
    return registry


def test_examples_are_found_and_marked():
    found = examples.python_examples()
    assert any(e.path.name == "README.md" for e in found)
    assert len(RUNNABLE) >= 2
    skipped = [e.id for e in found if not e.run]
    assert len(skipped) <= 3, f"keep no-run examples few: {skipped}"


def _run_example(example: examples.Example, monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute an example as the body of a throw-away module (dataclasses need one)."""
    module = types.ModuleType("qbench_docs_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(example.code, example.id, "exec"), module.__dict__)  # noqa: S102


@pytest.mark.parametrize("example", RUNNABLE, ids=[e.id for e in RUNNABLE])
def test_python_example_runs(example, fresh_methods, monkeypatch):
    _run_example(example, monkeypatch)


def _readme_method(registry, monkeypatch: pytest.MonkeyPatch) -> type:  # noqa: ANN001
    [example] = [e for e in RUNNABLE
                 if e.path.name == "README.md" and "@METHODS.register" in e.code]
    _run_example(example, monkeypatch)
    [name] = list(registry)
    return registry.get(name)


def test_readme_method_is_honest_on_an_llm(fresh_methods, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from suite import honesty, models
    from suite.interface import MethodData, RunContext, Seeds
    from suite.primitives import WeightFormat

    cls = _readme_method(fresh_methods, monkeypatch)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4)).eval()
    adapter = models.adapter_for(model.config.model_type)
    fmt = WeightFormat(bits=3, group_size=32)
    ctx = RunContext(torch.device("cpu"), Seeds.derive(0), adapter)
    res = cls(cls.Config(), fmt).quantize(model, MethodData(), ctx)
    check = honesty.check(res, adapter.target_layers(res.model), fmt)
    assert check["passed"], check["problems"]
    assert check["n_quantized"] == check["n_targets"] == 14


def test_readme_method_is_honest_on_conv_layers(fresh_methods, monkeypatch):
    """The vision track's layers are convs with 4-D weights: the example must flatten them."""
    from suite import honesty
    from suite.interface import MethodData, RunContext, Seeds
    from suite.primitives import PER_CHANNEL, WeightFormat
    from suite.vision.models import adapter_for, build_model

    cls = _readme_method(fresh_methods, monkeypatch)
    model = build_model("cnn-small", 10, 1, seed=0).eval()
    targets = adapter_for("cnn-small").target_layers(model)
    assert any(t.weight.dim() == 4 for t in targets.values())
    fmt = WeightFormat(2, PER_CHANNEL)
    ctx = RunContext(torch.device("cpu"), Seeds.derive(0), adapter_for("cnn-small"))
    res = cls(cls.Config(), fmt).quantize(model, MethodData(), ctx)
    check = honesty.check(res, adapter_for("cnn-small").target_layers(res.model), fmt)
    assert check["passed"], check["problems"]
    assert check["n_quantized"] == check["n_targets"] == 3


# ---------------------------------------------------------------------------------------------
# every generated page and marker renders


def test_every_page_marker_and_leaderboard_renders():
    from docgen import hooks

    for path in examples.doc_files():
        text = path.read_text()
        out = hooks.on_page_markdown(text)
        assert "<!-- qbench:" not in "\n".join(
            ln for ln in out.splitlines() if ln.startswith("<!-- qbench:")), path
    grids = results.published_grids()
    assert {g.name for g in grids} >= {"reproduce", "reproduce-vision"}
    for grid in grids:
        page = results.leaderboard_page(grid)
        assert f"# Leaderboard: {grid.name}" in page and "| method |" in page
        assert all((ROOT / "results" / fig).is_file() for fig in grid.figures)
    for method in ("rtn", "gptq", "lsq", "tr_scheduling", "precalibration", "decoupleq"):
        assert "| method | format |" in results.method_rows(method), method
    assert "](docs/" not in hooks.readme_as_index((ROOT / "README.md").read_text())
