"""Batch-level steps of a release, in plain Python (the Prefect flow wires these as tasks).

Each step takes and returns plain rows (dicts) of the photo table and the face table, and
passes pixels through the run's work folder: aligned crops in one ``.npz`` per batch,
anonymized photos as staged files. The work folder is private to the run and deleted at
its end; it is never inside the release folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.common.anonymize import AnonymizeSettings, anonymize_photo
from stages.common.faces import (
    ALIGNED_SIZE,
    AlignedFace,
    DetectedFace,
    align_face,
    apply_affine,
    detect_faces,
    invert_affine,
)
from stages.common.facetable import load_crops
from stages.common.imageio import (
    Frames,
    ImageRejected,
    decode_bytes,
    decode_frames,
    encode_frames,
    load_frames,
    load_rgb,
    multi_frame_format_for,
)
from stages.common.ingest import InputPhoto, failure_text, ingest_photo
from stages.common.obfuscate import box_protection_reason
from stages.common.parallel import map_in_processes

if TYPE_CHECKING:  # the generator (torch) is imported only by releases that use it
    from stages.synthesis.render import FaceRenders


@dataclass(frozen=True)
class IngestSettings:
    detector: str = "hog"
    upsample: int = 1
    max_side: int = 1600
    cnn_max_side: int = 800
    threshold: float = 0.5
    tile_side: int = 1024
    max_pixels: int = 40_000_000
    multi_frame: str = "deidentify"        # or "reject": multi-frame files are rejected
    aligned_size: int = ALIGNED_SIZE
    workers: int = 1                       # processes across the batch's photos (stages.common.parallel)

    def detection(self) -> dict:
        """:func:`stages.common.faces.detect_faces`'s keyword arguments."""
        return {"detector": self.detector, "upsample": self.upsample, "max_side": self.max_side,
                "cnn_max_side": self.cnn_max_side, "threshold": self.threshold, "tile_side": self.tile_side}


def ingest_batch(photos: list[InputPhoto], settings: IngestSettings, crops_file: Path) -> tuple[list[dict], list[dict]]:
    """Load, detect and align a batch (its photos across ``settings.workers`` processes).
    Aligned crops go to ``crops_file``; every photo gets a row (status ``ingested`` or
    ``rejected``)."""
    photo_rows, face_rows, crops = [], [], []
    ingested = map_in_processes(_ingest_one, [(photo, settings) for photo in photos], settings.workers)
    for photo, (row, faces, aligned) in zip(photos, ingested):
        for index, (face, align) in enumerate(zip(faces, aligned)):
            face_rows.append(face_row(photo.image_id, index, face, align, row["width"], row["height"], "ingest")
                             | {"crop_file": str(crops_file), "crop_row": len(crops), "status": "detected"})
            crops.append(align.crop)
        photo_rows.append(row)
    size = settings.aligned_size
    crops_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(crops_file, crops=np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8))
    return photo_rows, face_rows


def _ingest_one(photo: InputPhoto, settings: IngestSettings):
    started = time.perf_counter()
    try:
        row, faces, aligned = ingest_photo(photo, settings.detection(), settings.max_pixels, settings.aligned_size,
                                           settings.multi_frame)
    except Exception as exc:  # noqa: BLE001 - one photo's failure is its own outcome, never the batch's
        row, faces, aligned = {"image_id": photo.image_id, "status": "quarantined",
                               "reason": f"could not be ingested, so nothing was published: {failure_text(exc)}"}, [], []
    if row["status"] is None:
        row["status"] = "ingested"
    row["seconds"] = time.perf_counter() - started
    return row, faces, aligned


def load_photo_models(perturbation: bool) -> None:
    """Load what detecting, aligning and checking a photo needs (a photo worker's warm-up):
    CenterFace, dlib's detector, landmarks and verifier, and Stage IV's profiler."""
    from stages.common.centerface import _session
    from stages.common.faces import (
        _face_detector,
        _landmark_predictor,
        descriptor_network,
    )

    _session()
    _face_detector("hog")
    _landmark_predictor()
    descriptor_network()
    if perturbation:
        from stages.attributes.predict import default_network

        default_network()


