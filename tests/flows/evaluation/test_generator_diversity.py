"""The generator-diversity evaluation: dlib's verifier on different people's faces, real,
blurred, pasted and painted."""
from __future__ import annotations

import numpy as np
import pytest

from flows.evaluation.generator_diversity import (
    BLURS_PX,
    diversity_rows,
    diversity_table,
)


@pytest.mark.shared_data
def test_references_bracket_the_shipped_generator(shared_data):
    from stages.common.faces import align_face, detect_faces
    from stages.common.imageio import load_rgb

    crops = []
    for person in sorted((shared_data / "lfw_devtrain" / "images").iterdir())[:16]:
        rgb = load_rgb(sorted(person.iterdir())[0]).rgb
        face = max(detect_faces(rgb), key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        crops.append(align_face(rgb, face.landmarks).crop)
    rows = {row["faces"]: row for row in diversity_rows(np.stack(crops), [None])}
    # The references, then the shipped generator as released (first draw) and, with identity
    # codes (v2), with its mean identity too.
    assert len(rows) == 1 + len(BLURS_PX) + 2 + 1 + ("shipped generator, mean identity (no code)" in rows)
    real, blank = rows["real"], rows["nothing painted (the generator's blurred input)"]
    shipped = rows["shipped generator, as released (first draw)"]
    # 16 people: almost no pair alike; blurred away, most pairs alike; the painter well below
    # that (v1 in between: 24% of 150 CelebA people; v2 with the spread term about as far
    # apart as real people to dlib, which it trains against).
    assert real["verifier_same_share"] <= 2 / 120 and blank["verifier_same_share"] >= 0.5
    assert shipped["verifier_same_share"] < blank["verifier_same_share"] / 2
    assert min(real["median_pair_distance"], shipped["median_pair_distance"]) > blank["median_pair_distance"]
    # The second, independent verifier sees the same order.
    assert real["sface_same_share"] <= 2 / 120 and blank["sface_same_share"] > shipped["sface_same_share"]
    table = diversity_table({"people": 16, "split": "LFW", "verifier": "dlib", "second_verifier": "SFace",
                             "rows": list(rows.values())})
    assert all(f"| {name} | {100 * row['verifier_same_share']:.1f}% |" in table for name, row in rows.items())
