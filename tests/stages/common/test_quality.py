"""PSNR, SSIM (Gaussian sigma 1.5) and MS-SSIM against references."""
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from stages.common.quality import luma, ms_ssim, psnr, ssim


def test_ssim_matches_scikit_image_gaussian_ssim(astronaut):
    rng = np.random.default_rng(1)
    noisy = np.clip(astronaut + rng.normal(0, 20, astronaut.shape), 0, 255).astype(np.uint8)
    reference = structural_similarity(luma(astronaut), luma(noisy), gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=255)
    assert abs(ssim(astronaut, noisy) - reference) < 2e-3


def test_psnr_matches_scikit_image(astronaut):
    shifted = np.clip(astronaut.astype(int) + 5, 0, 255).astype(np.uint8)
    assert abs(psnr(astronaut, shifted) - peak_signal_noise_ratio(astronaut, shifted, data_range=255)) < 1e-9
    assert psnr(astronaut, astronaut) == float("inf")


def test_ms_ssim_is_one_for_identical_and_falls_with_noise(astronaut):
    assert abs(ms_ssim(astronaut, astronaut) - 1.0) < 1e-9
    rng = np.random.default_rng(2)
    values = []
    for sigma in (5, 20, 60):
        noisy = np.clip(astronaut + rng.normal(0, sigma, astronaut.shape), 0, 255).astype(np.uint8)
        values.append(ms_ssim(astronaut, noisy))
    assert values[0] > values[1] > values[2] > 0
