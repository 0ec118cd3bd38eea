"""Batch-level steps of a release, in plain Python (the Prefect flow wires these as tasks).

Each step takes and returns plain rows (dicts) of the photo table and the face table, and
passes pixels through the run's work folder: aligned crops in one ``.npz`` per batch,
anonymized photos as staged files. The work folder is private to the run and deleted at
its end; it is never inside the release folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from stages.common.anonymize import (
    AnonymizeResult,
    AnonymizeSettings,
    FaceStart,
    anonymize_photo,
    box_reason,
)
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
from stages.common.video import (
    VideoRejected,
    decode_video,
    encode_video,
    load_video,
    output_suffix,
)

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
    renders), every frame of a multi-frame file, or a video (staged whole or not at all).
    Returns the photo row and its face rows, with the faces the identity check found appended."""
    if row["status"] != "ingested":
        return row, faces
    started = time.perf_counter()
    video = "tracks" in row   # ingest's tracks (stages.common.ingest.ingest_video)
    multi_frame = (row.get("frames") or 1) > 1
    try:
        if video:
            image = load_video(source, max_pixels)
        else:
            image = load_frames(source, max_pixels) if multi_frame else load_rgb(source, max_pixels=max_pixels)
    except (ImageRejected, VideoRejected) as exc:  # vanished or damaged since ingest
        return row | {"status": "rejected", "reason": f"unreadable at anonymize: {exc}"}, faces
    if image.sha256 != row["input_sha256"]:
        return row | {"status": "quarantined", "reason": "file changed between ingest and anonymize; run again"}, faces
    try:
        if video:
            suffix = output_suffix(Path(row["image_id"]).suffix)
            faces, outcome = anonymize_video(row, faces, image.frames, image.fps, suffix, settings, rendered)
            outcome.update(output_format=suffix.lstrip(".").upper(), output_suffix=suffix)
        elif multi_frame:
            detected, aligned = faces_from_rows(faces, crops)
            faces, outcome = _anonymize_frames(row, faces, detected, aligned, image, settings, rendered)
        else:
            detected, aligned = faces_from_rows(faces, crops)
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


# A video's tracks agree on one protection each within this many passes over the frames
# whose outcome differs from their track's; past it the video is published with the frames
# as each was checked (every frame passed the check on its own) and the track is marked.
MAX_TRACK_ROUNDS = 6


def _track_faces_in_frames(tracks: list[dict], n_frames: int) -> list[list[tuple[int, DetectedFace]]]:
    """Per frame: (track index, the face as the track has it there) for every track present."""
    present: list[list[tuple[int, DetectedFace]]] = [[] for _ in range(n_frames)]
    for index, track in enumerate(tracks):
        for k, frame in enumerate(track["frames"]):
            error = track["landmark_errors"][k]
            present[frame].append((index, DetectedFace(
                box=tuple(track["boxes"][k]), score=track["scores"][k], detector=track["detectors"][k],
                landmarks=np.asarray(track["landmarks"][k], dtype=np.float64).reshape(68, 2),
                landmark_error=None if error is None or error != error else float(error))))
    return present


def anonymize_video(row: dict, track_rows: list[dict], frames: list[np.ndarray], fps: float, suffix: str,
                    settings: AnonymizeSettings, rendered: list[FaceRenders | None]) -> tuple[list[dict], dict]:
    """Every frame of a video de-identified and checked like a photo (as lossless PNG), with
    one decision per track (:class:`_TrackedFrames`). The frames are written losslessly and
    the file is released only if it decodes to exactly the frames judged. Returns the face
    rows (each track's face in every frame it shows in, and the faces the check found) and
    the video's outcome."""
    if not row["tracks"] and settings.on_no_face == "quarantine":
        return track_rows, {"status": "quarantined", "reason": "no face found in any frame and the policy "
                            "quarantines such photos", "encoded": None, "perturbation_seconds": 0.0}
    video = _TrackedFrames(row, frames, settings, rendered)
    held = video.check_frames()
    outcome = {"perturbation_seconds": sum(r.perturbation_seconds for r in video.results.values()),
               "video_rounds": video.rounds}
    if held is not None:
        faces = video.face_rows(track_rows, {})
        return faces, outcome | {"status": "quarantined", "encoded": None,
                                 "reason": f"frame {held + 1} of {len(frames)}: {video.results[held].reason}"}
    judged = [decode_bytes(video.results[t].encoded) for t in range(len(frames))]
    encoded = encode_video(judged, fps, suffix)
    written, written_fps = decode_video(encoded, suffix)
    outcome |= {"status": "released", "reason": None, "encoded": encoded,
                "check_detectors": "+".join(video.results[0].detectors)}
    if (len(written) != len(judged) or abs(written_fps - fps) > 1e-3
            or not all(np.array_equal(a, b) for a, b in zip(written, judged))):
        outcome.update(status="quarantined", encoded=None,
                       reason="the video written does not decode to the frames the check judged")
    faces = video.face_rows(track_rows, {track: False for track in video.off_decision()})
    if outcome["status"] != "released":
        faces = [face | {"status": "quarantined"} for face in faces]
    return faces, outcome


