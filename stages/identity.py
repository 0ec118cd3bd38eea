"""Identity-leak check: does any face in an output photo still verify as an original?

Follows EVALUATION.md's verifier: dlib's HOG detector + 68 landmarks find faces in the
output, and so does CenterFace (a second opinion made for crowds, with dlib's landmarks
fitted in its boxes); dlib's ResNet descriptor describes them, and a Euclidean distance below the
threshold (dlib's documented 0.6) means "same person". Every face found in the output is
compared with every original face of the photo, so a face that moved or was re-detected
or re-detected with a shifted box is still caught. Each output face is compared with the
original face(s) its box overlaps: comparing across people would flag look-alikes in group
photos (two different people can be 0.6 apart). A face found in the output that overlaps
no original face was never processed (ingest missed it); it is reported separately so
the caller can process it or hold the photo back.

The check runs once per round of a photo's processing. From the second round on, only what
changed since the previous round's published bytes is searched again (``changed_regions``,
with a margin as wide as half the change), and what the detectors found elsewhere is taken
from that round: pixels that did not change give the same faces and the same descriptors.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from stages.faces import (
    SAME_FACE_OVERLAP,
    DetectedFace,
    box_overlap,
    chip_descriptor,
    detect_faces,
    face_chip,
)

# The detectors whose findings in a published photo the release's check judges: CenterFace
# (made for crowds: it sees small, turned and covered faces that dlib misses, so a face that
# ingest missed is found here) and dlib's HOG (the verifier's own detector, as EVALUATION.md).
CHECK_DETECTORS = ("centerface", "hog")


@dataclass
class LeakReport:
    # Per original face: smallest descriptor distance to any face found in the output
    # (inf when no output face was found at all, or the face is not verified: box-protected).
    distances: list[float]
    # Output faces that overlap no original face: never processed by the pipeline.
    unprocessed_faces: list[DetectedFace] = field(default_factory=list)
    output_faces_found: int = 0
    detectors: tuple[str, ...] = CHECK_DETECTORS
    # Every face the detectors found in the output (HOG's first): the next round's check
    # takes from here the faces outside what it changed.
    found: list[DetectedFace] = field(default_factory=list, repr=False)

    def leaking(self, release_distance: float) -> list[int]:
        """Faces closer to their original than ``release_distance``."""
        return [i for i, d in enumerate(self.distances) if d < release_distance]


def same_face_as(face: DetectedFace, original_faces: list[DetectedFace]) -> list[int]:
    """Indices of the original faces whose box ``face``'s box overlaps: the same face."""
    return [i for i, original in enumerate(original_faces) if box_overlap(face.box, original.box) > SAME_FACE_OVERLAP]


def _described(rgb: np.ndarray, face: DetectedFace, cache: dict | None) -> np.ndarray:
    """dlib's descriptor of ``face`` in ``rgb``; from ``cache`` when the same face chip (the
    only pixels the descriptor reads) was described before."""
    chip = face_chip(rgb, face.landmarks)
    if cache is None:
        return chip_descriptor(chip)
    key = hashlib.blake2b(chip.tobytes(), digest_size=16).digest()
    if key not in cache:
        cache[key] = chip_descriptor(chip)
    return cache[key]


# A region searched again reaches this far beyond the pixels that changed: half the
# change's own size (a face that overlaps the change has its centre within it), at least
# the margin below (the detectors' windows reach beyond a face).
REGION_MARGIN_FRACTION = 0.5
REGION_MIN_MARGIN = 64
# Past this share of the photo, searching regions costs as much as searching it all.
REGION_MAX_SHARE = 0.5


def changed_regions(before: np.ndarray, after: np.ndarray) -> list[tuple[int, int, int, int]] | None:
    """Boxes (left, top, right, bottom) to search again in ``after``: around every pixel that
    differs from ``before``, with a margin, overlapping boxes merged. None when they would
    cover most of the photo (or the sizes differ): search all of it."""
    if before.shape != after.shape:
        return None
    changed = np.any(before != after, axis=2).astype(np.uint8)
    if not changed.any():
        return []
    count, _, stats, _ = cv2.connectedComponentsWithStats(cv2.dilate(changed, np.ones((9, 9), np.uint8)))
    height, width = changed.shape
    boxes = []
    for left, top, box_width, box_height, _ in stats[1:count]:
        margin = max(REGION_MIN_MARGIN, REGION_MARGIN_FRACTION * max(box_width, box_height))
        boxes.append([max(0, int(left - margin)), max(0, int(top - margin)),
                      min(width, int(left + box_width + margin)), min(height, int(top + box_height + margin))])
    merged = True
    while merged:   # boxes that overlap become one box around both
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    boxes[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    if sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) > REGION_MAX_SHARE * width * height:
        return None
    return [tuple(b) for b in boxes]


