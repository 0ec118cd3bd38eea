"""Obfuscate every face of a photo, compose it back, and release it only if no face in the
encoded output still verifies as its original.

The identity check runs on the *encoded* bytes that would be published (decoded again), so
what was checked is exactly what is released. A leaking face is re-done with the policy's
fallback methods, strongest last, each re-checked; when they are exhausted, or the policy
says so, the photo is quarantined and nothing of it is published. A face the check finds
in the output that ingest missed (a borderline detection that re-encoding tips over) is
taken in and obfuscated like the others; if faces keep appearing after
``MAX_DISCOVERY_ROUNDS``, the photo is quarantined. A synthesized face the check does not
find again at all, or finds still verifying as its original, is drawn again (Stage III's
``render_draws``: a new identity code, or another view of its crop; at most
``rerender_views`` more after such checks, and ``screened_draws`` more that only the
screen takes) before any fallback method, so that what is published is a new face dlib
still sees, and whose distance to the original the gate has therefore measured. The
fallback ``gan_surround`` keeps a drawn face and covers the rest of its enlarged box (hair,
ears, outline: what SFace still reads of a face that leaves the generator) with the box
method, trying the draws again from the first, before the methods that keep no face.

With Stage IV on (``settings.perturbation``), every synthesized face gets the universal
perturbation inside its mask (``stages.perturbation.apply``), added after the compose and before
encoding, so the identity check and re-detection judge the perturbed photo that is
published. Stage IV never costs identity protection: a face that the check no longer finds
with the perturbation, or finds within the release distance of its original, has it
withdrawn (``face_perturbation_withdrawn``: "lost" or "verifies") and is checked again
without it, then re-rendered or sent to the fallback as before. Once the photo is settled,
what the perturbation did to each face that kept it (PSNR cost, whether the white-box
profiler was fooled) is measured on it.

A face too small to synthesize (``min_synthesis_px``) or whose landmarks disagree with the
detector's own points (``max_landmark_error``) is obfuscated over its enlarged detection box
(``box_method``, then a flat fill when that still verifies) instead of its landmark mask
(``face_box_reasons``). A face that still verifies after the whole fallback chain is
protected over its enlarged box too, as the chain's last steps. Every face is measured
where the check finds it again, at its original box, and against the photo's other
original faces (``stages.common.identity``); no face is published without a measurement at its
box that passed. The check searches the output with CenterFace and HOG
(``check_detectors``); what either finds where no face was processed is taken in.

The loop is a small state machine over one ``FaceOutcome`` per face (``PhotoEscalation``),
whose named steps are: screen each face's edit alone (``PhotoEscalation.screen``: an edit
that verifies at its own landmarks is passed over before any round of the whole photo), then,
in order of precedence after each compose and check, take in newly found faces, withdraw
the perturbation, draw a lost or verifying face again, release, escalate. The
evaluation (``flows/evaluation/evaluate.py``) runs the same steps up to the escalation
(``compose_detectable``).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stages.common.compose import compose_face_into, cover_around
from stages.common.faces import (
    ALIGNED_SIZE,
    AlignedFace,
    DetectedFace,
    align_face,
    detect_faces,
    face_descriptor,
)
from stages.common.identity import (
    CHECK_DETECTORS,
    LeakReport,
    check_identity_leaks,
    same_face_as,
    union_box,
)
from stages.common.imageio import decode_bytes, encode_clean, output_format_for
from stages.common.obfuscate import (
    SYNTHESIZING_METHODS,
    box_protection_reason,
    enlarged_box,
    obfuscate,
    obfuscate_boxes,
)
from stages.common.obfuscate import mask as flat_fill
from stages.common.sface import SFACE_RELEASE, sface_descriptor
from stages.perturbation.apply import (
    ReleasePerturbation,
    apply_perturbation,
    measure_effect,
)

# Changing a crowd's faces changes what the detector makes of their neighbours: a face that
# scored just under the threshold at ingest can score just over it in the output (seen: 0.21
# to 0.29 at a threshold of 0.2), one or two more each round as their neighbours change.
# Each round protects what it finds; a photo still growing faces after this many is held back.
MAX_DISCOVERY_ROUNDS = 2


@dataclass
class AnonymizeSettings:
    method: str
    method_params: dict[str, dict]          # parameters per method name
    fallback: list[str]
    on_leak: str                            # "fallback" | "quarantine"
    on_no_face: str                         # "release" | "quarantine"
    release_distance: float                 # smallest verifier distance at which a face may be released
    feather_fraction: float
    upsample: int = 1                       # dlib HOG's, in the leak check
    max_side: int = 1600
    threshold: float = 0.5                  # CenterFace's score for a face (its second opinion in the check)
    tile_side: int = 1024
    min_synthesis_px: int = 40              # narrower faces are protected over their box (box_method)
    max_landmark_error: float = 1.0         # so are faces whose landmarks disagree with the detector's points
    box_method: str = "pixelate"
    box_margin: float = 0.25
    check_detectors: tuple[str, ...] = CHECK_DETECTORS   # who looks for faces in the output
    workers: int = 1                        # processes across a batch's photos (stages.common.parallel)
    output_format: str = "same"
    jpeg_quality: int = 95
    synthesis_batch: int = 64
    rerender_views: int = 4                 # further draws for a rendered face the check lost or that verifies
    screened_draws: int = 19                # and further draws only the screen may take (PhotoEscalation.screen)
    sface_release: float = SFACE_RELEASE   # SFace similarity at or above which a face may not be released
    perturbation: ReleasePerturbation | None = None   # Stage IV on synthesized faces (None: off)
    # stages.common.faces.detect_faces's keyword arguments at ingest: a multi-frame file's further
    # frames are searched with them (stages.common.pipeline)
    frame_detection: dict = field(default_factory=dict)

    @property
    def uses_generator(self) -> bool:
        return any(method in SYNTHESIZING_METHODS
                   for method in [self.method, *(self.fallback if self.on_leak == "fallback" else [])])



@dataclass
class FaceOutcome:
    """One face of a photo through the escalation: what protects it now and what the last
    check measured of it."""
    face: DetectedFace
    aligned: AlignedFace
    chain: list[str]                        # the methods it may be protected with, in order
    box_reason: str | None                  # why it is protected over its box (None: over its landmark mask)
    original: np.ndarray | None             # its original's descriptor (None: boxed from the start, not described)
    renders: Sequence[np.ndarray] | None = None   # Stage III's draws of its crop (None: not rendered)
    found_by_check: bool = False            # found by the identity check, missed by ingest
    step: int = 0                           # index into ``chain`` of the method used now
    draw: int = 0                           # index into ``renders`` of the drawing used now
    redrawn_for: list[str] = field(default_factory=list)     # why each further draw was made
    checked_redraws: int = 0                # of those, made after a check of the whole photo
    withdrawn: str | None = None            # why Stage IV was taken off it: "lost" | "verifies"
    escalated_for: list[str] = field(default_factory=list)   # what each step past the first answered
    screened_out: int = 0                   # draws and methods passed over by the screen (PhotoEscalation.screen)
    screened: tuple[int, int] | None = None   # the (step, draw) the screen last let through
    edited: np.ndarray | None = None        # its aligned crop as the current method leaves it
    # What the last check measured (stages.common.identity.LeakReport, this face's entries).
    distance: float = float("inf")          # found again (inf: not found)
    distance_at_box: float = float("inf")   # described at its original box
    membership_distance: float = float("inf")   # to the photo's other originals
    blank_distance: float = float("inf")    # the same measurement, face removed
    sface_original: np.ndarray | None = None          # SFace's descriptor of its original (None: not described)
    sface_similarity: float = float("-inf")           # SFace: highest similarity to its original
    sface_blank_similarity: float = float("-inf")     # the same measurement, face removed
    status: str = "detected"                # "anonymized" | "leaking" after a check
    perturbed: bool = False                 # carries Stage IV in the last composition
    # Stage IV's effect, measured on a released photo for a face that kept it.
    perturbation_psnr: float | None = None
    profiler_fooled: bool | None = None
    preserved_changed: list[str] | None = None

    @property
    def method(self) -> str:
        return self.chain[self.step]

    @property
    def methods_tried(self) -> list[str]:
        return self.chain[: self.step + 1]

    @property
    def boxed(self) -> bool:
        return self.box_reason is not None

    @property
    def synthesized(self) -> bool:
        return self.method in SYNTHESIZING_METHODS and not self.boxed

    @property
    def surrounded(self) -> bool:
        """Synthesized, with the rest of its enlarged box covered (``gan_surround``)."""
        return self.method == "gan_surround" and not self.boxed

    @property
    def forehead(self) -> float:
        """How far above the eyebrows its current edit reaches: a synthesized face, the region
        its generator was trained to paint (``FaceRenders.forehead``); other methods, the hull."""
        return float(getattr(self.renders, "forehead", 0.0)) if self.synthesized else 0.0

    @property
    def verifiable(self) -> bool:
        """Described by the verifier (not protected over its box from the start)."""
        return self.original is not None

    @property
    def render_draw(self) -> int | None:
        """Index into Stage III's draws of the one used (None: not rendered)."""
        return self.draw if self.method in SYNTHESIZING_METHODS else None

    @property
    def perturbation_withdrawn(self) -> str | None:
        return self.withdrawn if self.synthesized else None

    def next_method(self) -> None:
        """On to the chain's next method. From ``gan`` to ``gan_surround``, back to the first
        draw: every draw gets another chance with its surroundings covered (the screen's, at
        a fraction of a second each; the check's redraws are not given back)."""
        previous = self.method
        self.step += 1
        if previous == "gan" and self.step < len(self.chain) and self.method == "gan_surround":
            self.draw = 0

    def edit(self, settings: AnonymizeSettings) -> None:
        """The aligned crop edited with the chain's current method, skipping ``gan`` where
        nothing was rendered; None when the chain runs out or the face is protected over its box."""
        self.edited = None
        if self.boxed:
            return
        while self.step < len(self.chain):
            if self.method not in SYNTHESIZING_METHODS:
                self.edited = obfuscate(self.aligned.crop, self.method, settings.method_params.get(self.method))
                return
            if self.renders is not None:
                self.edited = self.renders[self.draw]
                return
            self.step += 1
        self.step = len(self.chain) - 1


