"""Training commands that produce the project's shipped model files.

``fit_alignment_template`` refits ``models/face_template_68.json`` (the 68-point mean face
the aligner maps every face onto) from aligned CelebA crops, and records its sha256 in the
manifest so loading keeps verifying it.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from models.registry import model_path, record_repo_model, sha256_of_file
from stages.common.faces import detect_faces, fit_template
from stages.common.imageio import ImageRejected, load_rgb

# CelebA's aligned crops are 89x109 here: faces about 45 px wide, below what HOG finds
# reliably, so they are upscaled before detection and the landmarks scaled back.
UPSCALE = 2


def fit_alignment_template(images: Path, limit: int = 3000, progress: bool = True,
                           target: Path | None = None) -> dict:
    """Fit the template on up to ``limit`` crops and write it to ``target`` (default: the
    shipped file, whose manifest sha256 is then updated)."""
    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    shapes, skipped = [], 0
    for path in tqdm(paths, desc="landmarks", unit="photo", disable=not progress):
        try:
            rgb = load_rgb(path).rgb
        except ImageRejected:
            skipped += 1
            continue
        big = cv2.resize(rgb, None, fx=UPSCALE, fy=UPSCALE, interpolation=cv2.INTER_LINEAR)
        faces = detect_faces(big, upsample=1)
        if len(faces) != 1:   # none or ambiguous: not a clean sample of the mean shape
            skipped += 1
            continue
        shapes.append(faces[0].landmarks / UPSCALE)
    if len(shapes) < 50:
        raise ValueError(f"only {len(shapes)} usable faces under {images}; need at least 50")
    unit = fit_template(shapes)
    shipped = target is None
    target = model_path("face_template_68") if shipped else Path(target)
    target.write_text(json.dumps({
        "description": f"68-point mean face shape (generalised Procrustes over dlib landmarks of {len(shapes)} "
                       f"CelebA aligned crops), unit crop coordinates",
        "points": np.round(unit, 5).tolist()}))
    if shipped:
        digest = record_repo_model("face_template_68", target,
                                   "alignment template; refit with `anonymousnet train template`")
    else:
        digest = sha256_of_file(target)
    return {"faces_used": len(shapes), "skipped": skipped, "file": str(target), "sha256": digest}
