"""The visibility benchmark: reshaped patterns and the table of settings."""
from __future__ import annotations

import numpy as np

from flows.evaluation.perturbation_visibility import measure_settings, reshaped


def _checkerboard(size: int, amplitude: float) -> np.ndarray:
    signs = np.indices((size, size)).sum(axis=0) % 2 * 2 - 1
    return np.repeat((signs * amplitude)[..., None], 3, axis=2).astype(np.float32)


def test_reshaped_patterns_keep_the_policy_bound_and_smoothing_removes_the_cross_hatch():
    pattern = _checkerboard(32, 0.5) + np.linspace(-3, 3, 32, dtype=np.float32)[None, :, None]
    for sigma in (0.0, 1.0, 2.0):
        assert np.abs(reshaped(pattern, sigma, 4.0)).max() == np.float32(4.0)
    smooth = reshaped(pattern, 1.0, 4.0)
    # neighbouring pixels alternate in the raw pattern; the smoothed one is a ramp
    assert np.abs(np.diff(smooth[..., 0], axis=1)).max() < 0.5 < np.abs(np.diff(pattern[..., 0], axis=1)).max()


def test_measure_settings_reports_each_shape_and_strength(astronaut):
    from stages.common.faces import align_face, detect_faces
    from stages.synthesis.render import template_mask

    faces = np.stack([align_face(astronaut, f.landmarks).crop for f in detect_faces(astronaut)] * 3)
    size = faces.shape[1]
    pattern = np.random.default_rng(1).uniform(-8, 8, (size, size, 3)).astype(np.float32)
    support = template_mask(size)[0, 0].numpy()
    rows = measure_settings(faces, pattern, ("Male", "Young"), support, {"as trained": 0.0, "smoothed": 2.0}, (8.0, 2.0))
    assert [(r["shape"], r["xi"]) for r in rows] == [("as trained", 8.0), ("as trained", 2.0),
                                                       ("smoothed", 8.0), ("smoothed", 2.0)]
    for row in rows:
        assert 0.0 <= row["visible_share_median"] <= row["visible_share_p90"] <= 1.0
        assert 0.0 <= row["white_box_fooling_rate"] <= 1.0 and row["psnr_db_median"] > 30
    assert rows[1]["visible_share_median"] <= rows[0]["visible_share_median"]   # weaker: no more visible