class _TrackedFrames:
    """A video's frames with its tracks' faces in them, through the photo loop with one
    decision per track: each track's face is rendered in every frame from that frame's crop
    with the track's Stage II targets and identity-code seed (one new person through the
    video), and a track that one frame had to escalate (another draw, the next method, its
    box covered) takes that step in all its frames: the frames after it start there and the
    earlier ones are checked again (a pass over them: ``rounds``)."""

    def __init__(self, row: dict, frames: list[np.ndarray], settings: AnonymizeSettings,
                 rendered: list[FaceRenders | None]):
        self.row, self.frames, self.settings, self.rendered = row, frames, settings, rendered
        # A frame without a face is one moment of the video, not a photo without one: the
        # policy's on_no_face applies to the video as a whole (anonymize_video).
        self.lossless = dataclasses.replace(settings, output_format="png", on_no_face="release")
        self.present = _track_faces_in_frames(row["tracks"], len(frames))
        self.aligned = [[align_face(frame, face.landmarks) for _, face in faces]
                        for frame, faces in zip(frames, self.present)]
        self.renders: dict[int, list] = {}
        self.decisions: dict[int, FaceStart] = {}
        self.taken: dict[tuple[int, int], FaceStart] = {}   # (frame, track): where that frame left it
        self.results: dict[int, AnonymizeResult] = {}
        self.rounds = 0
        # Frames go to the release's photo processes when this video is done in the flow's own
        # process (a batch of one item); inside a photo process they are done in turn.
        self.workers = settings.workers if multiprocessing.parent_process() is None else 1

    def frame_renders(self, t: int) -> list:
        """Stage III's draws of each track's face in frame ``t`` (None: not rendered)."""
        if t not in self.renders:
            from stages.synthesis.render import cached_synthesizer

            tracks = [track for track, _ in self.present[t]]
            self.renders[t] = [None] * len(tracks)
            wanted = [i for i, track in enumerate(tracks) if self.rendered[track] is not None]
            if wanted:
                sources = [self.rendered[tracks[i]] for i in wanted]
                drawn = cached_synthesizer(sources[0].folder).renders(
                    np.stack([self.aligned[t][i].crop for i in wanted]), np.stack([r.target for r in sources]),
                    self.settings.synthesis_batch, seeds=[r.seed for r in sources])
                for i, face_renders in zip(wanted, drawn):
                    self.renders[t][i] = face_renders
        return self.renders[t]

    def check_frames(self) -> int | None:
        """Pass over the frames until every track has one decision (at most MAX_TRACK_ROUNDS
        passes); returns the first frame held back (None: every frame passed)."""
        pending, chunk = set(range(len(self.frames))), max(1, 4 * self.workers)
        # A bar per video on a terminal (tqdm leaves it off elsewhere): a long video takes minutes.
        bar = tqdm(total=len(self.frames), desc=self.row["image_id"], unit="frame", leave=False, disable=None)
        try:
            while pending and self.rounds < MAX_TRACK_ROUNDS:
                self.rounds += 1
                if self.rounds > 1:
                    bar.reset(total=len(pending))
                    bar.set_description(f"{self.row['image_id']} (pass {self.rounds}: tracks that escalated)")
                order = sorted(pending)
                for first in range(0, len(order), chunk):
                    held = self._check(order[first:first + chunk], bar)
                    if held is not None:
                        return held
                pending = {t for (t, track), start in self.taken.items() if start != self.decisions[track]}
        finally:
            bar.close()
        return None

    def _check(self, ts: list[int], bar) -> int | None:
        arguments = [(self.frames[t], "PNG", [face for _, face in self.present[t]], self.aligned[t], self.lossless,
                      self.frame_renders(t), [self.decisions.get(track) for track, _ in self.present[t]])
                     for t in ts]
        for t, result in zip(ts, map_in_processes(anonymize_photo, arguments, self.workers)):
            self.results[t] = result
            bar.update()
        held = next((t for t in ts if self.results[t].status != "released"), None)
        if held is None:
            self._take(ts)
        return held

    def _take(self, ts: list[int]) -> None:
        """Where frames ``ts`` left each track; a track goes as far as its furthest frame."""
        for t in ts:
            for (track, face), outcome in zip(self.present[t], self.results[t].faces):
                if box_reason(face, self.settings) is None:   # not protected over its box by its size
                    start = self.taken[t, track] = FaceStart.of(outcome)
                    if track not in self.decisions or start.order() > self.decisions[track].order():
                        self.decisions[track] = start

    def off_decision(self) -> set[int]:
        """Tracks with frames that kept their own outcome (the passes ran out)."""
        return {track for (t, track), start in self.taken.items() if start != self.decisions[track]}

    def face_rows(self, track_rows: list[dict], consistent: dict[int, bool]) -> list[dict]:
        return _video_faces(self.row, track_rows, self.present, self.aligned, self.results, consistent)


def _video_faces(row: dict, track_rows: list[dict], present: list, aligned: list, results: dict,
                 consistent: dict[int, bool]) -> list[dict]:
    """Face rows of a video: per track, its ingest row for the frame it was chosen from and a
    row for each other frame it shows in (``track``, ``frame``), then the faces each frame's
    check found; each with what that frame's de-identification did to it."""
    out: list[dict] = []
    extra: list[dict] = []
    for t in sorted(results):
        result = results[t]
        frame_rows = []
        for i, (track, face) in enumerate(present[t]):
            base = track_rows[track]
            if t == row["tracks"][track]["representative"]:
                frame_rows.append(dict(base) | {"frame": t, "track": track,
                                                "track_frames": len(row["tracks"][track]["frames"]),
                                                "track_consistent": consistent.get(track, True)})
            else:
                frame_rows.append(face_row(row["image_id"], -1, face, aligned[t][i], row["width"], row["height"],
                                           "track" if face.detector == "track" else "frame")
                                  | {"frame": t, "track": track, "status": "detected"}
                                  | {key: base.get(key) for key in ("target_attributes", "changed_attributes")})
        recorded = _record_faces(row, frame_rows, result, t, 0)
        for face in recorded:
            (out if face.get("track") is not None else extra).append(face)
    ordered = sorted(out, key=lambda face: (face["found_by"] != "ingest", face["track"], face["frame"]))
    for index, face in enumerate(ordered + extra):
        face["face_index"] = index
    return ordered + extra


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
