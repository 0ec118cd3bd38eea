"""Identity-leak check: does any face in an output photo still verify as an original?

Follows EVALUATION.md's verifier: dlib's HOG detector + 68 landmarks find faces in the
output, and so does CenterFace (a second opinion made for crowds, with dlib's landmarks
fitted in its boxes); dlib's ResNet descriptor describes them, and a Euclidean distance below the
threshold (dlib's documented 0.6) means "same person". Each output face is compared with the
original face(s) its box overlaps, twice: with the original described where ingest put its
landmarks, and with the original photo described at the output face's own landmarks (the
same place). Landmarks fitted in a CenterFace box can sit off the face, and an original
described there is a poor likeness: a synthesized face measured 0.84 from it and 0.52
from the same original described at HOG's landmarks. The smaller distance counts.

A face the detectors do not find again is still measured: every original face is also
described in the output at landmarks fitted inside its original box, as someone who knows
where the faces were would do (the release keeps the geometry). And what the output shows
of each face is compared with every other original face of the photo (membership): a
published face close to another person's original tells whoever holds that person's
photo that they are in this one.

A face found in the output that overlaps no original face was never processed (ingest
missed it); it is reported separately so the caller can process it or hold the photo back.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from stages.common.faces import (
    SAME_FACE_OVERLAP,
    DetectedFace,
    box_overlap,
    chip_descriptor,
    detect_faces,
    face_chip,
    landmarks_in_box,
)
from stages.common.obfuscate import enlarged_box
from stages.common.sface import SFACE_RELEASE, sface_descriptor

# The detectors whose findings in a published photo the release's check judges: CenterFace
# (made for crowds: it sees small, turned and covered faces that dlib misses, so a face that
# ingest missed is found here) and dlib's HOG (the verifier's own detector, as EVALUATION.md).
CHECK_DETECTORS = ("centerface", "hog")


@dataclass
class LeakReport:
    # Per original face: smallest descriptor distance to any face found in the output over
    # it (inf when no output face was found there: "not found again").
    distances: list[float]
    # Per original face: the output described where the face was, at its original landmarks
    # and at landmarks fitted inside its original box (the smaller), as someone who knows
    # where the face was would look (inf: no original descriptor, i.e. not measured).
    at_box: list[float] = field(default_factory=list)
    # Per original face: smallest distance below the release distance from what the output
    # shows of it (found again or at its box) to any OTHER original face of the photo, that
    # is also smaller than with the face removed: whoever holds that person's photo must not
    # learn that they are in this one (inf: none).
    membership: list[float] = field(default_factory=list)
    # Per original face whose closest own distance is below the release distance: the same
    # measurement (same landmarks, same original) on the published photo with the face's
    # enlarged box filled flat, i.e. with nothing of the face left (inf: not needed). dlib's
    # descriptor puts what is not a face (a flat fill, a badge HOG took for a face) close to
    # everything else that is not one: a grey box measured 0.49 from a mission patch's
    # "face". A distance is evidence of identity only when it is smaller than this: what is
    # published then shows more of that face than its removal would.
    blank: list[float] = field(default_factory=list)
    # Output faces that overlap no original face: never processed by the pipeline.
    unprocessed_faces: list[DetectedFace] = field(default_factory=list)
    output_faces_found: int = 0
    detectors: tuple[str, ...] = CHECK_DETECTORS
    # The second verifier, SFace (stages.common.sface), per original face: the highest cosine
    # similarity of what the output shows of it (every place dlib described it) to its
    # original (-inf: not measured), and the same with the face's box filled flat (-inf: not
    # needed). As with dlib's blank, a similarity is evidence only above the blank one: SFace
    # called 3 of 100 LFW faces filled grey over their enlarged box their own person (up to
    # 0.41), from what is around the box.
    sface: list[float] = field(default_factory=list)
    sface_blank: list[float] = field(default_factory=list)
    sface_release: float = SFACE_RELEASE   # similarity at or above which a face may not be released

    def sface_verifies(self, index: int) -> bool:
        return bool(self.sface) and self.sface[index] >= self.sface_release and self.sface[index] > self.sface_blank[index]

    def leaking(self, release_distance: float) -> list[int]:
        """Faces that verify as their original to dlib (found again or at their box: closer
        than ``release_distance`` and than a blank chip) or to SFace (``sface_verifies``),
        or as another original face of the photo to dlib (``membership``, judged the same
        way when measured)."""
        return [i for i in range(len(self.distances))
                if min(self.distances[i], self.at_box[i]) < min(release_distance, self.blank[i])
                or self.membership[i] < release_distance or self.sface_verifies(i)]


BLANK_GREY = 128   # the default mask colour, which fills a removed face by default
OWN_COLOUR_NOISE = 0.01   # SFace's reading of a box filled flat again over JPEG's noise (see _WithFaceRemoved.sface_similarity)


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
                         descriptor_cache: dict | None = None, release_distance: float = 0.65,
                         removed: Callable[[tuple], np.ndarray] | None = None,
                         verifier_faces: list[DetectedFace] | None = None,
                         sface_originals: list[np.ndarray | None] | None = None,
                         sface_release: float = SFACE_RELEASE,
                         cover_boxes: list[tuple] | None = None) -> LeakReport:
    """Find faces in ``output_rgb`` with every detector in ``detectors`` and measure each one
    that overlaps an original face against that original's descriptor (None: the original
    is not described, so not measured) and against ``original_rgb`` described at the output
    face's landmarks. Every described original is also measured at its box in the output,
    and what the output shows of each face is compared with every other original face
    (membership). A face no original overlaps is returned as unprocessed: a face ingest
    missed, which the caller must protect or hold back. Both detectors search the whole
    photo: what either calls a face is protected (HOG's false alarms included, e.g. a badge
    it takes for a face), so no detector the project has finds an untouched face in what is
    published. ``descriptor_cache`` (a dict kept across the rounds of one photo) spares
    describing a face again whose pixels did not change. A face measured closer than
    ``release_distance`` is measured again on ``removed(box)``: the published photo as it
    would be with that face's box filled flat (``LeakReport.blank``; by default the box,
    enlarged by a quarter, filled grey in ``output_rgb``).

    ``verifier_faces`` are the faces the verifier's own detector (HOG) finds in the
    original, found once per photo by the caller. Where one overlaps a described face, the
    original is also described at its landmarks, and that face is also measured at its box
    and landmarks: a verifier that looks with its own detector describes the faces a little
    differently (seen: 0.58 to another person of the photo through HOG's landmarks, above
    0.65 through CenterFace's box), and every description an attacker can make is judged.

    ``sface_originals``: each original face's SFace descriptor (None: not measured). SFace
    then describes the output at every place dlib did, against that original and against
    the original photo described at the same place; ``LeakReport.sface`` holds the highest
    similarity and ``sface_blank`` the same measurement with the face removed, when it
    reaches ``sface_release``. SFace reads more of the face's surroundings than dlib (its
    crop takes in the forehead): another person's face pasted over the landmark hull still
    left 6.7% of 150 LFW faces their own person to it (results/painted_region_lfw150.json).

    ``cover_boxes``: per original face, the box its removal fills (default: its own box); a
    caller that protects a face over more than its box (``cover_box``) passes that."""
    if removed is None:
        removed = functools.partial(_filled, output_rgb)
    found = _output_faces(output_rgb, detectors, upsample, max_side, threshold, tile_side)
    targets, places = _originals(original_rgb, original_faces, original_descriptors, verifier_faces or [],
                                 descriptor_cache)
    measured = _Measurements.empty(len(original_faces))
    _measure_found_again(measured, found, output_rgb, original_rgb, original_faces, targets, descriptor_cache)
    _measure_at_box(measured, output_rgb, original_faces, targets, places, descriptor_cache)
    without = _WithFaceRemoved(removed, cover_boxes or [face.box for face in original_faces], output_rgb,
                               descriptor_cache)
    blank = [float("inf")] * len(original_faces)
    for index in range(len(original_faces)):
        if min(measured.distances[index], measured.at_box[index]) < release_distance:
            landmarks, target = measured.closest[index]
            blank[index] = float(np.linalg.norm(without.descriptor(index, landmarks) - target))
    membership = _membership(measured.shown, targets, without, release_distance)
    sface, sface_blank = _sface_measurements(measured.shown, output_rgb, original_rgb, sface_originals or [],
                                             without, sface_release, descriptor_cache)
    return LeakReport(distances=measured.distances, at_box=measured.at_box, membership=membership, blank=blank,
                      unprocessed_faces=measured.unprocessed, output_faces_found=len(found),
                      detectors=tuple(detectors), sface=sface, sface_blank=sface_blank, sface_release=sface_release)


def _sface_measurements(shown: list[list[tuple[np.ndarray, np.ndarray]]], output_rgb: np.ndarray,
                        original_rgb: np.ndarray, originals: list[np.ndarray | None], without: _WithFaceRemoved,
                        sface_release: float, cache: dict | None = None) -> tuple[list[float], list[float]]:
    """Per original face: SFace's similarity of the output, at every place dlib described it,
    to its original (ingest's description, and the original photo described at the same
    place), and the same with the face removed. Every place that reaches ``sface_release``
    is judged on its own removal; the face's entry is the highest that is evidence (above its
    removal), else the highest with its removal. Faces without an original (not described)
    get -inf for both. ``cache``: as dlib's descriptor cache (unchanged pixels at the same
    landmarks are not described again)."""
    count = len(shown)
    similarity, blank = [float("-inf")] * count, [float("-inf")] * count
    for index, original in enumerate(originals[:count]):
        if original is None:
            continue
        readings = []   # (similarity, landmarks, target)
        for landmarks in {landmarks.tobytes(): landmarks for landmarks, _ in shown[index]}.values():
            described = sface_descriptor(output_rgb, landmarks, cache)
            for target in (original, sface_descriptor(original_rgb, landmarks, cache)):
                readings.append((float(described @ target), landmarks, target))
        readings.sort(key=lambda reading: -reading[0])
        if readings:
            similarity[index] = readings[0][0]
        for value, landmarks, target in readings:
            if value < sface_release:
                break
            removed = without.sface_similarity(index, landmarks, target)
            if blank[index] == float("-inf"):   # the highest reading's removal
                blank[index] = removed
            if value > removed:
                similarity[index], blank[index] = value, removed
                break
    return similarity, blank


def union_box(*boxes: tuple) -> tuple[float, float, float, float]:
    """The smallest box that holds every one of ``boxes``."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


