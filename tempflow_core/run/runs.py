"""Run records on the store: what a run is, where it came from, and branching a new run.

`{run}/run.json` holds the config, the MLflow parent run id, the sha256 of every file the
config points at (fingerprints.py; a resume whose files changed is refused) and, for a run
that re-runs a finished one from a named stage, the run and stage it came from. Branching
copies every finished stage upstream of (iteration, stage) into the new run, manifests last,
so the new run reuses them (e.g. re-score stored rollouts with another reward without
sampling again), unless a changed setting invalidates them (invalidation.py). A branch is
idempotent: its run.json is written before the copy, so a repeated branch with the same
source, stage and config (Prefect's Retry, a branch killed during the copy) continues it.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from tempflow_core.config import RunConfig
from tempflow_core.run.fingerprints import changed_inputs, fingerprints
from tempflow_core.run.invalidation import plan_branch
from tempflow_core.shards import MANIFEST_NAME
from tempflow_core.run.layout import STAGES, RunLayout
from tempflow_core.run.ownership import RUN_FOLDER_FIX, is_run_folder, run_folder_problem
from tempflow_core.storage import ObjectNotFound, join_key

_ORDER = {"rollout": 0, "reward": 1, "advantages": 2, "learner": 2, "eval": 3}


class RunError(ValueError):
    """A run id or resume request that cannot be honoured; the message says why."""


def display_name(cfg: RunConfig, run_id: str) -> str:
    """What a person reads first on a run's page (Prefect flow run, MLflow run): the run id
    (algorithm first), the reward and the seed.

    >>> display_name(RunConfig(algorithm="branch", reward={"name": "shapes"}), "branch-1a2b3c")
    'branch-1a2b3c · shapes · seed 0'
    """
    return f"{run_id} · {cfg.reward.name} · seed {cfg.train.seed}"


def config_yaml(cfg: RunConfig) -> str:
    """The whole config as YAML, to be read and to reproduce the run (`tempflow train -c FILE`);
    values under a key that names a credential become '***' (set them again to reproduce)."""
    import yaml

    from tempflow_core.redaction import scrub_mapping

    return yaml.safe_dump(scrub_mapping(cfg.model_dump(mode="json")), sort_keys=False, allow_unicode=True)


def read_run(layout: RunLayout) -> dict[str, Any] | None:
    try:
        return json.loads(layout.store.get_bytes(layout.record_key))
    except ObjectNotFound:
        return None


def write_run(layout: RunLayout, record: dict[str, Any]) -> None:
    layout.store.put_bytes(layout.record_key, json.dumps(record, indent=1, sort_keys=True).encode())


def new_run_id(cfg: RunConfig, flow_run_id: str | None = None) -> str:
    """A run id; inside a Prefect flow run it derives from the flow run's id, so Prefect's
    Retry of that flow run continues the same run instead of starting another."""
    if flow_run_id:
        return f"{cfg.algorithm}-{flow_run_id.replace('-', '')[:12]}"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.algorithm}-{stamp}-{cfg.digest()[:6]}"


def _new_record(cfg: RunConfig, layout: RunLayout, resumed_from: dict[str, Any] | None) -> dict[str, Any]:
    return {"run_id": layout.run_id, "config": cfg.model_dump(mode="json"), "config_digest": cfg.digest(),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "resumed_from": resumed_from, "mlflow_run_id": None, "inputs": fingerprints(cfg)}


def open_run(cfg: RunConfig, layout: RunLayout, resumed_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create run.json, or check that an existing run was made with this config and that the
    files it points at (model, prompts, reward models) are still those it started with."""
    record = read_run(layout)
    if record is None:
        problem = run_folder_problem(layout.store, layout.run_id)
        if problem:  # the CLI refuses it earlier; a run started from the UI or API is refused here
            raise RunError(f"run id {layout.run_id!r}: {problem}; fix: {RUN_FOLDER_FIX}")
        record = _new_record(cfg, layout, resumed_from)
        write_run(layout, record)
        return record
    if record["config_digest"] != cfg.digest():
        raise RunError(f"run {layout.run_id!r} was made with a different config (digest {record['config_digest'][:8]} "
                       f"!= {cfg.digest()[:8]}); to change settings, branch a new run from one of its stages (branch_run)")
    changed = changed_inputs(record["inputs"], fingerprints(cfg)) if "inputs" in record else []
    if changed:
        raise RunError(f"run {layout.run_id!r} cannot continue: files its config points at changed since it started: "
                       + "; ".join(changed[:5]) + (f" (and {len(changed) - 5} more)" if len(changed) > 5 else "")
                       + "; restore them, or start a new run")
    return record


