"""Policy v1: the shipped policy loads; malformed policies get file:line errors that say what to do."""
import pytest
from click.testing import CliRunner

from flows.cli import main
from policy.loader import DEFAULT_POLICY, PolicyError, load_policy, parse_policy

VALID = "version: 1\nname: t\n"


def test_default_policy_loads():
    loaded = load_policy()
    assert loaded.path == DEFAULT_POLICY.resolve() and len(loaded.sha256) == 64
    assert loaded.policy.identity_check.threshold == 0.6
    assert loaded.policy.obfuscation.method == "gan"


def _problems(text):
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    return info.value.problems


@pytest.mark.parametrize("text, where, words", [
    ("version: 1\nname: t\nobfuscation:\n  method: blurr\n", "p.yaml:4:11", "'blur', 'pixelate' or 'mask'"),
    ("version: 1\nname: t\nobfuscation:\n  blur:\n    sigmaa: 1\n", "p.yaml:5:5", "unknown key 'sigmaa'"),
    ("version: 1\nname: t\nidentity_check:\n  threshold: -1\n", "p.yaml:4:14", "greater than 0"),
    ("version: 1\nname: t\nidentity_check:\n  threshold: high\n", "p.yaml:4:14", "valid number"),
    ("version: 1\nname: t\nidentity_check:\n  on_leak: fallback\n  fallback: []\n", "p.yaml:5:13", "fallback list is empty"),
    ("version: 1\nname: t\nobfuscation:\n  method: mask\nidentity_check:\n  fallback: [mask]\n", "p.yaml:6:13",
     "would leak again"),
    ("version: 1\nname: t\nname: u\n", "p.yaml:3:1", "appears twice"),
    ("version: 1\n", "p.yaml:1:1", "'name' is required"),
    ("version: 1\nname: [unclosed\n", "p.yaml:", "YAML syntax error"),
    ("- just\n- a list\n", "p.yaml:1:1", "must be a mapping"),
    ("", "p.yaml:1:1", "empty"),
    ("version: 1\nname: t\nmask:\n  color: [1, 2, 300]\n", "p.yaml:3:1", "unknown key 'mask'"),
    ("version: 1\nname: t\nobfuscation:\n  mask:\n    color: [1, 2, 300]\n", "p.yaml:5:12", "between 0 and 255"),
    # Policy language v1: attributes and privacy (issue 4).
    ("version: 0\nname: t\n", "p.yaml:1:10", "set `version: 1`"),
    ("version: 1\nname: t\nattributes:\n  obfuscate: [Male, Blond_Hiar]\n", "p.yaml:4:21",
     "unknown attribute 'Blond_Hiar'; did you mean 'Blond_Hair'?"),
    ("version: 1\nname: t\nattributes:\n  preserve: [smiling]\n", "p.yaml:4:14", "did you mean 'Smiling'?"),
    ("version: 1\nname: t\nattributes:\n  preserve: [Smiling, Male]\n  obfuscate: [Young, Male]\n", "p.yaml:5:22",
     "'Male' is both preserved and obfuscated; remove it from one of the lists"),
    ("version: 1\nname: t\nprivacy:\n  epsilon: 0\n", "p.yaml:4:12", "epsilon must be a positive number"),
    ("version: 1\nname: t\nprivacy:\n  epsilon: -1.5\n", "p.yaml:4:12", "greater than 0"),
    ("version: 1\nname: t\nprivacy:\n  t: 0\n", "p.yaml:4:6", "t is a share between 0 and 1"),
    ("version: 1\nname: t\nprivacy:\n  t: 1.2\n", "p.yaml:4:6", "less than or equal to 1"),
    ("version: 1\nname: t\nprivacy:\n  epsilon: 4\n  budget: 3\n", "p.yaml:5:11",
     "no release could ever run; raise budget or lower epsilon"),
    ("version: 1\nname: t\nprivacy:\n  epsilon: lots\n", "p.yaml:4:12", "valid number"),
    ("version: 1\nname: t\nprivacy:\n  mechanism: laplace\n", "p.yaml:4:14", "'exponential' or 'randomised_response'"),
    ("version: 1\nname: t\nprivacy:\n  epsilonn: 1\n", "p.yaml:4:3", "unknown key 'epsilonn'"),
    ("version: 1\nname: t\nattributes:\n  obfuscate: [Male, Young, Bald, Bangs, Big_Lips, Big_Nose, Black_Hair, "
     "Blond_Hair, Brown_Hair, Gray_Hair, Wavy_Hair]\n", "p.yaml:4:14", "set mechanism: randomised_response"),
])
def test_malformed_policies_name_file_line_and_fix(text, where, words):
    problems = _problems(text)
    assert any(p.startswith(where) and words in p for p in problems), problems


def test_every_problem_is_reported_at_once():
    problems = _problems("version: 1\nname: t\nobfuscation:\n  method: x\ndetection:\n  upsample: 9\n")
    assert len(problems) == 2


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="file not found"):
        load_policy(tmp_path / "none.yaml")


def test_policy_check_command_exit_codes(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["policy", "check", str(DEFAULT_POLICY)]).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID + "detection:\n  detector: retina\n")
    result = runner.invoke(main, ["policy", "check", str(bad)])
    assert result.exit_code == 1 and f"{bad}:4:" in result.output


def test_release_distance_is_threshold_plus_safety_margin():
    policy = parse_policy(VALID + "identity_check:\n  threshold: 0.55\n  safety_margin: 0.1\n")
    assert policy.identity_check.release_distance == 0.55 + 0.1
    assert load_policy().policy.identity_check.release_distance == 0.6 + 0.05


def test_default_detector_is_the_crowd_detector():
    assert load_policy().policy.detection.detector == "centerface"
    assert parse_policy(VALID + "detection:\n  detector: hog\n").detection.detector == "hog"


def test_every_shipped_policy_validates():
    shipped = sorted(DEFAULT_POLICY.parent.glob("*.yaml"))
    assert len(shipped) >= 2
    for path in shipped:
        assert load_policy(path).policy.name == path.stem


def test_gan_policy_is_told_which_obfuscated_attributes_the_photo_cannot_show():
    from policy.tools import unrendered_notes

    text = ("version: 1\nname: gan-hair\nobfuscation:\n  method: gan\n"
            "attributes:\n  preserve: [Smiling]\n  obfuscate: [Male, Blond_Hair]\n")
    policy = parse_policy(text)
    notes = unrendered_notes(policy, rendered=("Male", "Young", "Smiling"))
    assert len(notes) == 1 and "Blond Hair" in notes[0] and "Male," not in notes[0].split("renders")[0]
    assert unrendered_notes(policy, rendered=("Male", "Blond_Hair")) == []
    blur = parse_policy(text.replace("method: gan", "method: blur"))
    assert unrendered_notes(blur, rendered=("Male",)) == []
