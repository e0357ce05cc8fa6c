"""Corrupt stage outputs heal: a killed run whose stored objects were damaged resumes, moves
the damaged output aside, recomputes it to the same bytes and ends with the same LoRA."""

from __future__ import annotations

import hashlib
import json

import pytest

from tempflow_core.config import load_config
from tempflow_core.run.layout import RunLayout

from .conftest import tiny_overrides

ADAPTER = "adapter/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def finished(prefect_api, tiny_model_dir, tmp_path_factory):
    """One uninterrupted run of 2 iterations: (config, layout); every case copies it."""
    from flows.train import train_flow

    tmp = tmp_path_factory.mktemp("heal")
    cfg = load_config(overrides=tiny_overrides(tmp, tiny_model_dir))
    train_flow(config=cfg, run_id="whole")
    return cfg, RunLayout.open(cfg, "whole")


def _killed_copy(lay: RunLayout, run_id: str, killed: bool = True) -> RunLayout:
    """A copy of the finished run as a SIGKILL during iteration 1's learner leaves it: no
    checkpoint 1 (its manifest was never written), no evaluation (killed=False: all of it)."""
    dst = RunLayout(lay.store, run_id)
    for key in lay.store.list("whole"):
        rel = key[len("whole/"):]
        if killed and rel.startswith(("iter-000001/learner/", "iter-000001/eval/")) and rel.endswith("manifest.json"):
            continue
        data = lay.store.get_bytes(key)
        if rel == "run.json":
            record = json.loads(data)
            record.update(run_id=run_id, mlflow_run_id=None)
            data = json.dumps(record).encode()
        lay.store.put_bytes(f"{run_id}/{rel}", data)
    return dst


