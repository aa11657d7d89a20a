"""Reference pages generated from the code: config keys, the CLI, the leaderboard schema.

- Config keys come from the frozen dataclasses that validate a grid YAML (``suite.config``,
  ``suite.vision``) and from every registered method's ``Config``: name, type, default, the
  accepted values (a ``Literal``'s choices, or the "accepted: ..." text of the validator's own
  error, found by feeding it a bad value), and the documentation text (see :func:`field_docs`).
- The CLI comes from the argparse parser ``qbench`` itself uses.
- The leaderboard schema is ``suite.leaderboard.schema_markdown()``.

:func:`undocumented_config_keys` and :func:`undocumented_cli` list what lacks text; the tests
require both to be empty.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any

from docgen.fields import CLI_TEXT, TEXT

_LLM_GRID = {"axes": {"model": ["smollm2-135m-instruct@gguf-q4_1"], "method": ["rtn"]}}
_VISION_GRID = {"axes": {"model": ["cnn-small@fashion-mnist"], "method": ["rtn"]}}
_NO_PROBE = {"methods"}  # the validator names the grid's own methods only
_NOT_A_KEY = "(not a YAML key: filled in by qbench)"
_BAD_VALUES: tuple[Any, ...] = (-1, [99], "qbench-not-a-value", {"qbench": 1})


@dataclass(frozen=True)
class Key:
    """One documented config key."""

    path: str  # as written in YAML, e.g. run.slurm.mem_gb
    owner: str  # Class.field, or the YAML path for keys that are not dataclass fields
    type: str
    default: str
    accepted: str
    doc: str
    source: str  # where the text came from; "" when there is none


# ---------------------------------------------------------------------------------------------
# documentation text of dataclass fields


def _attributes_section(doc: str | None) -> dict[str, str]:
    """``{name: text}`` of a Google-style ``Attributes:`` section (``a / b: text`` gives both)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    current: list[str] = []
    base: int | None = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        base = indent if base is None else base
        if indent < base:
            break
        entry = re.match(r"\s*([A-Za-z_][\w ,/]*?):\s+(.*)", line) if indent == base else None
        if indent == base and entry is None:
            break
        if entry:
            current = [n.strip() for n in re.split(r"[/,]", entry.group(1)) if n.strip()]
            for name in current:
                out[name] = entry.group(2).strip()
        else:
            for name in current:
                out[name] += " " + line.strip()
    return out


