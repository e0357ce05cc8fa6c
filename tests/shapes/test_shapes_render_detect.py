"""Renderer and detector: determinism, speed, hand-drawn detection and the round trip."""

from __future__ import annotations


import numpy as np
import pytest

from tempflow_core.shapes import detect, evaluate, generate_dataset, load_split, render_batch, render_scene, score_images
from tempflow_core.shapes.world import PALETTE, TAGS

PER_CATEGORY = 300


def _records_by_tag(res_seed: int):
    recs = load_split("all")
    rng = np.random.default_rng(res_seed)
    out = []
    for tag in TAGS:
        pool = [r for r in recs if r["tag"] == tag]
        out += [pool[i] for i in rng.integers(len(pool), size=PER_CATEGORY)]
    return out


@pytest.mark.parametrize("resolution", [64, 32])
def test_round_trip_is_strictly_correct_per_category(resolution):
    records = _records_by_tag(resolution)
    images = render_batch(records, seed=1234, resolution=resolution)
    res = evaluate(images, records)
    assert res["counts"] == {t: PER_CATEGORY for t in TAGS}
    for tag, acc in res["per_category"].items():
        assert acc >= 0.99, (resolution, tag, acc)


def test_detections_match_ground_truth_objects():
    recs = load_split("all")
    for i in range(60):
        image, objects = render_scene(recs[(7 * i) % len(recs)], i, 64)
        (found,) = detect(image[None])
        assert sorted((o.bbox, o.shape, o.color) for o in objects) == sorted((d.bbox, d.shape, d.color) for d in found)
        for o in objects:  # the colour is within the jitter of its palette entry
            pix = image[o.bbox[1]:o.bbox[3], o.bbox[0]:o.bbox[2]].reshape(-1, 3)
            pix = pix[pix.any(axis=1)][0].astype(int)
            assert np.abs(pix - PALETTE[o.color]).max() <= 15


def test_detector_on_hand_drawn_shapes():
    img = np.zeros((64, 64, 3), np.uint8)
    img[5:19, 5:19] = (225, 35, 45)  # red square, 14 x 14
    yy, xx = np.mgrid[:64, :64]
    img[(xx + 0.5 - 45) ** 2 + (yy + 0.5 - 15) ** 2 <= 8 ** 2] = (40, 75, 225)  # blue circle r=8
    for y in range(36, 56):  # yellow upward triangle, apex at (20, 36), base 20 wide at y=55
        half = (y - 36) / 2
        img[y, int(round(20 - half)):int(round(20 + half)) + 1] = (240, 210, 50)
    img[40:43, 40:43] = (30, 200, 60)  # a 9-px green speck: below the minimum area
    found = {(d.shape, d.color): d for d in detect(img)[0]}
    assert set(found) == {("square", "red"), ("circle", "blue"), ("triangle", "yellow")}
    assert found[("square", "red")].bbox == (5, 5, 19, 19)
    assert found[("circle", "blue")].center == pytest.approx((45, 15), abs=0.6)
    assert found[("square", "red")].fill == 1.0
    assert 0.45 < found[("triangle", "yellow")].fill < 0.6


def test_noise_and_blank_images_score_zero_strict():
    recs = load_split("all")
    rng = np.random.default_rng(0)
    for res in (64, 32):
        noise = rng.integers(0, 256, size=(400, res, res, 3), dtype=np.uint8)
        meta = [recs[i] for i in rng.integers(len(recs), size=400)]
        strict, partial = score_images(noise, meta)
        assert strict.mean() <= 0.01, res
        assert partial.mean() < 0.1, res
    strict, partial = score_images(np.zeros((5, 64, 64, 3), np.uint8), recs[:5])
    assert strict.sum() == 0 and partial.sum() == 0


def test_position_scenes_respect_the_relation_unambiguously():
    recs = [r for r in load_split("all") if r["tag"] == "position"]
    from tempflow_core.shapes.geometry import relative_position
    for i, rec in enumerate(recs * 4):
        _, objs = render_scene(rec, i, 64)
        ref, obj = objs
        assert relative_position(obj.bbox, ref.bbox) == {rec["include"][1]["position"][0]}


def test_renderer_is_deterministic():
    a = generate_dataset(300, seed=5)
    b = generate_dataset(300, seed=5)
    c = generate_dataset(300, seed=6)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])
    prefix = generate_dataset(50, seed=5)
    assert np.array_equal(prefix[0], a[0][:50])  # image i depends only on (seed, i)
    assert a[0].dtype == np.uint8 and a[0].shape == (300, 64, 64, 3)
    tags = [m["tag"] for m in a[2]]
    assert all(tags.count(t) >= 25 for t in TAGS)  # tags are balanced, not prompt-weighted
    assert (a[0].reshape(300, -1, 3) == 0).all(axis=-1).mean() > 0.7  # mostly black background


def test_split_argument_and_errors():
    _, caps, _ = generate_dataset(100, seed=1, split="test")
    test_prompts = {r["prompt"] for r in load_split("test")}
    assert set(caps) <= test_prompts
    with pytest.raises(ValueError, match="split"):
        generate_dataset(2, seed=1, split="val")
    with pytest.raises(ValueError, match="place"):
        render_scene({"include": [{"class": "circle", "count": 40}]}, 0, 64)


def test_detector_refuses_float_images():
    with pytest.raises(ValueError, match="uint8"):
        detect(np.zeros((1, 32, 32, 3), np.float32))
