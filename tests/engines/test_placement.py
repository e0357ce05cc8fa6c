"""Which workers hold a model on Ray (pipeline.placement) and which reward actors ask for a GPU,
decided from the config alone (the Ray runs: tests/pipeline/test_ray_engine.py)."""

from __future__ import annotations

import pytest

from tempflow_core.config import ConfigError, load_config
from tempflow_core.engines.ray_engine import colocated, worker_gpus
from tempflow_core.rewards import RewardRegistry


def _cfg(*sets: str):
    return load_config(None, ["pipeline.engine=ray", "rollout.slices=4", *sets])


def test_auto_colocates_gpu_workers_unless_rollout_actors_are_asked_for():
    gpu = ["pipeline.ray_gpus=1", "train.workers=4"]
    assert worker_gpus(_cfg(*gpu)) == 1.0 and colocated(_cfg(*gpu))
    assert colocated(_cfg(*gpu, "rollout.workers=4"))  # one model per GPU: the ranks sample
    assert not colocated(_cfg(*gpu, "rollout.workers=3"))  # rollout actors of their own: separate pools
    assert not colocated(_cfg("model.device=cpu", "train.workers=4"))  # no GPUs: separate (CPU processes)
    assert colocated(_cfg("model.device=cpu", "pipeline.placement=colocated"))
    assert not colocated(_cfg(*gpu, "pipeline.placement=separate"))
    assert worker_gpus(_cfg("model.device=cpu")) == 0.0


def test_colocated_with_rollout_actors_of_another_count_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match=r"rollout.workers \(3\) with pipeline.placement=colocated"):
        _cfg("pipeline.placement=colocated", "rollout.workers=3", "train.workers=2")


def test_only_rewards_that_run_a_model_ask_for_a_gpu():
    reg = RewardRegistry.builtin()
    assert [reg.needs_gpu(n) for n in ("shapes", "brightness", "ocr", "remote", "frames", "clipscore", "pickscore")] \
        == [False, False, False, False, False, True, True]
    assert reg.needs_gpu("remote:geneval") is False  # a labelled reward is its base's
    assert not reg.needs_gpu("weighted", {"shapes": 1.0, "jpeg_compressibility": 0.1})
    assert reg.needs_gpu("weighted", {"shapes": 1.0, "clipscore": 0.1})

    def cpu_reward(**_):
        return lambda images, prompts, metadata: (images.mean(axis=(1, 2, 3)), {})

    def model_reward(**_):
        return cpu_reward()

    cpu_reward.gpu = False
    plugins = reg.with_rewards({"mine": cpu_reward, "theirs": model_reward})
    assert not plugins.needs_gpu("mine") and plugins.needs_gpu("theirs")  # unknown: assumed to want one


def test_the_plan_counts_the_gpus_each_placement_holds_and_its_wall_minutes_by_hand():
    from tempflow_core.run.plan import Minutes, placements, wall_minutes

    node = ["rollout.prompts_per_iter=48", "rollout.slices=48", "train.workers=8"]
    colo, sep = placements(_cfg(*node), reward_gpus=False)
    assert (colo.name, colo.gpus, colo.rollout_workers, colo.learner_workers) == ("colocated", 8, 8, 8)
    assert (sep.name, sep.gpus) == ("separate", 16)  # one rollout actor per rank, beside the ranks
    actors = ["rollout.prompts_per_iter=48", "rollout.slices=48", "rollout.workers=6", "reward.workers=1",
              "train.workers=1"]
    mine = placements(_cfg(*actors), reward_gpus=False)[0]
    assert (mine.name, mine.gpus, mine.rollout_workers, mine.learner_workers) == ("separate", 7, 6, 1)
    assert placements(_cfg(*actors), reward_gpus=True)[0].gpus == 8  # a reward model: one more GPU
    one_actor = placements(_cfg("pipeline.placement=separate", "train.workers=2"), reward_gpus=False)[0]
    assert (one_actor.gpus, one_actor.rollout_workers) == (3, 1)  # the run's one rollout actor and 2 ranks
    assert [p.name for p in placements(load_config(None, []), False)] == ["one GPU"]
    m = Minutes("H200", rollout=48.0, learner=8.0, measured=True)  # one GPU's minutes of one iteration
    # colocated: 6 one-prompt slices per rank, the update over 8 ranks; separate: 8 slices on the
    # busiest of 6 actors, the update on one rank
    assert wall_minutes(_cfg(*node), m, colo) == 48.0 * 6 / 48 + 8.0 / 8
    assert wall_minutes(_cfg(*actors), m, mine) == 48.0 * 8 / 48 + 8.0 / 1
