"""The checks a CLI command makes before it creates any state: each refuses in one line, exit 2."""

from __future__ import annotations

from typing import Optional

from flows.cli_errors import fail as _fail


def preflight(cfg) -> None:
    """tempflow_core.run.preflight on a resolved config, and the HTTP tracking server's health: exit 2
    with a one-line message naming the field and the fix."""
    from flows.ray_head import ray_preflight
    from tasks.tracking.uri import TrackingUnavailable, probe_configured
    from tempflow_core.run.plan import device_refusal
    from tempflow_core.run.preflight import PreflightError, preflight as core_preflight

    try:
        core_preflight(cfg)
        ray_preflight(cfg)
    except PreflightError as e:
        _fail(str(e))
    why = device_refusal(cfg)  # a run that does not fit its GPU (the estimate of `tempflow plan`)
    if why:
        _fail(why)
    try:
        probe_configured(cfg.pipeline.mlflow_uri)
    except TrackingUnavailable as e:
        _fail(f"pipeline.mlflow_uri: {e}")


def check_run_ids(*ids: Optional[str]) -> None:
    """--run-id and --resume name single safe names (exit 2 before any state exists)."""
    from tempflow_core.run.layout import check_run_id

    for run in ids:
        if run is not None:
            try:
                check_run_id(run)
            except ValueError as e:
                _fail(str(e))


def check_not_locked(cfg, run: Optional[str]) -> None:
    """A run folder that holds things but no run, or a run another live process writes, is
    refused (exit 2) before a flow run is created."""
    if run is None:
        return
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.run.ownership import RUN_FOLDER_FIX, run_folder_problem
    from tempflow_core.run.runlock import held_by_another

    layout = RunLayout.open(cfg, run)
    problem = run_folder_problem(layout.store, run)
    if problem:
        _fail(f"--run-id {run}: {problem}; fix: {RUN_FOLDER_FIX}")
    why = held_by_another(layout)
    if why:
        _fail(why)
