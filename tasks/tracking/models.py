"""Checkpoints as MLflow 3 LoggedModels: created by the iteration's child run, chained back to
the base model through ``parent_model_id``, registered as versions of a registered model
with an alias, and downloaded again by id, version or alias.

Functions over an ``MlflowClient``; RunTracker calls them with its client and run ids.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from collections.abc import Mapping

from .values import (
    BASE,
    MAX_PARAM_VAL,
    MODEL_TYPE,
    MODEL_VERSIONS_TAG,
    TAG_BASE_MODEL,
    TAG_CHECKPOINT_URI,
    TAG_ITERATION,
    TAG_MODEL_ID,
    TAG_PARENT_MODEL,
    TAG_ROLLOUT_MANIFEST,
    TAG_TRAINING_RUN,
    clean_tags,
    clip,
    finite,
    is_secret_key,
    metric_key,
    redact,
)


def existing_checkpoint(client, child_run_id: str, checkpoint_uri: str) -> str | None:
    """The READY model that child_run_id already logged for checkpoint_uri, if any (resume)."""
    run = client.get_run(child_run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    for out in outputs:
        try:
            lm = client.get_logged_model(out.model_id)
        except Exception:  # noqa: BLE001
            continue
        if (lm.tags.get(TAG_CHECKPOINT_URI) == redact(checkpoint_uri)
                and str(getattr(lm.status, "name", lm.status)).endswith("READY")):
            return lm.model_id
    return None


def log_checkpoint(client, experiment_id: str, child_run_id: str, iteration: int, lora_dir: pathlib.Path,
                   lineage: Mapping[str, str], parent_model_id: str | None, metrics: Mapping[str, float] | None,
                   name: str) -> str:
    """A new LoggedModel with the adapter files of lora_dir, produced by the child run at step
    iteration; returns its model id.

    lineage (tempflow.* tags) is kept as tags and, without the prefix, as params; the parent
    model (if any) becomes an input of the child run and the new model an output. A model
    whose upload fails is finalised FAILED."""
    from mlflow.entities import LoggedModelInput, LoggedModelOutput

    params = {k.removeprefix("tempflow."): v for k, v in lineage.items()}
    lm = client.create_logged_model(
        experiment_id, name=name, source_run_id=child_run_id, model_type=MODEL_TYPE,
        tags=clean_tags(lineage),
        params={k: clip(v, MAX_PARAM_VAL) for k, v in clean_tags(params).items()},
    )
    try:
        upload_adapter(client, lm.model_id, lora_dir)
        for k, v in (metrics or {}).items():
            f = finite(v)
            if f is not None:
                client.log_metric(child_run_id, metric_key(k), f, step=iteration, model_id=lm.model_id)
        if parent_model_id:
            client.log_inputs(child_run_id, models=[LoggedModelInput(parent_model_id)])
        client.log_outputs(child_run_id, [LoggedModelOutput(lm.model_id, step=iteration)])
        client.finalize_logged_model(lm.model_id, "READY")
    except BaseException:
        try:
            client.finalize_logged_model(lm.model_id, "FAILED")
        except Exception:  # noqa: BLE001
            pass
        raise
    return lm.model_id


def upload_adapter(client, model_id: str, lora_dir: pathlib.Path) -> None:
    """The files of lora_dir as the model's artifacts, except secret-looking ones (.env*, credentials)."""
    files = [p for p in sorted(lora_dir.rglob("*")) if p.is_file()]
    keep = [p for p in files if not is_secret_key(p.name) and not p.name.startswith(".env")]
    if len(keep) == len(files):
        client.log_model_artifacts(model_id, str(lora_dir))
        return
    with tempfile.TemporaryDirectory(prefix="tempflow-ckpt-") as tmp:
        for p in keep:
            dst = pathlib.Path(tmp) / p.relative_to(lora_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
        client.log_model_artifacts(model_id, tmp)


def checkpoint_lineage(client, model_id: str) -> list[str]:
    """Model ids from ``model_id`` back to the first checkpoint (whose parent is the base)."""
    chain: list[str] = []
    mid: str | None = model_id
    while mid and mid != BASE:
        if mid in chain:
            raise RuntimeError(f"lineage cycle at {mid}")
        chain.append(mid)
        mid = client.get_logged_model(mid).tags.get(TAG_PARENT_MODEL)
    return chain


def download_model(client, tracking_uri: str, model: str, dst: pathlib.Path) -> pathlib.Path:
    """Adapter files of ``model`` (a model id, ``models:/<id>``, ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``) into ``dst``, resolved with ``tracking_uri`` (MLflow's own
    models:/ download resolves through the process-global URI)."""
    import mlflow.artifacts

    ref = model.removeprefix("models:/").strip("/")
    if ref.startswith("m-") and "/" not in ref and "@" not in ref:
        location = client.get_logged_model(ref).artifact_location
    else:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        location = client.get_model_version_download_uri(mv.name, mv.version)
    pathlib.Path(dst).mkdir(parents=True, exist_ok=True)
    return pathlib.Path(mlflow.artifacts.download_artifacts(
        artifact_uri=location, dst_path=str(dst), tracking_uri=tracking_uri))


def register(client, model_id: str, registered_name: str, alias: str | None, training_run_id: str) -> str:
    """Register ``model_id`` as a version of ``registered_name`` (once), set ``alias``; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(registered_name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    lm = client.get_logged_model(model_id)
    linked = json.loads(lm.tags.get(MODEL_VERSIONS_TAG) or "[]")
    version = next((str(v["version"]) for v in linked if v.get("name") == registered_name), None)
    if version is None:
        # source = the model's artifact location, not "models:/<id>": MLflow 3.17's
        # sqlalchemy registry resolves a models:/ source with a *global* MlflowClient()
        # (the default ./mlflow.db of the cwd), not this client's store. It also keeps
        # no model_id column, hence the tag; the logged model gets MLflow's own
        # mlflow.modelVersions tag, as mlflow.register_model does.
        mv = client.create_model_version(
            registered_name, source=lm.artifact_location, run_id=lm.source_run_id, model_id=model_id,
            tags={TAG_MODEL_ID: model_id, TAG_TRAINING_RUN: training_run_id}, description=lineage_text(lm.tags),
        )
        version = str(mv.version)
        linked.append({"name": registered_name, "version": version})
        client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(linked)})
    if alias:
        client.set_registered_model_alias(registered_name, alias, version)
    return version


def lineage_text(tags: Mapping[str, str]) -> str:
    """A model version's description: where its checkpoint came from (the lineage tags of its
    logged model), what a person looks for first on the version's page."""
    rows = [("iteration", TAG_ITERATION), ("training run", TAG_TRAINING_RUN), ("trained on rollouts", TAG_ROLLOUT_MANIFEST),
            ("checkpoint", TAG_CHECKPOINT_URI), ("parent model", TAG_PARENT_MODEL), ("base model", TAG_BASE_MODEL)]
    return "\n".join(f"- {label}: `{tags[key]}`" for label, key in rows if tags.get(key))


