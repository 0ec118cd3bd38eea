"""The identity-leak gate: a method that leaves the face unchanged is caught and never published."""
from dataclasses import replace

import numpy as np
import pytest

from stages.common import obfuscate
from stages.common.anonymize import AnonymizeSettings, anonymize_photo
from stages.common.faces import align_face, detect_faces, face_descriptor
from stages.common.identity import check_identity_leaks
from stages.common.imageio import decode_bytes
from stages.common.obfuscate import enlarged_box


@pytest.fixture
def identity_method(monkeypatch):
    """A 'method' that returns the face untouched: the worst possible obfuscation."""
    monkeypatch.setitem(obfuscate.METHODS, "identity", lambda crop, params: crop.copy())
    return "identity"


def _settings(method, **overrides):
    base = dict(method=method, method_params={}, fallback=["pixelate", "mask"], on_leak="fallback",
                on_no_face="release", release_distance=0.65, feather_fraction=0.06, output_format="png")
    return AnonymizeSettings(**(base | overrides))


@pytest.fixture(scope="module")
def astronaut_faces(astronaut):
    faces = detect_faces(astronaut)
    return faces, [align_face(astronaut, f.landmarks) for f in faces]


def test_unchanged_face_is_caught_and_fallback_applied(astronaut, astronaut_faces, identity_method):
    faces, aligned = astronaut_faces
    result = anonymize_photo(astronaut, "PNG", faces, aligned, _settings(identity_method))
    assert result.status == "released"
    real = max(range(len(faces)), key=lambda i: -faces[i].box[1])
    # The real face leaked with "identity" and was escalated; what is released no longer verifies.
    assert result.faces[real].methods_tried[0] == "identity" and len(result.faces[real].methods_tried) > 1
    assert result.faces[real].method in ("pixelate", "mask")
    assert all(f.distance >= 0.6 for f in result.faces)
    assert not np.array_equal(decode_bytes(result.encoded), astronaut)


def test_unchanged_face_is_quarantined_when_policy_says_so(astronaut, astronaut_faces, identity_method):
    faces, aligned = astronaut_faces
    result = anonymize_photo(astronaut, "PNG", faces, aligned, _settings(identity_method, on_leak="quarantine"))
    assert result.status == "quarantined" and result.encoded is None
    assert "still verifies after identity" in result.reason and ">= 0.65" in result.reason


def test_face_still_verified_after_the_chain_is_protected_over_its_box_and_measured(astronaut, astronaut_faces,
                                                                                    identity_method):
    faces, aligned = astronaut_faces
    result = anonymize_photo(astronaut, "PNG", faces, aligned, _settings(identity_method, fallback=["identity"]))
    assert result.status == "released"
    real = max(range(len(faces)), key=lambda i: -faces[i].box[1])
    # pixelated over its box, then filled flat over it if even that still verifies
    assert result.faces[real].methods_tried in (["identity", "identity", "pixelate"],
                                               ["identity", "identity", "pixelate", "mask"])
    assert result.faces[real].box_reason.startswith("still verified after identity/identity")
    assert result.faces[real].distance >= 0.65     # measured again (inf: no detector finds a face there)
    left, top, right, bottom = (int(v) for v in faces[real].box)
    published = decode_bytes(result.encoded)
    assert np.abs(published[top:bottom, left:right].astype(int) - astronaut[top:bottom, left:right]).mean() > 10


def test_fallback_and_box_exhausted_quarantines(astronaut, astronaut_faces, identity_method, monkeypatch):
    """The flat fill over the box is the last step; when even that leaves the face verifiable
    (here it changes nothing), the photo is held back."""
    monkeypatch.setitem(obfuscate.METHODS, "mask", obfuscate.METHODS[identity_method])
    faces, aligned = astronaut_faces
    result = anonymize_photo(astronaut, "PNG", faces, aligned,
                             _settings(identity_method, fallback=["identity"], box_method=identity_method))
    assert result.status == "quarantined" and result.encoded is None
    assert "identity/identity/identity/mask" in result.reason


def test_face_missed_by_ingest_is_found_and_obfuscated(astronaut):
    # Pretend ingest found no face: the check finds the real one and it gets obfuscated.
    result = anonymize_photo(astronaut, "PNG", [], [], _settings("blur"))
    assert result.status == "released" and len(result.discovered) >= 1
    assert all(f.distance >= 0.6 for f in result.faces)


def test_no_face_policy_quarantine():
    blank = np.full((64, 64, 3), 200, np.uint8)
    result = anonymize_photo(blank, "PNG", [], [], _settings("blur", on_no_face="quarantine"))
    assert result.status == "quarantined" and "no face" in result.reason


def test_baseline_methods_change_the_crop_and_keep_its_shape(astronaut_faces):
    crop = astronaut_faces[1][0].crop
    for name in ("blur", "pixelate", "mask"):
        out = obfuscate.obfuscate(crop, name)
        assert out.shape == crop.shape and out.dtype == np.uint8 and not np.array_equal(out, crop)
    with pytest.raises(ValueError, match="unknown obfuscation method"):
        obfuscate.obfuscate(crop, "swirl")


