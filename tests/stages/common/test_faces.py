"""Detection, alignment round trip, mask coverage and compose on a real photo."""
import cv2
import numpy as np
import pytest

from stages.common.compose import compose_face
from stages.common.faces import (
    align_face,
    apply_affine,
    detect_faces,
    face_mask,
    invert_affine,
    mask_polygon,
    similarity_transform,
    template,
)


@pytest.fixture(scope="module")
def astronaut_face(astronaut):
    faces = detect_faces(astronaut)
    # The real face is the one in the upper half (HOG also fires on the suit's collar).
    return max(faces, key=lambda f: -f.box[1])


def test_detects_the_astronaut_face(astronaut, astronaut_face):
    left, top, right, bottom = astronaut_face.box
    assert 150 < (left + right) / 2 < 290 and 50 < (top + bottom) / 2 < 200
    assert astronaut_face.landmarks.shape == (68, 2) and np.isfinite(astronaut_face.landmarks).all()


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 100, (68, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = scale * points @ rotation.T + shift
    matrix = similarity_transform(points, moved)
    np.testing.assert_allclose(apply_affine(matrix, points), moved, atol=1e-9)


def test_alignment_round_trip_within_one_pixel(astronaut, astronaut_face):
    aligned = align_face(astronaut, astronaut_face.landmarks)
    back = apply_affine(aligned.inverse, aligned.landmarks)
    assert np.abs(back - astronaut_face.landmarks).max() < 1.0
    np.testing.assert_allclose(aligned.inverse, invert_affine(aligned.matrix))
    # Warped landmarks sit near the template: the alignment did its job.
    assert np.median(np.linalg.norm(aligned.landmarks - template(aligned.crop.shape[0]), axis=1)) < 5


def test_mask_covers_the_landmark_hull(astronaut_face):
    landmarks = astronaut_face.landmarks
    mask = face_mask(landmarks, (512, 512))
    hull = np.zeros((512, 512), np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(landmarks[list(range(27))].astype(np.int32)), 1)
    assert mask[hull == 1].min() >= 0.99
    # Feathered: values strictly between 0 and 1 exist, and far away it is 0.
    assert ((mask > 0.05) & (mask < 0.95)).sum() > 0
    assert mask[0, 0] == 0 and mask[-1, -1] == 0


def test_mask_polygon_includes_interpolated_side_points(astronaut_face):
    polygon = mask_polygon(astronaut_face.landmarks)
    assert len(polygon) >= 10
    assert cv2.pointPolygonTest(polygon.astype(np.float32), tuple(map(float, astronaut_face.landmarks[30])), False) > 0


def test_compose_changes_only_the_masked_face(astronaut, astronaut_face):
    aligned = align_face(astronaut, astronaut_face.landmarks)
    grey = np.full_like(aligned.crop, 128)
    out = compose_face(astronaut, aligned, grey)
    changed = np.any(out != astronaut, axis=2)
    mask = face_mask(astronaut_face.landmarks, astronaut.shape[:2])
    assert changed[mask == 0].sum() == 0
    nose = astronaut_face.landmarks[30].round().astype(int)
    assert np.all(np.abs(out[nose[1], nose[0]].astype(int) - 128) <= 1)


def test_large_photo_detection_uses_downscaled_copy(astronaut):
    big = cv2.resize(astronaut, (3000, 3000), interpolation=cv2.INTER_CUBIC)
    faces = detect_faces(big, max_side=800)
    assert any(1000 < (f.box[0] + f.box[2]) / 2 < 1700 and f.box[1] < 1200 for f in faces)


def test_cnn_detector_option_finds_the_face(astronaut):
    faces = detect_faces(astronaut, detector="cnn", upsample=0)
    assert any(150 < (f.box[0] + f.box[2]) / 2 < 290 and (f.box[1] + f.box[3]) / 2 < 200 for f in faces)


def test_unknown_detector_is_a_clear_error(astronaut):
    with pytest.raises(ValueError, match="unknown detector"):
        detect_faces(astronaut, detector="retina")


def test_forehead_extends_the_mask_above_the_eyebrows_only(astronaut_face):
    landmarks = astronaut_face.landmarks
    hull, with_forehead = face_mask(landmarks, (512, 512)), face_mask(landmarks, (512, 512), forehead=0.25)
    assert np.array_equal(hull, face_mask(landmarks, (512, 512), forehead=0.0))
    assert with_forehead[hull >= 0.99].min() >= 0.99           # everything the hull covers, and more
    brows, chin = landmarks[17:27].mean(axis=0), landmarks[8]
    above = np.round(brows + 0.2 * (brows - chin)).astype(int)  # a point on the forehead
    assert hull[above[1], above[0]] < 0.01 and with_forehead[above[1], above[0]] >= 0.99
    below = np.round(chin + 0.2 * (chin - brows)).astype(int)   # under the chin: neither
    assert hull[below[1], below[0]] < 0.01 and with_forehead[below[1], below[0]] < 0.01


def test_compose_with_a_forehead_changes_the_forehead_too(astronaut, astronaut_face):
    aligned = align_face(astronaut, astronaut_face.landmarks)
    grey = np.full_like(aligned.crop, 128)
    brows, chin = astronaut_face.landmarks[17:27].mean(axis=0), astronaut_face.landmarks[8]
    x, y = np.round(brows + 0.2 * (brows - chin)).astype(int)
    assert np.array_equal(compose_face(astronaut, aligned, grey)[y, x], astronaut[y, x])
    assert np.abs(compose_face(astronaut, aligned, grey, forehead=0.25)[y, x].astype(int) - 128).max() <= 1
