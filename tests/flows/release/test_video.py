"""Video releases: tracks, lossless writing, and whole videos through the release flow,
built from public-domain frames (skimage's astronaut panned and zoomed; two faces)."""
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from flows.release import lineage
from flows.release.flow import release
from policy.loader import load_policy
from stages.common.faces import DetectedFace, detect_faces, face_descriptor
from stages.common.imageio import load_rgb
from stages.common.samples import panned_clip_frames, two_face_clip_frames, write_clip
from stages.common.sface import SFACE_RELEASE, sface_descriptor
from stages.common.video import decode_video, encode_video, output_suffix, track_faces


def _face(left: float, top: float, size: float = 100.0) -> DetectedFace:
    points = np.stack([np.linspace(left, left + size, 68), np.linspace(top, top + size, 68)], axis=1)
    return DetectedFace(box=(left, top, left + size, top + size), score=1.0, landmarks=points, detector="hog")


def test_tracks_link_faces_across_frames_and_cover_a_detectors_gap():
    """One face moving right, missed by the detector in frames 2 and 3, and a second face
    appearing in frame 1 far from it: two tracks; the gap is covered from its two ends."""
    detections = [[_face(10, 10)], [_face(14, 10), _face(300, 50)], [_face(300, 52)], [_face(301, 54)],
                  [_face(26, 10), _face(302, 56)]]
    tracks = track_faces(detections)
    assert len(tracks) == 2
    moving, other = sorted(tracks, key=lambda track: track.boxes[0][0])
    assert moving.frames == [0, 1, 2, 3, 4] and moving.detected == [True, True, False, False, True]
    assert moving.boxes[2][0] == pytest.approx(18.0) and moving.boxes[3][0] == pytest.approx(22.0)
    assert np.allclose(moving.landmarks[2][:, 0], np.linspace(18, 118, 68))
    assert other.frames == [1, 2, 3, 4] and all(other.detected)
    assert moving.representative() in (0, 1, 4) and moving.detections[2] is None


def test_tracks_do_not_bridge_a_gap_longer_than_the_limit():
    from stages.common.video import MAX_GAP_FRAMES

    detections = [[_face(10, 10)]] + [[] for _ in range(MAX_GAP_FRAMES + 1)] + [[_face(10, 10)]]
    assert len(track_faces(detections)) == 2


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"])
def test_a_video_is_written_losslessly_with_its_frames_and_nothing_else(suffix):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    encoded = encode_video(frames, 12.5, suffix)
    decoded, fps = decode_video(encoded, suffix)
    assert fps == pytest.approx(12.5) and len(decoded) == 4
    assert all(np.array_equal(a, b) for a, b in zip(frames, decoded))
    assert b"soun" not in encoded   # no audio handler (MP4/MOV) ...
    assert b"auds" not in encoded   # ... nor an audio stream (AVI)
    assert output_suffix(suffix) == {".webm": ".mkv", ".m4v": ".mp4"}.get(suffix, suffix)


def _tag_rotated_90(path: Path) -> None:
    """Set the MP4 track header's display matrix to a quarter turn (players and OpenCV rotate
    the stored frames by it)."""
    data = bytearray(path.read_bytes())
    header = data.find(b"tkhd") - 4
    assert data[header + 8] == 0   # version 0: the matrix starts 48 bytes into the box
    data[header + 48:header + 84] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))


