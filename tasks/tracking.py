"""MLflow side of the training pipeline: one parent run per training run, a child run per
iteration, LoRA checkpoints as MLflow 3 LoggedModels chained back to the base model, and the
prompt set and rollout shards recorded as dataset inputs.

Everything goes through an ``MlflowClient`` with explicit run ids (never the fluent
active-run stack), so calls from different Prefect tasks or threads are safe. The module
imports without a server; only ``RunTracker(...)`` talks to the tracking backend.

Secrets never reach MLflow: config keys that look like credentials are dropped from params
and tags, and passwords in URLs (``scheme://user:pw@host``) are masked wherever a URI is
written (params, tags, dataset sources, error messages).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from tempflow_core.redaction import is_secret_key
from tempflow_core.redaction import redact_uris as redact

log = logging.getLogger(__name__)

MODEL_NAME = "tempflow-lora"
MODEL_TYPE = "lora-adapter"
BASE = "base"

TAG_KIND = "tempflow.kind"
TAG_ITERATION = "tempflow.iteration"
TAG_RESUMED_FROM = "tempflow.resumed_from"
TAG_RUN_NAME = "tempflow.run_name"
TAG_CHECKPOINT_URI = "tempflow.checkpoint_uri"
TAG_ROLLOUT_MANIFEST = "tempflow.rollout_manifest_uri"
TAG_PARENT_MODEL = "tempflow.parent_model_id"  # a model id, or "base"
TAG_BASE_MODEL = "tempflow.base_model"
TAG_TRAINING_RUN = "tempflow.training_run_id"
PARENT_RUN_TAG = "mlflow.parentRunId"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"
TAG_MODEL_ID = "tempflow.model_id"

# MLflow 3.17 limits (mlflow.utils.validation).
_MAX_KEY = 250
_MAX_PARAM_VAL = 6000
_MAX_TAG_VAL = 8000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_DATASET_DIGEST = 36  # a sha256 hex (64) is rejected: the full digest goes into an input tag
_MAX_INPUT_TAG_VAL = 500

# Health probe of an HTTP tracking server: attempts x (timeout + pause) stays well under 20 s.
_PROBE_ATTEMPTS = 3
_PROBE_TIMEOUT_S = 3.0
_PROBE_PAUSE_S = 1.0


class TrackingUnavailable(RuntimeError):
    """The tracking backend cannot be reached (the message names the tracking URI)."""


# ---------------------------------------------------------------------------------------
# secrets and values
# ---------------------------------------------------------------------------------------

# Secrets follow the project's one set of rules (tempflow_core/redaction.py): keys that name a
# credential are dropped (is_secret_key), credentials inside values are masked (redact).

# MLflow accepts alphanumerics, '_', '-', '.', ' ', '/' and ':' in param, tag and metric keys.
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings with dots; values stringified; secret-looking keys dropped."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if is_secret_key(key):
            continue
        if isinstance(v, Mapping):
            out.update(flatten_params(v, prefix=f"{key}."))
            continue
        out[_clip(_KEY_BAD.sub("_", key), _MAX_KEY)] = _clip(redact(_to_str(v)), _MAX_PARAM_VAL)
    return out


def _to_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, pathlib.PurePath):
        return str(v)
    if isinstance(v, (list, tuple)):
        try:
            return json.dumps(v, default=str)
        except (TypeError, ValueError):
            return str(v)
    return str(v)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {
        _clip(_KEY_BAD.sub("_", str(k)), _MAX_KEY): _clip(redact(_to_str(v)), _MAX_TAG_VAL)
        for k, v in (tags or {}).items()
        if v is not None and not is_secret_key(str(k))
    }




def metric_key(name: str) -> str:
    """A name MLflow accepts as metric / image key (invalid characters become '_')."""
    return _clip(_KEY_BAD.sub("_", str(name)), _MAX_KEY)


def _finite(v: Any) -> float | None:
    try:
        f = float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def iteration_run_name(iteration: int) -> str:
    return f"iter-{int(iteration):06d}"


# ---------------------------------------------------------------------------------------
# tracking URI
# ---------------------------------------------------------------------------------------


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db`` depends on the cwd of whichever worker opens it: make it absolute."""
    rest = uri[len("sqlite:///"):]
    if not rest or rest.startswith("/") or rest.startswith(":memory:"):
        return uri
    path, sep, query = rest.partition("?")
    return f"sqlite:///{pathlib.Path(path).resolve()}{sep}{query}"


