"""The docs site builds with no warning (`mkdocs build --strict`: every page in the nav, every
link and image found, the API pages' docstrings parsed), and the README's links point at files
that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_docs_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    assert (site / "index.html").is_file() and (site / "fidelity" / "index.html").is_file()
    # the pages' figures and records outside docs/ are carried onto the site
    assert (site / "results" / "ablation" / "shapes" / "fig2_score_vs_iteration.png").is_file()
    page = (site / "experiments" / "shapes-32px" / "index.html").read_text()
    assert 'src="../../results/ablation/shapes/fig2_score_vs_iteration.png"' in page
    api = (site / "api" / "index.html").read_text()
    assert "sde_step" in api  # the API page is made from the docstrings


def test_the_readmes_links_point_at_files_in_the_checkout():
    text = (ROOT / "README.md").read_text()
    links = [m for m in re.findall(r"\]\(([^)\s#]+)", text) if not m.startswith(("http://", "https://"))]
    assert links, "the README links to nothing"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_files_the_docs_cite_exist():
    """Every path of the checkout that the README, the docs pages and the base models' cards
    name (`tempflow_core/...py`, `flows/configs/...yaml`, ...) is there: a moved module leaves
    no stale reference behind."""
    users_own = {"infra/.env": "the user's copy of infra/.env.example (git-ignored)",
                 "models/FLUX.1-dev": "a model folder the user downloads"}
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "models").rglob("*.md"))]
    cited = re.compile(r"(?<![\w/.])((?:tempflow_core|flows|tasks|benchmarks|infra|tests|models|results)/[\w/.-]*[\w/])")
    missing = sorted({f"{page.relative_to(ROOT)}: {path}" for page in pages for path in cited.findall(page.read_text())
                      if "{" not in path and path not in users_own and not (ROOT / path).exists()})
    assert not missing, "\n".join(missing)
