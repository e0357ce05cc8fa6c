"""`tempflow` for tests: in a subprocess of its own (what depends on the process: the console
script's exit code, credentials and settings from its environment, what it leaves behind) or in
this process through typer's runner (the CLI's own code, its exit code and stderr; a command
refused before any work takes ~0.1 s there instead of ~5 s of interpreter start and imports)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = Path(sys.executable).parent / "tempflow"  # the console script a user runs
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "flows.cli"]


def run_cli(args: list[str], env: dict[str, str], cwd: Path, own_process: bool = True,
            timeout: float = 120) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `tempflow ARGS` in `cwd` under the environment `env`."""
    if own_process:
        out = subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        return out.returncode, out.stdout, out.stderr
    from typer.testing import CliRunner

    from flows.cli import app

    delta: dict[str, str | None] = {k: v for k, v in env.items() if os.environ.get(k) != v}
    delta.update({k: None for k in os.environ if k not in env})
    delta.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cwd.parent / "inductor"))  # else the CLI makes one in $TMPDIR
    here = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, args, env=delta)
    finally:
        os.chdir(here)
    return result.exit_code, result.stdout, result.stderr


def in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`tempflow ARGS` in this process (typer's runner) as a CompletedProcess: exit code, stdout, stderr."""
    code, out, err = run_cli(args, dict(os.environ), cwd, own_process=False)
    return subprocess.CompletedProcess(["tempflow", *args], code, out, err)