# A removal region counts as filled flat already when this share of its pixels lies within
# FLAT_LEVELS grey levels of its median colour in every channel: JPEG's ringing at the edges of a
# flat fill leaves 96% of a masked box within 4 levels, a face or hair under 1%.
FLAT_SHARE, FLAT_LEVELS = 0.9, 4


def already_flat(rgb: np.ndarray, box: tuple) -> bool:
    """Whether ``box``, enlarged by a quarter (the removal region), is one flat colour in ``rgb``."""
    left, top, right, bottom = enlarged_box(box, 0.25, rgb.shape)
    region = rgb[top:bottom, left:right].reshape(-1, 3).astype(np.int16)
    if not len(region):
        return False
    deviation = np.abs(region - np.median(region, axis=0)).max(axis=1)
    return float((deviation <= FLAT_LEVELS).mean()) >= FLAT_SHARE


def _filled(output_rgb: np.ndarray, box: tuple, colour=BLANK_GREY) -> np.ndarray:
    """``output_rgb`` with ``box``, enlarged by a quarter, filled flat with ``colour`` (None:
    the enlarged box's own median colour)."""
    left, top, right, bottom = enlarged_box(box, 0.25, output_rgb.shape)
    copy = output_rgb.copy()
    region = copy[top:bottom, left:right]
    copy[top:bottom, left:right] = (np.median(region.reshape(-1, 3), axis=0).astype(np.uint8)
                                    if colour is None else colour)
    return copy