@dataclass(frozen=True)
class FaceStart:
    """Where a face's escalation starts instead of its chain's first method and draw: a
    video's decision for a track, taken by every frame of it (``stages.common.pipeline``), so
    a person keeps one method and one identity code through the video."""
    chain: tuple[str, ...]
    step: int
    draw: int
    box_reason: str | None = None           # covered over its box after its chain verified

    @classmethod
    def of(cls, outcome: FaceOutcome) -> FaceStart:
        return cls(tuple(outcome.chain), outcome.step, outcome.draw, outcome.box_reason)

    def order(self) -> tuple[bool, int, int]:
        """Further along the escalation sorts later."""
        return self.box_reason is not None, self.step, self.draw


@dataclass
class AnonymizeResult:
    status: str                             # "released" | "quarantined"
    reason: str | None
    encoded: bytes | None                   # the bytes to publish (None when quarantined)
    output_format: str | None
    suffix: str | None
    # One per face: ingest's, then those the identity check found (``found_by_check``).
    faces: list[FaceOutcome] = field(default_factory=list)
    perturbation_seconds: float = 0.0       # time Stage IV added to this photo (apply and measure)
    detectors: tuple[str, ...] = ()         # detectors whose findings in the output the check judged

    @property
    def discovered(self) -> list[tuple[DetectedFace, AlignedFace]]:
        """Faces found by the identity check that ingest had missed."""
        return [(outcome.face, outcome.aligned) for outcome in self.faces if outcome.found_by_check]