# what each case damages: (stage prefix in the run, object) and how
CASES = {
    "shard": ("iter-000001/rollout", "shard-000000.tar"),
    "score": ("iter-000001/reward", "scores.safetensors"),
    "embeds": ("iter-000001/rollout", "embeds.safetensors"),
    "checkpoint": ("iter-000000/learner", ADAPTER),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_corrupt_object_is_quarantined_recomputed_to_the_same_bytes_and_the_run_ends_identical(
        finished, kind, quiet_env):
    from flows.train import train_flow

    cfg, whole = finished
    run = f"heal-{kind}"
    lay = _killed_copy(whole, run)
    stage, name = CASES[kind]
    key = f"{run}/{stage}/{name}"
    original = lay.store.get_bytes(key)
    if kind == "checkpoint":  # flip one byte inside the tensor data: same size, other sha256
        damaged = original[:-100] + bytes([original[-100] ^ 0xFF]) + original[-99:]
    else:  # truncate by 1 KiB
        damaged = original[:-1024]
    lay.store.put_bytes(key, damaged)
    manifest_before = {s: lay.store.get_bytes(f"{run}/{s}/manifest.json")
                       for s in ("iter-000001/rollout", "iter-000001/reward")}

    train_flow(config=cfg, run_id=run)  # the resume

    # the final checkpoint's adapter file equals the uninterrupted run's, byte for byte
    final = f"iter-000001/learner/{ADAPTER}"
    assert lay.store.get_bytes(f"{run}/{final}") == whole.store.get_bytes(f"whole/{final}")
    # the damaged output lies in quarantine, as it was, with the reason; the live one is whole again
    q = f"{run}/quarantine/{stage}/01"
    assert lay.store.get_bytes(f"{q}/{name}") == damaged
    record = json.loads(lay.store.get_bytes(f"{q}/heal.json"))
    assert record["reason"].startswith(f"{lay.store.uri_for(key)} is corrupt: sha256 ")
    assert record["reproduced"] is True and record["differs"] == []
    assert hashlib.sha256(lay.store.get_bytes(key)).hexdigest() == hashlib.sha256(original).hexdigest()
    assert len(lay.store.list(f"{run}/quarantine")) == len(lay.store.list(f"{q}"))  # nothing else moved
    # a recomputed output with the same bytes does not invalidate what was computed from it
    for s, before in manifest_before.items():
        if s != stage:
            assert lay.store.get_bytes(f"{run}/{s}/manifest.json") == before


def test_an_output_whose_input_changed_is_recomputed(finished, quiet_env):
    """The reward of iteration 1 records the digest of the rollout it scored; when that no
    longer matches (the rollout was replaced), the reward is moved aside and recomputed."""
    from flows.train import train_flow

    cfg, whole = finished
    run = "heal-stale"
    lay = _killed_copy(whole, run)
    key = f"{run}/iter-000001/reward/manifest.json"
    m = json.loads(lay.store.get_bytes(key))
    m["producer"]["inputs"]["rollout"] = "0" * 64  # scored some other rollout
    lay.store.put_bytes(key, json.dumps(m).encode())

    train_flow(config=cfg, run_id=run)

    record = json.loads(lay.store.get_bytes(f"{run}/quarantine/iter-000001/reward/01/heal.json"))
    assert "input 'rollout' changed" in record["reason"] and record["reproduced"] is None
    final = f"iter-000001/learner/{ADAPTER}"
    assert lay.store.get_bytes(f"{run}/{final}") == whole.store.get_bytes(f"whole/{final}")
    assert lay.store.get_bytes(f"{run}/iter-000001/reward/scores.safetensors") == \
        whole.store.get_bytes("whole/iter-000001/reward/scores.safetensors")


def test_rewards_and_evaluations_made_before_the_detectors_audit_are_made_again(finished, quiet_env):
    """Reward and eval outputs record the detector's rules they read images with; one that does
    not record them was made with the rules before the audit (v1), so a resume under v2 moves it
    aside and makes it again instead of mixing the two readings in one run."""
    from flows.train import train_flow

    cfg, whole = finished
    run = "heal-detector"
    lay = _killed_copy(whole, run, killed=False)
    for stage in ("iter-000001/reward", "iter-000001/eval"):
        key = f"{run}/{stage}/manifest.json"
        m = json.loads(lay.store.get_bytes(key))
        assert m["producer"]["inputs"]["detector"] == "v2"
        del m["producer"]["inputs"]["detector"]  # as written before the audit
        lay.store.put_bytes(key, json.dumps(m).encode())

    train_flow(config=cfg, run_id=run)

    for stage in ("iter-000001/reward", "iter-000001/eval"):
        record = json.loads(lay.store.get_bytes(f"{run}/quarantine/{stage}/01/heal.json"))
        assert "input 'detector' changed" in record["reason"], stage
        assert json.loads(lay.store.get_bytes(f"{run}/{stage}/manifest.json"))["producer"]["inputs"]["detector"] == "v2"
    for key in (f"iter-000001/learner/{ADAPTER}", "iter-000001/eval/eval.json"):  # made again, the same
        assert lay.store.get_bytes(f"{run}/{key}") == whole.store.get_bytes(f"whole/{key}"), key


def test_an_input_found_corrupt_while_a_stage_reads_it_is_healed_and_the_stage_retried(finished):
    """No resume check in front: the learner itself hits the damaged shard, heals its inputs
    (the rollout is moved aside and resampled) and computes the same checkpoint."""
    from tempflow_core.run import stages
    from tempflow_core.algorithm.session import SessionCache

    cfg, whole = finished
    lay = _killed_copy(whole, "heal-inside")
    key = "heal-inside/iter-000001/rollout/shard-000000.tar"
    lay.store.put_bytes(key, lay.store.get_bytes(key)[:-1024])
    sessions = SessionCache()
    try:
        stages.learner_stage(cfg, lay, 1, sessions)
    finally:
        sessions.clear()
    final = f"iter-000001/learner/{ADAPTER}"
    assert lay.store.get_bytes(f"heal-inside/{final}") == whole.store.get_bytes(f"whole/{final}")
    record = json.loads(lay.store.get_bytes("heal-inside/quarantine/iter-000001/rollout/01/heal.json"))
    assert record["reproduced"] is True and "is corrupt" in record["reason"]