def _check_not_file_store(uri: str) -> None:
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("", "file") or re.match(r"^[A-Za-z]:[\\/]", uri):
        raise ValueError(
            f"tracking URI {redact(uri)!r} is an MLflow file store, which MLflow 3.17 no longer "
            "serves (maintenance mode); use sqlite:///<abs path>/mlflow.db or http://host:port"
        )


def resolve_tracking_uri(configured: str | None, run_root: pathlib.Path) -> str:
    """configured > $MLFLOW_TRACKING_URI > ``sqlite:///<abs run_root>/mlflow.db``.

    Never a file: store (ValueError); a relative sqlite path is made absolute."""
    uri = (configured or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        root = pathlib.Path(run_root).expanduser().resolve()
        return f"sqlite:///{root / 'mlflow.db'}"
    _check_not_file_store(uri)
    if uri.startswith("sqlite:///"):
        uri = _absolute_sqlite(uri)
    return uri


def _sqlite_path(uri: str) -> pathlib.Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].partition("?")[0]
    return None if path.startswith(":memory:") or not path else pathlib.Path(path)


def _probe_http(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    last: BaseException | None = None
    for attempt in range(_PROBE_ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT_S) as resp:  # noqa: S310
                if resp.status == 200:
                    return
                last = RuntimeError(f"HTTP {resp.status}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = e
        if attempt + 1 < _PROBE_ATTEMPTS:
            time.sleep(_PROBE_PAUSE_S)
    raise TrackingUnavailable(
        f"MLflow tracking server at {redact(uri)} is unreachable ({url}: {last}); start it, fix "
        "the tracking URI (config tracking.uri / $MLFLOW_TRACKING_URI), or leave both unset for "
        "a local sqlite store"
    )


def _is_connection_error(e: BaseException) -> bool:
    import requests

    chain: BaseException | None = e
    while chain is not None:
        if isinstance(chain, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              ConnectionError)):
            return True
        msg = str(chain)
        if any(m in msg for m in ("Max retries exceeded", "Connection refused",
                                  "unable to open database file")):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


# ---------------------------------------------------------------------------------------
# the tracker
# ---------------------------------------------------------------------------------------


class RunTracker:
    """One MLflow parent run per training run; a child run per iteration.

    ``run_id`` given: re-attach to that existing parent run (resume) instead of creating one.
    ``parent_run_id``: the run this one was resumed or branched from (tag tempflow.resumed_from).
    ``base_model``: what the first checkpoint was trained from (recorded on every checkpoint).
    ``artifact_location``: for a new experiment; default for sqlite is ``<db dir>/mlartifacts/``
    (MLflow's own default is ``./mlruns`` under the *current directory*).
    ``kind``: the tempflow.kind tag of a new run ("training"; "ablation" for an ablation's report).
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
        _check_not_file_store(tracking_uri)
        if tracking_uri.startswith("sqlite:///"):
            tracking_uri = _absolute_sqlite(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.run_name = run_name
        self.base_model = base_model
        self._lock = threading.RLock()
        self._iter_runs: dict[int, str] = {}
        self._open_iters: list[int] = []
        self._client = self._connect()

        with self._guard():
            if run_id:
                run = self._client.get_run(run_id)
                self.experiment_id = run.info.experiment_id
                self.run_id = run.info.run_id
                if run.info.status != "RUNNING":
                    self._client.update_run(self.run_id, status="RUNNING")
                self._log_params(params, existing=run.data.params)
                extra = _clean_tags(tags)
                if parent_run_id:
                    extra[TAG_RESUMED_FROM] = parent_run_id
                self._set_tags(self.run_id, extra)
            else:
                self.experiment_id = self._experiment_id(experiment, artifact_location)
                run_tags = self._context_tags()
                run_tags.update(_clean_tags(tags))
                run_tags.update({TAG_KIND: kind, TAG_RUN_NAME: run_name})
                if parent_run_id:
                    run_tags[TAG_RESUMED_FROM] = parent_run_id
                if base_model:
                    run_tags[TAG_BASE_MODEL] = redact(base_model)
                run = self._client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)
                self.run_id = run.info.run_id
                self._log_params(params, existing={})

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
        from mlflow import MlflowClient

        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            _probe_http(uri)
        db = _sqlite_path(uri)
        if db is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrackingUnavailable(f"cannot create the directory of {uri}: {e}") from e
        try:
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        except Exception as e:  # noqa: BLE001 - store construction (sqlite open, migrations)
            raise TrackingUnavailable(f"MLflow tracking backend {redact(uri)} failed: {e}") from e

    @contextlib.contextmanager
    def _guard(self):
        """Connection failures in the middle of a run surface as TrackingUnavailable."""
        try:
            yield
        except TrackingUnavailable:
            raise
        except Exception as e:
            if _is_connection_error(e):
                raise TrackingUnavailable(
                    f"MLflow tracking backend {redact(self.tracking_uri)} became unreachable: {e}"
                ) from e
            raise

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            loc = artifact_location
            db = _sqlite_path(self.tracking_uri)
            if loc is None and db is not None:
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "default"
                loc = (db.parent / "mlartifacts" / safe).as_uri()
            try:
                return self._client.create_experiment(name, artifact_location=loc)
            except MlflowException as e:  # created concurrently by another worker
                exp = self._client.get_experiment_by_name(name)
                if exp is None:
                    raise e
        if exp.lifecycle_stage == "deleted":
            self._client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    @staticmethod
    def _context_tags() -> dict[str, str]:
        try:
            from mlflow.tracking.context.registry import resolve_tags

            return _clean_tags(resolve_tags({}))
        except Exception:  # noqa: BLE001 - context tags are a nicety
            return {}

    # -- low-level helpers -----------------------------------------------------------------

    def _log_params(self, params: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params or {})
        new = {k: v for k, v in flat.items() if k not in existing}
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i: i + _MAX_PARAMS_PER_BATCH])
        if changed:
            # MLflow params are immutable: a resumed run with a changed config records the keys.
            log.warning("resumed run %s: params changed and not re-logged: %s", self.run_id, changed)
            self._set_tags(self.run_id, {"tempflow.params_changed_on_resume": ",".join(changed)})

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, tags=items[i: i + _MAX_PARAMS_PER_BATCH])

    def _log_metric_dict(self, run_ids: Iterable[str], metrics: Mapping[str, Any], step: int,
                         prefix: str = "") -> dict[str, float]:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        clean: dict[str, float] = {}
        for k, v in (metrics or {}).items():
            f = _finite(v)
            if f is not None:
                clean[metric_key(prefix + str(k))] = f
        items = [Metric(k, v, ts, int(step)) for k, v in clean.items()]
        for rid in run_ids:
            for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
                self._client.log_batch(rid, metrics=items[i: i + _MAX_METRICS_PER_BATCH])
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
        name = iteration_run_name(it)
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

    def _dataset_input(self, uri: str, name: str, digest: str, context: str,
                       extra_tags: Mapping[str, str] | None = None):
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        safe_uri = redact(uri)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" (local)
                source = resolve_dataset_source(safe_uri)
        except MlflowException as e:
            raise ValueError(f"dataset URI {safe_uri!r} has no MLflow dataset source "
                             "(use file://..., s3://..., a local path, or http(s)://...)") from e
        digest = str(digest)
        ds = MetaDataset(source, name=_clip(name, 500), digest=digest[:_MAX_DATASET_DIGEST])
        tags = [InputTag("mlflow.data.context", context)]
        if len(digest) > _MAX_DATASET_DIGEST:
            tags.append(InputTag("tempflow.digest", _clip(digest, _MAX_INPUT_TAG_VAL)))
        for k, v in (extra_tags or {}).items():
            tags.append(InputTag(k, _clip(redact(str(v)), _MAX_INPUT_TAG_VAL)))
        return DatasetInput(ds._to_mlflow_entity(), tags=tags)

    def log_rollout_dataset(self, iteration: int, manifest_uri: str, digest: str, num_samples: int,
                            context: str = "rollouts") -> None:
        """A MetaDataset input on the iteration child run (source resolved from the URI)."""
        di = self._dataset_input(
            manifest_uri, f"rollouts-{iteration_run_name(iteration)}", digest, context,
            {"num_samples": str(int(num_samples)), TAG_ITERATION: str(int(iteration))},
        )
        with self._guard():
            self._client.log_inputs(self._child(iteration), datasets=[di])

    def log_prompts_dataset(self, name: str, source_uri: str, digest: str) -> None:
        """The prompt set as a dataset input (context "prompts") on the parent run."""
        di = self._dataset_input(source_uri, name, digest, "prompts")
        with self._guard():
            self._client.log_inputs(self.run_id, datasets=[di])

    def _existing_checkpoint(self, child: str, checkpoint_uri: str) -> str | None:
        run = self._client.get_run(child)
        outputs = run.outputs.model_outputs if run.outputs else []
        for out in outputs:
            try:
                lm = self._client.get_logged_model(out.model_id)
            except Exception:  # noqa: BLE001
                continue
            if (lm.tags.get(TAG_CHECKPOINT_URI) == redact(checkpoint_uri)
                    and str(getattr(lm.status, "name", lm.status)).endswith("READY")):
                return lm.model_id
        return None

    def log_checkpoint(self, iteration: int, lora_dir: pathlib.Path, checkpoint_uri: str,
                       rollout_manifest_uri: str, parent_model_id: str | None,
                       metrics: dict[str, float] | None = None, *, name: str = MODEL_NAME) -> str:
        """The adapter as a LoggedModel produced by the iteration child run; returns model_id.

        Lineage: tag/param ``parent_model_id`` (``base`` for the first one), a
        ``log_input(model=parent)`` and ``log_outputs(model=new)`` on the child run.
        Idempotent: the same checkpoint_uri logged again from the same child run returns the
        existing model id (resume)."""
        from mlflow.entities import LoggedModelInput, LoggedModelOutput

        lora_dir = pathlib.Path(lora_dir)
        if not lora_dir.is_dir():
            raise FileNotFoundError(f"LoRA checkpoint directory not found: {lora_dir}")
        it = int(iteration)
        with self._guard():
            child = self._child(it)
            existing = self._existing_checkpoint(child, checkpoint_uri)
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
            params = {k.removeprefix("tempflow."): v for k, v in lineage.items()}
            lm = self._client.create_logged_model(
                self.experiment_id, name=name, source_run_id=child, model_type=MODEL_TYPE,
                tags=_clean_tags(lineage),
                params={k: _clip(v, _MAX_PARAM_VAL) for k, v in _clean_tags(params).items()},
            )
            try:
                self._upload_adapter(lm.model_id, lora_dir)
                for k, v in (metrics or {}).items():
                    f = _finite(v)
                    if f is not None:
                        self._client.log_metric(child, metric_key(k), f, step=it, model_id=lm.model_id)
                if parent_model_id:
                    self._client.log_inputs(child, models=[LoggedModelInput(parent_model_id)])
                self._client.log_outputs(child, [LoggedModelOutput(lm.model_id, step=it)])
                self._client.finalize_logged_model(lm.model_id, "READY")
            except BaseException:
                try:
                    self._client.finalize_logged_model(lm.model_id, "FAILED")
                except Exception:  # noqa: BLE001
                    pass
                raise
            return lm.model_id

    def _upload_adapter(self, model_id: str, lora_dir: pathlib.Path) -> None:
        files = [p for p in sorted(lora_dir.rglob("*")) if p.is_file()]
        keep = [p for p in files if not is_secret_key(p.name) and not p.name.startswith(".env")]
        if len(keep) == len(files):
            self._client.log_model_artifacts(model_id, str(lora_dir))
            return
        with tempfile.TemporaryDirectory(prefix="tempflow-ckpt-") as tmp:
            for p in keep:
                dst = pathlib.Path(tmp) / p.relative_to(lora_dir)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dst)
            self._client.log_model_artifacts(model_id, tmp)

    def checkpoint_lineage(self, model_id: str) -> list[str]:
        """Model ids from ``model_id`` back to the first checkpoint (whose parent is the base)."""
        chain: list[str] = []
        mid: str | None = model_id
        while mid and mid != BASE:
            if mid in chain:
                raise RuntimeError(f"lineage cycle at {mid}")
            chain.append(mid)
            mid = self._client.get_logged_model(mid).tags.get(TAG_PARENT_MODEL)
        return chain

    def download_model(self, model: str, dst: pathlib.Path) -> pathlib.Path:
        """Adapter files of ``model`` (a model id, ``models:/<id>``, ``models:/<name>@<alias>``
        or ``models:/<name>/<version>``) into ``dst``, resolved with *this* tracking URI
        (MLflow's own models:/ download resolves through the process-global URI)."""
        import mlflow.artifacts

        ref = model.removeprefix("models:/").strip("/")
        with self._guard():
            if ref.startswith("m-") and "/" not in ref and "@" not in ref:
                location = self._client.get_logged_model(ref).artifact_location
            else:
                if "@" in ref:
                    name, alias = ref.split("@", 1)
                    mv = self._client.get_model_version_by_alias(name, alias)
                else:
                    name, version = ref.rsplit("/", 1)
                    mv = self._client.get_model_version(name, version)
                location = self._client.get_model_version_download_uri(mv.name, mv.version)
            pathlib.Path(dst).mkdir(parents=True, exist_ok=True)
            return pathlib.Path(mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=str(dst), tracking_uri=self.tracking_uri))

    def register(self, model_id: str, registered_name: str, alias: str | None = None) -> str:
        """Register ``model_id`` as a version of ``registered_name`` (once), set ``alias``."""
        from mlflow.exceptions import MlflowException

        with self._guard():
            try:
                self._client.create_registered_model(registered_name)
            except MlflowException as e:
                if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            lm = self._client.get_logged_model(model_id)
            linked = json.loads(lm.tags.get(MODEL_VERSIONS_TAG) or "[]")
            version = next((str(v["version"]) for v in linked if v.get("name") == registered_name),
                           None)
            if version is None:
                # source = the model's artifact location, not "models:/<id>": MLflow 3.17's
                # sqlalchemy registry resolves a models:/ source with a *global* MlflowClient()
                # (the default ./mlflow.db of the cwd), not this client's store. It also keeps
                # no model_id column, hence the tag; the logged model gets MLflow's own
                # mlflow.modelVersions tag, as mlflow.register_model does.
                mv = self._client.create_model_version(
                    registered_name, source=lm.artifact_location, run_id=lm.source_run_id,
                    model_id=model_id,
                    tags={TAG_MODEL_ID: model_id, TAG_TRAINING_RUN: self.run_id},
                )
                version = str(mv.version)
                linked.append({"name": registered_name, "version": version})
                self._client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(linked)})
            if alias:
                self._client.set_registered_model_alias(registered_name, alias, version)
            return version

    def log_eval(self, iteration: int, scores: dict[str, float], table_markdown: str | None = None,
                 grid_png: pathlib.Path | None = None) -> None:
        """``eval/<name>`` metrics (child + parent), the table as markdown and MLflow table,
        the grid as a per-step image (key ``eval_grid``)."""
        it = int(iteration)
        with self._guard():
            child = self._child(it)
            self._log_metric_dict([child, self.run_id], scores, it, prefix="eval/")
            if table_markdown:
                name = f"eval/{iteration_run_name(it)}"
                for rid in (child, self.run_id):
                    self._client.log_text(rid, table_markdown, f"{name}.md")
                table = _markdown_table(table_markdown)
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
        """How to look at this run."""
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            return f"python -m webbrowser '{redact(uri).rstrip('/')}/#/experiments/" \
                   f"{self.experiment_id}/runs/{self.run_id}'"
        return f"mlflow ui --backend-store-uri {redact(uri)} --host 127.0.0.1"


def _markdown_table(md: str) -> dict[str, list[str]] | None:
    """A pipe table -> {column: [cells]} (None when the text holds no such table)."""
    rows = [ln.strip() for ln in md.splitlines() if ln.strip().startswith("|")]
    if len(rows) < 2:
        return None
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    header, body = cells[0], [r for r in cells[1:] if not all(re.fullmatch(r":?-+:?", c or "-") for c in r)]
    if not header or any(len(r) != len(header) for r in body):
        return None
    return {h or f"col{i}": [r[i] for r in body] for i, h in enumerate(header)}