def test_check_measures_the_original_at_the_output_faces_landmarks(astronaut, astronaut_faces):
    """An original described at landmarks off the face (as a CenterFace box can give) is a
    poor likeness of it: an unchanged face must still be caught, by describing the original
    where the check finds the face in the output."""
    faces, _ = astronaut_faces
    real = max(range(len(faces)), key=lambda i: -faces[i].box[1])
    width = faces[real].box[2] - faces[real].box[0]
    off_face = faces[real].landmarks * 1.25 - faces[real].landmarks.mean(axis=0) * 0.25 + (0.5 * width, 0.0)
    poor = face_descriptor(astronaut, off_face)
    assert np.linalg.norm(poor - face_descriptor(astronaut, faces[real].landmarks)) > 0.65   # a poor likeness
    report = check_identity_leaks(astronaut, astronaut, [faces[real]], [poor], detectors=("hog",))
    assert report.distances[0] < 0.1 and report.leaking(0.65) == [0]


def _real_and_patch(faces):
    """The astronaut's face and the mission patch on her suit that HOG takes for one."""
    real = max(range(len(faces)), key=lambda i: -faces[i].box[1])
    return real, 1 - real


def test_check_measures_a_face_at_its_box_where_no_detector_finds_it(astronaut, astronaut_faces):
    """Someone who knows where a face was describes it there: an unchanged face is caught even
    when no detector looks (``detectors=()``), with a finite distance for every face."""
    faces, _ = astronaut_faces
    real, _ = _real_and_patch(faces)
    originals = [face_descriptor(astronaut, f.landmarks) for f in faces]
    report = check_identity_leaks(astronaut, astronaut, faces, originals, detectors=())
    assert report.distances == [float("inf")] * len(faces)          # not found again: nobody looked
    assert report.at_box[real] < 0.1 and real in report.leaking(0.65)
    assert all(d < float("inf") for d in report.at_box)


def test_check_catches_a_face_that_verifies_as_another_person_of_the_photo(astronaut, astronaut_faces):
    """Membership: the face published at one place is a person whose original stands at
    another place of the photo; its own distances pass, the comparison with the other fails."""
    faces, _ = astronaut_faces
    real, patch = _real_and_patch(faces)
    width = faces[real].box[2] - faces[real].box[0]
    elsewhere = faces[real].landmarks * 1.25 - faces[real].landmarks.mean(axis=0) * 0.25 + (0.5 * width, 0.0)
    stranger = face_descriptor(astronaut, elsewhere)          # who "was" at the face's place: someone else
    her = face_descriptor(astronaut, faces[real].landmarks)   # she "was" where the patch is
    grey = np.full_like(astronaut, 128)                       # the original photo shows no one at the same place
    report = check_identity_leaks(astronaut, grey, [faces[real], faces[patch]], [stranger, her], detectors=("hog",))
    assert min(report.distances[0], report.at_box[0]) > 0.65   # not close to whoever was there
    assert report.membership[0] < 0.1 and 0 in report.leaking(0.65)


def test_a_blank_that_measures_close_to_a_non_face_is_not_a_leak(astronaut, astronaut_faces):
    """dlib puts what is not a face close to everything else that is not one: a grey fill
    over the mission patch measures within the release distance of the patch's "face", but
    no closer than any blank chip does, so it shows nothing of it."""
    faces, _ = astronaut_faces
    real, patch = _real_and_patch(faces)
    covered = astronaut.copy()
    left, top, right, bottom = enlarged_box(faces[patch].box, 0.25, astronaut.shape)
    covered[top:bottom, left:right] = 128
    originals = [face_descriptor(astronaut, f.landmarks) for f in faces]
    report = check_identity_leaks(covered, astronaut, faces, originals, detectors=())
    assert report.at_box[patch] < 0.65 and report.at_box[patch] >= report.blank[patch]
    assert patch not in report.leaking(0.65) and real in report.leaking(0.65)


def test_protection_over_the_box_covers_the_verifiers_own_box_of_the_face_too(astronaut, astronaut_faces):
    """A face ingest's detector boxed more tightly than the verifier's (HOG) is covered over
    both boxes (enlarged), and its removal takes out both: SFace still read hair left beside a
    face masked over CenterFace's box alone as the person's."""
    faces, aligned = astronaut_faces
    real = max(range(len(faces)), key=lambda i: -faces[i].box[1])
    left, top, right, bottom = faces[real].box
    tight = replace(faces[real], box=(left + 30, top, right, bottom))   # HOG's box reaches 30 px further left
    settings = _settings("mask", fallback=[], min_synthesis_px=10_000, box_method="mask")   # all over their box
    result = anonymize_photo(astronaut, "PNG", [tight], [aligned[real]], settings)
    assert result.status == "released" and result.faces[0].boxed
    published = decode_bytes(result.encoded)
    hog_left, _, _, _ = enlarged_box(faces[real].box, settings.box_margin, astronaut.shape)
    strip = published[int(top):int(bottom), hog_left:int(left + 30)]
    assert strip.size and (strip == strip[0, 0]).all(), "the part of HOG's box beyond the ingest box is filled too"
