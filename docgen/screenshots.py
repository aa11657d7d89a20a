"""Screenshots of the built site with headless Chromium (Debian package ``chromium``).

``python -m docgen.screenshots [SITE]`` (what ``nox -s docs -- --screenshots`` runs) writes
``SITE/screenshots/front.png`` (the front page) and ``leaderboard.png`` (the first LLM
leaderboard page), at a desktop width and tall enough to show the top tables. The site is read
from ``file://`` (``use_directory_urls: false`` in mkdocs.yml), so no server is needed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from docgen import ROOT

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PAGES = {"front": "index.html", "leaderboard": "leaderboards/reproduce.html"}
WINDOW = (1280, 2400)


def browser() -> str:
    """The first headless-capable Chromium on PATH; exits with a hint when there is none."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium on PATH: `apt-get install chromium` (Debian), then re-run")


def shoot(site: Path, page: str, out: Path, window: tuple[int, int] = WINDOW) -> Path:
    """One screenshot of ``site/page`` into ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--allow-file-access-from-files", f"--window-size={window[0]},{window[1]}",
           f"--screenshot={out}", (site / page).resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {page}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Screenshot the front page and a leaderboard page of a built site."""
    p = argparse.ArgumentParser(prog="python -m docgen.screenshots", description=__doc__)
    p.add_argument("site", nargs="?", default=str(ROOT / "site"), help="the built site")
    args = p.parse_args(argv)
    site = Path(args.site)
    if not (site / "index.html").is_file():
        sys.exit(f"{site}/index.html missing: build the site first (`nox -s docs`)")
    for name, page in PAGES.items():
        print(shoot(site, page, site / "screenshots" / f"{name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
