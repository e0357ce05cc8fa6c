"""The base model's evaluation, kept once per store: computed with the initial adapter, read back
while nothing it depends on changes, recomputed when something does."""

from __future__ import annotations

import json

import pytest

from tempflow_core.algorithm import evaluation
from tempflow_core.algorithm.session import SessionCache
from tempflow_core.config import load_config
from tempflow_core.run.baseline import base_evaluation, baseline_key
from tempflow_core.run.fingerprints import fingerprints
from tempflow_core.run.ownership import store_root_problem
from tempflow_core.storage import open_store

OVERRIDES = ["model.path=null", "sampling.eval_num_steps=3", "eval.max_prompts=3", "prompts.source=builtin:colors",
             "reward.name=brightness"]


def test_the_base_evaluation_is_computed_once_and_recomputed_only_when_what_it_depends_on_changes(tmp_path):
    store = open_store(str(tmp_path / "store"))
    cfg = load_config(overrides=OVERRIDES)
    sessions = SessionCache()
    s = sessions.get(cfg)
    # a policy moved away from the base: the base evaluation must still be the base's
    lora = {k: v + 0.05 for k, v in s.init_lora.items()}
    s.policy.load_lora_state_dict(lora)
    first, cached = base_evaluation(cfg, store, lambda: s)
    assert not cached
    fresh = SessionCache().get(cfg)  # an independent session at its initial adapter
    fresh.policy.load_lora_state_dict(fresh.init_lora)
    want, _ = evaluation.evaluate_policy(cfg, fresh.policy, fresh.reward_fn, evaluation.eval_prompts(cfg))
    assert first == json.loads(json.dumps(want))
    s.policy.load_lora_state_dict(lora)
    again, cached = base_evaluation(cfg, store, lambda: s)
    assert cached and again == first
    stored, cached = base_evaluation(cfg, store, lambda: pytest.fail("a stored base evaluation loaded a model"))
    assert cached and stored == first
    assert store.list("_baselines") == [f"_baselines/{baseline_key(cfg, fingerprints(cfg))}.json"]
    assert store_root_problem(store, shared=False) is None  # the store holds only the project's things

    trained_only = load_config(overrides=OVERRIDES + ["train.lr=0.1", "train.iterations=9", "loss.beta=0.5"])
    assert baseline_key(trained_only, fingerprints(trained_only)) == baseline_key(cfg, fingerprints(cfg))
    for change in ("eval.seed=7", "sampling.eval_num_steps=4", "eval.guidance_scale=1.5", "reward.name=shapes"):
        other = load_config(overrides=OVERRIDES + [change])
        assert baseline_key(other, fingerprints(other)) != baseline_key(cfg, fingerprints(cfg)), change
    other = load_config(overrides=OVERRIDES + ["eval.seed=7"])
    result, cached = base_evaluation(other, store, lambda: sessions.get(other))
    assert not cached and result["samples"] != first["samples"]
    assert len(store.list("_baselines")) == 2