def _output_faces(output_rgb: np.ndarray, detectors: tuple[str, ...], upsample: int, max_side: int,
                  threshold: float, tile_side: int) -> list[DetectedFace]:
    """Every face each of ``detectors`` finds in the output (HOG's first)."""
    found: list[DetectedFace] = []
    if "hog" in detectors:
        found += detect_faces(output_rgb, detector="hog", upsample=upsample, max_side=max_side)
    if "centerface" in detectors:
        found += detect_faces(output_rgb, detector="centerface", threshold=threshold, tile_side=tile_side)
    return found


def _originals(original_rgb: np.ndarray, original_faces: list[DetectedFace],
               original_descriptors: list[np.ndarray | None], verifier_faces: list[DetectedFace],
               cache: dict | None) -> tuple[list[list[np.ndarray]], list[list[tuple[tuple, np.ndarray, str]]]]:
    """Each described face's originals (the ingest description, then the verifier detector's)
    and the boxes and landmarks it is looked for at in the output."""
    targets: list[list[np.ndarray]] = [[] if d is None else [d] for d in original_descriptors]
    places: list[list[tuple[tuple, np.ndarray, str]]] = [[(f.box, f.landmarks, f.detector)] for f in original_faces]
    for index, original in enumerate(original_faces):
        if original_descriptors[index] is None:
            continue
        for other in verifier_faces:
            if box_overlap(other.box, original.box) > SAME_FACE_OVERLAP \
                    and not np.allclose(other.landmarks, original.landmarks):
                targets[index].append(_described(original_rgb, other, cache))
                places[index].append((other.box, other.landmarks, other.detector))
    return targets, places


