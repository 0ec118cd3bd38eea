"""How visible Stage IV's pattern is, next to how often it fools the profiler, over a few
shapes and strengths of the pattern (``anonymousnet benchmark perturbation-visibility``).

Faces: the identity-disjoint CelebA test split (people Stage I never trained on), aligned
by the release's aligner and rendered by Stage III as a default release renders them (the
faces Stage IV is applied to). Each setting adds the shipped pattern, reshaped, to every
face in aligned-crop geometry (the release warps the same pattern into the photo).

Visibility measure: the share of face pixels where the luminance change exceeds the
just-noticeable difference (JND) of Chou & Li (1995) at that pixel of the clean face. The
JND model holds the two effects that decide whether a change is seen: luminance adaptation
(a change is easier to see on mid-grey than on dark skin) and texture masking (it hides in
hair, brows and edges and shows on smooth cheeks and foreheads). That is what was seen at
2x zoom: the cross-hatch shows on smooth faces and not on textured ones. A share near 0
means no pixel's change is above the threshold of visibility. PSNR is reported beside it;
it counts energy, not visibility.

Fooling rate: the share of faces whose white-box profiler verdict (Stage I's CNN head on
the pattern's attributes, as the release measures ``profiler_fooled``) changes, and the
same for Stage I's forests as a release runs them (transfer).
"""
from __future__ import annotations

import platform
from pathlib import Path

import cv2
import numpy as np

from stages.perturbation.visibility import visible_share

SHAPES = {"as trained": 0.0, "smoothed (sigma 1 px)": 1.0, "smoothed (sigma 2 px)": 2.0}
STRENGTHS = (8.0, 4.0, 2.0)   # xi, grey levels


def reshaped(pattern: np.ndarray, sigma: float, xi: float) -> np.ndarray:
    """The pattern smoothed by a Gaussian of ``sigma`` px (0: as trained), scaled so its
    largest change is ``xi`` grey levels (the policy's l-inf bound)."""
    shaped = cv2.GaussianBlur(pattern, (0, 0), sigma) if sigma > 0 else pattern
    return (shaped * (xi / max(float(np.abs(shaped).max()), 1e-9))).astype(np.float32)


def measure_settings(faces: np.ndarray, pattern: np.ndarray, attributes: tuple[str, ...], support: np.ndarray,
                     shapes: dict[str, float] = SHAPES, strengths: tuple[float, ...] = STRENGTHS) -> list[dict]:
    """One row per (shape, strength): visibility and fooling rates over ``faces`` (rendered crops)."""
    from stages.attributes.names import ATTRIBUTES
    from stages.attributes.predict import default_model
    from stages.common.quality import psnr
    from stages.perturbation.apply import profiler_verdicts

    columns = [ATTRIBUTES.index(name) for name in attributes]
    forests = default_model()   # Stage I as a release runs it: CNN features -> forests
    clean_verdicts = profiler_verdicts(faces, attributes)
    clean_forests = forests.predict(faces)[:, columns] >= 0.5
    rows = []
    for shape, sigma in shapes.items():
        for xi in strengths:
            layer = reshaped(pattern, sigma, xi)
            perturbed = np.clip(np.rint(faces.astype(np.float32) + layer), 0, 255).astype(np.uint8)
            fooled = (profiler_verdicts(perturbed, attributes) != clean_verdicts).any(axis=1)
            flips = (forests.predict(perturbed)[:, columns] >= 0.5) != clean_forests
            shares = [visible_share(c, p, support) for c, p in zip(faces, perturbed)]
            rows.append({"shape": shape, "sigma_px": sigma, "xi": xi,
                         "visible_share_median": float(np.median(shares)),
                         "visible_share_p90": float(np.percentile(shares, 90)),
                         "white_box_fooling_rate": float(fooled.mean()),
                         "stage_one_forests_fooling_rate": float(flips.any(axis=1).mean()),
                         "psnr_db_median": float(np.median([psnr(c, p) for c, p in zip(faces, perturbed)]))})
    return rows


def perturbation_visibility(celeba: Path, limit: int | None = 3000, workers: int = 2,
                            progress: bool = False) -> dict:
    """The table over ``SHAPES`` x ``STRENGTHS`` on the CelebA test split's rendered faces."""
    import os

    from flows.training.attributes import align_task, split_rows
    from flows.training.perturbation import render_as_released
    from models.perturbation import load_perturbation
    from stages.synthesis.render import template_mask

    images, labels = celeba / "img_align_celeba_89x109", celeba / "labels.csv"
    aligned_file = align_task(str(images), str(labels), ".data/train-attributes/aligned-cache", limit, workers,
                              progress)
    test = split_rows(str(labels), aligned_file, 0, limit)["splits"]["test"]
    with np.load(aligned_file) as stored:
        faces = render_as_released(stored["crops"][test])
    shipped = load_perturbation()
    pattern = (shipped.pattern * 255.0).astype(np.float32)
    support = template_mask(faces.shape[1])[0, 0].numpy()
    rows = measure_settings(faces, pattern, tuple(shipped.attributes), support)
    return {"faces": int(len(faces)), "attributes": list(shipped.attributes), "trained_xi": shipped.xi * 255.0,
            "visibility": "share of face pixels whose luminance change exceeds Chou & Li's JND",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "settings": rows}


def visibility_table(results: dict) -> str:
    lines = [f"{results['faces']} CelebA test faces rendered by Stage III; profiler attributes "
             f"{', '.join(results['attributes'])}; the pattern computed at xi {results['trained_xi']:.0f}", "",
             "| shape | xi | visible share (median) | visible share (p90) | fooling, white-box | fooling, Stage I "
             "forests | PSNR (median) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["settings"]:
        lines.append(f"| {row['shape']} | {row['xi']:g} | {100 * row['visible_share_median']:.1f}% | "
                     f"{100 * row['visible_share_p90']:.1f}% | {100 * row['white_box_fooling_rate']:.1f}% | "
                     f"{100 * row['stage_one_forests_fooling_rate']:.1f}% | {row['psnr_db_median']:.1f} dB |")
    return "\n".join(lines)
