"""The face table: the one contract between stages.

One row per detected face, keyed by ``(image_id, face_index)``; rows travel between tasks
as dicts. Each stage adds columns; :data:`FACE_SCHEMA` lists them all with their Arrow
types, and lineage stores the rows under it (``flows.release.lineage.FACE_LINEAGE_SCHEMA``).
Pixel data never lives here: aligned crops sit in the run's work folder, referenced by
``crop_file`` and ``crop_row``. Face descriptors (biometric templates) are never stored.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from stages.attributes.names import ATTRIBUTES
from stages.common.sface import SFACE_RELEASE

# Stage I: P(attribute) per face from the forests, one column per CelebA attribute.
ATTRIBUTE_COLUMNS = tuple(f"attr_{name}" for name in ATTRIBUTES)

FACE_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("face_index", pa.int32(), nullable=False),
    # Ingest: detection box (photo pixels), detector score, 68 landmarks (x0, y0, x1, y1, ...),
    # and the 2x3 photo -> aligned-crop similarity transform (row-major).
    pa.field("box_left", pa.float64()), pa.field("box_top", pa.float64()),
    pa.field("box_right", pa.float64()), pa.field("box_bottom", pa.float64()),
    pa.field("detector_score", pa.float64()),
    pa.field("found_by", pa.string()),          # "ingest", "identity-check" (a face ingest missed), "frame" (a further frame) or "track" (a video's track covered across a detector's gap)
    pa.field("frame", pa.int32()),              # frame of a multi-frame file or video (0: first; null: a photo)
    # A video's faces: which track (one person through the video; its ingest row is its face in
    # the frame Stage I and II saw), and on that row how many frames it shows in and whether all
    # of them took the track's one decision (False: some frames kept their own, each checked).
    pa.field("track", pa.int32()),
    pa.field("track_frames", pa.int32()),
    pa.field("track_consistent", pa.bool_()),
    pa.field("detector", pa.string()),          # which detector found it: centerface | hog | cnn
    # Mean distance of dlib's fitted landmarks from the detector's own five points, over the
    # box width (CenterFace faces; null for dlib's detectors, which give no points).
    pa.field("landmark_error", pa.float64()),
    pa.field("landmarks", pa.list_(pa.float64(), 136)),
    pa.field("align_matrix", pa.list_(pa.float64(), 6)),
    pa.field("crop_file", pa.string()),
    pa.field("crop_row", pa.int32()),
    # Stage I: the 40 attribute probabilities (null for faces found only by the identity check).
    *[pa.field(column, pa.float32()) for column in ATTRIBUTE_COLUMNS],
    # Stage II (PPAS): the 40 target attributes Stage III renders (ATTRIBUTES order), the
    # obfuscated ones whose target differs from the prediction, and the epsilon this face spent.
    pa.field("target_attributes", pa.list_(pa.bool_(), len(ATTRIBUTES))),
    pa.field("changed_attributes", pa.list_(pa.string())),
    pa.field("epsilon_spent", pa.float64()),
    # Anonymize: method finally used, every method tried in order, and the identity check.
    pa.field("method", pa.string()),
    pa.field("methods_tried", pa.list_(pa.string())),
    # The verifier's distances of the published face: to its original where a check detector
    # found it again (inf: not found again), described at its original box (always measured),
    # and to the nearest OTHER original face of its photo when that is within the release
    # distance and closer than with the face removed (inf: none is).
    pa.field("leak_distance", pa.float64()),
    pa.field("leak_distance_at_box", pa.float64()),
    pa.field("membership_distance", pa.float64()),
    # The closest of those measurements taken again with the face's enlarged box filled flat
    # (inf: not needed, nothing was close): a distance is evidence of identity only when it
    # is smaller (stages.common.identity.LeakReport.blank).
    pa.field("blank_distance", pa.float64()),
    # The second verifier, SFace: the highest cosine similarity of what the output shows of
    # the face to its original, and the same with its enlarged box filled flat (-inf: not
    # measured / not needed). It verifies at or above SFace's threshold when above the blank
    # one (stages.common.identity.LeakReport.sface).
    pa.field("sface_similarity", pa.float64()),
    pa.field("sface_blank_similarity", pa.float64()),
    # Whether the verifier describes the face: false for one protected over its box from the
    # start (too small or turned for dlib's descriptor to mean anything); its box is its
    # protection, and it has no distances.
    pa.field("verifiable", pa.bool_()),
    # Why each fallback step was taken: "found again", "at box", "membership" or "sface".
    pa.field("escalated_for", pa.list_(pa.string())),
    # Stage III: the view of the crop the published rendering was drawn from (RENDER_VIEWS:
    # "aligned" unless the verifier lost the first drawings); null when not rendered.
    pa.field("render_view", pa.string()),
    # The seed of the identity code the published face was drawn with (a v2 generator: a new
    # person per code; torch.randn(code_size) from this seed reproduces it); null when not
    # rendered or the generator has no codes.
    pa.field("identity_code_seed", pa.int64()),
    # Why each further draw was made: "lost" (the verifier's detector did not find the face)
    # or what still verified ("found again", "at box", "membership", "sface").
    pa.field("redrawn_for", pa.list_(pa.string())),
    # How many of those draws and fallback steps the screen took (the edit tried alone in the
    # original photo verified at the face's own landmarks; stages.common.anonymize's
    # PhotoEscalation.screen) rather than a check of the whole published photo.
    pa.field("screened_out", pa.int64()),
    # Stage IV: whether the universal perturbation was added (synthesized faces, when the
    # policy enables it); for released ones, the face region's PSNR against the photo without
    # it, whether the white-box profiler's verdict on the published face changed, and which
    # preserved attributes' verdicts it changed (should be none).
    pa.field("perturbed", pa.bool_()),
    pa.field("perturbation_psnr_db", pa.float64()),
    pa.field("profiler_fooled", pa.bool_()),
    pa.field("preserved_changed", pa.list_(pa.string())),
    # Why it was taken off a synthesized face: "lost" (the verifier's detector no longer found
    # the face with it) or "verifies" (with it the face came within the release distance of
    # its original); null when the face kept it or was not synthesized.
    pa.field("perturbation_withdrawn", pa.string()),
    # Where the method was applied: "mask" (the aligned face's landmark mask: synthesized or
    # obfuscated) or "box" (the detection box, enlarged: a face too small, turned or covered
    # to align, so never synthesized, or one still verified after the whole chain), and why.
    pa.field("protected_over", pa.string()),
    pa.field("box_reason", pa.string()),
    pa.field("status", pa.string()),
])

# Columns only meaningful inside a run (they point into the deleted work folder).
WORK_ONLY_COLUMNS = ("crop_file", "crop_row")


def _distance(row: dict, column: str) -> float:
    """A face row's distance in ``column``; missing (None, NaN) reads as inf: not measured."""
    value = row.get(column)
    return float("inf") if value is None or value != value else float(value)


