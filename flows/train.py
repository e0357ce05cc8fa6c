"""The training flow: rollout -> reward -> learner per iteration, evaluation every N.

    tempflow train                         # this flow on the embedded default
    prefect flow-run retry <run>           # or the UI's Retry: finished stages are skipped

Stages talk only through URIs on the object store (see tempflow_core.run.stages). The flow
runs the training controller (tempflow_core.algorithm.controller, the same one `train_in_process`
runs) on the run's stored stages with each stage a Prefect task (tasks.stages.FlowStages) and
MLflow tracking as its hooks; the controller stops a run whose reward has gone degenerate. The
flow owns the model: one SessionCache per flow run, shared by its tasks, dropped at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Literal, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.stages import FlowStages, base_eval_task, local_engine, stored_run
from flows.ray_head import ray_preflight
from tasks.tracking_task import describe_run, track_eval, track_iteration, tracker_for
from tempflow_core.reports import report
from tempflow_core.algorithm.controller import Hooks, RunResult, train
from tempflow_core.config import RunConfig
from tempflow_core.engines.engine import Engine
from tempflow_core.run.layout import RunLayout
from tempflow_core.run.preflight import preflight, read_roots
from tempflow_core.prompts import load_prompts
from tempflow_core.run.runlock import run_lock
from tempflow_core.run.runs import branch_run, config_yaml, display_name, new_run_id, open_run, write_run
from tempflow_core.algorithm.session import SessionCache


def preflight_check(config: RunConfig) -> None:
    """tempflow_core.run.preflight before any stage, so a run started from the Prefect UI or API fails
    on a bad input the way the CLI does. A run started from a deployment reads local files only
    under the configured roots (preflight.read_roots: the checkout and a data folder by default)."""
    from prefect.runtime import deployment

    from tasks.tracking.uri import probe_configured

    roots = read_roots() if deployment.id else None
    preflight(config, roots=roots)
    probe_configured(config.pipeline.mlflow_uri)  # TrackingUnavailable before the run record is written
    ray_preflight(config)


def tracking_credentials_to_env(config: RunConfig) -> RunConfig:
    """The config without credentials in pipeline.mlflow_uri: they move to MLflow's own
    MLFLOW_TRACKING_USERNAME/PASSWORD of this process (tasks.tracking.uri.credentials_to_env),
    so run.json, MLflow params and the parameters of flow runs started by the CLI hold none."""
    from tasks.tracking.uri import credentials_to_env

    plain = credentials_to_env(config.pipeline.mlflow_uri)
    if plain == config.pipeline.mlflow_uri:
        return config
    return config.model_copy(update={"pipeline": config.pipeline.model_copy(update={"mlflow_uri": plain})})


def reward_credentials_to_env(config: RunConfig) -> RunConfig:
    """The config without credentials in any reward option's `url` (a reward server's token as
    the URL's password or bare user): the token moves to TEMPFLOW_REWARD_TOKEN of this process,
    which the `remote` client sends as Authorization: Bearer, so run.json, MLflow and the flow
    run's parameters hold none. Two servers with different tokens cannot share the variable:
    ValueError naming the setting."""
    from tempflow_core.redaction import split_credentials
    from tempflow_core.rewards.remote import TOKEN_ENV

    options, token = {}, None
    for name, opts in config.reward.options.items():
        url = opts.get("url") if isinstance(opts, dict) else None
        plain, user, password = split_credentials(url) if isinstance(url, str) else (url, None, None)
        secret = password or user
        if secret:
            if token is not None and secret != token:
                raise ValueError(f"reward.options.{name}.url: reward servers with different tokens cannot share "
                                 f"{TOKEN_ENV}; fix: one token for every server")
            token = secret
            opts = {**opts, "url": plain}
        options[name] = opts
    if token is None:
        return config
    os.environ[TOKEN_ENV] = token
    return config.model_copy(update={"reward": config.reward.model_copy(update={"options": options})})


def flow_run_name() -> str:
    """The flow run's name in the Prefect UI: the run id, reward and seed (runs.display_name),
    not a random pair of words; computed when the run starts, also for runs started from the UI."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    raw = params.get("config")
    try:
        config = raw if isinstance(raw, RunConfig) else RunConfig.model_validate(raw or {})
    except ValueError:  # an invalid config: the parameter validation that follows names the field
        return f"invalid config {flow_run.get_id()[:8]}"
    return display_name(config, params.get("run_id") or new_run_id(config, flow_run.get_id()))


