"""`tempflow report`: an experiment folder's figures and tables from its records, or its records
collected from a run store first (registered on the CLI's app in flows/cli.py).

The folder's kind is read from what it holds: a replication (PROTOCOL.md), a cost comparison
(images.jsonl.gz, comparison.json), a comparison of two variants image by image (images.jsonl),
checkpoints scored by `tempflow eval --out` (*.json evaluations), else an ablation's curves.json,
a sweep's points.jsonl or GPU smoke records (tempflow_core/reports/records.py). With --store the
records of the kind `--kind` names are collected from the store into the folder first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli_errors import fail as _fail
from flows.resolve import ABLATION_CONFIG

KINDS = ("cost", "paired", "replication")


def _train_source() -> str:
    """The prompts the shipped ablation trains on (the 'untrained prompts' yardstick leaves them out)."""
    import yaml

    return yaml.safe_load(ABLATION_CONFIG.read_text())["prompts"]["source"]


def _kind(folder: Path) -> str:
    from tempflow_core.reports import checkpoint_evals, cost, replication, variant_pairs

    for kind, found in (("replication", replication.is_replication_folder), ("cost", cost.is_cost_folder),
                        ("paired", variant_pairs.is_pairs_folder), ("evals", checkpoint_evals.is_evals_folder)):
        if found(folder):
            return kind
    return "records"


def report(
    folder: Path = typer.Argument(..., help="Experiment folder, e.g. results/gpu/ablation-64px."),
    store: Optional[str] = typer.Option(None, "--store", help="Collect the folder's records from this run store "
                                        "first (with --kind)."),
    kind: Optional[str] = typer.Option(None, "--kind", help=f"With --store: which records ({', '.join(KINDS)})."),
    reference: Optional[str] = typer.Option(None, "--reference", help="cost: the arm the others are compared with "
                                            "(default: the one comparison.json names, else 'tempflow')."),
    base: Optional[Path] = typer.Option(None, "--base", help="cost, with --store: an ablation's curves.json whose "
                                        "base-model evaluation starts every curve."),
    categories: Optional[str] = typer.Option(None, "--categories", help="cost, evals: comma-separated categories of "
                                             "the score (default: those the folder recorded, else every one)."),
    train_prompts: Optional[str] = typer.Option(None, "--train-prompts", help="cost: the prompt source the runs train "
                                                "on (default: recorded, else flows/configs/ablation.yaml's)."),
    margin_share: Optional[float] = typer.Option(None, "--margin-share", help="cost: 'reaches' margin as a share of "
                                                 "the reference's gain over the base model (default: recorded, else 0.25)."),
    pair: str = typer.Option("tempflow,flow_grpo_fixed", "--pair", help="paired: the two variants, A,B (A - B)."),
) -> None:
    """Redraw an experiment folder's figures and tables in place from its committed records alone
    (no store, tracking or network), or collect its records from a run store first (--store)."""
    from tempflow_core.reports import checkpoint_evals, cost, replication, variant_pairs
    from tempflow_core.reports.records import RecordsError, read_records
    from tempflow_core.reports.redraw import redraw

    if store is not None and kind not in KINDS:
        _fail(f"--store needs --kind, one of {', '.join(KINDS)} (the records to collect), not {kind!r}")
    if store is None and kind is not None:
        _fail(f"--kind {kind} names the records to collect: pass --store too, or leave --kind out to redraw {folder}")
    a, _, b = pair.partition(",")
    found = kind or _kind(folder)
    try:
        if found == "cost":
            text = cost.report(folder, store, reference, base, categories, train_prompts, margin_share, _train_source())
        elif found == "replication":
            text = replication.report_folder(folder, store, train_source=_train_source())
        elif found == "paired":
            text = variant_pairs.report(folder, store, a, b)
        elif found == "evals":
            text = checkpoint_evals.report(folder, categories)
        else:
            typer.echo("\n".join(f"{name}: {path}" for name, path in redraw(read_records(folder)).items()))
            return
    except RecordsError as e:
        _fail(str(e))
    typer.echo(text)