@dataclass
class _Measurements:
    """Per original face: the closest distance found again and at its box, the (landmarks,
    target) of the closest, and what the output shows of it as (landmarks, descriptor)."""
    distances: list[float]
    at_box: list[float]
    closest: list[tuple[np.ndarray, np.ndarray] | None]
    shown: list[list[tuple[np.ndarray, np.ndarray]]]
    unprocessed: list[DetectedFace]

    @classmethod
    def empty(cls, count: int) -> _Measurements:
        return cls([float("inf")] * count, [float("inf")] * count, [None] * count, [[] for _ in range(count)], [])


def _measure_found_again(measured: _Measurements, found: list[DetectedFace], output_rgb: np.ndarray,
                         original_rgb: np.ndarray, original_faces: list[DetectedFace],
                         targets: list[list[np.ndarray]], cache: dict | None) -> None:
    """Each output face over an original face measured against it; the others kept as
    unprocessed (faces ingest missed)."""
    measured_by_hog: set[int] = set()
    for face in found:
        matches = same_face_as(face, original_faces)
        if not matches:
            # Two detectors may both find the face ingest missed: take it in once.
            if all(box_overlap(face.box, other.box) <= SAME_FACE_OVERLAP for other in measured.unprocessed):
                measured.unprocessed.append(face)
            continue
        indices = [index for index in matches if targets[index]]
        if face.detector == "hog":
            measured_by_hog.update(indices)
        else:
            # CenterFace's face is measured only where the verifier's own detector lost it:
            # where both see it, the protocol's measurement (HOG's landmarks) is the one.
            indices = [index for index in indices if index not in measured_by_hog]
        if not indices:
            continue
        descriptor = _described(output_rgb, face, cache)
        same_place = _described(original_rgb, face, cache)
        for index in indices:
            for target in (same_place, *targets[index]):
                distance = float(np.linalg.norm(descriptor - target))
                if distance < measured.distances[index]:
                    measured.distances[index], measured.closest[index] = distance, (face.landmarks, target)
            measured.shown[index].append((face.landmarks, descriptor))


def _measure_at_box(measured: _Measurements, output_rgb: np.ndarray, original_faces: list[DetectedFace],
                    targets: list[list[np.ndarray]], places: list[list[tuple[tuple, np.ndarray, str]]],
                    cache: dict | None) -> None:
    """Every described face measured where it was, found again or not."""
    for index, original in enumerate(original_faces):
        if not targets[index]:
            continue
        # Two ways to look where the face was: the original's own landmarks (lineage keeps
        # them), and landmarks fitted anew inside its box. They can differ by more than the
        # margin: a blurred 235 px face measured 0.60 at the first and 0.72 at the second.
        # Both at the ingest detector's box and at the verifier detector's.
        for box, known, detector in places[index]:
            for landmarks in (known, landmarks_in_box(output_rgb, box, detector)):
                at_place = _described(output_rgb, replace(original, landmarks=landmarks), cache)
                for descriptor in targets[index]:
                    distance = float(np.linalg.norm(at_place - descriptor))
                    if distance < measured.at_box[index]:
                        measured.at_box[index] = distance
                        if distance < measured.distances[index]:
                            measured.closest[index] = (landmarks, descriptor)
                measured.shown[index].append((landmarks, at_place))


