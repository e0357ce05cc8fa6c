"""The alias `best` of the registered model moves only to a checkpoint that beats its current
holder on the same held-out score: a weak run that improves on itself never takes it from a
strong one (real MLflow 3 on sqlite)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from tasks.tracking import RunTracker, resolve_tracking_uri

NAME = "tempflow-alias-test"


def _checkpoint(tracker: RunTracker, root: pathlib.Path, it: int) -> str:
    from safetensors.numpy import save_file

    d = root / f"{tracker.run_id}-lora-{it}"
    d.mkdir(parents=True)
    save_file({"lora_A.weight": np.full((2, 2), it, np.float32)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"r": 2}))
    tracker.start_iteration(it)
    model_id = tracker.log_checkpoint(it, d, f"file:///ck/{tracker.run_id}/{it}", f"file:///ro/{it}", None)
    tracker.end_iteration()
    return model_id


def _eval(tracker: RunTracker, root: pathlib.Path, it: int, score: float, key: str = "tempflow/shapes/abc") -> bool:
    """What track_eval does when a run improves on its own best: a new version, then the alias
    moves only if the version beats the holder."""
    version = tracker.register(_checkpoint(tracker, root, it), NAME)
    return tracker.promote(NAME, "best", version, score, key)


def _holder(uri: str) -> str:
    from mlflow import MlflowClient

    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(NAME, "best")
    return mv.tags["tempflow.training_run_id"]


def test_best_moves_only_to_a_better_checkpoint_on_the_same_score(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None, tmp_path)
    strong = RunTracker(uri, "tempflow-test", "strong", {})
    weak = RunTracker(uri, "tempflow-test", "weak", {})
    assert _eval(strong, tmp_path, 0, 0.60)  # nothing holds the alias yet
    assert _eval(strong, tmp_path, 1, 0.80)  # the holder improves on itself
    assert _holder(uri) == strong.run_id
    assert not _eval(weak, tmp_path, 0, 0.30)  # weaker than the holder
    assert not _eval(weak, tmp_path, 1, 0.45)  # improves on itself, still weaker
    assert not _eval(weak, tmp_path, 2, 0.80)  # a tie does not move it
    assert _holder(uri) == strong.run_id
    assert not _eval(weak, tmp_path, 3, 0.99, key="tempflow/jpeg_compressibility/def")  # another objective
    assert _holder(uri) == strong.run_id
    assert _eval(weak, tmp_path, 4, 0.81)  # beats the holder on the same score
    assert _holder(uri) == weak.run_id
    strong.finish()
    weak.finish()
