"""The README's Python heredocs run as written and print what the README says they print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def heredocs() -> list[tuple[str, str]]:
    """(snippet, expected output): the output is the snippet's `# ` comment lines."""
    text = (ROOT / "README.md").read_text()
    bodies = re.findall(r"\.venv/bin/python - <<'EOF'\n(.*?)\nEOF\n", text, flags=re.S)
    return [(b, "\n".join(ln[2:] for ln in b.splitlines() if ln.startswith("# "))) for b in bodies]


def test_readme_python_heredocs_print_what_the_readme_shows():
    docs = heredocs()
    assert docs, "README.md holds no `.venv/bin/python - <<'EOF'` snippet"
    for body, expected in docs:
        out = subprocess.run([sys.executable, "-"], input=body, capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        if expected:  # the comment lines under the snippet are its output
            assert out.stdout.strip() == expected.strip(), (out.stdout, expected)
