"""Paste an edited aligned face back into its photo through the inverse alignment and the
feathered landmark mask."""
from __future__ import annotations

import cv2
import numpy as np

from stages.faces import AlignedFace, apply_affine, face_mask


def compose_face(photo: np.ndarray, aligned: AlignedFace, edited_crop: np.ndarray,
                 feather_fraction: float = 0.06) -> np.ndarray:
    """``photo`` with the masked region of ``edited_crop`` warped back into place.

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
    result = photo.copy()
    region = result[top:bottom, left:right].astype(np.float32)
    blended = region * (1.0 - alpha) + warped.astype(np.float32) * alpha
    result[top:bottom, left:right] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return result


def compose_faces(photo: np.ndarray, aligned: list[AlignedFace], edited_crops: list[np.ndarray],
                  feather_fraction: float = 0.06) -> np.ndarray:
    """``photo`` with every face replaced by its edited crop (see :func:`compose_face`)."""
    output = photo
    for align, crop in zip(aligned, edited_crops):
        output = compose_face(output, align, crop, feather_fraction)
    return output
