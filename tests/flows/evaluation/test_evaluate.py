"""The evaluation's realism and diversity measures, its ``release`` method (the release's
own escalation) and its sample grid, on public-domain photos."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flows.evaluation.evaluate import (
    evaluate,
    frechet_distance,
    markdown_table,
)
from policy.loader import load_policy
from stages.common.faces import same_person_share


def test_same_person_share_counts_the_pairs_closer_than_the_threshold():
    rng = np.random.default_rng(0)
    alike = rng.normal(size=128)
    descriptors = [alike, alike + 0.01, alike - 0.01, alike + 5.0]
    assert same_person_share(descriptors) == pytest.approx(3 / 6)   # the three alike ones: 3 of 6 pairs
    assert same_person_share(descriptors[:1]) is None
    assert same_person_share([alike, alike + 5.0]) == 0.0


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    features = np.random.default_rng(1).normal(size=(400, 4))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(features + 2.0, features) == pytest.approx(4 * 2.0 ** 2, rel=1e-6)


@pytest.mark.slow
def test_release_method_diversity_realism_and_grid(tmp_path, astronaut):
    """Two pairs of the same person (the astronaut and her mirror image): the originals'
    verifier-same share is 1, the release method runs the release's loop and publishes, and
    the grid holds one line per pair with the original and each method."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(astronaut).save(images / "a.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(images / "b.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("rel_a,rel_b,same\na.png,b.png,1\nb.png,a.png,1\n")
    policy = load_policy(None).policy
    results = evaluate(pairs, images, ["blur", "release"], policy, workers=1, grid=tmp_path / "grid")
    methods = results["methods"]
    assert methods["original"]["verifier_same_share"] == 1.0 and methods["original"]["published_subjects"] == 2
    # The second verifier agrees on the originals: the same person, her own face not de-identified.
    assert methods["original"]["sface_same_share"] == 1.0 and methods["original"]["sface_deid_rate"] == 0.0
    release = methods["release"]
    assert release["released_share"] == 1.0 and release["self_deid_rate"] == 1.0 and release["deid_rate"] == 1.0
    assert release["faces_synthesized"] >= 1 and release["frechet_distance_stage1"] is not None
    assert 0.0 <= (release["verifier_same_share"] or 0.0) <= 1.0
    assert release["sface_deid_rate"] == 1.0 and release["sface_self_deid_rate"] == 1.0
    grid = Image.open(results["grid"])
    assert grid.height == 2 * (160 + 4)                      # one line per pair
    assert grid.width > 3 * 160                              # original, blur, release side by side
    text = markdown_table(results)
    assert "release: the verifier calls" in text and "100.0% of the photos released" in text
    assert "release de-ID 100.0%, self de-ID 100.0%" in text
