"""Grounding: parse <ref>/<box>/<quad> to pixel boxes (0-1000 scale), format them back, draw them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ivl.errors import ImageError
from ivl.processing.grounding import (
    Region,
    draw_grounding,
    format_box,
    format_region,
    grounding_prompt,
    parse_grounding,
)


def test_parse_hand_computed():
    text = "Here: <ref>the cat</ref><box>[[100, 200, 500, 1000]]</box> and <ref>dogs</ref><box>[[0, 0, 250, 250], [750, 750, 1000, 1000]]</box>."
    regions = parse_grounding(text, (640, 480))
    assert [r.label for r in regions] == ["the cat", "dogs"]
    # x / 1000 * W, y / 1000 * H
    assert regions[0].shapes == [(64.0, 96.0, 320.0, 480.0)]
    assert regions[1].shapes == [(0.0, 0.0, 160.0, 120.0), (480.0, 360.0, 640.0, 480.0)]


def test_bare_boxes_quads_and_garbage():
    text = "<box>[[10, 20, 30, 40]]</box> <quad>[[0, 0, 1000, 0, 1000, 1000, 0, 1000]]</quad> <box>[[1, 2, 3]]</box> <box>oops</box>"
    regions = parse_grounding(text, (200, 100))
    assert len(regions) == 2
    assert regions[0] == Region(None, [(2.0, 2.0, 6.0, 4.0)], "box")
    assert regions[1].kind == "quad" and regions[1].shapes == [(0.0, 0.0, 200.0, 0.0, 200.0, 100.0, 0.0, 100.0)]


def test_unit_boxes_follow_the_official_eval_rule():
    # four numbers summing to < 4 are already normalised to 0-1 (official RefCOCO eval)
    regions = parse_grounding("<box>[[0.1, 0.2, 0.5, 0.9]]</box>", (1000, 500))
    assert regions[0].shapes == [pytest.approx((100.0, 100.0, 500.0, 450.0))]
    raw = parse_grounding("<box>[[0.1, 0.2, 0.5, 0.9]]</box>", (1000, 500), unit_box_heuristic=False)
    assert raw[0].shapes == [pytest.approx((0.1, 0.1, 0.5, 0.45))]


def test_format_and_round_trip():
    assert format_box([(64, 96, 320, 480)], (640, 480)) == "<box>[[100, 200, 500, 1000]]</box>"
    assert format_region("cat", [(0, 0, 640, 480)], (640, 480)) == "<ref>cat</ref><box>[[0, 0, 1000, 1000]]</box>"
    assert format_box([(-5, 0, 700, 10)], (640, 480)) == "<box>[[0, 0, 1000, 21]]</box>"  # clamped to 0..1000
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(1, 4000, 2))
        box = tuple(float(v) for v in (rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h)))
        region = parse_grounding(format_region("x", [box], (w, h)), (w, h), unit_box_heuristic=False)[0]
        # quantisation to 1/1000 of the side: at most half a step of error
        steps = np.array([w, h, w, h]) / 1000
        assert (np.abs(np.array(region.shapes[0]) - box) <= steps / 2 + 1e-9).all()
    with pytest.raises(ImageError):
        format_box([(1, 2, 3)], (10, 10))
    assert grounding_prompt("the red car").endswith("<ref>the red car</ref>")


def test_draw_outlines_and_saves_png(tmp_path):
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    regions = parse_grounding("<ref>thing</ref><box>[[100, 200, 600, 900]]</box>", image.size)
    path = tmp_path / "boxes.png"
    drawn = draw_grounding(image, regions, path=path, width=2)
    assert np.asarray(image).max() == 0  # the input is not modified
    pixels = np.asarray(drawn)
    x1, y1, x2, y2 = (round(v) for v in regions[0].shapes[0])  # (20, 20, 120, 90)
    assert pixels[50, x1].any() and pixels[50, x2].any()  # left and right edges drawn
    assert pixels[y2, 70].any()  # bottom edge drawn
    assert not pixels[55, 70].any()  # inside stays untouched
    assert pixels[y1 - 2 : y1 + 12, x1 : x1 + 30].any()  # the label sits at the top-left corner
    reloaded = Image.open(path)
    assert reloaded.format == "PNG" and reloaded.size == (200, 100)
    np.testing.assert_array_equal(np.asarray(reloaded.convert("RGB")), pixels)


def test_label_is_the_ref_right_before_the_box() -> None:
    # a lazy match across </ref> would label this region "a</ref> x <ref>b"
    regions = parse_grounding("<ref>a</ref> x <ref>b</ref><box>[[0, 0, 500, 500]]</box>", (100, 100))
    assert [r.label for r in regions] == ["b"]