class _WithFaceRemoved:
    """The output with one face removed (``removed(box)`` over the face's cover box), each
    removal made when first needed, and what the verifiers make of it."""

    def __init__(self, removed: Callable[[tuple], np.ndarray], cover_boxes: list[tuple], output_rgb: np.ndarray,
                 cache: dict | None = None):
        self.removed, self.cover_boxes, self.output_rgb, self.cache = removed, cover_boxes, output_rgb, cache
        self.photos: dict[int, np.ndarray] = {}
        self.own_colour: dict[int, np.ndarray | None] = {}

    def photo(self, index: int) -> np.ndarray:
        """The output with face ``index`` removed."""
        if index not in self.photos:
            self.photos[index] = self.removed(self.cover_boxes[index])
        return self.photos[index]

    def own_colour_photo(self, index: int) -> np.ndarray | None:
        """The output with face ``index``'s cover box (enlarged) filled in its own median
        colour; None where that region is flat already (``already_flat``)."""
        if index not in self.own_colour:
            box = self.cover_boxes[index]
            self.own_colour[index] = None if already_flat(self.output_rgb, box) else _filled(self.output_rgb, box, None)
        return self.own_colour[index]

    def descriptor(self, index: int, landmarks: np.ndarray) -> np.ndarray:
        """dlib's descriptor at ``landmarks`` of the output with face ``index`` removed."""
        return chip_descriptor(face_chip(self.photo(index), landmarks))

    def sface_similarity(self, index: int, landmarks: np.ndarray, target: np.ndarray) -> float:
        """SFace's similarity to ``target`` at ``landmarks`` of the output with face ``index``
        removed over its cover box, the lower of two removals: filled with the mask colour,
        and with the region's own median colour. SFace reads the surroundings, so both where
        the face is taken out and which flat colour replaces it move its reading. Seen in CI:
        a released face at 0.369 read 0.387 with its box grey (so no evidence to the gate)
        and below 0.359 in its own colour; a face masked over CenterFace's box read 0.474 with
        that box removed again, and 0.363 to the independent check, which removed HOG's box,
        further left, with the hair beside it (hence cover boxes that hold HOG's box too).
        The own colour is exactly flat where a box the release already filled carries JPEG's
        noise (the astronaut's face filled grey read 0.465, refilled 0.463), hence
        OWN_COLOUR_NOISE, as the independent check allows."""
        grey = float(sface_descriptor(self.photo(index), landmarks, self.cache) @ target)
        own_colour = self.own_colour_photo(index)
        if own_colour is None:
            # Nothing of the face is left there to take out: filling it again in its own colour
            # moves only JPEG's noise, which moved one of the astronaut's places by 0.0127.
            return grey
        own = float(sface_descriptor(own_colour, landmarks, self.cache) @ target)
        return min(grey, own + OWN_COLOUR_NOISE)


def _membership(shown: list[list[tuple[np.ndarray, np.ndarray]]], targets: list[list[np.ndarray]],
                without: _WithFaceRemoved, release_distance: float) -> list[float]:
    """What the output shows of face i against every other original j, counted (like its own
    distances) only when it is closer to j than with face i removed."""
    count = len(shown)
    membership = [float("inf")] * count
    for index, views in enumerate(shown):
        for other, original in ((other, original) for other in range(count) if other != index
                                for original in targets[other]):
            for landmarks, descriptor in views:
                distance = float(np.linalg.norm(descriptor - original))
                if (distance < min(release_distance, membership[index])
                        and distance < float(np.linalg.norm(without.descriptor(index, landmarks) - original))):
                    membership[index] = distance
    return membership
