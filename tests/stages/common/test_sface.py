"""The second verifier (SFace) on dlib's landmarks: it must tell people apart by itself."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from stages.common.sface import (
    SFACE_SAME_PERSON,
    sface_descriptor,
    sface_same_person_share,
)


def test_a_mirrored_face_is_the_same_person_and_noise_is_nobody(astronaut):
    from stages.common.faces import detect_faces

    face = detect_faces(astronaut)[0]
    mirrored = astronaut[:, ::-1].copy()
    points = face.landmarks * [-1, 1] + [astronaut.shape[1] - 1, 0]
    # mirroring swaps left and right: dlib's index order follows the image, as SFace's does
    points = points[[*range(16, -1, -1), *range(26, 16, -1), *range(27, 31), *range(35, 30, -1),
                     45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
                     54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]]
    one, other = sface_descriptor(astronaut, face.landmarks), sface_descriptor(mirrored, points)
    noise = np.random.default_rng(0).integers(0, 256, astronaut.shape, dtype=np.uint8)
    blank = sface_descriptor(noise, face.landmarks)
    assert np.linalg.norm(one) == pytest.approx(1.0)
    assert float(one @ other) >= SFACE_SAME_PERSON > float(one @ blank)
    assert sface_same_person_share([one, other, blank]) == pytest.approx(1 / 3)
    assert sface_same_person_share([one]) is None


@pytest.mark.shared_data
def test_sface_tells_lfw_pairs_apart(shared_data):
    from stages.common.faces import detect_faces
    from stages.common.imageio import load_rgb

    folder = shared_data / "lfw_devtrain"
    rows = list(csv.DictReader(open(folder / "pairs.csv")))
    chosen = [r for r in rows if r["same"] == "1"][:10] + [r for r in rows if r["same"] != "1"][:10]

    def describe(relative: str) -> np.ndarray:
        rgb = load_rgb(folder / "images" / relative).rgb
        face = max(detect_faces(rgb), key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        return sface_descriptor(rgb, face.landmarks)

    verdicts = [float(describe(r["rel_a"]) @ describe(r["rel_b"])) >= SFACE_SAME_PERSON for r in chosen]
    assert sum(verdicts[:10]) >= 9 and sum(verdicts[10:]) <= 1
