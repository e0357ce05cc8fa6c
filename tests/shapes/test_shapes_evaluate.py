"""evaluate(), the Table-1 formatter and image_grid."""

from __future__ import annotations

import numpy as np
import pytest

from tempflow_core.prompts import load_prompts
from tempflow_core.shapes import evaluate, format_table, image_grid, render_batch


def test_overall_is_the_mean_over_categories_not_images():
    records = load_prompts("builtin:shapes_test")  # 1 single_object ... 18 color_attr prompts
    images = render_batch(records, seed=3)
    tags = [r.metadata["tag"] for r in records]
    blank = [i for i, t in enumerate(tags) if t == "color_attr"]  # blank all color_attr images
    images[blank] = 0
    res = evaluate(images, records)
    assert res["per_category"]["color_attr"] == 0.0
    assert all(v == 1.0 for t, v in res["per_category"].items() if t != "color_attr")
    assert res["overall"] == pytest.approx(5 / 6)  # mean over images would be 21/39
    assert res["n"] == len(records) and sum(res["counts"].values()) == len(records)


def test_format_table_rows_and_missing_columns():
    table = format_table({"base": {"overall": 0.4567, "per_category": {"counting": 0.25, "position": 1.0}},
                          "rl": {"overall": 0.9, "per_category": {}}})
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Model | Overall | Single Obj.")
    assert lines[2] == "| base | 0.46 | - | - | 0.25 | - | 1.00 | - |"
    assert len(lines) == 4


def test_image_grid_layout():
    imgs = np.zeros((5, 32, 32, 3), np.uint8)
    imgs[:, :, :, 0] = 200
    g = image_grid(imgs, ncols=3, pad=2)
    assert g.size == (3 * (128 + 2) + 2, 2 * (128 + 2) + 2)  # 32 px scaled x4 to 128
    assert g.getpixel((10, 10)) == (200, 0, 0) and g.getpixel((0, 0)) == (255, 255, 255)
    labelled = image_grid(imgs, ncols=5, labels=["a red circle left of a blue square"] * 5, scale=1)
    assert labelled.size[0] == 5 * 34 + 2 and labelled.size[1] > 34
    with pytest.raises(ValueError, match="labels"):
        image_grid(imgs, 2, labels=["x"])