def box_reason(face: DetectedFace, settings: AnonymizeSettings) -> str | None:
    """Why ``face`` is protected over its box (too small or unreliable landmarks), or None."""
    return box_protection_reason(face.box[2] - face.box[0], face.landmark_error, settings.min_synthesis_px,
                                 settings.max_landmark_error)


def leak_kind(report: LeakReport, index: int, release_distance: float) -> str:
    """Why leaking face ``index`` verifies: to dlib "found again" or "at box" (close to its
    own original), or "membership" (close to another original face of the photo); else
    "sface" (the second verifier calls it its own original)."""
    own = min(report.distances[index], report.at_box[index])
    if own < min(release_distance, report.blank[index]):
        return "found again" if own == report.distances[index] else "at box"
    return "membership" if report.membership[index] < release_distance else "sface"


def verified_as(report: LeakReport, index: int, release_distance: float) -> str:
    """What leaking face ``index`` still verifies as, and how close."""
    kind = leak_kind(report, index, release_distance)
    if kind == "membership":
        return f"distance {report.membership[index]:.3f} to another original face of the photo"
    if kind == "sface":
        return (f"SFace similarity {report.sface[index]:.3f} to its original (released below "
                f"{report.sface_release:.3f}; {report.sface_blank[index]:.3f} with the face removed)")
    where = "where the check found it again" if kind == "found again" else "at its box"
    return f"distance {min(report.distances[index], report.at_box[index]):.3f} to its original {where}"


