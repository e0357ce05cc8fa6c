"""Fingerprints of the files a config points at: the model folder, prompt files, reward models.

The config digest hashes paths, not what lies there. A run records the sha256 of every
input file when it starts (`run.json` "inputs") and a resume whose files changed is refused,
naming the file: continuing would mix outputs of two different models or prompt sets.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from tempflow_core.config import RunConfig
from tempflow_core.prompts import split_source


_NOT_LOADED = (".md",)  # documentation beside the weights (a model card): editing it changes no result


def _files(path: Path) -> Iterator[Path]:
    """The file itself, or every file of a folder that a loader may read (hidden ones and
    documentation left out)."""
    if path.is_file():
        yield path
    elif path.is_dir():
        yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in _NOT_LOADED
                          and not any(part.startswith(".") for part in p.relative_to(path).parts))


def _option_paths(value: Any) -> Iterator[Path]:
    """Existing local paths among reward options (a model folder, a weights file)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _option_paths(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _option_paths(v)
    elif isinstance(value, str) and os.sep in value and Path(value).exists():
        yield Path(value)


def input_paths(cfg: RunConfig) -> list[Path]:
    """The files and folders the config points at, as given."""
    paths = [Path(cfg.model.path)] if cfg.model.path else []
    for src in (cfg.prompts.source, cfg.prompts.test_source, cfg.eval.prompts):
        if src and not src.startswith("builtin:"):
            paths.append(Path(split_source(src)[0]))  # the file a `?tags=` filter reads
    paths += list(_option_paths(cfg.reward.options))
    return paths


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprints(cfg: RunConfig) -> dict[str, str]:
    """{absolute file path: sha256} of every input file (every file of an input folder)."""
    out: dict[str, str] = {}
    for root in input_paths(cfg):
        for f in _files(root):
            out[str(f.resolve())] = sha256_file(f)
    return out


def folder_sha256(path: str | Path, recorded: Mapping[str, str] | None = None) -> str:
    """sha256 over the relative path and content sha256 of every file of a folder that
    `fingerprints` covers: names the exact bytes of a model. File digests found in `recorded`
    (a run's `inputs`, checked when the run resumed) are reused, so SD3.5-M's weights are read
    once per run, not once per export."""
    root, recorded = Path(path), recorded or {}
    h = hashlib.sha256()
    for f in _files(root):
        key = str(f.resolve())
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update((recorded.get(key) or sha256_file(f)).encode() + b"\n")
    return h.hexdigest()


def changed_inputs(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """One line per input file that differs: changed, gone or new."""
    lines = []
    for path in sorted(recorded.keys() | current.keys()):
        a, b = recorded.get(path), current.get(path)
        if a == b:
            continue
        if b is None:
            lines.append(f"{path} is gone")
        elif a is None:
            lines.append(f"{path} is new")
        else:
            lines.append(f"{path} changed (sha256 {a[:12]}... when the run started, now {b[:12]}...)")
    return lines