TAG_SCORE = "tempflow.eval_score"  # on a model version: the held-out score it was promoted with
TAG_SCORE_KEY = "tempflow.eval_score_key"  # what that score measures (objective, eval protocol, experiment)


def promote_if_better(client, registered_name: str, alias: str, version: str, score: float, score_key: str) -> bool:
    """Point ``alias`` at ``version`` only when its held-out ``score`` beats the alias's current
    holder on the same ``score_key`` (or nothing holds the alias). Returns whether it moved.

    The score and its key are tagged on the version, so the next run compares against the
    holder without reading its run. A holder scored on another key (another objective, eval
    protocol or experiment) is not comparable: the alias stays where it is."""
    from mlflow.exceptions import MlflowException

    client.set_model_version_tag(registered_name, version, TAG_SCORE, repr(float(score)))
    client.set_model_version_tag(registered_name, version, TAG_SCORE_KEY, score_key)
    try:
        holder = client.get_model_version_by_alias(registered_name, alias)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise
        holder = None
    if holder is not None and str(holder.version) != str(version):
        if holder.tags.get(TAG_SCORE_KEY) != score_key:
            return False
        if not float(score) > float(holder.tags.get(TAG_SCORE, "-inf")):
            return False
    client.set_registered_model_alias(registered_name, alias, version)
    return True
