"""A real browser for the UI tests: Playwright driving the operating system's Chromium.

Playwright's own browser download is not used (it is not reachable everywhere): `.ci/run`
installs Debian's `chromium`; without it (or without Playwright) the browser tests skip and
say why. `snap` saves a page's screenshot in the test's output folder and, for the pages the
docs show (`doc=True`), with `pytest --screenshots DIR` also as DIR/<name>.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# as root, headless, and with no background traffic (the browser reaches no outside host)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}


def why_no_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return "no Chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does)"
    return None


needs_browser = pytest.mark.skipif(why_no_browser() is not None, reason=str(why_no_browser()))


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def shoot(page, folder: Path, name: str, docs: str | None) -> Path:
    """The page's screenshot as folder/name.png, copied to docs/name.png when given."""
    path = Path(folder) / f"{name}.png"
    page.screenshot(path=str(path))
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(docs) / path.name)
    return path


@pytest.fixture
def snap(request, tmp_path):
    """snap(page, name, doc=False): the page's screenshot as tmp_path/name.png (and, for a page the
    docs show, --screenshots DIR/name.png)."""
    docs = request.config.getoption("--screenshots")
    return lambda page, name, doc=False: shoot(page, tmp_path, name, docs if doc else None)
