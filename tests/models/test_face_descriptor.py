"""The PyTorch port of dlib's verifier gives dlib's numbers (the release's leak gate uses it)."""
import numpy as np
import pytest

# tests/dlib_compiled.py (conftest.py puts tests/ on the path)
from dlib_compiled import compiled_descriptor
from skimage import data

from models.face_descriptor import DlibFaceDescriptor, DlibFileError
from models.registry import verified_path
from stages.common.faces import chip_descriptor, detect_faces, face_chip
from stages.common.imageio import load_rgb

# float32 sums in another order: dlib and the port differ by ~4e-7 per component. A verifier
# distance moves by less than this, far below anything that could flip a 0.6 decision.
SAME_NUMBERS = 1e-5


def _chips(photos):
    chips = [face_chip(rgb, face.landmarks) for rgb in photos for face in detect_faces(rgb, detector="hog", upsample=1)]
    rng = np.random.default_rng(0)
    # Not faces: noise, flat grey (what the gate's "blank" measures), a dark and a bright chip.
    chips += [(rng.random((150, 150, 3)) * 255).astype(np.uint8), np.full((150, 150, 3), 128, np.uint8),
              np.full((150, 150, 3), 3, np.uint8), np.full((150, 150, 3), 250, np.uint8)]
    return np.stack(chips)


def _assert_same(chips):
    ours = np.stack([chip_descriptor(c) for c in chips])
    theirs = np.stack([compiled_descriptor(c) for c in chips])
    assert np.abs(ours - theirs).max() < SAME_NUMBERS
    pairs_ours = np.linalg.norm(ours[:, None] - ours[None], axis=2)
    pairs_theirs = np.linalg.norm(theirs[:, None] - theirs[None], axis=2)
    assert np.abs(pairs_ours - pairs_theirs).max() < SAME_NUMBERS
    # One batch gives each chip's own numbers.
    assert np.abs(DlibFaceDescriptor.from_file(verified_path("dlib_face_descriptor")).describe(chips) - ours).max() < 1e-6


def test_port_gives_dlibs_descriptors_on_the_astronaut_and_non_faces():
    astronaut = data.astronaut()
    chips = _chips([astronaut, astronaut[:, ::-1], np.ascontiguousarray(astronaut[::2, ::2])])
    assert len(chips) >= 7
    _assert_same(chips)


@pytest.mark.shared_data
def test_port_gives_dlibs_descriptors_on_group_photos(shared_data):
    photos = [load_rgb(p).rgb for p in sorted((shared_data / "wild" / "group_photos").glob("*.jpg"))[:3]]
    chips = _chips(photos)
    assert len(chips) >= 10
    _assert_same(chips)


def test_another_file_is_refused_with_the_reason(tmp_path):
    data_bytes = verified_path("dlib_face_descriptor").read_bytes()
    truncated = data_bytes.replace(b"\x01\x04fc_2", b"\x01\x04fc_x")
    with pytest.raises(DlibFileError, match="no fc_2 layer"):
        DlibFaceDescriptor(truncated)
    shape_predictor = verified_path("dlib_landmarks_68").read_bytes()
    with pytest.raises(DlibFileError, match="not dlib's face-recognition ResNet"):
        DlibFaceDescriptor(shape_predictor)
