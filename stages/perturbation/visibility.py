"""Whether a change to a face can be seen: Chou & Li's (1995) just-noticeable difference.

The JND model holds the two effects that decide whether a change is seen: luminance
adaptation (a change is easier to see on mid-grey than on dark skin) and texture masking
(it hides in hair, brows and edges and shows on smooth cheeks and foreheads). Stage IV's
training bounds its pattern by it and the visibility benchmark measures with it.
"""
from __future__ import annotations

import cv2
import numpy as np

# Chou & Li's four 5x5 directional gradient operators and the background-luminance kernel.
_GRADIENTS = [np.array(k, np.float32) for k in (
    [[0, 0, 0, 0, 0], [1, 3, 8, 3, 1], [0, 0, 0, 0, 0], [-1, -3, -8, -3, -1], [0, 0, 0, 0, 0]],
    [[0, 0, 1, 0, 0], [0, 8, 3, 0, 0], [1, 3, 0, -3, -1], [0, 0, -3, -8, 0], [0, 0, -1, 0, 0]],
    [[0, 0, 1, 0, 0], [0, 0, 3, 8, 0], [-1, -3, 0, 3, 1], [0, -8, -3, 0, 0], [0, 0, -1, 0, 0]],
    [[0, 1, 0, -1, 0], [0, 3, 0, -3, 0], [0, 8, 0, -8, 0], [0, 3, 0, -3, 0], [0, 1, 0, -1, 0]])]
_BACKGROUND = np.array([[1, 1, 1, 1, 1], [1, 2, 2, 2, 1], [1, 2, 0, 2, 1], [1, 2, 2, 2, 1], [1, 1, 1, 1, 1]],
                       np.float32) / 32

def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def jnd(rgb: np.ndarray) -> np.ndarray:
    """Chou & Li's per-pixel just-noticeable difference of luminance, in grey levels."""
    y = luminance(rgb)
    background = cv2.filter2D(y, -1, _BACKGROUND, borderType=cv2.BORDER_REFLECT)
    gradient = np.max([np.abs(cv2.filter2D(y, -1, k, borderType=cv2.BORDER_REFLECT)) / 16 for k in _GRADIENTS],
                      axis=0)
    texture = gradient * (0.0001 * background + 0.115) + (0.5 - 0.01 * background)
    adaptation = np.where(background <= 127, 17 * (1 - np.sqrt(background / 127)) + 3,
                          3 / 128 * (background - 127) + 3)
    return np.maximum(texture, adaptation)


def visible_share(clean: np.ndarray, perturbed: np.ndarray, support: np.ndarray) -> float:
    """Share of the face's pixels (``support`` > 0.5) whose luminance change is above the JND."""
    change = np.abs(luminance(perturbed) - luminance(clean))
    inside = support > 0.5
    return float((change > jnd(clean))[inside].mean())


def jnd_bound(faces: np.ndarray, percentile: float) -> np.ndarray:
    """Per pixel of the aligned crop, the ``percentile``-th JND over ``faces`` (grey levels):
    a change this small stays below the threshold of visibility on all but that share of
    faces at that place (texture in the brows, eyes and hair line hides more than a cheek)."""
    return np.percentile(np.stack([jnd(face) for face in faces]), percentile, axis=0).astype(np.float32)
