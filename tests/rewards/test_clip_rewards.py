"""Rewards over clips (frame strips): splitting, per-frame averaging, temporal consistency."""

import numpy as np
import pytest

from tempflow_core.rewards import build_reward
from tempflow_core.rewards.clips import split_strips
from tempflow_core.shapes.prompts import load_split
from tempflow_core.shapes.render import render_scene


def _strip(frames: list[np.ndarray]) -> np.ndarray:
    """Frames [H, W, 3] side by side, written out frame by frame."""
    h, w, _ = frames[0].shape
    out = np.zeros((h, w * len(frames), 3), np.uint8)
    for i, f in enumerate(frames):
        out[:, i * w:(i + 1) * w] = f
    return out


def test_a_strip_splits_into_its_square_frames_and_an_image_is_one_frame():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(2, 3, 8, 8, 3), dtype=np.uint8)
    strips = np.stack([_strip(list(c)) for c in frames])
    assert strips.shape == (2, 8, 24, 3) and np.array_equal(split_strips(strips), frames)
    assert split_strips(frames[:, 0]).shape == (2, 1, 8, 8, 3)
    with pytest.raises(ValueError, match="strips of square frames"):
        split_strips(np.zeros((1, 8, 20, 3), np.uint8))


def test_frames_averages_the_image_reward_over_each_clips_frames():
    rng = np.random.default_rng(1)
    clips = [[rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(4)] for _ in range(3)]
    per_frame = np.array([[f.astype(np.float64).mean() / 255 for f in c] for c in clips])  # brightness by hand
    score, details = build_reward("frames", options={"frames": {"of": "brightness"}})(
        np.stack([_strip(c) for c in clips]), ["a", "b", "c"], [{}] * 3)
    np.testing.assert_allclose(score, per_frame.mean(1), rtol=1e-5)
    np.testing.assert_allclose(details["frame_min"], per_frame.min(1), rtol=1e-5)
    with pytest.raises(ValueError, match="not 'frames'"):
        build_reward("frames", options={"frames": {"of": "frames"}})


def test_frames_of_shapes_keeps_its_per_task_details_and_temporal_consistency_counts_changed_frames():
    records = load_split("test")[:2]  # a single object, then two objects
    a, _ = render_scene(records[0], 0, 64)
    b, _ = render_scene(records[1], 0, 64)
    clips = np.stack([_strip([a, a, a]), _strip([a, b, a])])
    prompts = [records[0]["prompt"]] * 2
    score, details = build_reward("frames", options={"frames": {"of": "shapes"}})(clips, prompts, [records[0]] * 2)
    assert score[0] == pytest.approx(1.0) and score[1] == pytest.approx(2 / 3)  # frame b is the wrong scene
    assert details["strict_single_object"][0] == pytest.approx(1.0) and np.isnan(details["strict_two_object"]).all()
    consistency, _ = build_reward("temporal_consistency")(clips, prompts, [{}] * 2)
    np.testing.assert_array_equal(consistency, [1.0, 0.0])  # a a a: both pairs agree; a b a: neither does
    one, _ = build_reward("temporal_consistency")(np.stack([a]), prompts[:1], [{}])
    assert one.tolist() == [1.0]
