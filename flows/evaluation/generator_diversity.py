"""Do Stage III's faces differ from one another as people do? (``anonymousnet
evaluate-generator-diversity``)

The issue's diversity measure is the share of pairs of published faces that dlib's verifier
calls the same person (distance < 0.6). A release of LFW photos takes minutes per hundred;
this asks the same question of aligned crops in seconds, so generators and training
checkpoints can be compared, and it sets the painted faces beside references that say where
the collapse comes from:

- the real faces (what a release should match);
- the real faces with their interior blurred by 1-3 px (how much detail identity needs);
- the blurred context the generator starts from, nothing painted (the floor);
- another real face's interior pasted in (what a perfect painter would reach);
- each generator as a release draws it: Stage I -> Stage II targets -> the first draw with
  the identity code seeded per face; for generators with codes also the mean identity
  (no code), which says how much the codes add.

Each row also has SFace's share (``stages/common/sface.py``), a verifier independent of dlib's:
Stage III's spread term trains against dlib, so dlib alone would be judging its own lesson.

Faces: one each of the first ``people`` people of the identity-disjoint CelebA test split
(never trained on, never used to pick a checkpoint), aligned by the release's aligner.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

BLURS_PX = (1.0, 1.5, 2.0, 3.0)


def _row(name: str, crops: np.ndarray) -> dict:
    from stages.common.faces import (
        face_descriptor,
        pair_distances,
        same_person_share,
        template,
    )
    from stages.common.sface import sface_descriptor, sface_same_person_share

    landmarks = template(crops.shape[1])
    descriptors = [face_descriptor(crop, landmarks) for crop in crops]
    return {"faces": name, "verifier_same_share": same_person_share(descriptors),
            "median_pair_distance": float(np.median(pair_distances(descriptors))),
            "sface_same_share": sface_same_person_share([sface_descriptor(crop, landmarks) for crop in crops])}


def _references(crops: np.ndarray) -> dict[str, np.ndarray]:
    from models.generator import from_gan_output, to_gan_input
    from stages.synthesis.render import face_context, gaussian_blur, template_mask

    images = to_gan_input(crops, size=None)
    mask = template_mask(images.shape[-1])
    faces = {"real": crops}
    for sigma in BLURS_PX:
        blurred = images * (1 - mask) + gaussian_blur(images, sigma) * mask
        faces[f"real, interior blurred {sigma:g} px"] = from_gan_output(blurred)
    faces["nothing painted (the generator's blurred input)"] = from_gan_output(face_context(images))
    faces["another real face's interior pasted in"] = from_gan_output(images * (1 - mask) + images.roll(1, 0) * mask)
    return faces


def _generated(crops: np.ndarray, folder: str | None) -> dict[str, np.ndarray]:
    from flows.training.perturbation import default_release_targets
    from stages.synthesis.render import load_synthesizer

    synthesizer = load_synthesizer(folder, device="cpu")
    targets = default_release_targets(crops)
    name = folder or "shipped generator"
    drawn = synthesizer.renders(crops, targets, seeds=list(range(len(crops))))
    faces = {f"{name}, as released (first draw)": np.stack([renders[0] for renders in drawn])}
    if synthesizer.code_size:
        faces[f"{name}, mean identity (no code)"] = synthesizer.render(crops, targets)
    return faces


def generator_diversity(celeba: Path, generators: list[str | None], people: int = 150, limit: int | None = 3000,
                        workers: int = 2, progress: bool = False) -> dict:
    """The verifier-same share and median pair distance of each row (module docstring)."""
    from flows.training.attributes import align_task, split_rows

    images, labels = celeba / "img_align_celeba_89x109", celeba / "labels.csv"
    aligned = align_task(str(images), str(labels), ".data/train-attributes/aligned-cache", limit, workers, progress)
    data = split_rows(str(labels), aligned, 0, limit)
    test = data["splits"]["test"]
    firsts = np.sort(test[np.unique(data["identities"][test], return_index=True)[1]])[:people]
    with np.load(aligned) as stored:
        crops = stored["crops"][firsts]
    return {"people": int(len(crops)), "split": "CelebA test (identity-disjoint), one face per person",
            "verifier": "dlib face-recognition ResNet v1 (PyTorch port), same person below 0.6",
            "second_verifier": "SFace (OpenCV Zoo, int8), same person at cosine 0.363 or above",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "rows": diversity_rows(crops, generators)}


def diversity_rows(crops: np.ndarray, generators: list[str | None]) -> list[dict]:
    """One row per reference and generator (module docstring) on aligned crops of different
    people (N×S×S×3 uint8)."""
    faces = _references(crops)
    for folder in generators:
        faces |= _generated(crops, folder)
    return [_row(name, rendered) for name, rendered in faces.items()]


def diversity_table(results: dict) -> str:
    lines = [f"{results['people']} people, {results['split']}; {results['verifier']}; second opinion: "
             f"{results['second_verifier']}", "",
             "| faces | verifier-same share | median pair distance | SFace-same share |", "|---|---:|---:|---:|"]
    for row in results["rows"]:
        lines.append(f"| {row['faces']} | {100 * row['verifier_same_share']:.1f}% | "
                     f"{row['median_pair_distance']:.3f} | {100 * row['sface_same_share']:.1f}% |")
    return "\n".join(lines)
