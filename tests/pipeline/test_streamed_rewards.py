"""reward.stream: each rollout slice is scored while the next is sampled, and the stage outputs
are the ones of scoring after the rollout, bit for bit."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tempflow_core.algorithm.iteration import plan_iteration
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.config import ConfigError, load_config
from tempflow_core.engines.engine import LocalEngine
from tempflow_core.engines.stored_run import StoredRun
from tempflow_core.run.layout import RunLayout
from tempflow_core.shards import read_scores

from .conftest import tiny_overrides


def _logged_brightness(log: str):
    """Brightness that appends each call (when it started, how many images, on which thread) to `log`."""

    def fn(images, prompts, metadata):
        start = time.monotonic()
        time.sleep(0.2)  # a slow reward: a remote server or a reward model elsewhere
        with open(log, "a") as f:
            f.write(json.dumps({"start": start, "n": len(images), "thread": threading.current_thread().name}) + "\n")
        return images.reshape(len(images), -1).mean(1) / 255.0, {}

    return fn


REWARDS = {"test_logged_brightness": _logged_brightness}


def _run(cfg, run_id: str):
    """Two iterations through the local engine; when each rollout stage returned."""
    lay, sessions, engine = RunLayout.open(cfg, run_id), SessionCache(), LocalEngine()
    run = StoredRun(cfg, lay, sessions, engine)
    run.init()
    rollout_done = []
    try:
        for it in range(cfg.train.iterations):
            plan = plan_iteration(cfg, run.schedule(), it)
            rollouts = run.rollout(plan)
            rollout_done.append(time.monotonic())
            run.update(plan, rollouts, run.score(plan, rollouts))
    finally:
        engine.close()
    return lay, sessions, rollout_done


def test_streamed_scores_and_update_equal_scoring_after_the_rollout(tiny_model_dir, tmp_path):
    def cfg(stream: bool):
        return load_config(overrides=tiny_overrides(tmp_path, tiny_model_dir) + [
            "algorithm=tempflow", "rollout.prompts_per_iter=3", "rollout.slices=3", f"reward.stream={stream}",
            "reward.name=test_logged_brightness", f"reward.plugins=[{__name__}]",
            f"reward.options={{test_logged_brightness: {{log: '{tmp_path / 'calls.jsonl'}'}}}}"])

    after, streamed = cfg(False), cfg(True)
    assert after.digest() == streamed.digest()  # when scoring runs is not what a run computes
    lay_a, s_a, _ = _run(after, "after")
    calls_a = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    lay_s, s_s, rollout_done = _run(streamed, "streamed")
    calls_s = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()][len(calls_a):]
    for it in range(2):
        a = read_scores(lay_a.store, lay_a.iteration_prefix(it), "reward")
        b = read_scores(lay_s.store, lay_s.iteration_prefix(it), "reward")
        assert a.keys == b.keys and (a.values["reward"] == b.values["reward"]).all()
    wa, ws = s_a.get(after).policy.lora_state_dict(), s_s.get(streamed).policy.lora_state_dict()
    assert all((wa[k] == ws[k]).all() for k in wa)

    samples = 3 * 3 * 3  # 3 prompts x 3 branch points (T = 4: steps 0..2) x K = 3 children
    assert [c["n"] for c in calls_a] == [samples] * 2  # one call per iteration, after the rollout
    assert [c["n"] for c in calls_s] == [3 * 3] * 6  # one call per slice, on the scoring thread
    assert {c["thread"] for c in calls_s} == {"tempflow-reward_0"}
    # the first slices were scored while the rollout stage was still sampling the last one
    assert calls_s[0]["start"] < rollout_done[0] and calls_s[3]["start"] < rollout_done[1]


def test_streaming_without_slices_is_refused():
    with pytest.raises(ConfigError, match=r"reward\.stream.*rollout\.slices is 1: set rollout\.slices to 2"):
        load_config(overrides=["reward.stream=true"])
