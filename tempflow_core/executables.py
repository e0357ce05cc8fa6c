"""Console scripts installed beside this Python (a venv's own `mlflow`, `prefect`, `ray`,
`tempflow`), so that commands started or printed run as written without activating the venv."""

from __future__ import annotations

import os
import sys


def executable(name: str) -> str:
    """The console script `name` beside this Python; the bare name (looked up on PATH) when there
    is none."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.access(path, os.X_OK) else name