@dataclass
class Composition:
    """One round's photo: composed (``clean``), with Stage IV (``output``), encoded as it
    would be published and decoded again (``published``), and the check's report on it."""
    clean: np.ndarray
    output: np.ndarray
    encoded: bytes
    published: np.ndarray
    report: LeakReport


class PhotoEscalation:
    """The per-photo anonymize loop's state (one ``FaceOutcome`` per face) and its steps."""

    def __init__(self, rgb: np.ndarray, source_format: str, faces: list[DetectedFace], aligned: list[AlignedFace],
                 settings: AnonymizeSettings, rendered: list[Sequence[np.ndarray] | None] | None = None,
                 starts: list[FaceStart | None] | None = None):
        self.rgb, self.settings = rgb, settings
        self.fmt, self.suffix = output_format_for(source_format, settings.output_format)
        self.crop_size = aligned[0].crop.shape[0] if aligned else ALIGNED_SIZE
        self.chain = [settings.method] + (settings.fallback if settings.on_leak == "fallback" else [])
        # Over the box, a flat fill is the last resort when the policy allows fallbacks.
        self.box_chain = [settings.box_method] + (["mask"] if settings.box_method != "mask"
                                                  and settings.on_leak == "fallback" else [])
        rendered, starts = list(rendered or []), list(starts or [])
        self.faces: list[FaceOutcome] = []
        for index, (face, align) in enumerate(zip(faces, aligned)):
            self._add(face, align, rendered[index] if index < len(rendered) else None, found_by_check=False,
                      start=starts[index] if index < len(starts) else None)
        self.discovery_rounds = 0
        self.stage_four_seconds = 0.0
        self.descriptor_cache: dict = {}    # faces whose pixels a round did not change are not described again
        self.canvas: np.ndarray | None = None   # the screen's scratch copy of the photo
        self.screen_blank: dict[int, tuple[float, float]] = {}   # per face: the screen's measurements, face removed
        # The verifier's own detector's faces in the original, found once: the check also
        # describes each face through them (stages.common.identity.check_identity_leaks).
        self.verifier_faces = (detect_faces(rgb, detector="hog", upsample=settings.upsample,
                                            max_side=settings.max_side)
                               if "hog" in settings.check_detectors else [])

    def _add(self, face: DetectedFace, align: AlignedFace, renders: Sequence[np.ndarray] | None,
             found_by_check: bool, start: FaceStart | None = None) -> None:
        # A face protected over its box from the start (narrower than min_synthesis_px, or with
        # landmarks that disagree with the detector's) is not described: dlib's descriptor of a
        # 20 px face is not evidence of anyone (a flat-filled one in a crowd measured 0.33 from
        # a neighbour's original). The box method is its protection. Every other face is
        # described, and measured at its box every round.
        reason = box_reason(face, self.settings)
        outcome = FaceOutcome(face, align, list(self.box_chain) if reason else self.chain, reason,
                              None if reason else face_descriptor(self.rgb, face.landmarks), renders,
                              found_by_check=found_by_check,
                              sface_original=None if reason else sface_descriptor(self.rgb, face.landmarks))
        if start is not None and reason is None:   # a face protected over its box by its size keeps that
            outcome.chain, outcome.step, outcome.draw = list(start.chain), start.step, start.draw
            outcome.box_reason = start.box_reason
        outcome.edit(self.settings)
        self.faces.append(outcome)

    def result(self, status: str = "released", reason: str | None = None,
               composition: Composition | None = None) -> AnonymizeResult:
        released = status == "released" and composition is not None
        return AnonymizeResult(status, reason, composition.encoded if released else None, self.fmt, self.suffix,
                               list(self.faces) if composition is not None else [], self.stage_four_seconds,
                               composition.report.detectors if composition is not None else ())

    def unrenderable(self) -> int | None:
        """The first face with nothing to protect it with (no renders and no other method)."""
        return next((i for i, outcome in enumerate(self.faces) if outcome.edited is None and not outcome.boxed), None)

    def screen(self) -> None:
        """Step, before each compose and check: each described face's current edit is tried
        alone in the original photo and measured by both verifiers at the face's own
        landmarks, as the check measures it at its box (unencoded, the other faces as they
        were). An edit that verifies there (closer than the release distance, or at or above
        SFace's release similarity, and more so than with the face removed) is passed over at
        once, for its next draw or else the chain's next method, without composing, encoding
        and searching the whole photo for it: that round would have found it verifying too.
        Only the check releases a face; the screen can cost a face a draw or a method that
        the check might have let through, never let through one the check would not. A face
        on its chain's last method goes to the check as it is (the check covers its box).
        Seen on 27 wild photos: 45 of 85 rounds were further draws and fallback steps, each a
        whole round (HOG at 1600 px, CenterFace, both verifiers at every place they look)."""
        for index, outcome in enumerate(self.faces):
            while (outcome.verifiable and not outcome.boxed and outcome.edited is not None
                   and outcome.screened != (outcome.step, outcome.draw)):
                kind = self._screen_leak(index)
                if kind is None or not self._pass_over(outcome, kind):
                    outcome.screened = (outcome.step, outcome.draw)
                    break
                outcome.screened_out += 1

    def _pass_over(self, outcome: FaceOutcome, kind: str) -> bool:
        """The face's next draw, else its chain's next method, for ``kind``; False when it has neither."""
        if outcome.synthesized and outcome.draw < self._last_draw(outcome):
            outcome.redrawn_for.append(kind)
            outcome.draw += 1
        elif outcome.step + 1 < len(outcome.chain):
            outcome.escalated_for.append(kind)
            outcome.next_method()
        else:
            return False
        outcome.edit(self.settings)
        return True

    def _screen_leak(self, index: int) -> str | None:
        """What face ``index``'s current edit, alone in the photo, verifies as to dlib ("at
        box") or SFace ("sface") at its own landmarks; None when neither."""
        outcome, settings = self.faces[index], self.settings
        if self.canvas is None:
            self.canvas = self.rgb.copy()
        written = self._compose_face(self.canvas, outcome)
        try:
            distance, similarity = self._screen_measure(outcome)
        finally:
            if written is not None:
                self._restore(written)
        if distance >= settings.release_distance and similarity < settings.sface_release:
            return None
        blank_distance, blank_similarity = self._screen_blank_measure(index)
        if distance < min(settings.release_distance, blank_distance):
            return "at box"
        return "sface" if similarity >= max(settings.sface_release, blank_similarity) else None

    def _screen_measure(self, outcome: FaceOutcome) -> tuple[float, float]:
        """dlib's distance and SFace's similarity of the canvas at the face's own landmarks to its original."""
        landmarks = outcome.face.landmarks
        return (float(np.linalg.norm(face_descriptor(self.canvas, landmarks) - outcome.original)),
                float(sface_descriptor(self.canvas, landmarks) @ outcome.sface_original))

    def _screen_blank_measure(self, index: int) -> tuple[float, float]:
        """The screen's measurements of face ``index`` with its enlarged box filled flat."""
        if index not in self.screen_blank:
            box = enlarged_box(self.cover_box(self.faces[index]), self.settings.box_margin, self.rgb.shape)
            left, top, right, bottom = box
            self.canvas[top:bottom, left:right] = flat_fill(self.canvas[top:bottom, left:right],
                                                            self.settings.method_params.get("mask") or {})
            try:
                self.screen_blank[index] = self._screen_measure(self.faces[index])
            finally:
                self._restore(box)
        return self.screen_blank[index]

    def _restore(self, box: tuple[int, int, int, int]) -> None:
        left, top, right, bottom = box
        self.canvas[top:bottom, left:right] = self.rgb[top:bottom, left:right]

    def compose_and_check(self) -> Composition:
        """Step: compose every face with its current method (Stage IV on synthesized faces
        that still carry it), encode as published, and check the decoded bytes."""
        settings, faces = self.settings, self.faces
        clean = self.rgb.copy()   # one copy for all faces (a copy per face: 10 ms each in a 12 MP photo)
        for outcome in faces:
            if not outcome.boxed:
                self._compose_face(clean, outcome)
        for method in self.box_chain:   # over its enlarged box, each face with its chain's current method
            clean = obfuscate_boxes(clean, [self.cover_box(o) for o in faces if o.boxed and o.method == method],
                                    method, settings.method_params.get(method), settings.box_margin)
        for outcome in faces:
            outcome.perturbed = settings.perturbation is not None and outcome.synthesized and outcome.withdrawn is None
        started = time.perf_counter()
        output = (apply_perturbation(clean, [o.aligned for o in faces], [o.perturbed for o in faces],
                                     settings.perturbation, settings.feather_fraction)
                  if any(o.perturbed for o in faces) else clean)
        self.stage_four_seconds += time.perf_counter() - started
        encoded = encode_clean(output, self.fmt, settings.jpeg_quality)
        published = decode_bytes(encoded)
        report = check_identity_leaks(published, self.rgb, [o.face for o in faces], [o.original for o in faces],
                                      settings.upsample, settings.max_side, settings.threshold, settings.tile_side,
                                      settings.check_detectors, self.descriptor_cache, settings.release_distance,
                                      functools.partial(self._removed, output), self.verifier_faces,
                                      [o.sface_original for o in faces], settings.sface_release,
                                      [self.cover_box(o) for o in faces])
        leaking = set(report.leaking(settings.release_distance))
        for i, outcome in enumerate(faces):
            outcome.distance, outcome.distance_at_box = report.distances[i], report.at_box[i]
            outcome.membership_distance, outcome.blank_distance = report.membership[i], report.blank[i]
            outcome.sface_similarity, outcome.sface_blank_similarity = report.sface[i], report.sface_blank[i]
            outcome.status = "leaking" if i in leaking else "anonymized"
        return Composition(clean, output, encoded, published, report)

    def _compose_face(self, canvas: np.ndarray, outcome: FaceOutcome) -> tuple[int, int, int, int] | None:
        """Write the face's current edit into ``canvas`` in place (a synthesized face colour
        matched to what is there, over its generator's painted region; ``gan_surround`` with
        the rest of its enlarged cover box covered by the box method). Returns the rectangle
        written (None: the face lies outside the photo)."""
        settings = self.settings
        region = compose_face_into(canvas, outcome.aligned, outcome.edited, settings.feather_fraction,
                                   outcome.synthesized, outcome.forehead)
        if region is None:
            return None
        written = (region.left, region.top, region.right, region.bottom)
        if outcome.surrounded:
            covered = cover_around(canvas, region, self.cover_box(outcome), settings.box_method,
                                   settings.method_params.get(settings.box_method), settings.box_margin)
            written = tuple(int(v) for v in union_box(written, covered))
        return written

    def cover_box(self, outcome: FaceOutcome) -> tuple:
        """The face's box together with the verifier's own detector's boxes of it in the
        original: what protection over the box covers (enlarged by ``box_margin``) and what
        removing the face takes out. HOG's box of a face can reach past CenterFace's (seen: 48
        px further left, over hair that SFace still read as the person's beside a face masked
        over CenterFace's box alone)."""
        boxes = [self.verifier_faces[i].box for i in same_face_as(outcome.face, self.verifier_faces)]
        return tuple(union_box(outcome.face.box, *boxes))

    def _removed(self, output: np.ndarray, box: tuple) -> np.ndarray:
        """What would be published with the face at ``box`` filled flat over its enlarged
        box (as the chain's last step does), encoded and decoded the same way: for the
        face that already is, the very same pixels."""
        left, top, right, bottom = enlarged_box(box, self.settings.box_margin, output.shape)
        copy = output.copy()
        copy[top:bottom, left:right] = flat_fill(copy[top:bottom, left:right],
                                                 self.settings.method_params.get("mask") or {})
        return decode_bytes(encode_clean(copy, self.fmt, self.settings.jpeg_quality))

    def take_in_new_faces(self, report: LeakReport) -> bool:
        """Step: protect the faces the check found that nobody processed; False when the
        photo already had ``MAX_DISCOVERY_ROUNDS`` such rounds."""
        if self.discovery_rounds >= MAX_DISCOVERY_ROUNDS:
            return False
        self.discovery_rounds += 1
        for face in report.unprocessed_faces:
            # Same geometry as the original photo: align and describe the face there.
            self._add(face, align_face(self.rgb, face.landmarks, self.crop_size), None, found_by_check=True)
        return True

    def withdraw_perturbation(self, report: LeakReport) -> bool:
        """Step: take Stage IV off every perturbed face the check lost or finds verifying."""
        leaking = set(report.leaking(self.settings.release_distance))
        back = [i for i, o in enumerate(self.faces) if o.perturbed and (o.distance == float("inf") or i in leaking)]
        for i in back:
            self.faces[i].withdrawn = "lost" if self.faces[i].distance == float("inf") else "verifies"
        return bool(back)

    def redraw(self, report: LeakReport, verifying: bool = True) -> bool:
        """Step: a synthesized face the check does not find again, or (``verifying``) that
        still verifies as its original, gets its next draw (a new identity code, or another
        view of its crop) while it has draws left; the fallback methods come after that."""
        distance = self.settings.release_distance
        leaking = set(report.leaking(distance)) if verifying else set()
        again = False
        for i, outcome in enumerate(self.faces):
            lost = outcome.distance == float("inf")
            if (outcome.synthesized and (lost or i in leaking)
                    and outcome.checked_redraws < self.settings.rerender_views
                    and outcome.draw < self._last_draw(outcome)):
                outcome.redrawn_for.append("lost" if lost else leak_kind(report, i, distance))
                outcome.draw += 1
                outcome.checked_redraws += 1
                outcome.edit(self.settings)
                again = True
        return again

    def _last_draw(self, outcome: FaceOutcome) -> int:
        """The last of a rendered face's draws it may be published with: ``rerender_views`` more
        after checks of the whole photo, and ``screened_draws`` more the screen passes over
        (the screen may take any of them; the check only ``rerender_views``)."""
        return min(self.settings.rerender_views + self.settings.screened_draws, len(outcome.renders) - 1)

    def measure_perturbation(self, composition: Composition) -> None:
        """What Stage IV did to each face that kept it, on the settled photo."""
        chosen = [o for o in self.faces if o.perturbed]
        if not chosen:
            return
        started = time.perf_counter()
        effect = measure_effect(composition.clean, composition.output, composition.published,
                                [o.aligned for o in chosen], self.settings.perturbation)
        for outcome, cost, fooled, changed in zip(chosen, effect.psnr_db, effect.fooled, effect.preserved_changed):
            outcome.perturbation_psnr, outcome.profiler_fooled, outcome.preserved_changed = cost, fooled, changed
        self.stage_four_seconds += time.perf_counter() - started

    def escalate(self, report: LeakReport) -> str | None:
        """Step: every leaking face to its chain's next method. A face whose whole chain left
        it verifiable is covered over its enlarged box as well; returns why the photo is held
        back when a leaking face has nothing left to try (None otherwise)."""
        settings, distance = self.settings, self.settings.release_distance
        leaking = report.leaking(distance)
        exhausted = [i for i in leaking if self.faces[i].step + 1 >= len(self.faces[i].chain)]
        escalated = [i for i in exhausted if not self.faces[i].boxed and settings.on_leak == "fallback"]
        stuck = [i for i in exhausted if i not in escalated]
        if stuck:
            outcome = self.faces[stuck[0]]
            return (f"face {stuck[0]} still verifies after {'/'.join(outcome.methods_tried)} "
                    f"({verified_as(report, stuck[0], distance)}, release needs >= {distance:.2f})")
        for i in escalated:
            # What is left of the face outside the landmark mask (hair, outline, a small
            # face's context) is what dlib still recognises: cover its enlarged box as well,
            # and measure it again like any face.
            outcome = self.faces[i]
            outcome.box_reason = (f"still verified after {'/'.join(outcome.methods_tried)}: "
                                  f"{verified_as(report, i, distance)}, the release needs >= {distance:.2f}")
            outcome.chain = outcome.methods_tried + self.box_chain
        for i in leaking:
            outcome = self.faces[i]
            outcome.escalated_for.append(leak_kind(report, i, distance))
            outcome.next_method()
            outcome.edit(settings)
        return None