def face_row(image_id: str, index: int, face: DetectedFace, align: AlignedFace, width: int, height: int,
             found_by: str) -> dict:
    left, top, right, bottom = face.box
    return {
        "image_id": image_id, "face_index": index, "found_by": found_by, "detector": face.detector,
        # dlib boxes may reach past the border for faces cut by it; store the visible part.
        "box_left": float(np.clip(left, 0, width)), "box_top": float(np.clip(top, 0, height)),
        "box_right": float(np.clip(right, 0, width)), "box_bottom": float(np.clip(bottom, 0, height)),
        "detector_score": face.score,
        "landmark_error": face.landmark_error,
        "landmarks": face.landmarks.reshape(-1).tolist(),
        "align_matrix": align.matrix.reshape(-1).tolist(),
    }


def _landmark_error(row: dict) -> float | None:
    """A face row's ``landmark_error`` (None: the detector gave no points; NaN once in pandas)."""
    error = row.get("landmark_error")
    return None if error is None or error != error else float(error)


def faces_from_rows(face_rows: list[dict], crops: list[np.ndarray]) -> tuple[list[DetectedFace], list[AlignedFace]]:
    """Rebuild detection and alignment objects from face-table rows and their aligned crops."""
    detected, aligned = [], []
    for row, crop in zip(face_rows, crops, strict=True):
        landmarks = np.asarray(row["landmarks"], dtype=np.float64).reshape(68, 2)
        matrix = np.asarray(row["align_matrix"], dtype=np.float64).reshape(2, 3)
        detected.append(DetectedFace(box=(row["box_left"], row["box_top"], row["box_right"], row["box_bottom"]),
                                     score=row["detector_score"], landmarks=landmarks, detector=row["detector"],
                                     landmark_error=_landmark_error(row)))
        aligned.append(AlignedFace(crop=crop, matrix=matrix, inverse=invert_affine(matrix),
                                   landmarks=apply_affine(matrix, landmarks)))
    return detected, aligned


def anonymize_batch(photo_rows: list[dict], face_rows: list[dict], sources: dict[str, Path],
                    settings: AnonymizeSettings, max_pixels: int, staging_dir: Path) -> tuple[list[dict], list[dict]]:
    """Anonymize every ingested photo of a batch; released candidates are staged as files in
    ``staging_dir`` (``staged_file`` in the row), never in the release folder."""
    staging_dir.mkdir(parents=True, exist_ok=True)
    faces_by_image: dict[str, list[dict]] = {}
    for face in face_rows:
        faces_by_image.setdefault(face["image_id"], []).append(dict(face))
    # The batch's crops are read once, for Stage III and for every photo's compose.
    crops = {(row["image_id"], row["face_index"]): crop for row, crop in zip(face_rows, load_crops(face_rows))}
    rendered = render_faces(face_rows, crops, settings) if settings.uses_generator else {}
    work = []
    for row in photo_rows:
        faces = sorted(faces_by_image.get(row["image_id"], []), key=lambda f: f["face_index"])
        keys = [(row["image_id"], face["face_index"]) for face in faces]
        work.append((dict(row), faces, sources.get(row["image_id"]), settings, max_pixels, staging_dir,
                     [crops[key] for key in keys], [rendered.get(key) for key in keys]))
    out_photos, out_faces = [], []
    for photo, faces in map_in_processes(_anonymize_one, work, settings.workers):
        out_photos.append(photo)
        out_faces.extend(faces)
    return out_photos, out_faces


