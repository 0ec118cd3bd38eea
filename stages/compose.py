"""Paste an edited aligned face back into its photo through the inverse alignment and the
feathered landmark mask."""
from __future__ import annotations

import cv2
import numpy as np

from stages.faces import AlignedFace, apply_affine, face_mask


def match_colour(source: np.ndarray, reference: np.ndarray, region: np.ndarray,
                 max_gain: float = 1.5) -> np.ndarray:
    """``source`` (RGB uint8) shifted so that, inside ``region`` (bool), its mean and spread
    per CIELAB channel match ``reference``'s (Reinhard et al.'s colour transfer).

    A synthesized face carries the lighting and skin tone of the faces it was trained on;
    pasted as is, the mask's edge shows as a seam. The gain is bounded so a flat region
    (a masked face, a dark photo) cannot blow up the noise."""
    if region.sum() < 16:
        return source
    lab_source = cv2.cvtColor(source.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    lab_reference = cv2.cvtColor(reference.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    picked_source, picked_reference = lab_source[region], lab_reference[region]
    mean_source, mean_reference = picked_source.mean(axis=0), picked_reference.mean(axis=0)
    gain = np.clip(picked_reference.std(axis=0) / np.maximum(picked_source.std(axis=0), 1e-3),
                   1 / max_gain, max_gain)
    matched = (lab_source - mean_source) * gain + mean_reference
    rgb = cv2.cvtColor(matched.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def compose_face(photo: np.ndarray, aligned: AlignedFace, edited_crop: np.ndarray,
                 feather_fraction: float = 0.06, colour_match: bool = False) -> np.ndarray:
    """``photo`` with the masked region of ``edited_crop`` warped back into place, with
    ``colour_match`` first colour-matched to the face it replaces (:func:`match_colour`).

    Only the rectangle the crop maps onto is warped, so a face in a 40 MP photo costs what
    the face's own size costs.
    """
    size = edited_crop.shape[0]
    height, width = photo.shape[:2]
    corners = apply_affine(aligned.inverse, np.array([[0, 0], [size, 0], [0, size], [size, size]], float))
    left, top = np.floor(corners.min(axis=0)).astype(int)
    right, bottom = np.ceil(corners.max(axis=0)).astype(int)
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, width), min(bottom, height)
    if right <= left or bottom <= top:
        return photo.copy()
    # Crop -> region-of-interest transform: the inverse alignment shifted to the ROI origin.
    to_roi = aligned.inverse.copy()
    to_roi[:, 2] -= (left, top)
    roi_size = (right - left, bottom - top)
    warped = cv2.warpAffine(edited_crop, to_roi, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    roi_landmarks = apply_affine(to_roi, aligned.landmarks)
    alpha = face_mask(roi_landmarks, (roi_size[1], roi_size[0]), feather_fraction)[:, :, None]
    if colour_match:
        warped = match_colour(warped, photo[top:bottom, left:right], alpha[:, :, 0] > 0.98)
    result = photo.copy()
    region = result[top:bottom, left:right].astype(np.float32)
    blended = region * (1.0 - alpha) + warped.astype(np.float32) * alpha
    result[top:bottom, left:right] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return result


def compose_faces(photo: np.ndarray, aligned: list[AlignedFace], edited_crops: list[np.ndarray],
                  feather_fraction: float = 0.06, colour_match: list[bool] | None = None) -> np.ndarray:
    """``photo`` with every face replaced by its edited crop (see :func:`compose_face`);
    ``colour_match`` says per face whether to colour-match it (synthesized faces)."""
    output = photo
    matching = colour_match or [False] * len(aligned)
    for align, crop, match in zip(aligned, edited_crops, matching):
        output = compose_face(output, align, crop, feather_fraction, match)
    return output
