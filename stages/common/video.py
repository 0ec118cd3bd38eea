"""Video files: decoding, lossless re-encoding, and tracks of faces across frames.

A video is released as a whole or not at all. Its frames are decoded upright (the
container's rotation applied), de-identified like photos, and written again frame for frame
at the same size and frame rate, in the same container, with a lossless codec (PNG frames):
what is published then decodes to exactly the frames the identity check judged, as the
photo path publishes what it checked. A lossy codec would publish pixels nobody checked.
Nothing of the input's container is copied: no metadata, no audio track (voices identify
people), no subtitles.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm"}
# PNG frames fit every container OpenCV's FFmpeg writes here except WebM (VP8/VP9 only,
# and not losslessly through OpenCV): a WebM input is released as Matroska, and M4V (whose
# muxer takes no PNG frames) as MP4.
LOSSLESS_CODEC = "png "
OUTPUT_SUFFIX = {".webm": ".mkv", ".m4v": ".mp4"}
# Frames are held in memory while a video is de-identified: longer videos are refused with
# the reason (split them), rather than filling the machine's memory.
MAX_VIDEO_FRAMES = 3000
MAX_VIDEO_BYTES_DECODED = 4 * 1024 ** 3


class VideoRejected(ValueError):
    """The file cannot be released as a video (unreadable, empty, too long); the reason says why."""


@dataclass(frozen=True)
class Video:
    frames: list[np.ndarray]   # RGB, upright, all the same size
    fps: float
    source_format: str         # the container, from the file name: "MP4", "MOV", ...
    sha256: str
    size: int                  # bytes

    @property
    def height(self) -> int:
        return self.frames[0].shape[0]

    @property
    def width(self) -> int:
        return self.frames[0].shape[1]


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def output_suffix(suffix: str) -> str:
    return OUTPUT_SUFFIX.get(suffix.lower(), suffix.lower())


def _read_frames(path: Path, max_pixels: int) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise VideoRejected("not a video OpenCV's FFmpeg can decode")
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        frames: list[np.ndarray] = []
        decoded_bytes = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if frame.shape[0] * frame.shape[1] > max_pixels:
                raise VideoRejected(f"frames of {frame.shape[1]}x{frame.shape[0]} pixels exceed the limit of "
                                    f"{max_pixels:,} (raise input.max_pixels in the policy to allow them)")
            if frames and frame.shape != frames[0].shape:
                raise VideoRejected("its frames change size; a video is released frame for frame at one size")
            decoded_bytes += frame.nbytes
            if len(frames) >= MAX_VIDEO_FRAMES or decoded_bytes > MAX_VIDEO_BYTES_DECODED:
                raise VideoRejected(f"longer than {MAX_VIDEO_FRAMES} frames or {MAX_VIDEO_BYTES_DECODED >> 30} GiB "
                                    "decoded; split it into shorter clips")
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not frames:
        raise VideoRejected("no frame could be decoded (empty, truncated or not a video)")
    if not fps > 0:
        raise VideoRejected("the container states no frame rate")
    return frames, fps


def load_video(path: str | Path, max_pixels: int) -> Video:
    """Every frame of the video at ``path``. Raises :class:`VideoRejected` with the reason."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VideoRejected(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise VideoRejected("empty file (0 bytes)")
    frames, fps = _read_frames(path, max_pixels)
    return Video(frames, fps, path.suffix.lower().lstrip(".").upper(), hashlib.sha256(data).hexdigest(), len(data))


