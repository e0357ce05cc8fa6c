"""The evaluation flow: score a checkpoint (or the base model) on held-out prompts.

    tempflow eval --run RUN [--iteration N]     # a checkpoint of a run
    tempflow eval --run RUN --set eval.guidance_scale=1 --out F   # under other evaluation settings
    tempflow eval                                # the base model of the default config
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow, get_run_logger

from tasks.stages import base_eval_task, eval_task, stored_run
from tempflow_core.run import stages
from tempflow_core.config import RunConfig
from tempflow_core.run.layout import RunLayout
from tempflow_core.algorithm.session import SessionCache


@flow(name="tempflow-eval", validate_parameters=True)
def eval_flow(config: RunConfig = RunConfig(), run_id: Optional[str] = None, iteration: int = -1,
              eval_overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Evaluate checkpoint `iteration` of `run_id` (-1: the last finished one); without a run,
    evaluate the base model and return the scores. `eval_overrides` (fields of the eval section):
    score the checkpoint under those evaluation settings instead of the run's, and write nothing
    into the run (its own evaluation stays what its settings give)."""
    from prefect.runtime import deployment

    from tempflow_core.run.preflight import preflight, read_roots

    log = get_run_logger()
    roots = read_roots() if deployment.id else None  # a deployment run reads local files under these only
    preflight(config, roots=roots)
    sessions = SessionCache()  # this flow run's model
    if run_id is None:  # the base model: read from the store's _baselines/, else computed once and kept there
        result = base_eval_task(config, sessions)
        log.info("base model: %s", {k: v for k, v in result.items() if not isinstance(v, (dict, list))})
        return result
    from tempflow_core.run.runs import read_run

    record = read_run(RunLayout.open(config, run_id))
    if record is None:
        raise ValueError(f"run {run_id!r} not found in {config.pipeline.store}")
    config = RunConfig.model_validate(record["config"])  # the run's own model, LoRA and eval settings
    if eval_overrides:
        dump = config.model_dump(mode="json")
        config = RunConfig.model_validate({**dump, "eval": {**dump["eval"], **eval_overrides}})
    preflight(config, roots=roots, check_store=False)
    lay = RunLayout.open(config, run_id)
    if iteration < 0:
        last = lay.last_finished(config.train.iterations)
        if last is None:
            raise ValueError(f"run {run_id!r} has no finished checkpoint to evaluate")
        iteration = last
    if eval_overrides:
        if not lay.complete(iteration, "learner"):
            raise ValueError(f"run {run_id!r} has no checkpoint {iteration} to evaluate")
        result, _ = stages.evaluate_checkpoint(config, lay, iteration, sessions)
        result.update(run=run_id, iteration=iteration, eval_overrides=dict(eval_overrides))
        log.info("run %s iteration %d with %s: %s", run_id, iteration, eval_overrides,
                 {k: v for k, v in result.items() if not isinstance(v, (dict, list))})
        return result
    result = eval_task(stored_run(config, lay, sessions), iteration)
    log.info("run %s iteration %d: %s", run_id, iteration, {k: v for k, v in result.items() if not isinstance(v, dict)})
    return result
