"""The painted-region evaluation: another real person's face pasted over the hull, with and
without the forehead, judged by both verifiers."""
from __future__ import annotations

import pytest

from flows.evaluation.painted_region import painted_region, region_table


@pytest.mark.shared_data
def test_pasting_the_forehead_too_leaves_sface_less_to_recognise(shared_data):
    root = shared_data / "lfw_devtrain"
    results = painted_region(root / "pairs.csv", root / "images", limit=40, foreheads=(0.0, 0.45))
    hull, forehead = results["regions"]["0"], results["regions"]["0.45"]
    assert results["subjects"] >= 35 and hull["pasted"] == forehead["pasted"] >= 60
    # Another person's face is another person to dlib, over either region ...
    assert hull["dlib_as_b_share"] <= 0.05 and forehead["dlib_as_b_share"] <= 0.05
    # ... but SFace still recognises the photo's own person by what the hull leaves, more
    # than by what the larger region leaves (150 subjects: 6.7% against 0.0%).
    assert hull["sface_as_a_share"] > forehead["sface_as_a_share"]
    assert forehead["sface_as_a_share"] <= 0.03
    table = region_table(results)
    assert "| landmark hull |" in table and "| hull + 0.45 of the forehead |" in table
