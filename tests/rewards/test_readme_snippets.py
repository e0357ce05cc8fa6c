"""The Python heredocs of the README and of the docs pages run as written and print what the
page says they print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pages() -> list[Path]:
    """README.md and every Markdown page of the docs site."""
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def heredocs() -> list[tuple[str, str]]:
    """(snippet, expected output): the output is the snippet's `# ` comment lines."""
    text = "\n".join(p.read_text() for p in pages())
    bodies = re.findall(r"\.venv/bin/python - <<'EOF'\n(.*?)\nEOF\n", text, flags=re.S)
    return [(b, "\n".join(ln[2:] for ln in b.splitlines() if ln.startswith("# "))) for b in bodies]


def test_readme_python_heredocs_print_what_the_readme_shows():
    docs = heredocs()
    assert len(docs) >= 3, "the README and docs hold fewer `.venv/bin/python - <<'EOF'` snippets than they did"
    for body, expected in docs:
        out = subprocess.run([sys.executable, "-"], input=body, capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        if expected:  # the comment lines under the snippet are its output
            assert out.stdout.strip() == expected.strip(), (out.stdout, expected)
