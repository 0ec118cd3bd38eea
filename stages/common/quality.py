"""Image-quality metrics of EVALUATION.md: PSNR, SSIM and MS-SSIM.

SSIM follows Wang et al. (2004): an 11-tap Gaussian window with sigma 1.5, constants
K1 = 0.01, K2 = 0.03, population statistics. MS-SSIM follows Wang, Simoncelli & Bovik
(2003): five scales with weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), contrast-structure
at every scale and luminance at the coarsest, 2x2 averaging between scales. Both are
computed on luma (ITU-R BT.601) of 8-bit RGB images, as is usual for these tables.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

MS_SSIM_WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
_SIGMA = 1.5
_TRUNCATE = 3.5  # 3.5 sigma on each side: the 11-tap window of Wang et al.


def luma(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.ndim == 2:
        return rgb
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)


def _ssim_terms(x: np.ndarray, y: np.ndarray, data_range: float) -> tuple[float, float]:
    """(mean SSIM, mean contrast-structure) over the valid window positions."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(image):
        return gaussian_filter(image, _SIGMA, truncate=_TRUNCATE, mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = ((2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)) * cs_map
    # Drop the border where the window leaves the image (as skimage and the reference code do).
    pad = int(_TRUNCATE * _SIGMA + 0.5)
    inner = (slice(pad, -pad), slice(pad, -pad)) if min(x.shape) > 2 * pad else (slice(None), slice(None))
    return float(ssim_map[inner].mean()), float(cs_map[inner].mean())


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    return _ssim_terms(luma(a), luma(b), data_range)[0]


def ms_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    x, y = luma(a), luma(b)
    contrast_structure = []
    for scale in range(len(MS_SSIM_WEIGHTS)):
        full, cs = _ssim_terms(x, y, data_range)
        if scale == len(MS_SSIM_WEIGHTS) - 1:
            contrast_structure.append(full)  # luminance enters only at the coarsest scale
            break
        contrast_structure.append(cs)
        height, width = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
        if height < 2 or width < 2:
            raise ValueError(f"image too small for {len(MS_SSIM_WEIGHTS)}-scale MS-SSIM: {a.shape}")
        x = x[:height, :width].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
        y = y[:height, :width].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
    values = np.maximum(np.array(contrast_structure), 0.0)  # negative cs at coarse scales has no meaning
    return float(np.prod(values ** MS_SSIM_WEIGHTS))