def _shifted(face: DetectedFace, dx: int, dy: int) -> DetectedFace:
    left, top, right, bottom = face.box
    return replace(face, box=(left + dx, top + dy, right + dx, bottom + dy), landmarks=face.landmarks + (dx, dy))


def _centre_inside(face: DetectedFace, regions: list[tuple[int, int, int, int]]) -> bool:
    x, y = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    return any(left <= x < right and top <= y < bottom for left, top, right, bottom in regions)


def _search(output_rgb: np.ndarray, detector: str, region: tuple[int, int, int, int] | None, upsample: int,
            max_side: int, threshold: float, tile_side: int) -> list[DetectedFace]:
    """``detector``'s faces in the whole photo, or around ``region`` of it at the scale the
    whole photo is searched at (HOG sees photos larger than ``max_side`` scaled down)."""
    if region is None:
        crop, (dx, dy) = output_rgb, (0, 0)
    else:
        # Searched with a border around it, so that what the detectors make of a face cut by
        # the crop's edge lies in the border, where the caller ignores it.
        height, width = output_rgb.shape[:2]
        left, top = max(0, region[0] - REGION_MIN_MARGIN), max(0, region[1] - REGION_MIN_MARGIN)
        right, bottom = min(width, region[2] + REGION_MIN_MARGIN), min(height, region[3] + REGION_MIN_MARGIN)
        crop, (dx, dy) = output_rgb[top:bottom, left:right], (left, top)
    if detector == "hog":
        factor = min(1.0, max_side / max(output_rgb.shape[:2]))
        side = max_side if factor == 1.0 else max(1, round(factor * max(crop.shape[:2])))
        faces = detect_faces(crop, detector="hog", upsample=upsample, max_side=side)
    else:
        faces = detect_faces(crop, detector="centerface", threshold=threshold, tile_side=tile_side)
    return faces if region is None else [_shifted(face, dx, dy) for face in faces]


def check_identity_leaks(output_rgb: np.ndarray, original_faces: list[DetectedFace],
                         original_descriptors: list[np.ndarray | None], upsample: int = 1, max_side: int = 1600,
                         threshold: float = 0.5, tile_side: int = 1024,
                         detectors: tuple[str, ...] = CHECK_DETECTORS,
                         descriptor_cache: dict | None = None,
                         previous: LeakReport | None = None,
                         regions: list[tuple[int, int, int, int]] | None = None) -> LeakReport:
    """Find faces in ``output_rgb`` with every detector in ``detectors`` and measure each one
    that overlaps an original face against that original's descriptor (None: the original
    is not verified, e.g. protected over its box). A face no original overlaps is returned
    as unprocessed: a face ingest missed, which the caller must protect or hold back. Both
    detectors search the whole photo: what either calls a face is protected (HOG's false
    alarms included, e.g. a badge it takes for a face), so no detector the project has finds
    an untouched face in what is published. ``descriptor_cache`` (a dict kept across the
    rounds of one photo) spares describing a face again whose pixels did not change. With
    ``previous`` (the check of the same photo before some of it changed) and ``regions``
    (``changed_regions`` between the two), only the regions are searched; faces centred
    outside them are taken from ``previous``."""
    found: list[DetectedFace] = []
    for detector in ("hog", "centerface"):   # HOG's first: where both find a face, HOG's is measured
        if detector not in detectors:
            continue
        if previous is None or regions is None:
            found += _search(output_rgb, detector, None, upsample, max_side, threshold, tile_side)
            continue
        found += [face for face in previous.found if face.detector == detector and not _centre_inside(face, regions)]
        for region in regions:
            found += [face for face in _search(output_rgb, detector, region, upsample, max_side, threshold, tile_side)
                      if _centre_inside(face, [region])]
    distances = [float("inf")] * len(original_faces)
    measured_by_hog: set[int] = set()
    unprocessed: list[DetectedFace] = []
    for face in found:
        matches = same_face_as(face, original_faces)
        if not matches:
            # Two detectors may both find the face ingest missed: take it in once.
            if all(box_overlap(face.box, other.box) <= SAME_FACE_OVERLAP for other in unprocessed):
                unprocessed.append(face)
            continue
        measured = [index for index in matches if original_descriptors[index] is not None]
        if face.detector == "hog":
            measured_by_hog.update(measured)
        else:
            # CenterFace's face is measured only where the verifier's own detector lost it:
            # where both see it, the protocol's measurement (HOG's landmarks) is the one.
            measured = [index for index in measured if index not in measured_by_hog]
        if not measured:
            continue
        descriptor = _described(output_rgb, face, descriptor_cache)
        for index in measured:
            distances[index] = min(distances[index], float(np.linalg.norm(descriptor - original_descriptors[index])))
    return LeakReport(distances=distances, unprocessed_faces=unprocessed, output_faces_found=len(found),
                      detectors=tuple(detectors), found=found)