def render_faces(face_rows: list[dict], crops: dict[tuple[str, int], np.ndarray],
                 settings: AnonymizeSettings) -> dict[tuple[str, int], FaceRenders]:
    """Stage III for a batch: every face with Stage II targets that is aligned (not protected
    over its box: too small or turned to synthesize) synthesized in one batched pass of the
    generator (its further views on demand), keyed by (image_id, face_index)."""
    from stages.synthesis.render import cached_synthesizer

    chosen = [row for row in face_rows if row.get("target_attributes") is not None
              and box_protection_reason(row["box_right"] - row["box_left"], _landmark_error(row),
                                        settings.min_synthesis_px, settings.max_landmark_error) is None]
    if not chosen:
        return {}
    wanted = [(row["image_id"], row["face_index"]) for row in chosen]
    targets = np.array([row["target_attributes"] for row in chosen], dtype=np.float32)
    synthesized = cached_synthesizer().renders(np.stack([crops[key] for key in wanted]), targets,
                                               settings.synthesis_batch)
    return dict(zip(wanted, synthesized))


def _anonymize_one(row: dict, faces: list[dict], source: Path | None, settings: AnonymizeSettings,
                   max_pixels: int, staging_dir: Path, crops: list[np.ndarray],
                   rendered: list[FaceRenders | None]) -> tuple[dict, list[dict]]:
    """Anonymize one photo (``crops`` and ``rendered``: its faces' aligned crops and Stage III
    renders), every frame of a multi-frame file. Returns the photo row and its face rows,
    with the faces the identity check found appended."""
    if row["status"] != "ingested":
        return row, faces
    started = time.perf_counter()
    multi_frame = (row.get("frames") or 1) > 1
    try:
        image = load_frames(source, max_pixels) if multi_frame else load_rgb(source, max_pixels=max_pixels)
    except ImageRejected as exc:  # vanished or damaged since ingest
        return row | {"status": "rejected", "reason": f"unreadable at anonymize: {exc}"}, faces
    if image.sha256 != row["input_sha256"]:
        return row | {"status": "quarantined", "reason": "file changed between ingest and anonymize; run again"}, faces
    detected, aligned = faces_from_rows(faces, crops)
    try:
        if multi_frame:
            faces, outcome = _anonymize_frames(row, faces, detected, aligned, image, settings, rendered)
        else:
            result = anonymize_photo(image.rgb, image.source_format, detected, aligned, settings, rendered)
            faces = _record_faces(row, faces, result, None)
            outcome = {"status": result.status, "reason": result.reason, "output_format": result.output_format,
                       "output_suffix": result.suffix, "perturbation_seconds": result.perturbation_seconds,
                       "check_detectors": "+".join(result.detectors), "encoded": result.encoded}
    except Exception as exc:  # noqa: BLE001 - one photo's failure is its own outcome, never the batch's
        why = f"de-identification failed, so nothing was published: {failure_text(exc)}"
        return (row | {"status": "quarantined", "reason": why, "seconds": row.get("seconds", 0.0)
                       + time.perf_counter() - started}, [face | {"status": "quarantined"} for face in faces])
    encoded = outcome.pop("encoded")
    row.update(outcome, n_faces=len(faces))
    if encoded is not None:
        staged = staging_dir / (hashlib.sha256(row["image_id"].encode()).hexdigest()[:24] + ".bin")
        staged.write_bytes(encoded)
        row["staged_file"] = str(staged)
    row["seconds"] = row.get("seconds", 0.0) + time.perf_counter() - started
    return row, faces


def _record_faces(row: dict, faces: list[dict], result, frame: int | None, first_index: int = 0) -> list[dict]:
    """``faces`` (one frame's face rows) updated with what :func:`anonymize_photo` did to each,
    and the faces its check found appended (numbered on from ``first_index + len(faces)``)."""
    faces = list(faces)
    for extra, extra_aligned in result.discovered:
        faces.append(face_row(row["image_id"], first_index + len(faces), extra, extra_aligned, row["width"],
                              row["height"], "identity-check") | {"frame": frame})
    for face, outcome in zip(faces, result.faces):
        face.update(method=outcome.method, methods_tried=outcome.methods_tried, leak_distance=outcome.distance,
                    leak_distance_at_box=outcome.distance_at_box, membership_distance=outcome.membership_distance,
                    render_view=None if outcome.render_draw is None else outcome.renders.view_name(outcome.render_draw),
                    identity_code_seed=None if outcome.render_draw is None else outcome.renders.code_seed(
                        outcome.render_draw),
                    redrawn_for=list(outcome.redrawn_for), screened_out=outcome.screened_out,
                    perturbed=outcome.perturbed, perturbation_psnr_db=outcome.perturbation_psnr,
                    profiler_fooled=outcome.profiler_fooled, preserved_changed=outcome.preserved_changed,
                    perturbation_withdrawn=outcome.perturbation_withdrawn,
                    protected_over="box" if outcome.boxed else "mask", box_reason=outcome.box_reason,
                    status=outcome.status if result.status == "released" else "quarantined",
                    escalated_for=list(outcome.escalated_for), blank_distance=outcome.blank_distance,
                    sface_similarity=outcome.sface_similarity, sface_blank_similarity=outcome.sface_blank_similarity,
                    verifiable=outcome.verifiable)
    return faces


