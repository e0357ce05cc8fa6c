"""The command line's one way to fail on bad input: one line on stderr, then exit (2 unless told)."""

from __future__ import annotations

import typer


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)
