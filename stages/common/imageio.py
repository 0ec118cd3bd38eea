"""The project's one image loader and encoder.

Every stage that reads a photo goes through :func:`load_rgb`; every photo that leaves the
pipeline goes through :func:`encode_clean`. Loading normalises whatever arrives (EXIF
rotation, grayscale, palette, alpha, CMYK, 16-bit) to 8-bit RGB, and refuses what cannot
be trusted (corrupt, truncated, empty, non-image, decompression bombs) with a reason
rather than an exception that would stop a run. Encoding writes pixels only: no EXIF,
GPS, XMP, ICC profile or comment from the input can survive.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A photo larger than this is refused before its pixels are decoded (a 40 MP photo is a
# 160 MB RGB array; a "decompression bomb" claims billions of pixels in a few bytes).
DEFAULT_MAX_PIXELS = 40_000_000

# No photo file is read whole beyond this size (the pixel limit catches bombs once decoded).
MAX_FILE_BYTES = 512 * 1024 * 1024

# Formats we write back as themselves; anything else (GIF, PPM, ...) is released as PNG.
_KEEP_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}


class ImageRejected(Exception):
    """The file cannot be used as a photo; ``str(exc)`` is the reason recorded in lineage."""

    def __init__(self, reason: str, sha256: str | None = None, size: int | None = None):
        super().__init__(reason)
        self.sha256 = sha256
        self.size = size


@dataclass(frozen=True)
class LoadedImage:
    rgb: np.ndarray          # H x W x 3 uint8, upright (EXIF orientation applied)
    source_format: str       # PIL format name of the input, e.g. "JPEG"
    source_mode: str         # PIL mode before conversion, e.g. "CMYK", "I;16", "P"
    exif_rotated: bool       # an EXIF orientation other than "normal" was applied
    frames: int              # frames in the file (load_frames reads them all)
    sha256: str              # of the file's bytes as read
    size: int                # bytes


_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"II*\x00": "TIFF",
               b"MM\x00*": "TIFF", b"BM": "BMP"}


def _claimed_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_uint8_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale (PIL decodes it as I;16 or 32-bit I): scale 0..65535 to 0..255.
        values = np.asarray(image, dtype=np.float64)
        high = 65535.0 if values.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        gray = np.clip(np.rint(values * (255.0 / high)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Composite over white: what a viewer of the photo sees.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read ``path`` as an upright 8-bit RGB array.

    Raises
    ------
    ImageRejected
        With a one-line reason for zero-byte, non-image, corrupt or truncated files and
        for images above ``max_pixels``.
    """
    try:
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageRejected(f"file too large: {size:,} bytes exceeds {MAX_FILE_BYTES:,}", size=size)
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageRejected(f"cannot read file: {exc.strerror or exc}") from exc
    try:
        return decode_photo(data, max_pixels)
    except ImageRejected as exc:
        exc.sha256, exc.size = sha256_bytes(data), len(data)
        raise