@contextlib.contextmanager
def _quiet_stderr():
    """MP4 has no 'png ' sample entry: OpenCV's FFmpeg writes the PNG frames under MPEG-4's
    object type for PNG instead, and says so on the process's stderr (not through OpenCV's
    logging) for every file. The frames are the same (checked on decode), so that line is
    withheld while the writer opens."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def encode_video(frames: list[np.ndarray], fps: float, suffix: str) -> bytes:
    """RGB frames -> the bytes of a video file (``suffix``'s container, see
    :func:`output_suffix`) with PNG-coded frames at ``fps``, and nothing else in it."""
    height, width = frames[0].shape[:2]
    with tempfile.TemporaryDirectory(prefix="anonymousnet-video-") as folder:
        target = Path(folder) / f"out{output_suffix(suffix)}"
        with _quiet_stderr():
            writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*LOSSLESS_CODEC), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {LOSSLESS_CODEC.strip()} frames into {target.suffix}")
        try:
            for frame in frames:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        return target.read_bytes()


def decode_video(data: bytes, suffix: str) -> tuple[list[np.ndarray], float]:
    """The frames and frame rate of a video file's bytes (what a recipient sees)."""
    handle, name = tempfile.mkstemp(suffix=output_suffix(suffix), prefix="anonymousnet-video-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        return _read_frames(Path(name), np.iinfo(np.int64).max)
    finally:
        os.unlink(name)


# --- tracks ---------------------------------------------------------------------------------

# A detection joins the track whose box in its last frame overlaps it most, if by at least
# this much (intersection over union): between frames a face moves a fraction of its size.
TRACK_MIN_IOU = 0.3
# A track missing for up to this many frames between two detections is covered in them from
# its two ends (landmarks interpolated): a detector that blinks must not leave a face bare.
MAX_GAP_FRAMES = 5


@dataclass
class Track:
    """One person's face through a video: per frame it appears in, its 68 landmarks and box,
    and whether a detector found it there (False: interpolated across a gap)."""
    frames: list[int] = field(default_factory=list)
    landmarks: list[np.ndarray] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    detections: list = field(default_factory=list)   # the detector's faces (None where interpolated)

    @property
    def detected(self) -> list[bool]:
        return [face is not None for face in self.detections]

    def add(self, frame: int, face) -> None:
        self.frames.append(frame)
        self.landmarks.append(np.asarray(face.landmarks, dtype=np.float64))
        self.boxes.append(tuple(float(v) for v in face.box))
        self.detections.append(face)

    def representative(self) -> int:
        """Index (into ``frames``) of its largest detected face: what Stage I and II see."""
        sizes = [(box[2] - box[0]) if found else -1.0 for box, found in zip(self.boxes, self.detected)]
        return int(np.argmax(sizes))


def _iou(a: tuple, b: tuple) -> float:
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, right - left) * max(0.0, bottom - top)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def track_faces(detections: list[list]) -> list[Track]:
    """Link each frame's detected faces (``detections[t]``: :class:`DetectedFace` list) into
    tracks by greedy box overlap with each track's last position, then fill gaps of up to
    :data:`MAX_GAP_FRAMES` frames by interpolating landmarks and boxes."""
    tracks: list[Track] = []
    for frame, faces in enumerate(detections):
        open_tracks = [t for t in tracks if frame - t.frames[-1] <= MAX_GAP_FRAMES + 1]
        pairs = sorted(((_iou(track.boxes[-1], face.box), ti, fi) for ti, track in enumerate(open_tracks)
                        for fi, face in enumerate(faces)), reverse=True)
        used_tracks, used_faces = set(), set()
        for overlap, ti, fi in pairs:
            if overlap < TRACK_MIN_IOU or ti in used_tracks or fi in used_faces:
                continue
            used_tracks.add(ti)
            used_faces.add(fi)
            open_tracks[ti].add(frame, faces[fi])
        for fi, face in enumerate(faces):
            if fi not in used_faces:
                track = Track()
                track.add(frame, face)
                tracks.append(track)
    for track in tracks:
        _fill_gaps(track)
    return tracks


def _fill_gaps(track: Track) -> None:
    frames, landmarks, boxes, detections = [], [], [], []
    for i, frame in enumerate(track.frames):
        if i:
            previous = track.frames[i - 1]
            for missing in range(previous + 1, frame):
                w = (missing - previous) / (frame - previous)
                frames.append(missing)
                landmarks.append((1 - w) * track.landmarks[i - 1] + w * track.landmarks[i])
                boxes.append(tuple((1 - w) * a + w * b for a, b in zip(track.boxes[i - 1], track.boxes[i])))
                detections.append(None)
        frames.append(frame)
        landmarks.append(track.landmarks[i])
        boxes.append(track.boxes[i])
        detections.append(track.detections[i])
    track.frames, track.landmarks, track.boxes, track.detections = frames, landmarks, boxes, detections
