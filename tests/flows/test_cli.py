"""The command line: release and demo under the test harness, clear errors, policy schema."""
import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from flows.cli import main
from flows.release.lineage import read_table


def test_release_command_prints_summary(tmp_path, prefect_harness, astronaut):
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.fromarray(astronaut).save(tmp_path / "in" / "a.jpg")
    result = CliRunner().invoke(main, ["release", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "released 1, quarantined 0, rejected 0 of 1" in result.output
    assert read_table(tmp_path / "out", "photos").status.tolist() == ["released"]


def test_demo_command_releases_the_samples(tmp_path, prefect_harness):
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "demo"), "--samples", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "released 6, quarantined 0, rejected 0 of 6" in result.output
    assert (tmp_path / "demo" / "report.md").is_file() and (tmp_path / "demo" / "astronaut.jpg").is_file()
    assert (tmp_path / "demo" / "video" / "astronaut_pan.mp4").is_file()


def test_release_with_a_bad_policy_fails_before_touching_anything(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nname: x\nobfuscation:\n  method: swirl\n")
    result = CliRunner().invoke(main, ["release", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-p", str(policy)])
    assert result.exit_code != 0 and f"{policy}:4:11" in result.output
    assert not (tmp_path / "out").exists()


def test_release_of_a_missing_input_is_a_clear_error(tmp_path, prefect_harness):
    result = CliRunner().invoke(main, ["release", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "does not exist" in result.output


def test_policy_schema_lists_the_keys():
    result = CliRunner().invoke(main, ["policy", "schema"])
    schema = json.loads(result.output)
    assert {"obfuscation", "identity_check", "detection", "output", "input"} <= set(schema["properties"])


def test_lineage_show_on_a_non_release_folder(tmp_path):
    result = CliRunner().invoke(main, ["lineage", "show", str(tmp_path)])
    assert result.exit_code != 0 and "no lineage" in result.output


def test_clip_makes_a_video_of_photos_and_refuses_frames_of_two_sizes(tmp_path, astronaut):
    from stages.common.video import load_video

    for index in range(3):
        Image.fromarray(np.roll(astronaut, 8 * index, axis=1)).save(tmp_path / f"f{index}.png")
    Image.fromarray(astronaut[:256]).save(tmp_path / "small.png")
    frames = [str(tmp_path / f"f{index}.png") for index in range(3)]
    result = CliRunner().invoke(main, ["clip", *frames, "-o", str(tmp_path / "out" / "c.mp4"), "--fps", "10"])
    assert result.exit_code == 0, result.output
    video = load_video(tmp_path / "out" / "c.mp4", max_pixels=10 ** 7)
    assert len(video.frames) == 3 and video.fps == 10.0 and video.frames[0].shape == astronaut.shape
    result = CliRunner().invoke(main, ["clip", frames[0], str(tmp_path / "small.png"), "-o", str(tmp_path / "d.mp4")])
    assert result.exit_code != 0 and "differ in size" in result.output
