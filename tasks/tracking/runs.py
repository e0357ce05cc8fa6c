"""The MLflow record of a run: one parent run per training (or pretraining, or ablation) run, a
child run per iteration, params, tags, metrics, eval tables, images and artifacts.

Everything goes through an ``MlflowClient`` with explicit run ids (never the fluent
active-run stack), so calls from different Prefect tasks or threads are safe. Checkpoints
(models.py) and dataset inputs (datasets.py) are logged through the same tracker.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import re
import shlex
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from tempflow_core.executables import executable
from tempflow_core.run.layout import RunLayout

from . import models
from .datasets import dataset_input
from .uri import TrackingUnavailable, absolute_sqlite, check_not_file_store, connect, is_connection_error, sqlite_path
from .values import (
    EXPERIMENT_TAGS,
    experiment_page,
    BASE,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VAL,
    MODEL_NAME,
    NOTE_TAG,
    PARENT_RUN_TAG,
    TAG_BASE_MODEL,
    TAG_CHECKPOINT_URI,
    TAG_ITERATION,
    TAG_KIND,
    TAG_PARENT_MODEL,
    TAG_RESUMED_FROM,
    TAG_ROLLOUT_MANIFEST,
    TAG_RUN_NAME,
    TAG_TRACKED_ELSEWHERE,
    TAG_TRAINING_RUN,
    clean_tags,
    clip,
    finite,
    flatten_params,
    markdown_table,
    metric_key,
    redact,
)

log = logging.getLogger(__name__)


class RunTracker:
    """One MLflow parent run per training run; a child run per iteration.

    ``run_id`` given: re-attach to that existing parent run (resume) instead of creating one.
    ``parent_run_id``: the run this one was resumed or branched from (tag tempflow.resumed_from).
    ``base_model``: what the first checkpoint was trained from (recorded on every checkpoint).
    ``artifact_location``: for a new experiment; default for sqlite is ``<db dir>/mlartifacts/``
    (MLflow's own default is ``./mlruns`` under the *current directory*).
    ``kind``: the tempflow.kind tag of a new run ("training"; "pretrain"; "ablation" for an ablation's report).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        params: dict,
        tags: dict | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        *,
        base_model: str | None = None,
        artifact_location: str | None = None,
        kind: str = "training",
    ) -> None:
        check_not_file_store(tracking_uri)
        if tracking_uri.startswith("sqlite:///"):
            tracking_uri = absolute_sqlite(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.run_name = run_name
        self.base_model = base_model
        self._lock = threading.RLock()
        self._iter_runs: dict[int, str] = {}
        self._open_iters: list[int] = []
        self._client = self._connect()

        with self._guard():
            recorded, run = run_id, self._existing_run(run_id) if run_id else None
            if run is not None:
                self.experiment_id = run.info.experiment_id
                self.run_id = run.info.run_id
                if run.info.status != "RUNNING":
                    self._client.update_run(self.run_id, status="RUNNING")
                self._log_params(params, existing=run.data.params)
                extra = clean_tags(tags)
                if parent_run_id:
                    extra[TAG_RESUMED_FROM] = parent_run_id
                self._set_tags(self.run_id, extra)
            else:
                self.experiment_id = self._experiment_id(experiment, artifact_location)
                run_tags = self._context_tags()
                run_tags.update(clean_tags(tags))
                run_tags.update({TAG_KIND: kind, TAG_RUN_NAME: run_name})
                if parent_run_id:
                    run_tags[TAG_RESUMED_FROM] = parent_run_id
                if recorded:  # the run was tracked on another server before: say where
                    run_tags[TAG_TRACKED_ELSEWHERE] = recorded
                if base_model:
                    run_tags[TAG_BASE_MODEL] = redact(base_model)
                run = self._client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
                self.run_id = run.info.run_id
                self._log_params(params, existing={})

    def _existing_run(self, run_id: str):
        """The run `run_id` on this tracking server; None (and a warning) when this server has
        no such run: the training run was tracked on another server (another TEMPFLOW_HOME or
        MLFLOW_TRACKING_URI) and is resumed here, so a new run takes its metrics from now on."""
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        log.warning("MLflow run %s of %s is not on %s (tracked elsewhere): starting a new MLflow run, which "
                    "re-logs the finished iterations", run_id, self.run_name, redact(self.tracking_uri))
        return None

    # -- pickling: Prefect may serialise the tracker between tasks/processes ---------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_client", None)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._client = self._connect()

    # -- connection ------------------------------------------------------------------------

    def _connect(self):
        return connect(self.tracking_uri)

    @contextlib.contextmanager
    def _guard(self):
        """Connection failures in the middle of a run surface as TrackingUnavailable."""
        try:
            yield
        except TrackingUnavailable:
            raise
        except Exception as e:
            if is_connection_error(e):
                raise TrackingUnavailable(
                    f"MLflow tracking backend {redact(self.tracking_uri)} became unreachable: {e}"
                ) from e
            raise

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            loc = artifact_location
            db = sqlite_path(self.tracking_uri)
            if loc is None and db is not None:
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "default"
                loc = (db.parent / "mlartifacts" / safe).as_uri()
            try:
                return self._client.create_experiment(name, artifact_location=loc, tags=EXPERIMENT_TAGS)
            except MlflowException as e:  # created concurrently by another worker
                exp = self._client.get_experiment_by_name(name)
                if exp is None:
                    raise e
        if exp.lifecycle_stage == "deleted":
            self._client.restore_experiment(exp.experiment_id)
        for key, value in EXPERIMENT_TAGS.items():  # an experiment made before the tag existed
            if exp.tags.get(key) is None:
                self._client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    @staticmethod
    def _context_tags() -> dict[str, str]:
        try:
            from mlflow.tracking.context.registry import resolve_tags

            return clean_tags(resolve_tags({}))
        except Exception:  # noqa: BLE001 - context tags are a nicety
            return {}

    # -- low-level helpers -----------------------------------------------------------------

    def _log_params(self, params: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params or {})
        new = {k: v for k, v in flat.items() if k not in existing}
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i: i + MAX_PARAMS_PER_BATCH])
        if changed:
            # MLflow params are immutable: a resumed run with a changed config records the keys.
            log.warning("resumed run %s: params changed and not re-logged: %s", self.run_id, changed)
            self._set_tags(self.run_id, {"tempflow.params_changed_on_resume": ",".join(changed)})

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, tags=items[i: i + MAX_PARAMS_PER_BATCH])

    def _log_metric_dict(self, run_ids: Iterable[str], metrics: Mapping[str, Any], step: int,
                         prefix: str = "") -> dict[str, float]:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        clean: dict[str, float] = {}
        for k, v in (metrics or {}).items():
            f = finite(v)
            if f is not None:
                clean[metric_key(prefix + str(k))] = f
        items = [Metric(k, v, ts, int(step)) for k, v in clean.items()]
        for rid in run_ids:
            for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                self._client.log_batch(rid, metrics=items[i: i + MAX_METRICS_PER_BATCH])
        return clean

    def _child(self, iteration: int) -> str:
        """The iteration's child run id, started (or found again) on first use."""
        it = int(iteration)
        with self._lock:
            rid = self._iter_runs.get(it)
            if rid is None:
                self.start_iteration(it)
                rid = self._iter_runs[it]
            return rid

    # -- public API --------------------------------------------------------------------------

    def start_iteration(self, iteration: int) -> None:
        """Child run ``iter-000003`` under the parent; an existing one (resume) is reused."""
        it = int(iteration)
        name = RunLayout.iteration_name(it)
        with self._lock, self._guard():
            rid = self._iter_runs.get(it)
            if rid is None:
                found = self._client.search_runs(
                    [self.experiment_id],
                    filter_string=f"tags.`{PARENT_RUN_TAG}` = '{self.run_id}' "
                    f"and attributes.run_name = '{name}'",
                    order_by=["attributes.start_time ASC"],
                    max_results=1,
                )
                if found:
                    rid = found[0].info.run_id
                    if found[0].info.status != "RUNNING":
                        self._client.update_run(rid, status="RUNNING")
                else:
                    rid = self._client.create_run(
                        self.experiment_id,
                        run_name=name,
                        tags={PARENT_RUN_TAG: self.run_id, TAG_KIND: "iteration",
                              TAG_ITERATION: str(it), TAG_TRAINING_RUN: self.run_id},
                    ).info.run_id
                self._iter_runs[it] = rid
            if it not in self._open_iters:
                self._open_iters.append(it)

    def iteration_run_id(self, iteration: int) -> str:
        return self._child(iteration)

    def log_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        """Into the iteration child run and the parent run at step=iteration; non-finite skipped."""
        with self._guard():
            self._log_metric_dict([self._child(iteration), self.run_id], metrics, iteration)

    def log_rollout_dataset(self, iteration: int, manifest_uri: str, digest: str, num_samples: int,
                            context: str = "rollouts") -> None:
        """A MetaDataset input on the iteration child run (source resolved from the URI)."""
        di = dataset_input(
            manifest_uri, f"rollouts-{RunLayout.iteration_name(iteration)}", digest, context,
            {"num_samples": str(int(num_samples)), TAG_ITERATION: str(int(iteration))},
        )
        with self._guard():
            self._client.log_inputs(self._child(iteration), datasets=[di])

    def log_prompts_dataset(self, name: str, source_uri: str, digest: str) -> None:
        """The prompt set as a dataset input (context "prompts") on the parent run."""
        di = dataset_input(source_uri, name, digest, "prompts")
        with self._guard():
            self._client.log_inputs(self.run_id, datasets=[di])

    def log_checkpoint(self, iteration: int, lora_dir: pathlib.Path, checkpoint_uri: str,
                       rollout_manifest_uri: str, parent_model_id: str | None,
                       metrics: dict[str, float] | None = None, *, name: str = MODEL_NAME) -> str:
        """The adapter as a LoggedModel produced by the iteration child run; returns model_id.

        Lineage: tag/param ``parent_model_id`` (``base`` for the first one), a
        ``log_input(model=parent)`` and ``log_outputs(model=new)`` on the child run.
        Idempotent: the same checkpoint_uri logged again from the same child run returns the
        existing model id (resume)."""
        lora_dir = pathlib.Path(lora_dir)
        if not lora_dir.is_dir():
            raise FileNotFoundError(f"LoRA checkpoint directory not found: {lora_dir}")
        it = int(iteration)
        with self._guard():
            child = self._child(it)
            existing = models.existing_checkpoint(self._client, child, checkpoint_uri)
            if existing:
                return existing
            lineage = {
                TAG_CHECKPOINT_URI: checkpoint_uri,
                TAG_ROLLOUT_MANIFEST: rollout_manifest_uri,
                TAG_PARENT_MODEL: parent_model_id or BASE,
                TAG_ITERATION: str(it),
                TAG_TRAINING_RUN: self.run_id,
            }
            if self.base_model:
                lineage[TAG_BASE_MODEL] = self.base_model
            return models.log_checkpoint(self._client, self.experiment_id, child, it, lora_dir, lineage,
                                         parent_model_id, metrics, name)

    def checkpoint_lineage(self, model_id: str) -> list[str]:
        """Model ids from ``model_id`` back to the first checkpoint (whose parent is the base)."""
        return models.checkpoint_lineage(self._client, model_id)

    def download_model(self, model: str, dst: pathlib.Path) -> pathlib.Path:
        """Adapter files of ``model`` (a model id, ``models:/<id>``, ``models:/<name>@<alias>``
        or ``models:/<name>/<version>``) into ``dst``, resolved with *this* tracking URI."""
        with self._guard():
            return models.download_model(self._client, self.tracking_uri, model, dst)

    def register(self, model_id: str, registered_name: str, alias: str | None = None) -> str:
        """Register ``model_id`` as a version of ``registered_name`` (once), set ``alias``."""
        with self._guard():
            return models.register(self._client, model_id, registered_name, alias, self.run_id)

    def promote(self, registered_name: str, alias: str, version: str, score: float, score_key: str) -> bool:
        """Move ``alias`` to ``version`` if its score beats the holder's on ``score_key``
        (models.promote_if_better); returns whether it moved."""
        with self._guard():
            return models.promote_if_better(self._client, registered_name, alias, version, score, score_key)

    def log_eval(self, iteration: int, scores: dict[str, float], table_markdown: str | None = None,
                 grid_png: pathlib.Path | None = None) -> None:
        """``eval/<name>`` metrics (child + parent), the table as markdown and MLflow table,
        the grid as a per-step image (key ``eval_grid``)."""
        it = int(iteration)
        with self._guard():
            child = self._child(it)
            self._log_metric_dict([child, self.run_id], scores, it, prefix="eval/")
            if table_markdown:
                name = f"eval/{RunLayout.iteration_name(it)}"
                for rid in (child, self.run_id):
                    self._client.log_text(rid, table_markdown, f"{name}.md")
                table = markdown_table(table_markdown)
                if table:
                    try:
                        self._client.log_table(child, data=table, artifact_file=f"{name}.json")
                    except Exception as e:  # noqa: BLE001 - the markdown is the record
                        log.debug("log_table skipped: %s", e)
            if grid_png is not None:
                self.log_image(it, "eval_grid", grid_png)

    def log_image(self, iteration: int, key: str, png: pathlib.Path) -> None:
        """A per-step image on the parent (UI step slider) and on the iteration child."""
        from PIL import Image

        it = int(iteration)
        with Image.open(png) as im:
            img = im.convert("RGB") if im.mode not in ("RGB", "RGBA", "L") else im.copy()
        with self._guard():
            for rid in (self._child(it), self.run_id):
                self._client.log_image(rid, img, key=metric_key(key), step=it)

    def log_run_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Metrics on the parent run itself (summaries that belong to no iteration)."""
        with self._guard():
            self._log_metric_dict([self.run_id], metrics, step)

    def describe(self, markdown: str) -> None:
        """The parent run's description (MLflow's note, shown first on the run's page); credentials
        inside it masked."""
        with self._guard():
            self._set_tags(self.run_id, {NOTE_TAG: clip(redact(markdown), MAX_TAG_VAL)})

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text file among the parent run's artifacts."""
        with self._guard():
            self._client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, iteration: int | None, local_path: pathlib.Path,
                     artifact_path: str | None = None) -> None:
        """A file on the iteration child (or the parent when iteration is None)."""
        rid = self.run_id if iteration is None else self._child(iteration)
        with self._guard():
            self._client.log_artifact(rid, str(local_path), artifact_path)

    def end_iteration(self, status: str = "FINISHED", iteration: int | None = None) -> None:
        """Ends the iteration child (default: the last one started)."""
        with self._lock, self._guard():
            if iteration is None:
                if not self._open_iters:
                    return
                iteration = self._open_iters[-1]
            it = int(iteration)
            rid = self._iter_runs.get(it)
            if rid is not None:
                self._client.set_terminated(rid, status=status)
            if it in self._open_iters:
                self._open_iters.remove(it)

    def finish(self, status: str = "FINISHED") -> None:
        """Ends open iteration children and the parent run ("FAILED" on errors)."""
        with self._lock, self._guard():
            for it in list(self._open_iters):
                self.end_iteration(status, iteration=it)
            self._client.set_terminated(self.run_id, status=status)

    def ui_command(self) -> str:
        """How to look at this run: open its page on the tracking server, or start `mlflow ui` on
        the local database (then `ui_page()`)."""
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            return f"python -m webbrowser '{self.ui_page(redact(uri))}'"
        return f"{shlex.quote(executable('mlflow'))} ui --backend-store-uri {redact(uri)} --host 127.0.0.1"

    def ui_page(self, server: str = "http://127.0.0.1:5000") -> str:
        """This run's page in the MLflow UI at `server`, in its model-training view."""
        return experiment_page(server, self.experiment_id, self.run_id)
