"""Recall and precision of face detectors against hand-checked boxes.

The boxes are ``tests/data/face_annotations.csv`` (how they were drawn:
``tests/data/face_annotations.md``), over photos below ``../shared/data/wild``. A detection
finds an annotated face when most of the smaller of the two boxes lies inside the other
(:func:`stages.common.faces.box_overlap` >= ``MATCH_OVERLAP``) and their widths are within a factor
of ``MATCH_SCALE``: detectors frame faces differently (dlib's HOG box is forehead-less, a
CenterFace box of a very large face may hold only eyes to mouth), and what matters for
protection is that the face is found. Matching is one to one, best score first.

Recall is per size bucket of the annotated width; precision counts detections at least
``PRECISION_MIN_PX`` wide (every face that wide is annotated, so an unmatched detection is
a false alarm unless it matches a smaller annotated face).
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from stages.common.faces import DetectedFace, box_overlap, detect_faces
from stages.common.imageio import load_rgb

ANNOTATIONS = Path(__file__).resolve().parents[2] / "tests" / "data" / "face_annotations.csv"
MATCH_OVERLAP = 0.5
MATCH_SCALE = 3.0
PRECISION_MIN_PX = 16
SIZE_BUCKETS = ((10, 16), (16, 24), (24, 32), (32, 64), (64, 100_000))
# Detectors compared by default: name -> detect_faces keyword arguments.
DETECTORS = {
    "centerface@0.2 (default)": {"detector": "centerface", "threshold": 0.2},
    "centerface@0.3": {"detector": "centerface", "threshold": 0.3},
    "centerface@0.5": {"detector": "centerface", "threshold": 0.5},
    "hog": {"detector": "hog", "upsample": 1},
    "cnn": {"detector": "cnn", "upsample": 0, "max_side": 1024},
    "centerface@0.2+hog": {"detector": "centerface+hog", "threshold": 0.2, "upsample": 1},
}


def read_annotations(path: str | Path = ANNOTATIONS) -> pd.DataFrame:
    return pd.read_csv(path)


def _bucket(width: float) -> str:
    for low, high in SIZE_BUCKETS:
        if low <= width < high:
            return f"{low}-{high}" if high < 100_000 else f">={low}"
    return f"<{SIZE_BUCKETS[0][0]}"


def match(annotated: list[tuple], found: list[DetectedFace]) -> list[int | None]:
    """For each annotated box, the index of the detection that finds it (None: missed)."""
    taken: set[int] = set()
    result: list[int | None] = [None] * len(annotated)
    for index in sorted(range(len(found)), key=lambda i: -found[i].score):
        box = found[index].box
        width = box[2] - box[0]
        best, best_overlap = None, MATCH_OVERLAP
        for j, truth in enumerate(annotated):
            if result[j] is not None:
                continue
            ratio = width / max(truth[2] - truth[0], 1e-9)
            overlap = box_overlap(box, truth)
            if 1 / MATCH_SCALE <= ratio <= MATCH_SCALE and overlap >= best_overlap:
                best, best_overlap = j, overlap
        if best is not None:
            result[best] = index
            taken.add(index)
    return result


def evaluate_detectors(wild_root: str | Path, detectors: dict[str, dict] | None = None,
                       annotations: str | Path = ANNOTATIONS, progress: bool = True) -> dict:
    """Per detector: recall per size bucket (annotated faces found / annotated), precision of
    detections >= PRECISION_MIN_PX, and seconds per photo."""
    wild_root = Path(wild_root)
    table = read_annotations(annotations)
    detectors = detectors or DETECTORS
    rows, timings = [], {name: [] for name in detectors}
    false_alarms = {name: 0 for name in detectors}
    detections = {name: 0 for name in detectors}
    for image, boxes in tqdm(table.groupby("image", sort=True), desc="detectors", unit="photo", disable=not progress):
        rgb = load_rgb(wild_root / image).rgb
        truth = list(boxes[["left", "top", "right", "bottom"]].itertuples(index=False, name=None))
        for name, arguments in detectors.items():
            started = time.perf_counter()
            found = detect_faces(rgb, **arguments)
            timings[name].append(time.perf_counter() - started)
            matched = match(truth, found)
            used = {i for i in matched if i is not None}
            wide = [i for i, face in enumerate(found) if face.box[2] - face.box[0] >= PRECISION_MIN_PX]
            detections[name] += len(wide)
            false_alarms[name] += sum(i not in used for i in wide)
            for (left, _, right, _), index in zip(truth, matched):
                rows.append({"detector": name, "image": image, "width": right - left,
                             "bucket": _bucket(right - left), "found": index is not None})
    found_table = pd.DataFrame(rows)
    results = {"annotations": str(annotations), "photos": int(table.image.nunique()),
               "faces": int(len(table)), "faces_16px": int((table.width >= 16).sum()), "detectors": {}}
    for name in detectors:
        mine = found_table[found_table.detector == name]
        results["detectors"][name] = {
            "arguments": detectors[name],
            "recall_16px": float(mine[mine.width >= 16].found.mean()),
            "recall_20px": float(mine[mine.width >= 20].found.mean()),
            "recall_by_size": {bucket: {"faces": int(len(group)), "recall": float(group.found.mean())}
                               for bucket, group in mine.groupby("bucket", sort=False)},
            "missed_16px": mine[(mine.width >= 16) & ~mine.found][["image", "width"]].to_dict("records"),
            "detections_16px": detections[name],
            "precision_16px": 1 - false_alarms[name] / max(detections[name], 1),
            "median_seconds_per_photo": float(pd.Series(timings[name]).median()),
        }
    return results


def detectors_table(results: dict) -> str:
    buckets = [_bucket(low) for low, _ in SIZE_BUCKETS]
    lines = [f"{results['faces']} annotated faces ({results['faces_16px']} >= 16 px) in {results['photos']} photos",
             "| detector | recall >= 16 px | " + " | ".join(f"recall {b} px" for b in buckets)
             + " | precision (>= 16 px) | s / photo (median) |",
             "|---|---:|" + "---:|" * len(buckets) + "---:|---:|"]
    for name, m in results["detectors"].items():
        cells = []
        for bucket in buckets:
            entry = m["recall_by_size"].get(bucket)
            cells.append(f"{entry['recall']:.1%} ({entry['faces']})" if entry else "-")
        lines.append(f"| {name} | {m['recall_16px']:.1%} | " + " | ".join(cells)
                     + f" | {m['precision_16px']:.1%} | {m['median_seconds_per_photo']:.2f} |")
    return "\n".join(lines)
