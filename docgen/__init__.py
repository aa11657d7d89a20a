"""Documentation tooling: the generated parts of README.md and of the mkdocs site.

Nothing here is part of the suite. It reads what the suite declares (the config dataclasses,
the argument parser, the leaderboard schema, the method registry) and what it published
(``results/*.csv``), and writes Markdown, so the reference pages and result tables cannot drift
from the code and the data:

- ``results``: leaderboard pages, per-method result tables and the front page's headline table;
- ``reference``: config keys, CLI and leaderboard schema pages, with documentation-coverage
  checks used by ``tests/test_docs.py``;
- ``front``: ``python -m docgen.front [--check]`` re-renders README.md's headline table;
- ``examples``: the fenced Python examples of README.md and docs/ (run by the tests);
- ``hooks``: the mkdocs hooks that assemble the site (``mkdocs.yml``);
- ``screenshots``: headless-Chromium screenshots of the built site (``nox -s docs --
  --screenshots``).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