def _copy_prefix(src: RunLayout, dst: RunLayout, prefix_src: str, prefix_dst: str) -> int:
    keys = src.store.list(prefix_src)
    manifests = [k for k in keys if k.endswith("/" + MANIFEST_NAME)]
    n = 0
    for key in [k for k in keys if k not in manifests] + manifests:  # manifests last
        dst.store.put_bytes(prefix_dst + key[len(prefix_src):], src.store.get_bytes(key))
        n += 1
    return n


def branch_run(src: RunLayout, dst: RunLayout, from_stage: str, from_iteration: int, cfg: RunConfig) -> int:
    """Start run `dst` with config `cfg` from everything of `src` upstream of (from_iteration,
    from_stage) that `cfg`'s changed settings leave valid; returns the objects copied.

    Repeating a branch with the same source, stage, iteration and config continues it (the
    copy is redone, manifests last); a `dst` that exists for anything else is refused."""
    if from_stage not in STAGES:
        raise RunError(f"unknown stage {from_stage!r}; stages are {', '.join(STAGES)}")
    source = read_run(src)
    if source is None:
        raise RunError(f"run {src.run_id!r} not found in {src.store.uri_for('')}")
    origin = {"run": src.run_id, "stage": from_stage, "iteration": from_iteration}
    existing = read_run(dst)
    if existing is not None:
        if existing.get("resumed_from") != origin or existing.get("config_digest") != cfg.digest():
            was = existing.get("resumed_from")
            raise RunError(f"run {dst.run_id!r} already exists ({'branched from ' + json.dumps(was) if was else 'not a branch'}"
                           f", config digest {str(existing.get('config_digest'))[:8]}); this branch ({json.dumps(origin)}, "
                           f"config digest {cfg.digest()[:8]}) needs a new run id")
        if existing.get("branch_copied"):
            return 0
    elif not is_run_folder(dst.store, dst.run_id):  # objects besides a lock (ownership.py), but no record
        raise RunError(f"run {dst.run_id!r} already holds objects but no run record; a branch needs a new run id")
    # canonical dumps: a record written before model families (explicit shift 3.0 / a 0.7) and
    # today's unset fields are the same settings
    plan = plan_branch(RunConfig.model_validate(source["config"]).canonical_dump(), cfg.canonical_dump(),
                       from_stage, from_iteration)
    if plan.refusal:
        raise RunError(plan.refusal)
    if from_stage != "rollout" and not src.complete(from_iteration, "rollout"):
        raise RunError(f"run {src.run_id!r} has no finished rollout at iteration {from_iteration} to start "
                       f"'{from_stage}' from")
    record = existing or _new_record(cfg, dst, origin)
    write_run(dst, record)  # first: a branch killed during the copy is continued by the same branch
    copied = _copy_prefix(src, dst, src.init_prefix, dst.init_prefix) if plan.copy_init else 0
    for it in range(from_iteration + 1):
        base_s, base_d = src.iteration_prefix(it), dst.iteration_prefix(it)
        for stage in ("rollout", "reward", "advantages", "learner", "eval"):
            if (it == from_iteration and _ORDER[stage] >= _ORDER[from_stage]) or (stage == "eval" and not plan.copy_eval):
                continue
            copied += _copy_prefix(src, dst, join_key(base_s, stage), join_key(base_d, stage))
    record["branch_copied"] = True
    write_run(dst, record)
    return copied