@flow(name="tempflow-train", flow_run_name=flow_run_name, validate_parameters=True)
def train_flow(
    config: RunConfig = RunConfig(),
    run_id: Optional[str] = None,
    resume_from: Optional[str] = None,
    from_stage: Optional[Literal["rollout", "reward", "learner", "eval"]] = None,
    from_iteration: int = 0,
) -> dict[str, Any]:
    """Train one run. `run_id` of an existing run resumes it; `resume_from` + `from_stage`
    starts a new run that reuses everything of `resume_from` upstream of that stage."""
    from prefect.runtime import flow_run

    config = reward_credentials_to_env(tracking_credentials_to_env(config))  # a run started from the UI/API may carry them
    preflight_check(config)
    run_id = run_id or new_run_id(config, flow_run.get_id())
    lay = RunLayout.open(config, run_id)
    with contextlib.ExitStack() as stack:
        engine = _engine(config, stack)  # before anything is written: a Ray node that cannot see a path refuses
        with run_lock(lay):  # one writer per run; clears what a killed writer left (runlock.py)
            return _train_run(config, lay, resume_from, from_stage, from_iteration, engine)


def _engine(config: RunConfig, stack: contextlib.ExitStack) -> Engine:
    """The run's engine, built here only: pipeline.engine=local runs the stages in this process
    (holding the GPU concurrency slot around rollout and learner); ray on RAY_ADDRESS or on a
    local head of the run's own (flows.ray_head), both closed by `stack`."""
    if config.pipeline.engine != "ray":
        return local_engine(config)
    from flows.ray_head import ray_cluster
    from tempflow_core.engines.ray_engine import RayEngine

    address = stack.enter_context(ray_cluster(max(os.cpu_count() or 1, RayEngine.cpus_needed(config))))
    engine = RayEngine(config, address)
    stack.callback(engine.close)
    return engine


def _train_run(config: RunConfig, lay: RunLayout, resume_from: Optional[str], from_stage: Optional[str],
               from_iteration: int, engine: Engine) -> dict[str, Any]:
    """The body of train_flow, holding the run's lock; `engine` runs the stages' work."""
    log = get_run_logger()
    run_id = lay.run_id
    origin = None
    if resume_from and not from_stage:
        raise ValueError("resume_from needs from_stage (rollout, reward, learner or eval); to continue a run, pass "
                         "its run_id instead")
    if resume_from and from_stage:
        origin = {"run": resume_from, "stage": from_stage, "iteration": from_iteration}
        n = branch_run(RunLayout.open(config, resume_from), lay, from_stage, from_iteration, config)
        log.info("run %s starts from %s at iteration %d stage %s (%d objects reused)", run_id, resume_from,
                 from_iteration, from_stage, n)
    record = open_run(config, lay, origin)
    tracker = tracker_for(config, lay, record)
    if record.get("mlflow_run_id") != tracker.run_id:  # a new MLflow run: record it and its prompt set
        record["mlflow_run_id"] = tracker.run_id
        write_run(lay, record)
        # the exact prompt set goes into the run's folder, so lineage points at what was used
        data = "\n".join(json.dumps({"id": r.id, "prompt": r.text, **r.metadata}, sort_keys=True)
                         for r in load_prompts(config.prompts.source)).encode()
        key = lay.prompts_key
        lay.store.put_bytes(key, data)
        tracker.log_prompts_dataset(config.prompts.source.replace(":", "-"), lay.store.uri_for(key),
                                    hashlib.sha256(data).hexdigest()[:16])
        describe_run(config, lay, tracker)
    log.info("run %s: store %s, MLflow run %s", run_id, lay.store.uri_for(run_id), tracker.run_id)
    _config_artifact(config, run_id)
    loop = RunResult()  # filled as the run goes: the artifacts show what finished, also after a failure
    status, base = "FAILED", None
    sessions = SessionCache()  # this flow run's model, shared by its stage tasks
    try:
        def tracked(it: int, metrics: dict[str, float]) -> None:
            track_iteration(config, lay, it, tracker)
            log.info("iteration %d: reward %.4f ± %.4f, loss %+.4f, clip %.2f", it, metrics["reward/mean"],
                     metrics["reward/std"], metrics["train/loss"], metrics["train/clip_frac"])

        train(config, FlowStages(stored_run(config, lay, sessions, engine)),
              Hooks(on_iteration=tracked, on_eval=lambda it, e: track_eval(config, lay, it, tracker, e)), loop)
        base = base_eval_task(config, sessions, record.get("inputs"), engine)  # what the final evaluation is read against
        status = "FINISHED"
    finally:
        sessions.clear()
        tracker.finish(status)
        _artifacts(config, run_id, lay, loop.history, loop.evals, tracker, base)
    final = lay.uri(config.train.iterations - 1, "learner")
    return {"run_id": run_id, "checkpoint": final, "mlflow_run_id": tracker.run_id,
            "mlflow_ui": tracker.ui_command(), "mlflow_page": tracker.ui_page(), "store": lay.store.uri_for(run_id),
            "evals": loop.evals, "base_eval": base}


