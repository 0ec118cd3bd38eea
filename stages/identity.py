"""Identity-leak check: does any face in an output photo still verify as an original?

Follows EVALUATION.md's verifier: dlib's HOG detector + 68 landmarks find faces in the
output, dlib's ResNet descriptor describes them, and a Euclidean distance below the
threshold (dlib's documented 0.6) means "same person". Every face found in the output is
compared with every original face of the photo, so a face that moved or was re-detected
or re-detected with a shifted box is still caught. Each output face is compared with the
original face(s) its box overlaps: comparing across people would flag look-alikes in group
photos (two different people can be 0.6 apart). A face found in the output that overlaps
no original face was never processed (ingest missed it); it is reported separately so
the caller can process it or hold the photo back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stages.faces import (
    SAME_FACE_OVERLAP,
    DetectedFace,
    box_overlap,
    detect_faces,
    face_descriptor,
)


@dataclass
class LeakReport:
    # Per original face: smallest descriptor distance to any face found in the output
    # (inf when no output face was found at all).
    distances: list[float]
    # Output faces that overlap no original face: never processed by the pipeline.
    unprocessed_faces: list[DetectedFace] = field(default_factory=list)
    output_faces_found: int = 0

    def leaking(self, release_distance: float) -> list[int]:
        """Faces closer to their original than ``release_distance``."""
        return [i for i, d in enumerate(self.distances) if d < release_distance]


def same_face_as(face: DetectedFace, original_faces: list[DetectedFace]) -> list[int]:
    """Indices of the original faces whose box ``face``'s box overlaps: the same face."""
    return [i for i, original in enumerate(original_faces) if box_overlap(face.box, original.box) > SAME_FACE_OVERLAP]


def check_identity_leaks(output_rgb: np.ndarray, original_faces: list[DetectedFace],
                         original_descriptors: list[np.ndarray], detector: str = "hog",
                         upsample: int = 1, max_side: int = 1600) -> LeakReport:
    found = detect_faces(output_rgb, detector=detector, upsample=upsample, max_side=max_side)
    distances = [float("inf")] * len(original_faces)
    unprocessed = []
    for face in found:
        matches = same_face_as(face, original_faces)
        if not matches:
            unprocessed.append(face)
            continue
        descriptor = face_descriptor(output_rgb, face.landmarks)
        for index in matches:
            distances[index] = min(distances[index], float(np.linalg.norm(descriptor - original_descriptors[index])))
    return LeakReport(distances=distances, unprocessed_faces=unprocessed, output_faces_found=len(found))
