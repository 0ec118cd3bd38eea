"""Baseline obfuscation methods applied to an aligned face crop.

These are the comparison rows of the evaluation (blur, pixelation, masking as in the
AnonymousNet table) and the fallbacks a policy escalates to when a face still leaks its
identity. Each method maps an aligned RGB crop to an obfuscated crop of the same size; its
strength is relative to the crop so it means the same at every face size.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

ObfuscationMethod = Callable[[np.ndarray, dict], np.ndarray]


def blur(crop: np.ndarray, params: dict) -> np.ndarray:
    """Gaussian blur with sigma = ``sigma_fraction`` x crop width."""
    sigma = float(params.get("sigma_fraction", 0.08)) * crop.shape[1]
    return cv2.GaussianBlur(crop, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def pixelate(crop: np.ndarray, params: dict) -> np.ndarray:
    """Average over ``blocks`` x ``blocks`` cells, shown as flat squares."""
    blocks = int(params.get("blocks", 8))
    height, width = crop.shape[:2]
    small = cv2.resize(crop, (blocks, blocks), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def mask(crop: np.ndarray, params: dict) -> np.ndarray:
    """Flat fill with ``color`` (RGB)."""
    color = np.asarray(params.get("color", (128, 128, 128)), dtype=np.uint8)
    return np.broadcast_to(color, crop.shape).copy()


# The methods that publish a face Stage III synthesized: ``gan``, and ``gan_surround``, the
# same face with the rest of its enlarged box (hair, ears, outline) covered by the box method,
# for a face whose surroundings still let a verifier recognise the person (seen on 300 LFW
# photos: 14 of 20 faces that left the generator did so for SFace, and 15 of the 20 still
# verified through blur, pixelation and a flat fill of the landmark mask, passing only once
# their enlarged box was covered). They are not crop methods (``METHODS``): the release
# composes them (stages.common.anonymize).
SYNTHESIZING_METHODS = ("gan", "gan_surround")

MIN_CELL_PX = 6      # smallest pixelation cell over a face box, in photo pixels

METHODS: dict[str, ObfuscationMethod] = {"blur": blur, "pixelate": pixelate, "mask": mask}


def obfuscate(crop: np.ndarray, method: str, params: dict | None = None) -> np.ndarray:
    if method not in METHODS:
        raise ValueError(f"unknown obfuscation method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](crop, params or {})


def enlarged_box(box: tuple, margin: float, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``box`` (left, top, right, bottom) grown by ``margin`` of its width and height on every
    side, in whole pixels, clipped to a photo of ``shape``."""
    left, top, right, bottom = box
    grow_x, grow_y = margin * (right - left), margin * (bottom - top)
    height, width = shape[:2]
    return (max(0, int(np.floor(left - grow_x))), max(0, int(np.floor(top - grow_y))),
            min(width, int(np.ceil(right + grow_x))), min(height, int(np.ceil(bottom + grow_y))))


def obfuscate_boxes(photo: np.ndarray, boxes: list[tuple], method: str, params: dict | None = None,
                    margin: float = 0.25) -> np.ndarray:
    """``photo`` with each box (enlarged by ``margin``) obfuscated in place of the face: for
    faces too small, turned or covered to align, so the whole region is covered, whatever
    the landmarks say. Block counts and blur strength are relative to the region, so they
    mean what they mean on an aligned crop."""
    if not boxes:
        return photo
    output = photo.copy()
    for box in boxes:
        left, top, right, bottom = enlarged_box(box, margin, photo.shape)
        if right <= left or bottom <= top:
            continue
        output[top:bottom, left:right] = obfuscate_region(output[top:bottom, left:right], method, params)
    return output


def obfuscate_region(region: np.ndarray, method: str, params: dict | None = None) -> np.ndarray:
    """A photo region (a face's enlarged box) obfuscated with ``method`` as a whole."""
    region_params = dict(params or {})
    if method == "pixelate":
        # Cells of at least MIN_CELL_PX: 8 cells over a 15-pixel face would leave it as it was.
        region_params["blocks"] = max(2, min(int(region_params.get("blocks", 8)), min(region.shape[:2]) // MIN_CELL_PX))
    return obfuscate(np.ascontiguousarray(region), method, region_params)


def box_protection_reason(width: float, landmark_error: float | None, min_synthesis_px: int,
                          max_landmark_error: float) -> str | None:
    """Why a face is protected over its box instead of being aligned and synthesized (None:
    it can be): too small for the generator, or landmarks that disagree with the detector's
    own points (a turned or covered face, whose aligned crop would miss part of it)."""
    if width < min_synthesis_px:
        return f"small: {width:.0f} px wide, below detection.min_synthesis_px {min_synthesis_px}"
    if landmark_error is not None and landmark_error > max_landmark_error:
        return (f"landmarks unreliable: {landmark_error:.2f} of the face width from the detector's points, "
                f"above detection.max_landmark_error {max_landmark_error:.2f}")
    return None
