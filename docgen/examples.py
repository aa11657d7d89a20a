"""The fenced Python examples of README.md and docs/, which the tests execute.

An example that is not meant to run (a fragment, or one that needs a GPU or the hub) is
marked by the line ``<!-- no-run -->`` directly above its fence (blank lines between are
allowed); the page then says why in its text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from docgen import ROOT

NO_RUN = "<!-- no-run -->"
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")


@dataclass(frozen=True)
class Example:
    """One fenced code block."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    run: bool

    @property
    def id(self) -> str:
        """``README.md:123``: the example's place, for test ids and failure messages."""
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Example]:
    """Every fenced block of a Markdown file, with its language and no-run mark."""
    lines = path.read_text().splitlines()
    out: list[Example] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, fence, indent = i, m.group("fence"), len(m.group("indent"))
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marked = j >= 0 and lines[j].strip() == NO_RUN
        out.append(Example(path, start + 1, m.group("lang").lower(), "\n".join(body) + "\n",
                           not marked))
        i += 1
    return out


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def python_examples(root: Path = ROOT) -> list[Example]:
    """Every fenced ``python`` block of README.md and docs/ (marked ones included)."""
    return [e for path in doc_files(root) for e in code_blocks(path)
            if e.lang in ("python", "py")]
