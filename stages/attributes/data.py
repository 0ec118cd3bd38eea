"""Training data for Stage I: CelebA through our own aligner, split by identity, and the
population statistics Stage II needs.

The classifier must see exactly the crops a release produces, so every CelebA image goes
through :func:`stages.common.faces.detect_faces` and :func:`stages.common.faces.align_face` like a photo
in a release. CelebA's 89x109 crops hold faces about 45 px wide, at the edge of what HOG
finds, so a miss is retried at a higher upsampling and then with the MMOD CNN detector;
faces still missed are recorded, never silently dropped.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.attributes.names import ATTRIBUTES
from stages.common.faces import ALIGNED_SIZE, align_face, detect_faces
from stages.common.imageio import ImageRejected, load_rgb
from stages.common.parallel import map_with_progress

SPLITS = ("train", "validation", "test")
# Detection attempts in order: what a release does first, then stronger settings for the
# small CelebA faces. Each entry: (detector, upsample).
DETECTION_ATTEMPTS = (("hog", 1), ("hog", 2), ("cnn", 2))


@dataclass(frozen=True)
class LabelledImage:
    image_id: str
    identity: int
    labels: np.ndarray   # 40 x {0, 1}


def read_labels(labels_csv: Path) -> list[LabelledImage]:
    """Rows of CelebA's ``labels.csv`` (``image_id, identity, partition, <40 attributes as -1/1>``)."""
    rows = []
    with open(labels_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in ATTRIBUTES if name not in (reader.fieldnames or [])]
        if missing or "identity" not in (reader.fieldnames or []):
            raise ValueError(f"{labels_csv} lacks columns {missing or ['identity']}; expected CelebA's "
                             f"image_id, identity and the 40 attribute columns")
        for record in reader:
            labels = np.array([record[name] == "1" for name in ATTRIBUTES], dtype=np.uint8)
            rows.append(LabelledImage(record["image_id"], int(record["identity"]), labels))
    return rows


def split_of_identity(identity: int, seed: int, fractions: tuple[float, float] = (0.75, 0.10)) -> str:
    """Train / validation / test for one identity, from a seeded hash: every image of a
    person lands in the same split, and the split of a person never depends on which
    other people are in the data."""
    digest = hashlib.sha256(f"{seed}:{identity}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def _align_one(path: str) -> tuple[np.ndarray | None, str]:
    """Aligned crop of the most central face in a CelebA image and how it was found."""
    try:
        rgb = load_rgb(path).rgb
    except ImageRejected as error:
        return None, f"rejected: {error}"
    centre = np.array([rgb.shape[1] / 2, rgb.shape[0] / 2])
    for detector, upsample in DETECTION_ATTEMPTS:
        faces = detect_faces(rgb, detector=detector, upsample=upsample)
        if faces:
            face = min(faces, key=lambda f: np.linalg.norm(f.landmarks.mean(axis=0) - centre))
            return align_face(rgb, face.landmarks, ALIGNED_SIZE).crop, f"{detector}@{upsample}"
    return None, "missed"


def align_images(paths: list[Path], workers: int = 2, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Aligned crops (N x 128 x 128 x 3 uint8; zeros where no face was found) and, per
    image, how its face was found (``hog@1``, ``hog@2``, ``cnn@2``, ``missed`` or ``rejected: ...``)."""
    crops = np.zeros((len(paths), ALIGNED_SIZE, ALIGNED_SIZE, 3), dtype=np.uint8)
    found_by: list[str] = []
    results = map_with_progress(_align_one, [str(p) for p in paths], workers, "align CelebA", "image", progress)
    for index, (crop, how) in enumerate(results):
        if crop is not None:
            crops[index] = crop
        found_by.append(how)
    return crops, found_by


def population_statistics(annotations_zip: Path) -> dict:
    """Attribute prevalences and pairwise joint frequencies over all of CelebA (202,599
    images in ``list_attr_celeba.txt``), for Stage II's priors and the release drift check."""
    with zipfile.ZipFile(annotations_zip) as archive:
        name = next((n for n in archive.namelist() if n.endswith("list_attr_celeba.txt")), None)
        if name is None:
            raise ValueError(f"{annotations_zip} has no list_attr_celeba.txt")
        text = io.TextIOWrapper(archive.open(name), encoding="ascii")
        count = int(text.readline())
        header = text.readline().split()
        if tuple(header) != ATTRIBUTES:
            raise ValueError(f"{name}: attribute header differs from CelebA's 40 attributes")
        values = np.loadtxt(text, dtype=np.int8, usecols=range(1, 41))
    if len(values) != count:
        raise ValueError(f"{name}: header says {count} images, found {len(values)}")
    positive = (values == 1).astype(np.float64)
    # Combinations as 40-bit integers: Stage II draws target combinations from the ones
    # that occur, weighted by how often.
    codes = positive.astype(np.uint64) @ (np.uint64(1) << np.arange(40, dtype=np.uint64))
    unique, counts = np.unique(codes, return_counts=True)
    return {
        "source": f"CelebA {name} ({count} images)",
        "images": count,
        "attributes": list(ATTRIBUTES),
        "prevalence": np.round(positive.mean(axis=0), 6).tolist(),
        "joint_positive": np.round(positive.T @ positive / count, 6).tolist(),
        "combinations": {"bit_order": "bit i = attributes[i]", "codes": [int(c) for c in unique],
                         "counts": [int(c) for c in counts]},
    }


def aligned_dataset_key(image_ids: list[str], template_sha256: str) -> str:
    """Cache key of an aligned dataset: changes when the images, the template or the
    detection settings change, so a stale cache is never reused."""
    material = "|".join([template_sha256, repr(DETECTION_ATTEMPTS), str(ALIGNED_SIZE), *image_ids])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def build_aligned_dataset(images_dir: Path, rows: list[LabelledImage], cache_dir: Path, template_sha256: str,
                          workers: int = 2, progress: bool = True) -> Path:
    """Align every labelled image once and cache the crops as ``aligned_<key>.npz``
    (``crops``, ``image_ids``, ``found_by``); a later run with the same key reuses it."""
    image_ids = [row.image_id for row in rows]
    target = cache_dir / f"aligned_{aligned_dataset_key(image_ids, template_sha256)}.npz"
    if target.exists():
        return target
    missing = [i for i in image_ids if not (images_dir / i).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} labelled images are missing under {images_dir} "
                                f"(first: {missing[0]}); point --images at CelebA's image folder")
    crops, found_by = align_images([images_dir / i for i in image_ids], workers=workers, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Atomic: an interrupted run leaves no half-written cache, and two processes building the
    # same one (the test suite runs in two) each write their own file before the rename.
    partial = target.with_name(f"{target.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, crops=crops, image_ids=np.array(image_ids), found_by=np.array(found_by))
    partial.replace(target)
    return target
