"""The one image loader: every bad-input kind gets its documented outcome; outputs carry no metadata."""
import io

import numpy as np
import pytest
from PIL import Image

from stages.common.imageio import (
    ImageRejected,
    decode_bytes,
    encode_clean,
    load_rgb,
    output_format_for,
    write_atomic,
)


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def test_rgb_jpeg_loads_as_uint8_rgb(tmp_path, astronaut):
    path = _save(tmp_path / "a.jpg", Image.fromarray(astronaut), quality=95)
    loaded = load_rgb(path)
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == astronaut.shape
    assert loaded.source_format == "JPEG" and not loaded.exif_rotated
    assert np.abs(loaded.rgb.astype(int) - astronaut).mean() < 3


@pytest.mark.parametrize("orientation, stored", [(6, lambda a: np.rot90(a, k=1)), (8, lambda a: np.rot90(a, k=-1)),
                                                 (3, lambda a: np.rot90(a, k=2))])
def test_exif_orientation_is_applied(tmp_path, astronaut, orientation, stored):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path / "r.png", Image.fromarray(np.ascontiguousarray(stored(astronaut))), exif=exif)
    loaded = load_rgb(path)
    assert loaded.exif_rotated
    np.testing.assert_array_equal(loaded.rgb, astronaut)


def test_grayscale_becomes_rgb(tmp_path, astronaut):
    gray = Image.fromarray(astronaut).convert("L")
    loaded = load_rgb(_save(tmp_path / "g.png", gray))
    assert loaded.source_mode == "L" and loaded.rgb.shape == astronaut.shape
    np.testing.assert_array_equal(loaded.rgb[..., 0], np.asarray(gray))
    np.testing.assert_array_equal(loaded.rgb[..., 0], loaded.rgb[..., 2])


def test_palette_becomes_rgb(tmp_path, astronaut):
    palette = Image.fromarray(astronaut).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    loaded = load_rgb(_save(tmp_path / "p.gif", palette))
    assert loaded.source_mode == "P" and loaded.rgb.shape == astronaut.shape
    np.testing.assert_array_equal(loaded.rgb, np.asarray(palette.convert("RGB")))


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255      # top half opaque red, bottom half fully transparent
    loaded = load_rgb(_save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")))
    assert loaded.source_mode == "RGBA"
    assert tuple(loaded.rgb[0, 0]) == (200, 0, 0)
    assert tuple(loaded.rgb[7, 7]) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path, astronaut):
    cmyk = Image.fromarray(astronaut).convert("CMYK")
    loaded = load_rgb(_save(tmp_path / "c.jpg", cmyk, quality=95))
    assert loaded.source_mode == "CMYK" and loaded.rgb.shape == astronaut.shape
    assert np.abs(loaded.rgb.astype(int) - astronaut).mean() < 8


def test_16_bit_grayscale_is_scaled_to_8_bit(tmp_path):
    values = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    path = _save(tmp_path / "d.png", Image.fromarray(values))
    loaded = load_rgb(path)
    assert loaded.source_mode.startswith("I")
    np.testing.assert_array_equal(loaded.rgb[..., 0], [[0, 100], [255, 200]])


def test_decompression_bomb_is_rejected_before_decoding(tmp_path):
    path = _save(tmp_path / "bomb.png", Image.new("1", (20_000, 20_000)))   # 400 MP in a few KB
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageRejected, match="too large"):
        load_rgb(path)


def test_pixel_limit_is_configurable(tmp_path, astronaut):
    path = _save(tmp_path / "a.png", Image.fromarray(astronaut))
    with pytest.raises(ImageRejected, match="exceeds the limit of 100,000"):
        load_rgb(path, max_pixels=100_000)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"name,identity\nfoo,1\n", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "corrupt"),
])
def test_unusable_files_are_rejected_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageRejected, match=reason):
        load_rgb(path)


