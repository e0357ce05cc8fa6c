"""GenEval's position rule and the strict/partial scoring rules, on hand-made detections."""

from __future__ import annotations

import pytest

from tempflow_core.shapes.detect import Detection
from tempflow_core.shapes.geometry import normalized_offset, relative_position
from tempflow_core.shapes.render import _relation_ok
from tempflow_core.shapes.score import score_objects


def det(shape, color, x, y, s=10):
    return Detection(shape, color, (x, y, x + s, y + s), s * s, 1.0, 0.9)


def test_relative_position_matches_hand_computation():
    # centres (15, 15) and (35, 17): offset (20, 2), margin 0.1 * (10 + 10) = 2 per axis,
    # revised (18, 0), |offset| = sqrt(404) -> dx = 18 / 20.1 = 0.896
    dx, dy = normalized_offset((30, 12, 40, 22), (10, 10, 20, 20))
    assert dx == pytest.approx(18 / 404 ** 0.5) and dy == 0.0
    assert relative_position((30, 12, 40, 22), (10, 10, 20, 20)) == {"right of"}
    assert relative_position((10, 10, 20, 20), (30, 12, 40, 22)) == {"left of"}
    # offset (10, 9): revised (8, 7) / sqrt(181) = (0.595, 0.520): diagonal, both hold
    assert relative_position((20, 19, 30, 29), (10, 10, 20, 20)) == {"right of", "below"}
    # offset (10, 5): revised (8, 3) / sqrt(125) = (0.716, 0.268)
    assert relative_position((20, 15, 30, 25), (10, 10, 20, 20)) == {"right of"}
    assert relative_position((10, 0, 20, 10), (10, 30, 20, 40)) == {"above"}
    assert relative_position((10, 10, 20, 20), (11, 10, 21, 20)) == set()  # offset within the margin


@pytest.mark.parametrize("box_a,box_b", [((30, 12, 40, 22), (10, 10, 20, 20)), ((5, 30, 12, 36), (20, 4, 31, 15)),
                                         ((20, 19, 30, 29), (10, 10, 20, 20)), ((10, 0, 20, 10), (10, 30, 20, 40))])
def test_renderer_relation_check_agrees_with_geneval_rule(box_a, box_b):
    rels = relative_position(box_a, box_b)
    for rel in ("left of", "right of", "above", "below"):
        if _relation_ok(box_a, box_b, rel):
            assert rels == {rel}


COUNT3 = {"tag": "counting", "include": [{"class": "circle", "count": 3, "color": "red"}],
          "exclude": [{"class": "circle", "count": 4}], "prompt": "three red circles"}
POS = {"tag": "position", "include": [{"class": "square", "count": 1},
                                      {"class": "circle", "count": 1, "position": ["left of", 0]}],
       "prompt": "a circle left of a square"}
ATTR = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                         {"class": "square", "count": 1, "color": "blue"}],
        "prompt": "a red circle and a blue square"}


def test_counting_exact_and_partial_credit():
    three = [det("circle", "red", 2 + 14 * i, 5) for i in range(3)]
    assert score_objects(three, COUNT3).strict and score_objects(three, COUNT3).partial == 1.0
    two = three[:2]  # count term 1 - 1/3, colour term 0 (count wrong) -> mean 1/3
    r = score_objects(two, COUNT3)
    assert not r.strict and r.partial == pytest.approx((2 / 3 + 0) / 2)
    wrong_colour = three[:2] + [det("circle", "blue", 40, 40)]  # colour term 1 - 1/3
    r = score_objects(wrong_colour, COUNT3)
    assert not r.strict and r.partial == pytest.approx((1 + 2 / 3) / 2)
    four = three + [det("circle", "red", 40, 40)]  # too many: exact count and exclude fail
    r = score_objects(four, COUNT3)
    assert not r.strict and r.partial == pytest.approx((2 / 3 + 0) / 2)
    eight = [det("circle", "red", 2 + 7 * i, 5, 5) for i in range(8)]  # 1 - 5/3 < 0, clipped to 0
    assert score_objects(eight, COUNT3).partial == 0.0
    assert score_objects([], COUNT3).partial == 0.0


def test_position_strict_and_partial():
    left = [det("square", "green", 40, 20), det("circle", "red", 5, 22)]
    r = score_objects(left, POS)
    assert r.strict and r.partial == 1.0
    right = [det("square", "green", 5, 20), det("circle", "red", 40, 22)]
    r = score_objects(right, POS)  # terms: square 1, circle count 1, position 0
    assert not r.strict and r.partial == pytest.approx(2 / 3)
    no_ref = [det("circle", "red", 5, 22)]  # terms: square 0, circle 1, position: target missing 0
    r = score_objects(no_ref, POS)
    assert not r.strict and r.partial == pytest.approx(1 / 3)


def test_color_attribution_and_extra_objects():
    good = [det("circle", "red", 5, 5), det("square", "blue", 30, 30)]
    assert score_objects(good, ATTR).strict
    swapped = [det("circle", "blue", 5, 5), det("square", "red", 30, 30)]
    r = score_objects(swapped, ATTR)  # count 1, colour 0, count 1, colour 0
    assert not r.strict and r.partial == pytest.approx(0.5)
    extra = good + [det("triangle", "red", 45, 5)]  # an unrequested shape is not penalised (GenEval)
    assert score_objects(extra, ATTR).strict
    with pytest.raises(ValueError, match="include"):
        score_objects(good, {"prompt": "x"})
