"""Which photos a release covers: a folder (recursive) or a manifest (CSV or Parquet).

Every entry found becomes an :class:`InputPhoto`; entries that cannot be used (a path
outside the input root, a missing file, a reserved name) are kept with a ``refusal``
reason so the run accounts for them instead of silently dropping them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

# Top-level names in a release folder that belong to the pipeline, not to photos.
RESERVED_TOP_LEVEL = {"_lineage", "_reports", "report.md"}
MANIFEST_SUFFIXES = {".csv", ".parquet", ".pq"}
MANIFEST_PATH_COLUMN = "path"

# Photos with a side shorter than this are rejected: dlib's CNN detector cannot run on them
# (its filters are larger than the image) and no detector can say whether they hold a face,
# so they cannot be shown to hold none. Faces a verifier recognises are far larger.
MIN_PHOTO_SIDE = 16


@dataclass(frozen=True)
class InputPhoto:
    image_id: str            # relative POSIX path below the input root; unique in a run
    path: Path | None        # resolved file to read (None when refused)
    refusal: str | None = None


class InputError(ValueError):
    """The input location itself is unusable (not a per-photo problem)."""


def is_inside(root: Path, candidate: Path) -> bool:
    """Whether ``candidate`` is ``root`` or below it (both already resolved)."""
    try:
        candidate.relative_to(root)
        return True
    except ValueError:
        return False


def _checked(root: Path, relative: str) -> InputPhoto:
    relative_posix = PurePosixPath(relative.replace("\\", "/"))
    image_id = str(relative_posix)
    if relative_posix.is_absolute():
        candidate = Path(relative_posix)
    else:
        candidate = root / relative_posix
    resolved = candidate.resolve()
    if not is_inside(root, resolved):
        return InputPhoto(image_id, None, f"path is outside the input root {root}; refused")
    image_id = resolved.relative_to(root).as_posix()
    if image_id.split("/", 1)[0] in RESERVED_TOP_LEVEL:
        return InputPhoto(image_id, None, "name is reserved for the release's own records; rename it")
    if not resolved.is_file():
        return InputPhoto(image_id, None, "file not found")
    return InputPhoto(image_id, resolved)


def discover_folder(root: str | Path) -> list[InputPhoto]:
    """Every regular, non-hidden file below ``root``, sorted by relative path."""
    root = Path(root).resolve()
    photos = []
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            relative = (Path(directory) / name).relative_to(root).as_posix()
            photos.append(_checked(root, relative))
    return sorted(photos, key=lambda photo: photo.image_id)


def read_manifest(manifest: str | Path, root: str | Path | None = None) -> list[InputPhoto]:
    """Rows of a CSV or Parquet manifest with a ``path`` column; relative paths are taken
    from ``root`` (default: the manifest's folder). Paths resolving outside ``root`` are
    refused."""
    manifest = Path(manifest)
    root = Path(root).resolve() if root else manifest.resolve().parent
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    elif suffix in (".parquet", ".pq"):
        table = pd.read_parquet(manifest)
    else:
        raise InputError(f"manifest {manifest} must be .csv or .parquet")
    if MANIFEST_PATH_COLUMN not in table.columns:
        raise InputError(
            f"manifest {manifest} has no '{MANIFEST_PATH_COLUMN}' column "
            f"(columns: {', '.join(map(str, table.columns))})"
        )
    photos = []
    for value in table[MANIFEST_PATH_COLUMN].astype(str):
        if not value.strip():
            photos.append(InputPhoto(f"<empty row {len(photos) + 1}>", None, "empty path in manifest"))
        else:
            photos.append(_checked(root, value.strip()))
    return photos


def discover_inputs(location: str | Path, root: str | Path | None = None) -> tuple[Path, list[InputPhoto]]:
    """(input root, photos) for a folder or a manifest file. Duplicate entries are refused."""
    location = Path(location)
    if location.is_dir():
        input_root = location.resolve()
        photos = discover_folder(input_root)
    elif location.is_file() and location.suffix.lower() in MANIFEST_SUFFIXES:
        input_root = Path(root).resolve() if root else location.resolve().parent
        photos = read_manifest(location, input_root)
    elif location.exists():
        raise InputError(f"input {location} is neither a folder nor a .csv/.parquet manifest")
    else:
        raise InputError(f"input {location} does not exist")
    seen: set[str] = set()
    unique = []
    for photo in photos:
        if photo.image_id in seen:
            unique.append(InputPhoto(photo.image_id + f"#dup{len(unique)}", None,
                                     f"duplicate of {photo.image_id} in the input; released once"))
            continue
        seen.add(photo.image_id)
        unique.append(photo)
    return input_root, unique


def ingest_photo(photo: InputPhoto, detection: dict, max_pixels: int, aligned_size: int,
                 multi_frame: str = "deidentify"):
    """Load one photo, find its faces and align them.

    ``detection`` holds :func:`stages.common.faces.detect_faces`'s keyword arguments. The faces are
    the first frame's; a multi-frame file's further frames are searched at anonymize, or the
    file is rejected when ``multi_frame`` is ``reject``.
    Returns ``(photo_row, faces, aligned_faces)`` where ``photo_row`` is a dict for the
    photos table (status ``rejected`` with a reason when the file cannot be used).
    """
    # Imported here so input discovery stays usable without dlib/OpenCV loaded.
    from stages.common.faces import align_face, detect_faces
    from stages.common.imageio import ImageRejected, load_rgb

    row = {"image_id": photo.image_id, "status": None, "reason": None}
    if photo.refusal:
        row.update(status="rejected", reason=photo.refusal)
        return row, [], []
    from stages.common.video import is_video
    if is_video(photo.path):
        return ingest_video(photo, row, detection, max_pixels, aligned_size)
    try:
        image = load_rgb(photo.path, max_pixels=max_pixels)
    except ImageRejected as exc:
        row.update(status="rejected", reason=str(exc), input_sha256=exc.sha256, input_bytes=exc.size)
        return row, [], []
    height, width = image.rgb.shape[:2]
    row.update(input_sha256=image.sha256, input_bytes=image.size, height=height, width=width,
               source_format=image.source_format, source_mode=image.source_mode, exif_rotated=image.exif_rotated,
               frames=image.frames)
    if image.frames > 1 and multi_frame == "reject":
        row.update(status="rejected", reason=f"multi-frame image ({image.frames} frames) and the policy says "
                                             "input.multi_frame: reject")
        return row, [], []
    if min(height, width) < MIN_PHOTO_SIDE:
        row.update(status="rejected", reason=f"image too small: {width}x{height} pixels; a photo needs at least "
                                             f"{MIN_PHOTO_SIDE} pixels a side to be searched for faces")
        return row, [], []
    try:
        faces = detect_faces(image.rgb, **detection)
        aligned = [align_face(image.rgb, face.landmarks, aligned_size) for face in faces]
    except Exception as exc:  # noqa: BLE001 - one photo's failure is its own outcome, never the batch's
        # Unsearched means unknown faces: never published (quarantined), and the run goes on.
        row.update(status="quarantined", reason=f"face detection failed, so nothing was published: "
                                                f"{failure_text(exc)}")
        return row, [], []
    row.update(n_faces=len(faces))
    return row, faces, aligned


def ingest_video(photo: InputPhoto, row: dict, detection: dict, max_pixels: int, aligned_size: int):
    """A video: every frame searched with the ingest detector, the faces linked into tracks
    (:func:`stages.common.video.track_faces`). Each track is one face of the face table (its
    largest detected face, aligned), so Stage I and II see each person once and Stage II
    draws once per person; the row's ``tracks`` carry every frame's landmarks for anonymize."""
    from tqdm import tqdm

    from stages.common.faces import align_face, detect_faces
    from stages.common.video import VideoRejected, load_video, track_faces

    try:
        video = load_video(photo.path, max_pixels)
    except VideoRejected as exc:
        row.update(status="rejected", reason=f"video: {exc}")
        return row, [], []
    row.update(input_sha256=video.sha256, input_bytes=video.size, height=video.height, width=video.width,
               source_format=video.source_format, source_mode="RGB", exif_rotated=False,
               frames=len(video.frames), fps=video.fps)
    if min(video.height, video.width) < MIN_PHOTO_SIDE:
        row.update(status="rejected", reason=f"video too small: {video.width}x{video.height} pixels; a frame needs "
                                             f"at least {MIN_PHOTO_SIDE} pixels a side to be searched for faces")
        return row, [], []
    try:
        frames = tqdm(video.frames, desc=f"{photo.image_id}: faces", unit="frame", leave=False, disable=None)
        tracks = track_faces([detect_faces(frame, **detection) for frame in frames])
        faces, aligned = [], []
        for track in tracks:
            index = track.representative()
            faces.append(track.detections[index])
            aligned.append(align_face(video.frames[track.frames[index]], track.landmarks[index], aligned_size))
    except Exception as exc:  # noqa: BLE001 - one video's failure is its own outcome, never the batch's
        row.update(status="quarantined", reason=f"face detection failed, so nothing was published: "
                                                f"{failure_text(exc)}")
        return row, [], []
    row.update(n_faces=len(faces), n_tracks=len(tracks), tracks=[
        {"frames": track.frames, "landmarks": [points.reshape(-1).tolist() for points in track.landmarks],
         "boxes": [list(box) for box in track.boxes],
         "detectors": [face.detector if face is not None else "track" for face in track.detections],
         "scores": [float(face.score) if face is not None else 0.0 for face in track.detections],
         "landmark_errors": [face.landmark_error if face is not None else None for face in track.detections],
         "representative": track.frames[track.representative()]} for track in tracks])
    return row, faces, aligned


def failure_text(exc: BaseException) -> str:
    """An exception as one line for a photo's reason (dlib's messages span many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = " ".join(lines)[:300]
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
