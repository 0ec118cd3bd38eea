"""CenterFace (the release's detector), box protection of faces too small to synthesize,
and the leak check's second opinion on the published photo. Public-domain photo only."""
import cv2
import numpy as np
import pytest

from stages.common.anonymize import AnonymizeSettings, anonymize_photo
from stages.common.centerface import (
    FaceBox,
    _tiles,
    detect_face_boxes,
    suppress_overlaps,
)
from stages.common.faces import align_face, box_overlap, detect_faces
from stages.common.imageio import decode_bytes
from stages.common.obfuscate import box_protection_reason, enlarged_box, obfuscate_boxes


@pytest.fixture(scope="module")
def face_patch(astronaut):
    """The astronaut's head and shoulders (her face is about 90 px wide in it)."""
    return astronaut[30:230, 150:300]


def _canvas(patch, scale, places, size=(1800, 2600)):
    """A plain grey photo with the patch, scaled, pasted at ``places`` (left, top)."""
    canvas = np.full(size + (3,), 120, np.uint8)
    small = cv2.resize(patch, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    for left, top in places:
        canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    return canvas


def test_centerface_finds_the_astronaut_with_trusted_landmarks(astronaut):
    faces = detect_faces(astronaut, detector="centerface")
    hog = detect_faces(astronaut, detector="hog")
    real = max(hog, key=lambda f: -f.box[1])
    assert [f.detector for f in faces] == ["centerface"]
    assert box_overlap(faces[0].box, real.box) > 0.8 and faces[0].landmark_error < 0.1
    assert faces[0].landmarks.shape == (68, 2) and faces[0].score > 0.5


def test_large_photo_is_searched_in_tiles_at_full_resolution(face_patch):
    # Faces of about 27 px in a 2600 px photo, one across a tile border: a single pass over the
    # photo scaled to 1024 px would see them at 11 px.
    places = [(100, 100), (1000, 700), (1700, 1300), (2300, 200)]
    photo = _canvas(face_patch, 0.3, places)
    found = detect_face_boxes(photo, threshold=0.5, max_side=1024)
    centres = [((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2) for b in found]
    for left, top in places:
        assert any(left < x < left + 45 and top < y < top + 60 for x, y in centres), (left, top)
    assert len(found) == len(places)


def test_tiles_cover_the_photo_with_overlap():
    for length, tile in ((2600, 1024), (1025, 1024), (5000, 1024), (4000, 2560), (2561, 2560)):
        starts, side = _tiles(length, tile)
        assert starts[0] == 0 and starts[-1] + side == length and side <= tile
        assert all(b - a <= side - 160 for a, b in zip(starts, starts[1:]))   # neighbours overlap
        # The fewest tiles that can: one fewer could not cover the photo with that overlap.
        assert (len(starts) - 1) * (tile - 160) + 160 < length
    assert _tiles(800, 1024) == ([0], 800)


def test_close_up_face_is_found_whole(astronaut):
    # A face filling most of a 1,600 px photo: at full resolution the network finds only
    # parts of it; the scaled-down pass finds it whole.
    top, bottom, left, right = 18, 218, 152, 300
    crop = astronaut[top:bottom, left:right]
    photo = cv2.resize(crop, (1600, round(1600 * crop.shape[0] / crop.shape[1])), interpolation=cv2.INTER_CUBIC)
    found = detect_face_boxes(photo, threshold=0.5)
    widest = max(b.box[2] - b.box[0] for b in found)
    assert widest > 0.5 * photo.shape[1], [round(b.box[2] - b.box[0]) for b in found]


def test_pieces_of_a_face_give_way_to_the_whole_face():
    def box(left, top, right, bottom, score):
        return FaceBox((left, top, right, bottom), score, np.zeros((5, 2)))

    whole = box(300, 400, 900, 1300, 0.9)
    piece = box(450, 700, 820, 1150, 0.95)          # half the face, framed alone, scored higher
    neighbour = box(950, 420, 1500, 1250, 0.8)      # the next face: kept
    small_face = box(500, 500, 560, 570, 0.7)       # a small face over the large box: not a piece
    kept = suppress_overlaps([piece, whole, neighbour, small_face])
    assert sorted(f.box for f in kept) == sorted([whole.box, neighbour.box, small_face.box])


def test_box_reason_and_box_obfuscation():
    assert box_protection_reason(30, 0.02, 40, 0.1).startswith("small")
    assert box_protection_reason(80, 0.3, 40, 0.1).startswith("landmarks unreliable")
    assert box_protection_reason(80, None, 40, 0.1) is None and box_protection_reason(80, 0.05, 40, 0.1) is None
    assert enlarged_box((10, 10, 30, 30), 0.25, (100, 100)) == (5, 5, 35, 35)
    assert enlarged_box((0, 0, 30, 30), 0.25, (20, 20)) == (0, 0, 20, 20)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)
    out = obfuscate_boxes(photo, [(40, 40, 56, 56)], "pixelate", {"blocks": 8}, 0.25)
    left, top, right, bottom = enlarged_box((40, 40, 56, 56), 0.25, photo.shape)
    region = out[top:bottom, left:right].astype(int)
    # Cells of at least 6 px over a 24 px region: at most 4 x 4 distinct colours, all changed.
    assert len(np.unique(region.reshape(-1, 3), axis=0)) <= 16
    assert np.abs(region - photo[top:bottom, left:right]).mean() > 20
    outside = np.ones(photo.shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert np.array_equal(out[outside], photo[outside])


def _settings(**overrides):
    base = dict(method="blur", method_params={}, fallback=["pixelate", "mask"], on_leak="fallback",
                on_no_face="release", release_distance=0.65, feather_fraction=0.06, output_format="png",
                min_synthesis_px=40, max_landmark_error=0.1)
    return AnonymizeSettings(**(base | overrides))


def test_small_face_is_protected_over_its_box_not_skipped(face_patch):
    photo = _canvas(face_patch, 0.3, [(200, 150)], size=(400, 600))
    faces = detect_faces(photo, detector="centerface")
    assert len(faces) == 1 and faces[0].box[2] - faces[0].box[0] < 40
    aligned = [align_face(photo, f.landmarks) for f in faces]
    result = anonymize_photo(photo, "PNG", faces, aligned, _settings())
    assert result.status == "released" and [f.method for f in result.faces] == ["pixelate"]
    assert result.faces[0].box_reason.startswith("small") and [f.distance for f in result.faces] == [float("inf")]
    published = decode_bytes(result.encoded)
    left, top, right, bottom = (int(v) for v in faces[0].box)
    assert np.abs(published[top:bottom, left:right].astype(int) - photo[top:bottom, left:right]).mean() > 10
    assert result.detectors == ("centerface", "hog")


def test_second_opinion_takes_in_a_face_ingest_missed(astronaut, face_patch):
    """Ingest found nothing (as if its detector had missed both faces): the check finds them
    in the output (a large one and one too small for dlib), and neither is published as it was."""
    photo = astronaut.copy()
    small = cv2.resize(face_patch, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)
    photo[400:400 + small.shape[0], 20:20 + small.shape[1]] = small
    assert not any(f.box[0] < 80 and f.box[1] > 380 for f in detect_faces(photo, detector="hog"))
    result = anonymize_photo(photo, "PNG", [], [], _settings())
    assert result.status == "released" and len(result.discovered) >= 2
    published = decode_bytes(result.encoded)
    for face, _ in result.discovered:
        left, top, right, bottom = (int(v) for v in face.box)
        changed = np.abs(published[top:bottom, left:right].astype(int) - photo[top:bottom, left:right]).mean()
        assert changed > 5, face.box
    found_again = detect_faces(published, detector="centerface")
    for face in found_again:   # whatever is still a face is one of the protected ones
        assert any(box_overlap(face.box, d.box) > 0.3 for d, _ in result.discovered)
