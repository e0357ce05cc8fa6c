"""The evaluation protocol: images per category, the evaluation prompt set, standard errors."""

import math

import numpy as np
import pytest

from tempflow_core.config import RunConfig
from tempflow_core.algorithm.evaluation import eval_samples, evaluate_policy, images_per_prompt
from tempflow_core.policies.sd3 import SD3Policy
from tempflow_core.prompts import PromptRecord, load_prompts
from tempflow_core.reports.report import headline, mean_curve
from tempflow_core.rewards import build_reward
from tempflow_core.shapes.evaluate import evaluate, standard_error
from tempflow_core.shapes.prompts import load_split


def _recs(tags: dict[str, int]) -> list[PromptRecord]:
    return [PromptRecord(f"{t}{i}", f"{t} {i}", {"tag": t}) for t, n in tags.items() for i in range(n)]


def test_every_category_gets_at_least_n_images():
    recs = _recs({"single_object": 1, "colors": 3, "counting": 30})
    counts = images_per_prompt(recs, 1, 64)
    assert counts == [64] + [22] * 3 + [3] * 30
    assert images_per_prompt(recs, 2, 0) == [2] * 34  # no floor: images_per_prompt for all
    assert images_per_prompt(recs, 4, 64)[-1] == 4  # the per-prompt count is a floor too
    samples = eval_samples(recs[:2], [3, 1])
    # seed-major, the noise id names prompt and seed: a smaller protocol's images come first
    assert [i for _, i in samples] == ["single_object0_s0", "colors0_s0", "single_object0_s1", "single_object0_s2"]


def test_eval_set_holds_out_the_large_categories_and_takes_all_of_the_small():
    ev, train = load_split("eval"), load_split("train")
    by_tag = {}
    for r in ev:
        by_tag[r["tag"]] = by_tag.get(r["tag"], 0) + 1
    # the world has 3 single-object, 6 two-object and 12 colour prompts: all of them; the
    # large categories keep their held-out quarter (36, 24, 72 prompts in the world)
    assert by_tag == {"single_object": 3, "two_object": 6, "colors": 12, "counting": 9, "position": 6,
                      "color_attr": 18}
    seen = {r["prompt"] for r in train}
    assert not any(r["prompt"] in seen for r in ev if r["tag"] in ("counting", "position", "color_attr"))
    assert [r.id for r in load_prompts("builtin:shapes_eval")] == [r["id"] for r in ev]


def test_standard_errors_against_hand_computed_values():
    assert standard_error(np.array([1.0, 0.0, 0.0, 1.0])) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert standard_error(np.array([0.7])) == 0.0
    # overall = mean of two categories: se = sqrt(se_a^2 + se_b^2) / 2
    images = np.zeros((6, 32, 32, 3), dtype=np.uint8)  # blank: every strict score 0
    meta = [{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]}] * 3 + \
           [{"tag": "single_object", "include": [{"class": "square", "count": 1}]}] * 3
    out = evaluate(images, meta)
    assert out["overall"] == 0.0 and out["overall_se"] == 0.0 and out["per_category_se"] == {"single_object": 0.0,
                                                                                             "colors": 0.0}
    pts = [{"seed": 0, "iteration": 1, "score": 0.4, "se": 0.03}, {"seed": 1, "iteration": 1, "score": 0.5, "se": 0.04}]
    row = mean_curve(pts)[0]
    assert row["mean"] == pytest.approx(0.45) and row["se"] == pytest.approx(0.025)  # sqrt(.03^2+.04^2)/2
    h = headline({"tempflow": [{"seed": 0, "iteration": 0, "nfe": 0, "score": 0.3, "se": 0.02}, *pts]})
    assert h["base_se"] == 0.02 and h["finals"]["tempflow"]["se"] == pytest.approx(0.025)


def test_policy_evaluation_scores_every_category_with_its_error(tiny_pipe):
    cfg = RunConfig(sampling={"eval_num_steps": 2, "guidance_scale": 1.0}, reward={"name": "shapes"},
                    eval={"prompts": "builtin:shapes_eval", "images_per_category": 8})
    records = load_prompts("builtin:shapes_eval")
    result, png = evaluate_policy(cfg, SD3Policy(tiny_pipe, None, "cpu"), build_reward("shapes"), records)
    counts = result["geneval_counts"]
    # 8 per category at least: single_object 3 prompts x 3 seeds, colors 12 x 1, color_attr 18 x 1
    assert counts == {"single_object": 9, "two_object": 12, "counting": 9, "colors": 12, "position": 12,
                      "color_attr": 18}
    assert result["n"] == sum(counts.values()) == len(result["samples"])
    rewards = np.array([s["reward"] for s in result["samples"]])
    assert result["reward_se"] == pytest.approx(rewards.std(ddof=1) / math.sqrt(rewards.size))
    assert set(result["geneval_se"]) == set(counts) and result["geneval_overall_se"] >= 0
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # every image's category and strict score: the per-category scores are their means
    assert result["detector_rules"] == "v2"
    for tag, n in counts.items():
        mine = [x["strict"] for x in result["samples"] if x["category"] == tag]
        assert len(mine) == n and set(mine) <= {0, 1}
        assert result["geneval"][tag] == pytest.approx(np.mean(mine))


def test_evaluation_samples_with_its_own_guidance_when_set(tiny_pipe, monkeypatch):
    """eval.guidance_scale: a run trained without CFG is scored with the CFG it will be sampled with."""
    from tempflow_core.algorithm import evaluation

    seen = []
    real = evaluation.sample_images
    monkeypatch.setattr(evaluation, "sample_images", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    records = load_prompts("builtin:colors")[:2]
    policy = SD3Policy(tiny_pipe, None, "cpu")
    base = {"sampling": {"eval_num_steps": 2, "guidance_scale": 1.0}, "reward": {"name": "brightness"}}
    a, _ = evaluate_policy(RunConfig(**base), policy, build_reward("brightness"), records)
    b, _ = evaluate_policy(RunConfig(**base, eval={"guidance_scale": 4.0}), policy, build_reward("brightness"), records)
    c, _ = evaluate_policy(RunConfig(**base, eval={"guidance_scale": 1.0}), policy, build_reward("brightness"), records)
    assert seen == [1.0, 4.0, 1.0]
    assert a["samples"] == c["samples"] and a["reward"] != b["reward"]
    assert RunConfig(**base, eval={"guidance_scale": 4.0}).digest() != RunConfig(**base).digest()
    assert RunConfig(**base, eval={"guidance_scale": None}).digest() == RunConfig(**base).digest()


def test_eval_summary_line():
    from tempflow_core.reports.report import eval_summary

    assert eval_summary({"reward": 0.37391, "reward_se": 0.021, "geneval_overall": 0.296, "geneval_overall_se": 0.02}) \
        == "reward 0.3739 ± 0.0210, GenEval-style overall 0.296 ± 0.020"
    assert eval_summary({"reward": 0.5}) == "reward 0.5000"  # results written before standard errors existed