def test_truncated_jpeg_is_rejected(tmp_path, astronaut):
    buffer = io.BytesIO()
    Image.fromarray(astronaut).save(buffer, "JPEG", quality=95)
    path = tmp_path / "t.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageRejected, match="truncated") as info:
        load_rgb(path)
    assert info.value.sha256 and info.value.size == path.stat().st_size


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(ImageRejected, match="cannot read"):
        load_rgb(tmp_path / "nope.jpg")


def _metadata_free(data: bytes):
    image = Image.open(io.BytesIO(data))
    exif = image.getexif()
    # A TIFF's own IFD always holds structural tags (size, strips); nothing identifying may be there.
    for tag in (0x010F, 0x0110, 0x8825, 0x8769, 0x02BC, 0x8773, 0x9286):  # make, model, GPS, EXIF, XMP, ICC, comment
        assert tag not in exif, hex(tag)
    if image.format != "TIFF":
        assert not exif, "EXIF survived"
    assert "icc_profile" not in image.info and "exif" not in image.info and "xmp" not in image.info
    assert "comment" not in image.info
    for marker in (b"Exif\x00", b"http://ns.adobe.com/xap", b"ICC_PROFILE", b"DemoCam", b"secret-comment"):
        assert marker not in data, marker


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_encode_clean_writes_no_metadata(tmp_path, astronaut, fmt):
    exif = Image.Exif()
    exif[0x010F] = "DemoCam"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0)}
    source = tmp_path / "source.jpg"
    Image.fromarray(astronaut).save(source, exif=exif, comment=b"secret-comment",
                                    icc_profile=b"ICC_PROFILE" + b"\x00" * 128)
    loaded = load_rgb(source)
    data = encode_clean(loaded.rgb, fmt)
    _metadata_free(data)
    assert decode_bytes(data).shape == astronaut.shape


def test_output_format_keeps_common_formats_and_converts_others():
    assert output_format_for("JPEG") == ("JPEG", ".jpg")
    assert output_format_for("PNG") == ("PNG", ".png")
    assert output_format_for("GIF") == ("PNG", ".png")
    assert output_format_for("PNG", "jpeg") == ("JPEG", ".jpg")


def test_write_atomic_leaves_no_partial_files(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    write_atomic(target, b"hello")
    write_atomic(target, b"world")
    assert target.read_bytes() == b"world"
    assert [p.name for p in target.parent.iterdir()] == ["x.bin"]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_every_frame_and_its_timing_survive_a_round_trip(tmp_path, fmt):
    from stages.common.imageio import (
        MAX_FRAMES,
        decode_frames,
        encode_frames,
        load_frames,
        multi_frame_format_for,
    )

    rng = np.random.default_rng(1)
    frames = [np.repeat(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8), 32, axis=0).repeat(48, axis=1)
              for _ in range(3)]
    path = tmp_path / f"animated.{fmt.lower()}"
    images = [Image.fromarray(frame) for frame in frames]
    options = {} if fmt == "TIFF" else {"duration": [100, 150, 200], "loop": 0}
    if fmt == "WEBP":
        options["lossless"] = True
    images[0].save(path, fmt, save_all=True, append_images=images[1:], **options)
    loaded = load_frames(path)
    assert len(loaded.rgb) == 3 and all(np.abs(a.astype(int) - b).max() <= 2 for a, b in zip(loaded.rgb, frames))
    if fmt != "TIFF":
        assert loaded.durations_ms == [100, 150, 200]
    out_format, suffix = multi_frame_format_for(loaded.source_format)
    assert (out_format, suffix) == {"TIFF": ("TIFF", ".tif"), "WEBP": ("WEBP", ".webp")}.get(fmt, ("PNG", ".png"))
    encoded = encode_frames(loaded.rgb, loaded.durations_ms, loaded.loop, out_format)
    assert all(np.array_equal(a, b) for a, b in zip(decode_frames(encoded), loaded.rgb))   # lossless
    with Image.open(io.BytesIO(encoded)) as written:
        durations = []
        for index in range(written.n_frames):
            written.seek(index)
            written.load()
            durations.append(written.info.get("duration"))
    if fmt != "TIFF":
        assert durations == [100, 150, 200]
    assert MAX_FRAMES >= 100
