"""mkdocs hooks (``hooks:`` in mkdocs.yml): the generated pages and the generated page parts.

At build time, nothing is written into docs/:

- ``index.md`` is README.md, with its ``docs/`` links made site-relative;
- ``leaderboards/<grid>.md`` for every published grid in results/, and results/*.png beside
  them as site files;
- ``reference/config.md``, ``reference/cli.md`` and ``reference/leaderboard-schema.md`` from
  the code (``docgen.reference``);
- inside hand-written pages, marker comments are replaced by generated Markdown:
  ``<!-- qbench:method-options ID -->`` (a method's parameters),
  ``<!-- qbench:method-results ID -->`` (its published rows),
  ``<!-- qbench:csv results/NAME.csv COL,COL,... -->`` (columns of a results CSV),
  ``<!-- qbench:paper-configs -->`` (every ``configs/paper/*.yaml``),
  ``<!-- qbench:leaderboards -->`` (links to every leaderboard page).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if "docgen" not in sys.modules and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # mkdocs loads this file by path; the package is beside it

from docgen import RESULTS, reference, results  # noqa: E402

# a marker is a line of its own (one quoted in backticks inside a sentence is left alone)
_MARKER = re.compile(r"^<!-- qbench:(?P<kind>[\w-]+)(?P<args>[^>]*?)\s*-->[ \t]*$", re.M)


def readme_as_index(text: str) -> str:
    """README.md as the site's front page: links into docs/ become site-relative."""
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files: Any, config: Any, **_: Any) -> Any:
    """Add the generated pages and the result plots to the site's files."""
    from mkdocs.structure.files import File

    def add(uri: str, content: str | None = None, path: Path | None = None) -> None:
        old = files.get_file_from_path(uri)
        if old is not None:
            files.remove(old)
        files.append(File.generated(config, uri, content=content,
                                    abs_src_path=str(path) if path else None))

    add("index.md", readme_as_index((_ROOT / "README.md").read_text()))
    for grid in results.published_grids():
        add(f"leaderboards/{grid.name}.md", results.leaderboard_page(grid))
    for png in sorted(RESULTS.glob("*.png")) + sorted((RESULTS / "vision").glob("*.png")):
        add(png.relative_to(_ROOT).as_posix(), path=png)
    add("reference/config.md", reference.config_page())
    add("reference/cli.md", reference.cli_page())
    add("reference/leaderboard-schema.md", reference.schema_page())
    return files


def _expand(match: re.Match) -> str:
    kind, args = match.group("kind"), match.group("args").split()
    if kind == "method-options":
        return reference.method_options(args[0])
    if kind == "method-results":
        return results.method_rows(args[0]) or "No published rows yet."
    if kind == "csv":
        return results.csv_table(_ROOT / args[0], args[1].split(","))
    if kind == "paper-configs":
        return reference.paper_configs()
    if kind == "leaderboards":
        return "\n".join(f"- [{g.name}]({g.name}.md): {g.meta.get('description', '')}"
                         for g in results.published_grids())
    raise ValueError(f"unknown docs marker {match.group(0)!r}")


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace the generated-part markers of a page."""
    return _MARKER.sub(_expand, markdown)
