"""The committed records of an experiment folder, read and checked before anything is drawn.

An experiment folder under results/ holds one kind of record:

- ``curves.json``: written by `tempflow ablation` (every evaluation point of every seed, the
  final evaluations, the base model's, Figure 1's reward std per step, the sampling grid);
- ``points.jsonl``: appended by `tempflow sweep` (one evaluated point per line,
  runs named VARIANT-sSEED); a ``records.json`` beside it may name more points files to join
  (paths relative to the folder) and the variants to keep, e.g. a second run of more seeds:
  ``{"points": ["points.jsonl", "../ablation-64px/points.jsonl"], "variants": ["tempflow"]}``;
- ``*.json`` files of `benchmarks/gpu_smoke.py --json` (one GPU smoke measurement each).

``read_records`` parses all of it or raises RecordsError with one line naming the folder (or
file) and the fix, so a report is refused before it writes anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tempflow_core.reports import sweep

CURVES = "curves.json"
POINTS = "points.jsonl"
MANIFEST = "records.json"
CURVES_KEYS = ("reward", "curves", "std_by_step", "finals", "base_eval", "config")
SMOKE_KEYS = ("rollout_s", "rollout_nfe", "images", "images_per_s", "learner_s", "learner_units",
              "learner_terms", "learner_units_per_s")
WRITERS = (f"{CURVES} (tempflow ablation), {POINTS} (tempflow sweep) or the JSON files of "
           "benchmarks/gpu_smoke.py --json")


class RecordsError(ValueError):
    """A folder no report can be drawn from; the message is one line naming it and the fix."""


@dataclass(frozen=True)
class Records:
    """What one experiment folder's report is drawn from (only the field of its kind is set)."""

    folder: Path
    kind: Literal["curves", "points", "smoke"]
    curves: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    smoke: dict[str, dict[str, Any]] = field(default_factory=dict)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordsError(f"{path}: not readable as JSON ({e}); restore it (git checkout -- {path})") from None


def read_curves(folder: Path) -> Records:
    """A `tempflow ablation` folder: curves.json with every key the report draws from."""
    path = folder / CURVES
    data = _json(path)
    missing = [k for k in CURVES_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise RecordsError(f"{path}: lacks {', '.join(missing)}, so it is not a curves.json of `tempflow ablation`; "
                           f"restore it (git checkout -- {path}) or write it again with tempflow ablation --report-only")
    if "sampling" not in data["config"] or "num_steps" not in data["config"]["sampling"]:
        raise RecordsError(f"{path}: config.sampling.num_steps is missing; restore it (git checkout -- {path})")
    return Records(folder, "curves", curves=data)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The points files (paths, resolved against the folder) and variants (None: all) of a
    points folder: records.json when there is one, else its own points.jsonl."""
    path = folder / MANIFEST
    if not path.exists():
        return {"points": [folder / POINTS], "variants": None}
    m = _json(path)
    files = m.get("points") if isinstance(m, dict) else None
    variants = m.get("variants") if isinstance(m, dict) else None
    if not files or not all(isinstance(f, str) for f in files) or not (
            variants is None or (isinstance(variants, list) and all(isinstance(v, str) for v in variants))):
        raise RecordsError(f"{path}: expected {{\"points\": [files relative to the folder], \"variants\": [names] "
                           "(optional)}; fix the file or remove it to read points.jsonl alone")
    return {"points": [(folder / f) for f in files], "variants": variants}


def read_points(folder: Path) -> Records:
    """A sweep folder: every points file its manifest names, parsed and checked; the runs of
    the manifest's variants only; the last line wins where a point repeats."""
    manifest = read_manifest(folder)
    rows: list[dict[str, Any]] = []
    for path in manifest["points"]:
        if not path.is_file():
            raise RecordsError(f"{folder / MANIFEST}: names {path}, which does not exist; fix the path")
        try:
            rows += sweep.parse_points(path.read_text(), str(path))
        except ValueError as e:
            raise RecordsError(f"{e}; restore the file (git checkout -- {path})") from None
    keep = manifest["variants"]
    rows = sweep.latest(r for r in rows if keep is None or sweep.variant_of(r["name"]) in keep)
    if not rows:
        raise RecordsError(f"{folder}: its points files hold no points"
                           + (f" of {', '.join(keep)}" if keep else "")
                           + "; rerun the sweep into it (tempflow sweep --out FOLDER)")
    if not any(r["point"]["iteration"] == 0 for r in rows):
        raise RecordsError(f"{folder}: no point at iteration 0 (the base model every curve starts from); "
                           "rerun the sweep: tempflow sweep evaluates the base model first")
    return Records(folder, "points", rows=rows)


def read_smoke(folder: Path, paths: list[Path]) -> Records:
    """A folder of GPU smoke measurements: every *.json holds the figures the table shows."""
    records = {}
    for path in paths:
        data = _json(path)
        missing = [k for k in SMOKE_KEYS if not isinstance(data, dict) or k not in data]
        if missing:
            raise RecordsError(f"{path}: lacks {', '.join(missing)}, so it is not a benchmarks/gpu_smoke.py --json "
                               "record; move it out of the folder or write it again with gpu_smoke.py --json")
        records[path.stem] = data
    return Records(folder, "smoke", smoke=records)


def read_records(folder: Path) -> Records:
    """The records of an experiment folder, read whole and checked (RecordsError otherwise):
    curves.json first, then points.jsonl (or records.json), then gpu_smoke JSON files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RecordsError(f"{folder}: no such folder; pass an experiment folder, e.g. results/gpu/ablation-64px")
    if (folder / CURVES).exists():
        return read_curves(folder)
    if (folder / MANIFEST).exists() or (folder / POINTS).exists():
        return read_points(folder)
    smoke = smoke_files(folder)
    if smoke:
        return read_smoke(folder, smoke)
    inside = [p for p in sorted(folder.iterdir()) if p.is_dir() and holds_records(p)]
    hint = (f"its subfolders {', '.join(p.name for p in inside)} hold records: tempflow report {inside[0]}"
            if inside else "e.g. results/gpu/ablation-64px")
    raise RecordsError(f"{folder}: holds no records to draw a report from; pass a folder with {WRITERS}; {hint}")


def smoke_files(folder: Path) -> list[Path]:
    """The *.json files of a folder that are gpu_smoke records (they carry rollout_nfe);
    other JSON (an index such as results/ablation/runs.json) is not a record of its own."""
    found = []
    for path in sorted(folder.glob("*.json")):
        data = _json(path)
        if isinstance(data, dict) and "rollout_nfe" in data:
            found.append(path)
    return found


def holds_records(folder: Path) -> bool:
    """Whether a folder holds records of any kind (without reading them whole)."""
    if any((folder / name).exists() for name in (CURVES, POINTS, MANIFEST)):
        return True
    try:
        return bool(smoke_files(folder))
    except RecordsError:
        return True  # a JSON file there does not parse: reading the folder names it
