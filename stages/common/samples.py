"""Sample photos for the demo, made from public-domain images shipped with scikit-image.

They exercise the loader as real inputs do: a JPEG carrying EXIF with GPS, a JPEG stored
sideways with an EXIF orientation tag, a grayscale PNG, a PNG with an alpha channel, and a
photo without a face.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data


def _exif_with_gps(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "DemoCam"          # Make
    exif[0x0112] = orientation        # Orientation
    gps = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}
    exif[0x8825] = gps                # GPS IFD
    return exif


def write_samples(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    astronaut = data.astronaut()
    written = []

    path = folder / "astronaut.jpg"
    Image.fromarray(astronaut).save(path, quality=92, exif=_exif_with_gps())
    written.append(path)

    # Stored rotated 90 degrees clockwise; EXIF orientation 8 tells viewers to rotate it back.
    path = folder / "rotated" / "astronaut_exif_rotated.jpg"
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(np.rot90(astronaut, k=-1).copy()).save(path, quality=92, exif=_exif_with_gps(orientation=8))
    written.append(path)

    path = folder / "astronaut_gray.png"
    Image.fromarray(astronaut).convert("L").save(path)
    written.append(path)

    path = folder / "astronaut_alpha.png"
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(path)
    written.append(path)

    path = folder / "coffee_no_face.jpg"
    Image.fromarray(data.coffee()).save(path, quality=92)
    written.append(path)
    return written


def panned_clip_frames(count: int = 12, size: tuple[int, int] = (320, 240)) -> list[np.ndarray]:
    """The astronaut panned right and zoomed in a little each frame (``size``: width, height)."""
    astronaut = data.astronaut()
    width, height = size
    frames = []
    for index in range(count):
        zoom = 1.0 + 0.02 * index
        left = 60 + 4 * index
        crop = astronaut[40:40 + int(300 / zoom), left:left + int(400 / zoom)]
        frames.append(np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.BOX)))
    return frames


def two_face_clip_frames(count: int = 8, size: tuple[int, int] = (480, 240)) -> list[np.ndarray]:
    """Two faces side by side, the astronaut and her mirror image, moving down 2 px a frame."""
    astronaut = data.astronaut()
    width, height = size
    half = width // 2
    crop_height = int(round(280 * height / half))
    frames = []
    for index in range(count):
        top = 20 + 2 * index
        face = np.asarray(Image.fromarray(astronaut[top:top + crop_height, 100:380]).resize((half, height),
                                                                                          Image.Resampling.BOX))
        frames.append(np.concatenate([face, face[:, ::-1]], axis=1))
    return frames


def write_clip(path: str | Path, frames: list[np.ndarray], fps: float) -> Path:
    """RGB frames as a lossy MPEG-4 clip, as a camera or phone would deliver one."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    try:
        for frame in frames:
            writer.write(frame[:, :, ::-1].copy())
    finally:
        writer.release()
    return path