def _collapse_repeats(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Frames with consecutive identical ones merged (animated PNG and WebP store them once,
    adding up their display times)."""
    kept: list[np.ndarray] = []
    for frame in frames:
        if not kept or not np.array_equal(kept[-1], frame):
            kept.append(frame)
    return kept


def _anonymize_frames(row: dict, faces: list[dict], detected: list[DetectedFace], aligned: list[AlignedFace],
                      frames: Frames, settings: AnonymizeSettings,
                      rendered: list[FaceRenders | None]) -> tuple[list[dict], dict]:
    """Every frame of a multi-frame file de-identified and checked like a photo of its own:
    the first with ingest's faces (Stage II targets and III renders), each further frame with
    the faces the ingest detector finds in it, which have no Stage II targets (a person in
    many frames would otherwise spend epsilon once per frame), so the policy's first method
    other than ``gan`` protects them. Frames are checked as lossless PNG and published in a
    lossless multi-frame container with their timing; the file is held back when any frame is."""
    lossless = dataclasses.replace(settings, output_format="png")
    fmt, suffix = multi_frame_format_for(frames.source_format)
    all_faces, checked, results = [], [], []
    for index, rgb in enumerate(frames.rgb):
        if index == 0:
            frame_faces = [face | {"frame": 0} for face in faces]
            result = anonymize_photo(rgb, "PNG", detected, aligned, lossless, rendered)
        else:
            found = detect_faces(rgb, **settings.frame_detection)
            frame_aligned = [align_face(rgb, face.landmarks) for face in found]
            frame_faces = [face_row(row["image_id"], len(all_faces) + i, face, align, row["width"], row["height"],
                                    "frame") | {"frame": index, "status": "detected"}
                           for i, (face, align) in enumerate(zip(found, frame_aligned))]
            result = anonymize_photo(rgb, "PNG", found, frame_aligned, lossless, None)
        all_faces += _record_faces(row, frame_faces, result, index, len(all_faces))
        results.append(result)
        if result.status != "released":
            for face in all_faces:
                face["status"] = "quarantined"
            return all_faces, {"status": "quarantined", "reason": f"frame {index + 1} of {len(frames.rgb)}: "
                               f"{result.reason}", "output_format": fmt, "output_suffix": suffix, "encoded": None,
                               "perturbation_seconds": sum(r.perturbation_seconds for r in results)}
        checked.append(decode_bytes(result.encoded))
    encoded = encode_frames(checked, frames.durations_ms, frames.loop, fmt)
    outcome = {"status": "released", "reason": None, "output_format": fmt, "output_suffix": suffix,
               "encoded": encoded, "perturbation_seconds": sum(r.perturbation_seconds for r in results),
               "check_detectors": "+".join(results[0].detectors)}
    written, judged = _collapse_repeats(decode_frames(encoded)), _collapse_repeats(checked)
    if len(written) != len(judged) or not all(np.array_equal(a, b) for a, b in zip(written, judged)):
        outcome.update(status="quarantined", encoded=None,
                       reason="the multi-frame file written does not decode to the frames the check judged")
        for face in all_faces:
            face["status"] = "quarantined"
    return all_faces, outcome
