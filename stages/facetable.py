"""The face table: the one contract between stages.

One row per detected face, keyed by ``(image_id, face_index)``; rows travel between tasks
as dicts. Each stage adds columns; :data:`FACE_SCHEMA` lists them all with their Arrow
types, and lineage stores the rows under it (``flows.lineage.FACE_LINEAGE_SCHEMA``).
Pixel data never lives here: aligned crops sit in the run's work folder, referenced by
``crop_file`` and ``crop_row``. Face descriptors (biometric templates) are never stored.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from stages.attribute_names import ATTRIBUTES

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
    pa.field("found_by", pa.string()),          # "ingest", or "identity-check" for a face ingest missed
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
    pa.field("leak_distance", pa.float64()),
    # Stage III: the view of the crop the published rendering was drawn from (RENDER_VIEWS:
    # "aligned" unless the verifier lost the first rendering); null when not rendered.
    pa.field("render_view", pa.string()),
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
    # obfuscated and verified) or "box" (the detection box, enlarged: a face too small, turned
    # or covered to align; not verifiable, so never synthesized), and why it was a box.
    pa.field("protected_over", pa.string()),
    pa.field("box_reason", pa.string()),
    pa.field("status", pa.string()),
])

# Columns only meaningful inside a run (they point into the deleted work folder).
WORK_ONLY_COLUMNS = ("crop_file", "crop_row")



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
