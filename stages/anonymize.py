"""Obfuscate every face of a photo, compose it back, and release it only if no face in the
encoded output still verifies as its original.

The identity check runs on the *encoded* bytes that would be published (decoded again), so
what was checked is exactly what is released. A leaking face is re-done with the policy's
fallback methods, strongest last, each re-checked; when they are exhausted, or the policy
says so, the photo is quarantined and nothing of it is published. A face the check finds
in the output that ingest missed (a borderline detection that re-encoding tips over) is
taken in and obfuscated like the others; if faces keep appearing after
``MAX_DISCOVERY_ROUNDS``, the photo is quarantined. A synthesized face the check does not
find again at all is rendered again from the next view of its crop (Stage III's
``RENDER_VIEWS``, at most ``rerender_views`` more), so that what is published is a face
dlib still sees, and whose distance to the original the gate has therefore measured.

With Stage IV on (``settings.perturbation``), every synthesized face gets the universal
perturbation inside its mask (``stages.perturbation``), added after the compose and before
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
original faces (``stages.identity``); no face is published without a measurement at its
box that passed. The check searches the output with CenterFace and HOG
(``check_detectors``); what either finds where no face was processed is taken in.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stages.compose import compose_faces
from stages.faces import (
    ALIGNED_SIZE,
    AlignedFace,
    DetectedFace,
    align_face,
    detect_faces,
    face_descriptor,
)
from stages.identity import CHECK_DETECTORS, LeakReport, check_identity_leaks
from stages.imageio import decode_bytes, encode_clean, output_format_for
from stages.obfuscate import (
    box_protection_reason,
    enlarged_box,
    obfuscate,
    obfuscate_boxes,
)
from stages.obfuscate import mask as flat_fill
from stages.perturbation import ReleasePerturbation, apply_perturbation, measure_effect

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
    workers: int = 1                        # processes across a batch's photos (stages.parallel)
    output_format: str = "same"
    jpeg_quality: int = 95
    synthesis_batch: int = 64
    rerender_views: int = 4                 # further views tried for a rendered face the check lost
    perturbation: ReleasePerturbation | None = None   # Stage IV on synthesized faces (None: off)
    # stages.faces.detect_faces's keyword arguments at ingest: a multi-frame file's further
    # frames are searched with them (stages.pipeline)
    frame_detection: dict = field(default_factory=dict)

    @property
    def uses_generator(self) -> bool:
        return self.method == "gan" or (self.on_leak == "fallback" and "gan" in self.fallback)


@dataclass
class AnonymizeResult:
    status: str                             # "released" | "quarantined"
    reason: str | None
    encoded: bytes | None                   # the bytes to publish (None when quarantined)
    output_format: str | None
    suffix: str | None
    face_methods: list[str] = field(default_factory=list)
    face_methods_tried: list[list[str]] = field(default_factory=list)
    face_distances: list[float] = field(default_factory=list)          # found again (inf: not found)
    face_distances_at_box: list[float] = field(default_factory=list)   # described at its original box
    face_membership_distances: list[float] = field(default_factory=list)   # to the photo's other originals
    face_blank_distances: list[float] = field(default_factory=list)   # the same measurement, face removed
    face_verifiable: list[bool] = field(default_factory=list)   # described by the verifier (not boxed from the start)
    face_status: list[str] = field(default_factory=list)
    # Per face: index into Stage III's RENDER_VIEWS of the render used (None: not rendered).
    face_render_views: list[int | None] = field(default_factory=list)
    # Faces found by the identity check that ingest had missed (appended after the ingest faces).
    discovered: list[tuple[DetectedFace, AlignedFace]] = field(default_factory=list)
    # Stage IV, per face: perturbed or not; for perturbed faces of a released photo, the
    # region's PSNR against the photo without it and whether the white-box profiler was fooled.
    face_perturbed: list[bool] = field(default_factory=list)
    face_perturbation_psnr: list[float | None] = field(default_factory=list)
    face_profiler_fooled: list[bool | None] = field(default_factory=list)
    face_preserved_changed: list[list[str] | None] = field(default_factory=list)
    face_perturbation_withdrawn: list[str | None] = field(default_factory=list)   # "lost" | "verifies" | None
    perturbation_seconds: float = 0.0       # time Stage IV added to this photo (apply and measure)
    # Per face: why it was protected over its box instead of aligned (None: it was aligned).
    face_box_reasons: list[str | None] = field(default_factory=list)
    detectors: tuple[str, ...] = ()         # detectors whose findings in the output the check judged
    # Per face: why each fallback step was taken ("found again", "at box", "membership").
    face_escalated_for: list[list[str]] = field(default_factory=list)


def box_reason(face: DetectedFace, settings: AnonymizeSettings) -> str | None:
    """Why ``face`` is protected over its box (too small or unreliable landmarks), or None."""
    return box_protection_reason(face.box[2] - face.box[0], face.landmark_error, settings.min_synthesis_px,
                                 settings.max_landmark_error)


def leak_kind(report: LeakReport, index: int, release_distance: float) -> str:
    """Why leaking face ``index`` verifies: "found again" or "at box" (close to its own
    original), or "membership" (close to another original face of the photo)."""
    own = min(report.distances[index], report.at_box[index])
    if own < min(release_distance, report.blank[index]):
        return "found again" if own == report.distances[index] else "at box"
    return "membership"


def verified_as(report: LeakReport, index: int, release_distance: float) -> str:
    """What leaking face ``index`` still verifies as, and how close."""
    kind = leak_kind(report, index, release_distance)
    if kind == "membership":
        return f"distance {report.membership[index]:.3f} to another original face of the photo"
    where = "where the check found it again" if kind == "found again" else "at its box"
    return f"distance {min(report.distances[index], report.at_box[index]):.3f} to its original {where}"


def anonymize_photo(rgb: np.ndarray, source_format: str, faces: list[DetectedFace],
                    aligned: list[AlignedFace], settings: AnonymizeSettings,
                    rendered: list[Sequence[np.ndarray] | None] | None = None) -> AnonymizeResult:
    """``rendered`` holds Stage III's renders per ingest face, one per view of its crop
    (``stages.synthesis.FaceRenders``; ``None`` where a face has no Stage II targets);
    method ``gan`` uses the first and the next ones when the check loses the face, and a
    face without renders goes straight to the next method of the chain."""
    fmt, suffix = output_format_for(source_format, settings.output_format)
    if not faces and settings.on_no_face == "quarantine":
        return AnonymizeResult("quarantined", "no face found and the policy quarantines such photos",
                               None, fmt, suffix)
    faces, aligned = list(faces), list(aligned)
    rendered = list(rendered or [])
    ingest_count = len(faces)
    crop_size = aligned[0].crop.shape[0] if aligned else ALIGNED_SIZE
    chain = [settings.method] + (settings.fallback if settings.on_leak == "fallback" else [])
    boxed = [box_reason(face, settings) for face in faces]
    # A face protected over its box from the start (narrower than min_synthesis_px, or with
    # landmarks that disagree with the detector's) is not described: dlib's descriptor of a
    # 20 px face is not evidence of anyone (a flat-filled one in a crowd measured 0.33 from
    # a neighbour's original). The box method is its protection. Every other face is
    # described, and measured at its box every round.
    originals = [None if reason else face_descriptor(rgb, face.landmarks) for face, reason in zip(faces, boxed)]
    # Over the box, a flat fill is the last resort when the policy allows fallbacks.
    box_chain = [settings.box_method] + (["mask"] if settings.box_method != "mask" and settings.on_leak == "fallback"
                                         else [])
    chains = [list(box_chain) if reason else chain for reason in boxed]
    step = [0] * len(faces)
    view = [0] * len(faces)
    withdrawn: list[str | None] = [None] * len(faces)   # why Stage IV was taken off a face
    escalated_for: list[list[str]] = [[] for _ in faces]   # per face: what each step past the first answered

    def edit(i: int) -> np.ndarray | None:
        """Face i edited with its chain's current method, skipping ``gan`` where nothing was
        rendered; None when the chain runs out or the face is protected over its box."""
        if boxed[i]:
            return None
        while step[i] < len(chains[i]):
            method = chains[i][step[i]]
            if method != "gan":
                return obfuscate(aligned[i].crop, method, settings.method_params.get(method))
            if i < len(rendered) and rendered[i] is not None:
                return rendered[i][view[i]]
            step[i] += 1
        step[i] = len(chains[i]) - 1
        return None

    edited = [edit(i) for i in range(len(faces))]
    discovery_rounds = 0
    stage_four_seconds = 0.0
    descriptor_cache: dict = {}             # faces whose pixels a round did not change are not described again
    # The verifier's own detector's faces in the original, found once: the check also
    # describes each face through them (stages.identity.check_identity_leaks).
    verifier_faces = (detect_faces(rgb, detector="hog", upsample=settings.upsample, max_side=settings.max_side)
                      if "hog" in settings.check_detectors else [])
    while True:
        unrenderable = [i for i, crop in enumerate(edited) if crop is None and not boxed[i]]
        if unrenderable:
            return AnonymizeResult("quarantined", f"face {unrenderable[0]} has no Stage II target attributes for "
                                   "the generator and the policy names no other method for it", None, fmt, suffix)
        synthesized = [chains[i][step[i]] == "gan" and not boxed[i] for i in range(len(faces))]
        inside = [i for i in range(len(faces)) if not boxed[i]]
        clean = compose_faces(rgb, [aligned[i] for i in inside], [edited[i] for i in inside],
                              settings.feather_fraction, [synthesized[i] for i in inside])
        for method in box_chain:   # over its enlarged box, each face with its chain's current method
            clean = obfuscate_boxes(clean, [faces[i].box for i in range(len(faces)) if boxed[i]
                                            and chains[i][step[i]] == method],
                                    method, settings.method_params.get(method), settings.box_margin)
        perturbed = [settings.perturbation is not None and flag and withdrawn[i] is None
                     for i, flag in enumerate(synthesized)]
        started = time.perf_counter()
        output = (apply_perturbation(clean, aligned, perturbed, settings.perturbation, settings.feather_fraction)
                  if any(perturbed) else clean)
        stage_four_seconds += time.perf_counter() - started
        encoded = encode_clean(output, fmt, settings.jpeg_quality)
        published = decode_bytes(encoded)
        def removed(box: tuple, output: np.ndarray = output) -> np.ndarray:
            """What would be published with the face at ``box`` filled flat over its enlarged
            box (as the chain's last step does), encoded and decoded the same way: for the
            face that already is, the very same pixels."""
            left, top, right, bottom = enlarged_box(box, settings.box_margin, output.shape)
            copy = output.copy()
            copy[top:bottom, left:right] = flat_fill(copy[top:bottom, left:right], settings.method_params.get("mask") or {})
            return decode_bytes(encode_clean(copy, fmt, settings.jpeg_quality))

        report = check_identity_leaks(published, rgb, faces, originals, settings.upsample, settings.max_side,
                                      settings.threshold, settings.tile_side, settings.check_detectors,
                                      descriptor_cache, settings.release_distance, removed, verifier_faces)
        leaking = report.leaking(settings.release_distance)
        result = AnonymizeResult(
            "released", None, encoded, fmt, suffix,
            face_methods=[chain[i] for chain, i in zip(chains, step)],
            face_methods_tried=[chain[: i + 1] for chain, i in zip(chains, step)],
            face_distances=report.distances,
            face_distances_at_box=report.at_box,
            face_membership_distances=report.membership,
            face_blank_distances=report.blank,
            face_verifiable=[original is not None for original in originals],
            face_status=["leaking" if i in leaking else "anonymized" for i in range(len(faces))],
            face_render_views=[view[i] if chains[i][step[i]] == "gan" else None for i in range(len(faces))],
            discovered=list(zip(faces[ingest_count:], aligned[ingest_count:])),
            face_perturbed=perturbed,
            face_perturbation_psnr=[None] * len(faces), face_profiler_fooled=[None] * len(faces),
            face_preserved_changed=[None] * len(faces),
            face_perturbation_withdrawn=[withdrawn[i] if synthesized[i] else None for i in range(len(faces))],
            perturbation_seconds=stage_four_seconds,
            face_box_reasons=list(boxed), detectors=report.detectors,
            face_escalated_for=[list(reasons) for reasons in escalated_for],
        )
        if report.unprocessed_faces:
            if discovery_rounds >= MAX_DISCOVERY_ROUNDS:
                result.status, result.encoded = "quarantined", None
                result.reason = (f"{len(report.unprocessed_faces)} face(s) still found in the output after "
                                 f"{discovery_rounds} rounds of processing missed faces; photo held back")
                return result
            discovery_rounds += 1
            for face in report.unprocessed_faces:
                # Same geometry as the original photo: align and describe the face there.
                align = align_face(rgb, face.landmarks, crop_size)
                reason = box_reason(face, settings)
                faces.append(face)
                aligned.append(align)
                boxed.append(reason)
                originals.append(None if reason else face_descriptor(rgb, face.landmarks))
                chains.append(list(box_chain) if reason else chain)
                step.append(0)
                view.append(0)
                withdrawn.append(None)
                escalated_for.append([])
                edited.append(edit(len(faces) - 1))
            continue
        back = [i for i, flag in enumerate(perturbed) if flag and (report.distances[i] == float("inf") or i in leaking)]
        if back:
            for i in back:
                withdrawn[i] = "lost" if report.distances[i] == float("inf") else "verifies"
            continue
        lost = [i for i, distance in enumerate(report.distances)
                if distance == float("inf") and chains[i][step[i]] == "gan"
                and view[i] < min(settings.rerender_views, len(rendered[i]) - 1)]
        if lost:
            for i in lost:
                view[i] += 1
                edited[i] = edit(i)
            continue
        if not leaking:
            if any(perturbed):
                started = time.perf_counter()
                chosen = [i for i, flag in enumerate(perturbed) if flag]
                effect = measure_effect(clean, output, published, [aligned[i] for i in chosen], settings.perturbation)
                for i, cost, fooled, changed in zip(chosen, effect.psnr_db, effect.fooled, effect.preserved_changed):
                    result.face_perturbation_psnr[i], result.face_profiler_fooled[i] = cost, fooled
                    result.face_preserved_changed[i] = changed
                result.perturbation_seconds += time.perf_counter() - started
            return result
        exhausted = [i for i in leaking if step[i] + 1 >= len(chains[i])]
        escalated = [i for i in exhausted if not boxed[i] and settings.on_leak == "fallback"]
        if escalated:
            # The whole chain left the face verifiable: what is left of it outside the
            # landmark mask (hair, outline, a small face's context) is what dlib still
            # recognises. Cover its enlarged box as well, and measure it again like any face.
            for i in escalated:
                boxed[i] = (f"still verified after {'/'.join(chains[i][: step[i] + 1])}: "
                            f"{verified_as(report, i, settings.release_distance)}, the release needs >= {settings.release_distance:.2f}")
                chains[i] = chains[i][: step[i] + 1] + box_chain
        stuck = [i for i in exhausted if i not in escalated]
        if stuck:
            result.status, result.encoded = "quarantined", None
            tried = "/".join(chains[stuck[0]][: step[stuck[0]] + 1])
            result.reason = (f"face {stuck[0]} still verifies after {tried} "
                             f"({verified_as(report, stuck[0], settings.release_distance)}, release needs >= {settings.release_distance:.2f})")
            return result
        for i in leaking:
            escalated_for[i].append(leak_kind(report, i, settings.release_distance))
            step[i] += 1
            edited[i] = edit(i)
