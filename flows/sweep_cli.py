"""`tempflow sweep`: variants x seeds as in-process training runs with their report
(flows/sweep.py; registered on the CLI's app in flows/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli_errors import fail as _fail
from flows.resolve import ABLATION_CONFIG, PAPER_VARIANTS, resolve


def _runs(variants: Optional[str], seeds: str, run: list[str]) -> dict[str, list[str]]:
    """Run name (VARIANT-sSEED) -> its own overrides; exits 2 on a malformed option."""
    from tempflow_core.reports.sweep import NAME

    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        _fail(f"--seeds must be comma-separated integers, not {seeds!r}")
    names = variants if variants is not None else ("" if run else PAPER_VARIANTS)
    runs = {f"{v}-s{s}": [f"algorithm={v}", f"train.seed={s}"]
            for v in (x.strip() for x in names.split(",")) if v for s in seed_list}
    for spec in run:
        name, _, sets = spec.partition(":")
        if NAME.match(name) is None:
            _fail(f"--run {spec!r}: name the run VARIANT-sSEED (e.g. tempflow-s0:train.lr=1e-4), so that the report "
                  "pairs its seeds")
        if name in runs:
            _fail(f"--run {spec!r}: a run named {name!r} is already in the sweep; give it another name")
        runs[name] = [x for x in sets.split(",") if x]
    if not runs:
        _fail("no runs: name --variants and --seeds, or --run NAME:overrides")
    return runs


def sweep(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Base config of every run (default: the "
                                          "shipped ablation's, flows/configs/ablation.yaml)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override for every run: section.field=value (repeatable)."),
    variants: Optional[str] = typer.Option(None, help="Comma-separated variants (algorithm presets), each run once "
                                           "per seed as VARIANT-sSEED (default: the paper's five, unless --run names "
                                           "the runs)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (train.seed) of the variants' runs."),
    run: list[str] = typer.Option([], "--run", help="A run with overrides of its own: "
                                  "VARIANT-sSEED:field=value,field=value (repeatable)."),
    iterations: int = typer.Option(24, min=1, help="train.iterations of every run."),
    eval_every: int = typer.Option(6, "--eval-every", min=1, help="Evaluate every this many iterations (and after "
                                   "the last; the base model first)."),
    jobs: int = typer.Option(1, min=1, help="Runs at a time, each in a process of its own (one torch thread each "
                             "when more than one)."),
    deadline: float = typer.Option(0.0, min=0.0, help="Seconds after which runs still training are stopped, their "
                                   "points kept (0: none)."),
    out: Path = typer.Option(Path("sweep"), "--out", help="Folder of points.jsonl, runs.jsonl, log.txt and the report."),
    at: Optional[int] = typer.Option(None, "--at", help="Compare the variants at this iteration (default: the last "
                                     "every run evaluated)."),
) -> None:
    """Train variants x seeds in process (no Prefect, MLflow or store), each evaluated on a
    schedule, and draw the ablation's report from the points; rerunning skips finished runs.

        tempflow sweep --variants tempflow,flow_grpo_fixed --seeds 0,1 --iterations 48 \\
            --eval-every 12 --jobs 2 --set model.path=models/tiny-shapes-sd3 --out results/mine
    """
    from flows.sweep import POINTS, sweep as run_sweep
    from tempflow_core.reports.redraw import write_sweep_report
    from tempflow_core.reports.sweep import load_points

    from flows.train import reward_credentials_to_env

    runs = _runs(variants, seeds, run)
    base = config if config is not None else ABLATION_CONFIG
    configs = {name: resolve(base, [*set_, f"train.iterations={iterations}", *own]) for name, own in runs.items()}
    try:  # a reward server's token travels in the workers' environment, as in `tempflow train`
        configs = {name: reward_credentials_to_env(cfg) for name, cfg in configs.items()}
    except ValueError as e:
        _fail(str(e))
    done = run_sweep(configs, out, eval_every, jobs, deadline, typer.echo)
    typer.echo(f"{len(done)} of {len(configs)} runs finished; points in {out / POINTS}")
    if not (out / POINTS).exists():
        _fail(f"no points in {out / POINTS}: every run failed before its first evaluation (see {out / 'log.txt'})", 1)
    try:
        made = write_sweep_report(load_points(out / POINTS), out, at)
    except ValueError as e:
        _fail(f"{out / POINTS}: no report ({e})", 1)
    typer.echo("\n".join(f"{name}: {path}" for name, path in made.items()))