def _mentions(doc: str | None, name: str) -> str:
    """The class docstring's sentences that name ``name`` in double backticks."""
    text = " ".join(inspect.cleandoc(doc or "").split())
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z`])", text)
    return " ".join(s for s in sentences if f"``{name}``" in s or f"``{name}: " in s)


def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (text, source)}`` for a dataclass, from the code, in this order: an attribute
    docstring (a string right after the field), the class docstring's ``Attributes:`` entry,
    ``#`` comments on or directly above the field; then the docs tooling's own text
    (``docgen.fields``); last, the sentences of the class docstring that name the field in
    double backticks."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        src = ""
    body = ast.parse(src).body[0].body if src else []  # type: ignore[attr-defined]
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = src.splitlines()
    attrs = _attributes_section(cls.__doc__)
    out: dict[str, tuple[str, str]] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        nxt = body[i + 1] if i + 1 < len(body) else None
        if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            out[name] = (" ".join(nxt.value.value.split()), "attribute docstring")
            continue
        if name in attrs:
            out[name] = (attrs[name], "class docstring")
            continue
        above, ln = [], node.lineno - 1
        while ln in comments and lines[ln - 1].lstrip().startswith("#"):
            above.insert(0, comments[ln])
            ln -= 1
        inline = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                  if n in comments]
        if above or inline:
            out[name] = (" ".join(above + inline), "comment")
            continue
        key = f"{cls.__name__}.{name}"
        if key in TEXT:
            out[name] = (TEXT[key], "docs tooling")
            continue
        mention = _mentions(cls.__doc__, name)
        if mention:
            out[name] = (mention, "class docstring")
    return out


# ---------------------------------------------------------------------------------------------
# types, defaults, accepted values


def _yaml(value: Any) -> str:
    """A value as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _type_and_choices(annotation: Any) -> tuple[str, str]:
    """(readable type, Literal choices or '') of a field annotation (a string under
    ``from __future__ import annotations``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__",
                                                                   str(annotation))
    choices = ""
    lit = re.fullmatch(r"Literal\[(.*)\]", text)
    if lit:
        values = ast.literal_eval(f"({lit.group(1)},)")
        choices = ", ".join(_yaml(v) for v in values)
        text = type(values[0]).__name__
    text = re.sub(r"tuple\[(\w+), \.\.\.\]", r"list of \1", text)
    text = text.replace(" | None", " or null")
    return text, choices


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _yaml(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "(mapping below)" if dataclasses.is_dataclass(value) else _yaml(value)
    return "(required)"


def _accepted_text(message: str) -> str:
    return message.split("accepted:", 1)[1].strip() if "accepted:" in message else ""


def _set(raw: dict, path: list[str | int], value: Any) -> dict:
    out = copy.deepcopy(raw)
    node: Any = out
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[path[-1]] = value
    return out


def _probe_grid(base: dict, path: list[str | int], label: str) -> str:
    """The accepted values the grid validator names when ``path`` gets a bad value."""
    from suite.config import parse_grid
    from suite.errors import ConfigError

    last = str(path[-1])
    for bad in _BAD_VALUES:
        try:
            parse_grid(_set(base, path, bad))
        except ConfigError as e:
            msg = str(e)
            if msg.startswith(f"{label}: unknown key"):
                return _NOT_A_KEY
            if (msg.startswith(label) or f".{last}=" in msg) and "accepted:" in msg:
                return _accepted_text(msg)
        except Exception:  # noqa: BLE001 - a probe that crashes simply names nothing
            continue
    return ""


def _probe_method(config: type, name: str) -> str:
    """The accepted values a method config's own check names for a bad ``name``."""
    from suite.errors import ConfigError

    for bad in _BAD_VALUES:
        try:
            config(**{name: bad})
        except ConfigError as e:
            if name in str(e).split(":", 1)[0]:
                return _accepted_text(str(e))
        except Exception:  # noqa: BLE001 - the constructor's own type errors name nothing
            continue
    return ""


# ---------------------------------------------------------------------------------------------
# the sections of a grid YAML


@dataclass(frozen=True)
class Section:
    """A mapping of the grid YAML and the dataclass (or key list) that defines it."""

    path: str
    title: str
    cls: type | None = None
    keys: tuple[str, ...] = ()
    base: dict | None = None  # a valid raw grid to probe the validator with
    probe_path: tuple[str | int, ...] = ()  # where this section sits in that raw grid
    intro: str = ""


def grid_sections() -> list[Section]:
    """Every section of a grid YAML, in the order a grid file is written."""
    from suite import config as C
    from suite.vision.runtime import QATBudget, VisionSetup
    from suite.vision.train import TrainSpec

    ppl = {"fixed": {"eval": [{"type": "ppl"}]}}
    acc = {"fixed": {"eval": [{"type": "acc", "task": "bigbench:strategyqa"}]}}
    top1 = {"fixed": {"eval": [{"type": "top1"}]}}
    return [
        Section("", "Top-level keys", keys=C._TOP, base=_LLM_GRID),
        Section("axes", "axes", keys=C._AXES, base=_LLM_GRID, probe_path=("axes",),
                intro="Each key takes a list (a single value is a list of one)."),
        Section("fixed", "fixed", keys=C._FIXED, base=_LLM_GRID, probe_path=("fixed",)),
        Section("fixed.calib", "fixed.calib", C.CalibSpec, base=_LLM_GRID,
                probe_path=("fixed", "calib")),
        Section("fixed.eval[]", "fixed.eval: type ppl", C.EvalSpec,
                base={**_LLM_GRID, **ppl}, probe_path=("fixed", "eval", 0)),
        Section("fixed.eval[]", "fixed.eval: type acc", C.TaskSpec,
                base={**_LLM_GRID, **acc}, probe_path=("fixed", "eval", 0)),
        Section("fixed.eval[]", "fixed.eval: type top1", C.Top1Spec,
                base={**_VISION_GRID, **top1}, probe_path=("fixed", "eval", 0)),
        Section("fixed.vision", "fixed.vision", VisionSetup, base=_VISION_GRID,
                probe_path=("fixed", "vision")),
        Section("fixed.vision.fp_train", "fixed.vision.fp_train", TrainSpec,
                base=_VISION_GRID, probe_path=("fixed", "vision", "fp_train")),
        Section("fixed.vision.train", "fixed.vision.train", QATBudget, base=_VISION_GRID,
                probe_path=("fixed", "vision", "train")),
        Section("run", "run", C.RunSpec, base=_LLM_GRID, probe_path=("run",)),
        Section("run.slurm", "run.slurm", C.SlurmSpec, base=_LLM_GRID,
                probe_path=("run", "slurm")),
        Section("run.ray", "run.ray", C.RaySpec, base=_LLM_GRID, probe_path=("run", "ray")),
        Section("exclude[]", "exclude", keys=C._EXCLUDE,
                intro="A list of rules; each names some of these keys."),
    ]


def method_configs() -> dict[str, type]:
    """``{method id: its Config dataclass}`` of every registered method."""
    from suite.interface import METHODS

    return {name: METHODS.get(name).Config for name in sorted(METHODS)}


def section_keys(section: Section, probe: bool = True) -> list[Key]:
    """The documented keys of one grid section."""
    out = []
    if section.cls is None:
        for key in section.keys:
            path = f"{section.path}.{key}" if section.path else key
            lookup = path.replace("[]", "")
            accepted = ""
            if probe and section.base is not None and lookup not in _NO_PROBE:
                accepted = _probe_grid(section.base, [*section.probe_path, key], lookup)
            text = TEXT.get(lookup, "")
            out.append(Key(lookup, lookup, "", "", accepted, text,
                           "docs tooling" if text else ""))
        return out
    docs = field_docs(section.cls)
    for f in dataclasses.fields(section.cls):
        path = f"{section.path}.{f.name}"
        type_, choices = _type_and_choices(f.type)
        accepted = choices
        if probe and not accepted and section.base is not None and not type_.startswith("bool"):
            accepted = _probe_grid(section.base, [*section.probe_path, f.name],
                                   path.replace("[]", "[0]"))
        if type_ == "bool":
            accepted = "true, false"
        text, source = docs.get(f.name, ("", ""))
        out.append(Key(path, f"{section.cls.__name__}.{f.name}", type_, _default(f), accepted,
                       text, source))
    return out


def method_keys(method: str, config: type, probe: bool = True) -> list[Key]:
    """The documented parameters of one method (``methods.<id>.<key>``)."""
    docs = field_docs(config)
    out = []
    for f in dataclasses.fields(config):
        type_, choices = _type_and_choices(f.type)
        accepted = choices or ("true, false" if type_ == "bool" else
                               _probe_method(config, f.name) if probe else "")
        text, source = docs.get(f.name, ("", ""))
        out.append(Key(f"methods.{method}.{f.name}", f"{config.__name__}.{f.name}", type_,
                       _default(f), accepted, text, source))
    return out


def all_config_keys(probe: bool = False) -> list[Key]:
    """Every key of the grid YAML and of every method's parameters."""
    keys = [k for s in grid_sections() for k in section_keys(s, probe)]
    for method, config in method_configs().items():
        keys += method_keys(method, config, probe)
    return keys


def undocumented_config_keys() -> list[str]:
    """Config keys without documentation text (the tests require none)."""
    return [k.path for k in all_config_keys() if not k.doc.strip()]


def unused_supplement() -> list[str]:
    """Entries of ``docgen.fields.TEXT`` that no key uses (the field is gone, or its code now
    carries its own text)."""
    used = {k.owner for k in all_config_keys() if k.source == "docs tooling"}
    return sorted(set(TEXT) - used)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _key_table(keys: list[Key], with_type: bool = True) -> list[str]:
    lines = (["| key | type | default | accepted | meaning |", "|---|---|---|---|---|"]
             if with_type else ["| key | accepted | meaning |", "|---|---|---|"])
    for k in keys:
        name = k.path.rsplit(".", 1)[-1]
        meaning = _cell(k.doc) or "**undocumented**"
        accepted = _cell(k.accepted) or ""
        if with_type:
            lines.append(f"| `{name}` | {_cell(k.type)} | `{_cell(k.default)}` | {accepted} | "
                         f"{meaning} |")
        else:
            lines.append(f"| `{name}` | {accepted} | {meaning} |")
    return lines


def config_page() -> str:
    """The config-keys reference page."""
    lines = ["# Config keys", "",
             "Generated at build time from the dataclasses that validate a grid YAML "
             "(`suite/config.py`, `suite/vision/`) and from every registered method's config "
             "dataclass. *Accepted* is a `Literal`'s choices or the text the validator itself "
             "prints for a bad value; unknown keys and bad values are one-line errors (exit "
             "code 2, nothing written). `--set dotted.key=value` overrides any key from the "
             "command line.", ""]
    for section in grid_sections():
        keys = section_keys(section)
        lines += [f"## {section.title}", ""]
        if section.intro:
            lines += [section.intro, ""]
        if section.cls is not None and section.cls.__doc__:
            summary = inspect.cleandoc(section.cls.__doc__).split("\n\n")[0]
            if not summary.startswith("Attributes:"):
                lines += [" ".join(summary.split()), ""]
        lines += _key_table(keys, with_type=section.cls is not None) + [""]
    lines += ["## methods", "",
              "`methods: {<id>: {...}}`; each method's parameters, validated by its config "
              "dataclass (its `version` enters the run key). The method pages explain them.",
              ""]
    for method, config in method_configs().items():
        keys = method_keys(method, config)
        lines += [f"### methods.{method}", "", f"`{config.__module__}.{config.__name__}`, "
                  f"version {config.version}.", ""]
        lines += _key_table(keys) + [""] if keys else ["No parameters.", ""]
    return "\n".join(lines)


def method_options(method: str) -> str:
    """The options table of one method (for its page)."""
    config = method_configs()[method]
    keys = method_keys(method, config)
    if not keys:
        return f"`{config.__name__}` has no parameters beyond the cell's weight format."
    return "\n".join([f"`methods: {{{method}: {{...}}}}` (`{config.__name__}`, version "
                      f"{config.version}; generated from the code):", "", *_key_table(keys)])


# ---------------------------------------------------------------------------------------------
# the command line


def build_parser() -> argparse.ArgumentParser:
    """The parser the ``qbench`` console script uses (``suite.cli``)."""
    from suite import cli

    builder = getattr(cli, "build_parser", None) or cli._parser
    return builder()


def _subcommands(parser: argparse.ArgumentParser
                 ) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of every subcommand."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _arg_name(action: argparse.Action) -> str:
    if action.option_strings:
        name = ", ".join(action.option_strings)
        if action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}"
        return name
    return str(action.metavar or action.dest).upper()


def _help(command: str, action: argparse.Action) -> tuple[str, str]:
    """(help text, source) of an argument: its argparse help, else the docs tooling's."""
    if action.help and action.help.strip() and action.help != argparse.SUPPRESS:
        return action.help, "argparse"
    key = f"{command} {action.dest}"
    return (CLI_TEXT[key], "docs tooling") if key in CLI_TEXT else ("", "")


def undocumented_cli() -> list[str]:
    """Subcommands and arguments without help text (the tests require none)."""
    missing = []
    for name, help_, sub in _subcommands(build_parser()):
        if not help_.strip():
            missing.append(name)
        missing += [f"{name} {_arg_name(a)}" for a in _arguments(sub) if not _help(name, a)[0]]
    return missing


def unused_cli_supplement() -> list[str]:
    """Entries of ``docgen.fields.CLI_TEXT`` that no argument uses."""
    used = {f"{name} {a.dest}" for name, _, sub in _subcommands(build_parser())
            for a in _arguments(sub) if _help(name, a)[1] == "docs tooling"}
    return sorted(set(CLI_TEXT) - used)


def cli_page() -> str:
    """The CLI reference page."""
    parser = build_parser()
    lines = ["# Command line", "",
             "Generated at build time from the argument parser of `qbench` "
             "(`suite/cli.py`). Every user error prints one line `qbench: error: ...` and "
             "exits with code 2 before anything is written.", "",
             "```text", parser.format_usage().strip(), "```", ""]
    for name, help_, sub in _subcommands(parser):
        lines += [f"## qbench {name}", "", help_[:1].upper() + help_[1:] + ".", "",
                  "```text", sub.format_usage().strip(), "```", "",
                  "| argument | default | meaning |", "|---|---|---|"]
        for a in _arguments(sub):
            default = "" if a.default in (None, [], False) else f"`{_yaml(a.default)}`"
            if a.required:
                default = "(required)"
            text = _help(name, a)[0] or "**undocumented**"
            if a.choices:
                text += f" (one of: {', '.join(map(str, a.choices))})"
            lines.append(f"| `{_cell(_arg_name(a))}` | {default} | {_cell(text)} |")
        lines.append("")
    return "\n".join(lines)


def schema_page() -> str:
    """The leaderboard schema page (``suite.leaderboard``'s own SCHEMA.md text)."""
    from suite.leaderboard import schema_markdown

    return schema_markdown()


# ---------------------------------------------------------------------------------------------
# the paper-scale configs


def paper_configs(folder: str = "configs/paper") -> str:
    """One section per paper-scale grid: its file, leading comment, models, methods and axes."""
    import yaml

    from docgen import ROOT

    lines: list[str] = []
    for path in sorted((ROOT / folder).glob("*.yaml")):
        text = path.read_text()
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        for doc in yaml.safe_load_all(text):
            if not isinstance(doc, dict):
                continue
            axes = doc.get("axes", {})
            run = doc.get("run", {})
            lines += [f"### {doc.get('name', path.stem)}", "", f"`{folder}/{path.name}`", "",
                      " ".join(comment), "",
                      f"- models: {', '.join(f'`{m}`' for m in axes.get('model', []))}",
                      f"- methods: {', '.join(f'`{m}`' for m in axes.get('method', []))}",
                      f"- wbits: {_yaml(axes.get('wbits', []))}; group sizes: "
                      f"{_yaml(axes.get('group_size', []))}; seeds: {_yaml(axes.get('seed', [0]))}",
                      f"- device: `{run.get('device', 'cpu')}`", ""]
    return "\n".join(lines)