def decode_photo(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """:func:`load_rgb` on bytes already read."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below replaces PIL's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageRejected(
                        f"image too large: {width}x{height} = {width * height:,} pixels exceeds "
                        f"the limit of {max_pixels:,} (raise input.max_pixels in the policy "
                        f"if this photo is genuine)"
                    )
                source_format = image.format or "unknown"
                source_mode = image.mode
                frames = getattr(image, "n_frames", 1)
                image.load()  # decode now so truncation and corruption surface here
                orientation = image.getexif().get(0x0112, 1)
                upright = ImageOps.exif_transpose(image)
                rgb = _to_uint8_rgb(upright)
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        claimed = _claimed_format(data)
        if claimed:
            raise ImageRejected(f"corrupt image file: starts like {claimed} but cannot be decoded") from exc
        raise ImageRejected("not an image file (format not recognised)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"image too large (decompression bomb): {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc) or type(exc).__name__
        if "truncated" in message.lower():
            raise ImageRejected(f"truncated image file: {message}") from exc
        raise ImageRejected(f"corrupt image file: {message}") from exc
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageRejected(f"unusable image shape {rgb.shape}")
    return LoadedImage(
        rgb=np.ascontiguousarray(rgb),
        source_format=source_format,
        source_mode=source_mode,
        exif_rotated=orientation not in (1, None),
        frames=frames,
        sha256=sha256_bytes(data),
        size=len(data),
    )


# A multi-frame file with more frames than this is rejected (each frame is searched and
# checked like a photo; a long animation belongs in the video pipeline).
MAX_FRAMES = 300


@dataclass(frozen=True)
class Frames:
    """Every frame of a multi-frame file (animated GIF/PNG/WebP, multi-page TIFF), upright
    8-bit RGB, with each frame's display time and the loop count."""
    rgb: list[np.ndarray]
    durations_ms: list[int]
    loop: int
    source_format: str
    sha256: str


def load_frames(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Frames:
    """All frames of ``path`` (the first is what :func:`load_rgb` returns). Raises
    :class:`ImageRejected` like it, and for more than :data:`MAX_FRAMES` frames."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageRejected(f"cannot read file: {exc.strerror or exc}") from exc
    first = decode_photo(data, max_pixels)   # the checks (size, corruption) on the file
    if first.frames > MAX_FRAMES:
        raise ImageRejected(f"{first.frames} frames: more than the {MAX_FRAMES} a multi-frame image may have "
                            "(release it as a video)")
    frames, durations = [first.rgb], []
    try:
        with Image.open(io.BytesIO(data)) as image:
            loop = int(image.info.get("loop", 0) or 0)
            for index in range(first.frames):
                image.seek(index)
                image.load()   # WebP sets a frame's duration when it decodes it
                durations.append(int(image.info.get("duration", 0) or 0))
                if index:      # the first frame is decode_photo's
                    frames.append(_to_uint8_rgb(ImageOps.exif_transpose(image.copy())))
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"corrupt frame in a multi-frame image: {exc}") from exc
    return Frames(frames, durations, loop, first.source_format, first.sha256)


# Multi-frame files are released in a lossless container that keeps every frame and its
# timing, so that each frame published is exactly the frame the identity check judged:
# animated PNG for GIF (whose palette would alter the checked pixels) and anything else,
# multi-page TIFF for TIFF, lossless animated WebP for WebP.
_MULTI_FRAME_FORMATS = {"TIFF": ("TIFF", ".tif"), "WEBP": ("WEBP", ".webp")}


def multi_frame_format_for(source_format: str) -> tuple[str, str]:
    return _MULTI_FRAME_FORMATS.get(source_format.upper(), ("PNG", ".png"))


def encode_frames(frames: list[np.ndarray], durations_ms: list[int], loop: int, fmt: str) -> bytes:
    """Encode frames (pixels and timing only, no metadata from the input) losslessly."""
    images = [Image.fromarray(frame, mode="RGB") for frame in frames]
    buffer = io.BytesIO()
    if fmt == "TIFF":
        images[0].save(buffer, "TIFF", save_all=True, append_images=images[1:], compression="tiff_deflate")
    elif fmt == "WEBP":
        images[0].save(buffer, "WEBP", save_all=True, append_images=images[1:], lossless=True,
                       duration=durations_ms, loop=loop)
    else:
        images[0].save(buffer, "PNG", save_all=True, append_images=images[1:], duration=durations_ms, loop=loop)
    return buffer.getvalue()


def decode_frames(data: bytes) -> list[np.ndarray]:
    """Every frame of bytes produced by :func:`encode_frames`, as RGB."""
    frames = []
    with Image.open(io.BytesIO(data)) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return frames


def output_format_for(source_format: str, requested: str = "same") -> tuple[str, str]:
    """(PIL format, file suffix) to release a photo in."""
    if requested == "jpeg":
        return "JPEG", ".jpg"
    if requested == "png":
        return "PNG", ".png"
    if source_format in _KEEP_FORMATS:
        return source_format, _KEEP_FORMATS[source_format]
    return "PNG", ".png"


def encode_clean(rgb: np.ndarray, fmt: str, jpeg_quality: int = 95) -> bytes:
    """Encode pixels only. Nothing from the input file (EXIF, GPS, XMP, ICC, comments) is
    passed to the encoder, so nothing of it can be written."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8, got {rgb.dtype} {rgb.shape}")
    buffer = io.BytesIO()
    image = Image.fromarray(rgb, mode="RGB")
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=jpeg_quality, optimize=True)
    elif fmt == "WEBP":
        image.save(buffer, "WEBP", quality=jpeg_quality)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def decode_bytes(data: bytes) -> np.ndarray:
    """Decode bytes produced by :func:`encode_clean` back to RGB (for checks on exactly
    what will be published)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _process_umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere it can only be read by
    setting it (and setting it back), which is done once, at import."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Published files (photos, lineage, reports) get the mode an ordinary file would get under
# the user's umask (0644 under the usual 022): the temporary files they are written
# through are created 0600, and a rename keeps that, so others sharing the release
# folder could not read what was published.
PUBLISHED_FILE_MODE = 0o666 & ~_process_umask()


def temporary_beside(path: Path) -> tuple[int, str]:
    """An open descriptor and name of a new hidden temporary file in ``path``'s folder, with
    :data:`PUBLISHED_FILE_MODE`, to be renamed onto ``path`` once complete."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.fchmod(fd, PUBLISHED_FILE_MODE)
    return fd, name


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