def _config_artifact(cfg: RunConfig, run_id: str) -> None:
    """The run's config as a Prefect artifact a person reads (the flow run's Artifacts tab): the
    settings that differ from the code's defaults first, then the whole config as YAML (the
    Parameters tab holds the same as one JSON document)."""
    import yaml

    from flows.defaults import flat
    from tempflow_core.redaction import scrub_mapping

    mine = flat(yaml.safe_load(config_yaml(cfg)))
    defaults = flat(scrub_mapping(RunConfig().model_dump(mode="json")))
    rows = [f"| `{k}` | `{json.dumps(v)}` | `{json.dumps(defaults.get(k))}` |" for k, v in mine.items()
            if defaults.get(k) != v]
    md = [f"# Config of run `{run_id}`", "", f"{display_name(cfg, run_id)}; the same config again: "
          "`tempflow train --config config.yaml` with the YAML below saved as config.yaml.", "",
          "| setting | this run | code default |", "|---|---|---|", *rows, "", "```yaml", config_yaml(cfg).rstrip(), "```"]
    create_markdown_artifact(markdown="\n".join(md), key="tempflow-config", description=f"config of {run_id}")


def _artifacts(cfg: RunConfig, run_id: str, lay: RunLayout, history: list[dict[str, float]],
               evals: dict[int, dict[str, Any]], tracker, base: dict[str, Any] | None = None) -> None:
    """Prefect artifacts: a per-iteration metrics table and a summary linking MLflow."""
    if not history:
        return
    cols = ["reward/mean", "reward/std", "adv/frac_zero_std_groups", "train/loss", "train/approx_kl",
            "train/clip_frac", "rollout/nfe"]
    table = [{"iteration": i, **{c: round(float(m.get(c, float("nan"))), 6) for c in cols}} for i, m in enumerate(history)]
    create_table_artifact(table=table, key="tempflow-metrics", description=f"per-iteration metrics of {run_id}")
    lines = [f"# tempflow run `{run_id}`", "", f"- algorithm: `{cfg.algorithm}`, reward `{cfg.reward.name}`",
             f"- store: `{lay.store.uri_for(run_id)}`", f"- MLflow run: `{tracker.run_id}` ({tracker.ui_command()})",
             f"- iterations finished: {len(history)} / {cfg.train.iterations}"]
    if base is not None:
        lines.append(f"- the base model (before training): {report.eval_summary(base)}")
    for it, e in sorted(evals.items()):
        lines.append(f"- eval after iteration {it}: {report.eval_summary(e)}")
    create_markdown_artifact(markdown="\n".join(lines), key="tempflow-summary", description="run summary")
