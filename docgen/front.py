"""README.md's headline results, rendered from results/ between two marker comments.

``python -m docgen.front`` rewrites the block in place (run it after ``qbench table`` changed
results/); ``--check`` only reports whether README.md is current (exit 1 if not), which is what
``tests/test_docs.py`` asserts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from docgen import RESULTS, ROOT
from docgen.results import headline

BEGIN = "<!-- headline:begin: generated from results/ by `python -m docgen.front`; do not edit -->"
END = "<!-- headline:end -->"
README = ROOT / "README.md"


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with the block between the markers replaced by the current headline."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError("README.md must hold the headline markers exactly once each")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{headline(results)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with ``--check`` only compare) README.md's headline block."""
    p = argparse.ArgumentParser(prog="python -m docgen.front", description=__doc__)
    p.add_argument("--check", action="store_true",
                   help="exit 1 if README.md's table differs from results/, writing nothing")
    args = p.parse_args(argv)
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md's headline table is stale: run `python -m docgen.front`",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new)
        print("README.md: headline table re-rendered from results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