def measured_at_box(row: dict) -> bool:
    """Whether the verifier measured the face at its original box (a finite distance)."""
    return _distance(row, "leak_distance_at_box") < float("inf")


def sface_verifies(row: dict, sface_release: float = SFACE_RELEASE) -> bool:
    """Whether SFace calls a face row its own original: at or above ``sface_release`` and
    above the same measurement with the face removed (missing: not measured, False; the
    publish gate requires the measurement of every described face)."""
    similarity, blank = (row.get(column) for column in ("sface_similarity", "sface_blank_similarity"))
    if similarity is None or similarity != similarity:
        return False
    return similarity >= sface_release and (blank is None or blank != blank or similarity > blank)


def leaks(row: dict, threshold: float, sface_release: float = SFACE_RELEASE) -> bool:
    """A published face row that verifies, or that the verifier should have measured and did
    not: closer than ``threshold`` to its original (found again or at its box) and closer to
    it than with the face removed, or closer than ``threshold`` to another original face of
    its photo (``membership_distance`` holds only such evidence), or SFace's verdict
    (:func:`sface_verifies`). A face that is not ``verifiable`` must be protected over its
    box instead."""
    if row.get("verifiable") is False or row.get("verifiable") == 0:
        return row.get("protected_over") != "box"
    if not measured_at_box(row):
        return True
    own = min(_distance(row, "leak_distance"), _distance(row, "leak_distance_at_box"))
    return (own < min(threshold, _distance(row, "blank_distance")) or _distance(row, "membership_distance") < threshold
            or sface_verifies(row, sface_release))


def load_crops(face_rows: list[dict]) -> list[np.ndarray]:
    """The aligned crop of each face row, from the run's work folder (``crop_file``,
    ``crop_row``); each crops file is read once."""
    files: dict[str, np.ndarray] = {}
    crops = []
    for row in face_rows:
        if row["crop_file"] not in files:
            with np.load(row["crop_file"]) as stored:
                files[row["crop_file"]] = stored["crops"]
        crops.append(files[row["crop_file"]][row["crop_row"]])
    return crops