def anonymize_photo(rgb: np.ndarray, source_format: str, faces: list[DetectedFace],
                    aligned: list[AlignedFace], settings: AnonymizeSettings,
                    rendered: list[Sequence[np.ndarray] | None] | None = None,
                    starts: list[FaceStart | None] | None = None) -> AnonymizeResult:
    """``starts``: per face, where its escalation starts (None: its chain's first method).
    ``rendered`` holds Stage III's renders per ingest face, one per view of its crop
    (``stages.synthesis.render.FaceRenders``; ``None`` where a face has no Stage II targets);
    method ``gan`` uses the first and the next ones when the check loses the face, and a
    face without renders goes straight to the next method of the chain."""
    if not faces and settings.on_no_face == "quarantine":
        fmt, suffix = output_format_for(source_format, settings.output_format)
        return AnonymizeResult("quarantined", "no face found and the policy quarantines such photos", None, fmt, suffix)
    photo = PhotoEscalation(rgb, source_format, faces, aligned, settings, rendered, starts)
    while True:
        photo.screen()
        missing = photo.unrenderable()
        if missing is not None:
            return photo.result("quarantined", f"face {missing} has no Stage II target attributes for the "
                                "generator and the policy names no other method for it")
        composition = photo.compose_and_check()
        report = composition.report
        if report.unprocessed_faces:
            if not photo.take_in_new_faces(report):
                return photo.result("quarantined", f"{len(report.unprocessed_faces)} face(s) still found in the "
                                    f"output after {photo.discovery_rounds} rounds of processing missed faces; "
                                    "photo held back", composition)
            continue
        if photo.withdraw_perturbation(report) or photo.redraw(report):
            continue
        if not report.leaking(settings.release_distance):
            photo.measure_perturbation(composition)
            return photo.result("released", None, composition)
        held_back = photo.escalate(report)
        if held_back:
            return photo.result("quarantined", held_back, composition)