def _read_clip(path: Path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The astronaut panned and zoomed (12 frames, 320x240, 12 fps) and two faces side by
    side, one mirrored, moving down (8 frames, 480x240, 10 fps), plus a truncated clip and
    a file that only claims to be a video."""
    root = tmp_path_factory.mktemp("videos")
    write_clip(root / "astronaut_pan.mp4", panned_clip_frames(12, (320, 240)), 12.0)
    write_clip(root / "people" / "two_faces.mov", two_face_clip_frames(8, (480, 240)), 10.0)
    # Stored sideways with a rotation in its track header, as phones record portrait video.
    sideways = [np.ascontiguousarray(np.rot90(frame, 1)) for frame in panned_clip_frames(6, (320, 240))]
    _tag_rotated_90(write_clip(root / "phone" / "rotated.mp4", sideways, 10.0))
    whole = (root / "astronaut_pan.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (root / "not_a_video.avi").write_bytes(b"RIFF\x00\x00\x00\x00AVI " + bytes(200))
    return root


@pytest.fixture(scope="module")
def released_videos(clips, tmp_path_factory, prefect_harness):
    output = tmp_path_factory.mktemp("video-release")
    summary = release(input=str(clips), output=str(output))
    return clips, output, summary


def test_a_video_is_released_whole_at_its_path_with_its_frames_rate_and_size(released_videos):
    clips, output, summary = released_videos
    assert summary["status"] == "completed" and summary["n_leaks_published"] == 0
    photos = lineage.read_table(output, "photos").set_index("image_id")
    for name, frames, fps, size in (("astronaut_pan.mp4", 12, 12.0, (240, 320)),
                                    ("people/two_faces.mov", 8, 10.0, (240, 480))):
        assert photos.loc[name, "status"] == "released", photos.loc[name, "reason"]
        assert photos.loc[name, "output_path"] == name
        assert photos.loc[name, "frames"] == frames and photos.loc[name, "fps"] == pytest.approx(fps)
        assert 1 <= photos.loc[name, "video_rounds"] <= 6
        published, published_fps = _read_clip(output / name)
        assert len(published) == frames and published_fps == pytest.approx(fps)
        assert published[0].shape[:2] == size
        assert b"soun" not in (output / name).read_bytes()   # no audio track
    assert photos.loc["astronaut_pan.mp4", "n_tracks"] == 1
    assert photos.loc["people/two_faces.mov", "n_tracks"] == 2
    report = (output / "report.md").read_text()
    assert "## Videos" in report and "| `people/two_faces.mov` | released | 8 | 10 | 2 |" in report
    assert "Videos in run" in lineage.summarize(output) and "3 (3 released), 26 frames, 4 track(s)" \
        in lineage.summarize(output)


def test_a_video_stored_sideways_is_released_upright_without_its_rotation_tag(released_videos):
    clips, output, _ = released_videos
    photos = lineage.read_table(output, "photos").set_index("image_id")
    assert photos.loc["phone/rotated.mp4", "status"] == "released"
    assert (photos.loc["phone/rotated.mp4", "width"], photos.loc["phone/rotated.mp4", "height"]) == (320, 240)
    capture = cv2.VideoCapture(str(output / "phone" / "rotated.mp4"))
    assert capture.get(cv2.CAP_PROP_ORIENTATION_META) == 0   # the frames themselves are upright
    capture.release()
    published, _ = _read_clip(output / "phone" / "rotated.mp4")
    assert len(published) == 6 and published[0].shape[:2] == (240, 320)
    assert _assert_no_frame_verifies(clips / "phone" / "rotated.mp4", output / "phone" / "rotated.mp4") == 6


def test_bad_videos_are_rejected_with_the_reason(released_videos):
    _, output, _ = released_videos
    photos = lineage.read_table(output, "photos").set_index("image_id")
    for name in ("truncated.mp4", "not_a_video.avi"):
        assert photos.loc[name, "status"] == "rejected"
        assert photos.loc[name, "reason"].startswith("video: ")


def test_each_person_keeps_one_new_face_through_the_video(released_videos):
    """One Stage II draw and one identity code per track; every frame of it recorded."""
    _, output, _ = released_videos
    faces = lineage.read_table(output, "faces")
    two = faces[(faces.image_id == "people/two_faces.mov") & faces.track.notna()]
    assert sorted(two.groupby("track").frame.nunique()) == [8, 8]
    for _, track in two.groupby("track"):
        # One seed through the track, or none when the track went to a method that draws none.
        assert track.identity_code_seed.nunique(dropna=False) == 1 and track.method.nunique() == 1
        assert (track.found_by == "ingest").sum() == 1
        chosen = track[track.found_by == "ingest"].iloc[0]
        assert chosen.track_frames == 8 and chosen.track_consistent
        assert len({tuple(t) for t in track.target_attributes}) == 1
    seeds = two.groupby("track").identity_code_seed.first().dropna()
    assert seeds.is_unique   # two people, two codes (a track escalated past synthesis has none)


def _assert_no_frame_verifies(original_clip: Path, published_clip: Path) -> int:
    """Every published frame against its original: at each original face's landmarks (dlib
    and SFace), and every face any detector finds anywhere in the frame (dlib). Returns the
    original faces measured."""
    release_distance = load_policy().policy.identity_check.release_distance
    originals, _ = _read_clip(original_clip)
    published, _ = _read_clip(published_clip)
    assert len(originals) == len(published)
    measured = 0
    for original, frame in zip(originals, published):
        faces = [face for face in detect_faces(original, detector="hog") if face.box[3] - face.box[1] > 40]
        described = [face_descriptor(original, face.landmarks) for face in faces]
        for face, descriptor in zip(faces, described):
            assert np.linalg.norm(face_descriptor(frame, face.landmarks) - descriptor) >= release_distance
            assert sface_descriptor(frame, face.landmarks) @ sface_descriptor(original, face.landmarks) < SFACE_RELEASE
            measured += 1
        for detector in ("hog", "centerface"):
            for found in detect_faces(frame, detector=detector):
                shown = face_descriptor(frame, found.landmarks)
                assert all(np.linalg.norm(shown - d) >= release_distance for d in described)
    return measured


def test_in_no_frame_does_the_verifier_match_an_original_face(released_videos):
    clips, output, _ = released_videos
    assert _assert_no_frame_verifies(clips / "astronaut_pan.mp4", output / "astronaut_pan.mp4") == 12
    assert _assert_no_frame_verifies(clips / "people/two_faces.mov", output / "people/two_faces.mov") == 16


@pytest.mark.shared_data
@pytest.mark.slow
def test_a_clip_of_the_franck_frames_is_released(shared_data, tmp_path, prefect_harness):
    """The README's video figures: the frames ../shared/data/wild/misc/franck_*.jpg as a 25 fps clip."""
    frames = sorted((shared_data / "wild" / "misc").glob("franck_*.jpg"))
    clip = write_clip(tmp_path / "in" / "franck.mp4", [load_rgb(frame).rgb for frame in frames], 25.0)
    summary = release(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    assert summary["n_released"] == 1 and summary["n_leaks_published"] == 0
    video = lineage.read_table(tmp_path / "out", "photos").iloc[0]
    assert video.frames == len(frames) == 11 and video.n_tracks >= 1
    assert _assert_no_frame_verifies(clip, tmp_path / "out" / "franck.mp4") == len(frames)
