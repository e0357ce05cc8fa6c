"""The detector's rules: what the audit tightened (a template IoU of 0.7, 80% of the blob's
coloured pixels), and that the rules before it stay selectable and give their old answers."""

from __future__ import annotations

import numpy as np
import pytest

from tempflow_core.rewards import RewardRegistry
from tempflow_core.run.preflight import PreflightError, check_reward
from tempflow_core.shapes import RULES, RULES_V1, DetectorRules, detect, rules_named
from tempflow_core.shapes.world import PALETTE

RED, GREEN, BLUE = PALETTE["red"], PALETTE["green"], PALETTE["blue"]


def _two_coloured_square() -> np.ndarray:
    img = np.zeros((64, 64, 3), np.uint8)
    img[20:36, 20:28] = RED  # one 16 x 16 square, left half red, right half green
    img[20:36, 28:36] = GREEN
    return img


def test_a_two_coloured_blob_is_no_object_under_the_current_rules():
    img = _two_coloured_square()
    old = detect(img, rules=RULES_V1)[0]
    assert sorted((d.color, d.shape) for d in old) == [("green", "square"), ("red", "square")]  # two 8 x 16 boxes
    assert [d.color_share for d in old] == [0.5, 0.5]  # 128 of the blob's 256 coloured pixels each
    assert detect(img)[0] == []


def test_touching_objects_are_one_blob_and_apart_they_are_objects():
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:24, 10:24] = RED
    img[10:24, 24:38] = BLUE  # touches the red square along a column
    assert detect(img)[0] == []
    img[:, 24] = 0  # one black column between them: two objects that stand alone
    found = detect(img)[0]
    assert sorted((d.color, d.shape, d.color_share) for d in found) == [("blue", "square", 1.0), ("red", "square", 1.0)]


def test_unlabelled_fringe_does_not_lower_the_colour_share():
    img = np.zeros((64, 64, 3), np.uint8)
    img[19:37, 19:37] = (130, 130, 130)  # a grey ring, farther than the cut-off from every palette colour
    img[20:36, 20:36] = BLUE
    (found,) = detect(img)
    assert [(d.color, d.shape, d.color_share) for d in found] == [("blue", "square", 1.0)]


def test_a_shapeless_blob_passes_only_the_old_rules():
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:30, 10:30] = GREEN
    img[10:22, 18:30] = 0  # a 20 x 20 box missing its 12 x 12 top-right corner: 256 of 400 pixels
    old = detect(img, rules=RULES_V1)[0]
    assert len(old) == 1 and 0.5 <= old[0].confidence < 0.7  # the box template alone gives 256 / 400 = 0.64
    assert old[0].confidence >= 256 / 400
    assert detect(img)[0] == []


def test_rule_sets_by_name():
    assert rules_named("v1") == RULES_V1 == DetectorRules() and rules_named("v2") == RULES
    assert (RULES.min_confidence, RULES.min_color_share) == (0.7, 0.8)
    assert RULES.name == "v2" and DetectorRules(0.6, 0.1).name == "custom"
    with pytest.raises(ValueError, match="unknown detector rules 'v3'; expected one of v1, v2"):
        rules_named("v3")


def test_the_shapes_reward_takes_the_rules_as_an_option():
    img = _two_coloured_square()[None]
    meta = [{"tag": "counting", "include": [{"class": "square", "count": 2}]}]
    reg = RewardRegistry.builtin()
    old, _ = reg.build("shapes", options={"shapes": {"rules": "v1"}})(img, ["two squares"], meta)
    new, _ = reg.build("shapes")(img, ["two squares"], meta)
    assert old.tolist() == [1.0] and new.tolist() == [0.0]
    strict_old, _ = reg.build("shapes_strict", options={"shapes_strict": {"rules": "v1"}})(img, ["two squares"], meta)
    assert strict_old.tolist() == [1.0]


def test_preflight_refuses_unknown_rules_naming_the_field():
    check_reward("shapes", {}, {"shapes": {"rules": "v1"}}, "reward.name")
    with pytest.raises(PreflightError) as e:
        check_reward("shapes", {}, {"shapes": {"rules": "strict"}}, "reward.name")
    assert str(e.value) == ("reward.options.shapes.rules: 'strict' is not a value of option 'rules' of reward "
                            "'shapes'; fix: use one of: v1, v2")


def test_evaluation_reads_images_with_the_rules_of_the_reward():
    from tempflow_core.algorithm.evaluation import detector_rules
    from tempflow_core.config import load_config

    assert detector_rules(load_config(None, [])) == RULES
    assert detector_rules(load_config(None, ["reward.options={shapes: {rules: v1}}"])) == RULES_V1
    strict = load_config(None, ["reward.name=shapes_strict", "reward.options={shapes_strict: {rules: v1}}"])
    assert detector_rules(strict) == RULES_V1
