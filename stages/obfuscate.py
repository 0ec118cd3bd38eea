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


METHODS: dict[str, ObfuscationMethod] = {"blur": blur, "pixelate": pixelate, "mask": mask}


def obfuscate(crop: np.ndarray, method: str, params: dict | None = None) -> np.ndarray:
    if method not in METHODS:
        raise ValueError(f"unknown obfuscation method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](crop, params or {})
