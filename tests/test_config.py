"""Config validation: malformed grids give one-line errors naming the field, exit 2, no output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from suite.cli import main
from suite.config import load_grid, load_grids, parse_grid
from suite.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
GOOD = {
    "name": "t",
    "axes": {"model": ["smollm2-135m-instruct@gguf-q4_1"], "method": ["fp", "rtn"],
             "wbits": [4, 3], "group_size": [64, "per-channel"], "seed": [0]},
    "fixed": {"eval": [{"type": "ppl", "corpus": "enwiki-gensim", "seqlen": 512,
                        "windows": 8}]},
    "run": {"store": "STORE"},
}

BAD = [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"axes": {"method": ["rtn"]}}, "axes.model: missing"),
    ({"axes": {"model": ["smollm2-135m-instruct@gguf-q4_1"], "method": ["rtm"]}},
     "did you mean 'rtn'"),
    ({"axes.wbits": [4, 9]}, "axes.wbits: got 9; accepted: integers 2..8"),
    ({"axes.wbits": ["four"]}, "axes.wbits: got 'four'"),
    ({"axes.group_size": [-2]}, "axes.group_size: got -2"),
    ({"axes.group_size": ["per-row"]}, "axes.group_size: got 'per-row'"),
    ({"axes.seed": [-1]}, "axes.seed: got -1"),
    ({"axes.seed": [0, 0]}, "axes.seed: duplicate value 0"),
    ({"axes.model": ["smollm-135m"]}, "axes.model: unknown model"),
    ({"axes.method": ["fp+rtn"]}, "'fp' must stand alone"),
    ({"fixed": {"eval": [{"type": "bleu", "corpus": "enwiki-gensim"}]}},
     "fixed.eval[0].type: got 'bleu'; accepted: ppl, acc"),
    ({"fixed": {"eval": [{"type": "acc", "corpus": "enwiki-gensim"}]}},
     "fixed.eval[0].corpus: unknown key; accepted: type, task, shots, limit"),
    ({"fixed": {"eval": [{"type": "acc", "task": "social_iqa"}]}},
     "fixed.eval[0].task: got 'social_iqa'; accepted: 'bigbench:"),
    ({"fixed": {"eval": [{"type": "acc", "task": "bigbench:social_iqa", "shots": 5}]}},
     "fixed.eval[0].shots: got 5; accepted: 0 for bigbench"),
    ({"fixed": {"eval": [{"type": "acc", "task": "lm-eval:piqa", "limit": 0}]}},
     "fixed.eval[0].limit: got 0"),
    ({"fixed": {"eval": [{"type": "ppl", "corpus": "wikitxt2"}]}}, "fixed.eval[0].corpus"),
    ({"fixed": {"eval": [{"type": "ppl", "seqlen": 0}]}}, "fixed.eval[0].seqlen: got 0"),
    ({"fixed": {"calib": {"windows": "many"}}}, "fixed.calib.windows: got 'many'"),
    ({"fixed": {"scale_dtype": "fp8"}}, "fixed.scale_dtype: got 'fp8'"),
    ({"methods": {"rtn": {"alpha": 1}}}, "methods.rtn.alpha: unknown parameter"),
    ({"methods": {"gtpq": {}}}, "methods.gtpq: unknown method 'gtpq' (did you mean 'gptq'?)"),
    ({"run": {"device": "tpu"}}, "run.device: got 'tpu'; accepted: cpu, cuda, auto"),
    ({"run": {"timeout_s": -5}}, "run.timeout_s: got -5"),
    ({"name": "bad name!"}, "name: got 'bad name!'"),
    ({"exclude": [{"bits": 8}]}, "exclude[0].bits: unknown key; accepted: model, method"),
]


def _config(update: dict, tmp_path: Path) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(GOOD))
    cfg["run"]["store"] = str(tmp_path / "store")
    for key, value in update.items():
        if key.startswith("axes."):
            cfg["axes"][key[5:]] = value
        elif key == "axes":
            cfg["axes"] = value
        else:
            cfg[key] = value
    return cfg


def test_good_config_expands():
    grid = parse_grid(_config({}, Path("/tmp")))
    cells = grid.expand()
    assert len(cells) == 1 + 2 * 2  # fp once, rtn per (bits x group size)
    assert cells[0].fmt is None and cells[0].calib is None
    assert {c.fmt.label() for c in cells[1:]} == {"w4g64", "w4pc", "w3g64", "w3pc"}


@pytest.mark.parametrize(("update", "expected"), BAD, ids=[b[1][:30] for b in BAD])
def test_malformed_config_one_line_error_exit_2_nothing_written(update, expected, tmp_path,
                                                                capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_config(update, tmp_path)))
    out = tmp_path / "out"
    rc = main(["run", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qbench: error: ")
    assert expected in err
    assert not out.exists() and not (tmp_path / "store").exists()


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text("axes: [unclosed\n")
    assert main(["run", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "reason"), [
    # an unclosed bracket: noticed on line 4, opened on line 3
    ("name: t\naxes:\n  model: [a, b\n  method: [rtn]\n",
     "line 4, column 9: expected ',' or ']', but got ':': `method: [rtn]` (in the flow "
     "sequence starting at line 3: `model: [a, b`)"),
    # a key without its colon: the parser trips on the next line's colon
    ("name: t\naxes:\n  model [a]\n  method: [rtn]\n",
     "line 4, column 9: mapping values are not allowed here: `method: [rtn]` (line 3 "
     "`model [a]` has no ':' after its key)"),
    ("name: t\naxes:\n\tmodel: [a]\n",
     "line 3, column 1: found character '\\t' that cannot start any token: `model: [a]`"),
    # lines count from the top of the file, across YAML documents
    ("name: a\n---\nname: b\naxes: {model: [a], method: [rtn]\nrun: {}\n",
     "line 5, column 1: expected ',' or '}', but got '<scalar>': `run: {}` (in the flow "
     "mapping starting at line 4"),
])
def test_malformed_yaml_names_the_parser_reason_and_line(tmp_path, capsys, text, reason):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    assert main(["expand", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"qbench: error: config: {path} is not valid YAML: ")
    assert reason in err, err


@pytest.mark.parametrize(("value", "where"), [(-2, "axes.group_size: got -2"),
                                              ("per-row", "axes.group_size: got 'per-row'")])
def test_group_size_errors_name_the_words_users_write(tmp_path, capsys, value, where):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(_config({"axes.group_size": [value]}, tmp_path)))
    assert main(["expand", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert where in err and err.endswith(
        "accepted: a positive integer (input columns per group), per-channel or per-tensor")
    assert "-1" not in err and "(0)" not in err


def test_a_group_size_error_from_the_format_itself_has_no_internal_codes():
    from suite.errors import ConfigError
    from suite.primitives import WeightFormat, check_divides

    with pytest.raises(ConfigError) as e:
        WeightFormat(4, -3)
    assert "per-channel or per-tensor" in str(e.value) and "-1" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_divides(WeightFormat(4, 48), 64, "l")
    assert str(e.value).endswith("width, per-channel or per-tensor") and " 0" not in str(e.value)


def test_parameters_of_methods_not_in_the_grid_are_a_warning(tmp_path, capsys):
    params = {"gptq": {"act_order": True}, "lsq:adam": {"optimizer": "adam"},
              "rtn": {}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(_config({"methods": params}, tmp_path)))
    grid = load_grid(path)
    assert [c.method for c in grid.expand()][:2] == ["fp", "rtn"]
    assert grid.warnings[0] == ("methods: parameters of gptq, lsq:adam ignored (not in "
                                "axes.method)")
    assert main(["expand", str(path)]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warned == ["qbench: warning: t: methods: parameters of gptq, lsq:adam ignored (not "
                      "in axes.method)"]
    # the same parameter is an error once the method is in the grid
    with pytest.raises(ConfigError, match="methods.gptq.act_ordr: unknown parameter"):
        load_grid(path, ["axes.method=[rtn, gptq]", "methods.gptq.act_ordr=true"])


def test_the_published_grids_narrow_to_two_methods_with_one_override(capsys):
    """`--set 'axes.method=[rtn,...]'` on a file whose grids set parameters of other methods
    (e.g. methods.lsq:adam in the vision grid) loads, with one warning line per grid."""
    assert main(["expand", str(ROOT / "configs" / "reproduce.yaml"), "--set",
                 "axes.method=[fp,rtn]"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [ln for ln in err if "parameters of" in ln]
    grids = [ln.split(": ")[2] for ln in warned]
    assert len(grids) >= 2 and len(set(grids)) == len(grids)  # at most one line per grid
    assert any("lsq:adam" in ln for ln in warned) and "unknown key" not in " ".join(err)


def test_group_size_not_dividing_a_layer_names_it(tiny_llama, tmp_path, capsys):
    cfg = _config({"axes.model": [f"hf:{tiny_llama}"], "axes.group_size": [48]}, tmp_path)
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["run", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert "group_size: 48 does not divide the input width 64 of layer " in err
    assert "model.layers.0.self_attn.q_proj" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_real_console_script_exit_code(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_config({"axes.wbits": [1]}, tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "suite.cli", "run", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "qbench: error: axes.wbits: got 1; accepted: integers 2..8"


def test_overrides_take_precedence(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(_config({}, tmp_path)))
    grid = load_grid(path, ["axes.wbits=[2]", "fixed.scale_dtype=float32"])
    assert grid.wbits == (2,) and grid.scale_dtype == "float32"


def test_degenerate_format_warns(monkeypatch):
    """SmolLM2's Q4_1 stores float offsets: no integer-zero format reproduces it, so nothing
    warns. A source with integer offsets warns for the formats that nest in its grid."""
    import dataclasses

    from suite.models import MODELS

    raw = _config({"axes.group_size": [32, 64], "axes.wbits": [4, 8, 3]}, Path("/tmp"))
    assert not parse_grid(raw).warnings
    model = raw["axes"]["model"][0]
    spec = dataclasses.replace(MODELS.get(model), source_integer_offsets=True)
    monkeypatch.setitem(MODELS._items, model, spec)
    warned = " ".join(parse_grid(raw).warnings)
    assert "w4g32" in warned and "w8g32" in warned
    assert "w3g32" not in warned and "g64" not in warned


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_and_expands(path):
    for grid in load_grids(path):
        assert grid.expand()


def test_exclude_drops_matching_cells():
    grid = parse_grid(_config({"exclude": [{"method": "rtn", "wbits": 3,
                                            "group_size": "per-channel"}]}, Path("/tmp")))
    labels = {c.fmt.label() for c in grid.expand() if c.fmt}
    assert labels == {"w4g64", "w4pc", "w3g64"}
