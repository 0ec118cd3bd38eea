"""Stage IV's visibility measure: Chou & Li's JND, on flat and textured faces."""
from __future__ import annotations

import numpy as np

from stages.perturbation.visibility import jnd, jnd_bound, visible_share


def _checkerboard(size: int, amplitude: float) -> np.ndarray:
    signs = np.indices((size, size)).sum(axis=0) % 2 * 2 - 1
    return np.repeat((signs * amplitude)[..., None], 3, axis=2).astype(np.float32)


def _added(face: np.ndarray, layer: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(face.astype(np.float32) + layer), 0, 255).astype(np.uint8)


def test_a_checkerboard_shows_on_a_smooth_face_and_hides_in_texture():
    size, support = 64, np.ones((64, 64), np.float32)
    smooth = np.full((size, size, 3), 170, np.uint8)
    columns = np.indices((size, size))[1]
    textured = np.repeat(np.where(columns // 2 % 2 == 0, 70, 200)[..., None], 3, axis=2).astype(np.uint8)  # fine hair
    assert jnd(textured).mean() > 2 * jnd(smooth).mean()     # texture masks changes
    assert visible_share(smooth, _added(smooth, _checkerboard(size, 8)), support) > 0.9
    assert visible_share(smooth, _added(smooth, _checkerboard(size, 2)), support) == 0.0
    assert visible_share(textured, _added(textured, _checkerboard(size, 8)), support) < 0.1


def test_jnd_bound_is_the_per_pixel_percentile_over_faces():
    smooth = np.full((16, 16, 3), 170, np.uint8)
    columns = np.indices((16, 16))[1]
    textured = np.repeat(np.where(columns // 2 % 2 == 0, 70, 200)[..., None], 3, axis=2).astype(np.uint8)
    bound = jnd_bound(np.stack([smooth, textured]), 0)
    assert bound.shape == (16, 16)
    assert np.allclose(bound, np.minimum(jnd(smooth), jnd(textured)))
