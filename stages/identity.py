"""Identity-leak check: does any face in an output photo still verify as an original?

Follows EVALUATION.md's verifier: dlib's HOG detector + 68 landmarks find faces in the
output, and so does CenterFace (a second opinion made for crowds, with dlib's landmarks
fitted in its boxes); dlib's ResNet descriptor describes them, and a Euclidean distance below the
threshold (dlib's documented 0.6) means "same person". Each output face is compared with the
original face(s) its box overlaps (comparing across people would flag look-alikes in group
photos: two different people can be 0.6 apart), twice: with the original described where
ingest put its landmarks, and with the original photo described at the output face's own
landmarks (the same place). Landmarks fitted in a CenterFace box can sit off the face, and
an original described there is a poor likeness: a synthesized face measured 0.84 from it
and 0.52 from the same original described at HOG's landmarks. The smaller distance counts. A face found in the output that overlaps
no original face was never processed (ingest missed it); it is reported separately so
the caller can process it or hold the photo back.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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


def check_identity_leaks(output_rgb: np.ndarray, original_rgb: np.ndarray, original_faces: list[DetectedFace],
                         original_descriptors: list[np.ndarray | None], upsample: int = 1, max_side: int = 1600,
                         threshold: float = 0.5, tile_side: int = 1024,
                         detectors: tuple[str, ...] = CHECK_DETECTORS,
                         descriptor_cache: dict | None = None) -> LeakReport:
    """Find faces in ``output_rgb`` with every detector in ``detectors`` and measure each one
    that overlaps an original face against that original's descriptor (None: the original
    is not verified, e.g. protected over its box) and against ``original_rgb`` described at
    the output face's landmarks. A face no original overlaps is returned
    as unprocessed: a face ingest missed, which the caller must protect or hold back. Both
    detectors search the whole photo: what either calls a face is protected (HOG's false
    alarms included, e.g. a badge it takes for a face), so no detector the project has finds
    an untouched face in what is published. ``descriptor_cache`` (a dict kept across the
    rounds of one photo) spares describing a face again whose pixels did not change."""
    found: list[DetectedFace] = []
    if "hog" in detectors:
        found += detect_faces(output_rgb, detector="hog", upsample=upsample, max_side=max_side)
    if "centerface" in detectors:
        found += detect_faces(output_rgb, detector="centerface", threshold=threshold, tile_side=tile_side)
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
        same_place = float(np.linalg.norm(descriptor - _described(original_rgb, face, descriptor_cache)))
        for index in measured:
            distance = min(same_place, float(np.linalg.norm(descriptor - original_descriptors[index])))
            distances[index] = min(distances[index], distance)
    return LeakReport(distances=distances, unprocessed_faces=unprocessed, output_faces_found=len(found),
                      detectors=tuple(detectors))
