"""The ablation's report (figures 2 and 5, Table 1's form, the verdicts) from sweep points.

`benchmarks/sweep_parallel.sh` runs the variants as in-process sweeps and appends every
evaluated point to `points.jsonl`; this turns those points into the same report
`tempflow ablation` writes, for runs named `VARIANT-sSEED`. Runs stopped at a deadline reach
different iterations: every curve is cut at `--at` (default: the last iteration every run
evaluated), so the variants are compared at equal iterations. The implementation is
`tempflow_core.reports.sweep` and `tempflow_core.reports.redraw`, which `tempflow report DIR`
also uses (it redraws a committed folder in place from its points alone).

    python -m benchmarks.sweep_report results/gpu/ablation-64px/points.jsonl \\
        --out results/gpu/ablation-64px [--at 30]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tempflow_core.reports import redraw
from tempflow_core.reports.sweep import load_points


def write_report(rows: list[dict[str, Any]], out: Path, at: int | None = None) -> dict[str, str]:
    """Figures, summary.md and table.md of the points `rows` in folder `out`, compared at `at`."""
    return redraw.write_sweep_report(rows, out, at)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("points", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--at", type=int, default=None, help="compare at this iteration (default: the last every run reached)")
    args = ap.parse_args()
    for name, path in write_report(load_points(args.points), args.out, args.at).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
