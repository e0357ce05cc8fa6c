"""The likelihood ratio at unchanged weights (the first minibatch of an update) must be 1. On a
GPU in bf16 the rollout's batch shapes (rollout.max_batch rows a call) and the learner's
(train.micro_batch units) can pick other kernels, so the log-probs the rollout stored and the
learner's differ and the ratio drifts from 1; with a clip range of 1e-4 that decides what is
clipped. Every run records the first minibatch's ratio range; train.recompute_old_log_probs
makes the learner recompute the old log-probs in its own shapes, so that range is exactly 1."""

from __future__ import annotations

import math

import pytest

import tempflow_core.algorithm.train as train_module
from tempflow_core.algorithm.learner import TrainUnits
from tempflow_core.algorithm.train import train_in_process
from tempflow_core.config import load_config

KEYS = ("ratio_first_min", "ratio_first_max", "ratio_min", "ratio_max", "clip_frac")


def _metrics(tiny_model_dir, tmp_path, dtype: str, recompute: bool) -> dict[str, float]:
    cfg = load_config(overrides=[
        f"model.path={tiny_model_dir}", f"model.dtype={dtype}", "model.device=cpu", "train.iterations=1",
        "rollout.prompts_per_iter=2", "rollout.group_size=4", "rollout.max_batch=16", "train.micro_batch=1",
        "train.minibatches=2", "sampling.num_steps=4", "lora.rank=4", "lora.alpha=8", "loss.beta=0.01",
        f"train.recompute_old_log_probs={str(recompute).lower()}", f"output_dir={tmp_path / 'runs'}",
        "prompts.source=builtin:colors"])
    m = train_in_process(cfg, tmp_path / f"{dtype}-{recompute}").history[0]
    return {k: m[f"train/{k}"] for k in KEYS}


def test_the_first_minibatchs_ratio_is_what_the_stored_log_probs_give_and_1_when_recomputed(
        tiny_model_dir, tmp_path, monkeypatch):
    """Stored log-probs 0.5 too high: read as they are, the first minibatch's ratio is exp(-0.5)
    for every term; recomputed, it is exactly 1 (the learner's own forward, bit for bit)."""
    build = train_module.build_units

    def shifted(*a, **k) -> TrainUnits:
        u = build(*a, **k)
        u.old_log_prob = u.old_log_prob + 0.5
        return u

    monkeypatch.setattr(train_module, "build_units", shifted)
    read = _metrics(tiny_model_dir, tmp_path, "float32", recompute=False)
    assert read["ratio_first_min"] == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert read["ratio_first_max"] == pytest.approx(math.exp(-0.5), rel=1e-5)
    again = _metrics(tiny_model_dir, tmp_path, "float32", recompute=True)
    assert again["ratio_first_min"] == again["ratio_first_max"] == 1.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_ratio_spread_at_unchanged_weights_with_and_without_recomputing(tiny_model_dir, tmp_path, dtype, capsys):
    """The rollout samples in 16-row calls, the learner takes 1 unit a call. Reported: the first
    minibatch's largest |ratio - 1| both ways (on this CPU, bf16 measured 0 and float32 1.2e-7:
    CPU kernels round a row alike in any batch; a GPU's need not)."""
    read = _metrics(tiny_model_dir, tmp_path, dtype, recompute=False)
    again = _metrics(tiny_model_dir, tmp_path, dtype, recompute=True)
    spread = {name: max(abs(m["ratio_first_min"] - 1), abs(m["ratio_first_max"] - 1))
              for name, m in (("rollout's log-probs", read), ("recomputed", again))}
    with capsys.disabled():
        print(f"\n{dtype}: first minibatch's max |ratio - 1|: {spread}")
    assert again["ratio_first_min"] == again["ratio_first_max"] == 1.0
    assert spread["rollout's log-probs"] < 1e-3  # the sampler and the learner compute the same transition
