"""Stage II (PPAS): the mechanisms do what their math says (≥ 100,000 simulated faces),
t-closeness holds on CelebA test faces for every example policy, infeasible policies are
refused before any image is touched, the privacy ledger refuses a release over budget, and
the compliance tools (check, explain, diff, new, JSON Schema) work."""
import json
import math

import jsonschema
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from flows.cli import main
from flows.release import gates, lineage, privacy_ledger
from policy.loader import POLICY_DIR, load_policy
from policy.schema import policy_json_schema
from policy.tools import diff, explain
from stages.attributes.names import ATTRIBUTES
from stages.attributes.predict import shipped_population
from stages.common.facetable import ATTRIBUTE_COLUMNS
from stages.selection.ppas import (
    PolicyInfeasible,
    build_selection,
    check_t_closeness,
    measured_t_closeness,
    require_feasible,
    select_face_rows,
)

EXAMPLES = ["default", "research-share", "strict", "frontal-fast"]
SIMULATED = 100_000


@pytest.fixture(scope="module")
def population():
    return shipped_population()


def test_randomised_response_keep_rate_and_odds_on_100k_faces(population):
    selection = build_selection(population, ["Male", "Young"], epsilon=2.0, mechanism="randomised_response")
    rng = np.random.default_rng(0)
    x = rng.random((SIMULATED, 2)) < np.array([0.42, 0.77])
    y = selection.select(x, random_state=1)
    q = math.exp(1.0) / (1 + math.exp(1.0))          # ε/k = 1 per attribute
    assert selection.keep_probability == pytest.approx(q)
    for j in range(2):
        keep_given_one = (y[x[:, j], j]).mean()
        keep_given_zero = (~y[~x[:, j], j]).mean()
        assert abs(keep_given_one - q) < 0.01 and abs(keep_given_zero - q) < 0.01
        # Odds ratio P(y=1 | x=1) / P(y=1 | x=0) is e^{ε/k} by design: empirically no more than
        # that plus three standard errors of its logarithm.
        p1, p0 = keep_given_one, 1 - keep_given_zero
        n1, n0 = x[:, j].sum(), (~x[:, j]).sum()
        log_ratio = math.log(p1 / p0)
        se = math.sqrt((1 - p1) / (n1 * p1) + (1 - p0) / (n0 * p0))
        assert log_ratio <= 1.0 + 3 * se
    # Whole face: the most different inputs (all attributes differ) are at most e^ε apart.
    same = (y == x).all(axis=1).mean()
    flipped = (y == ~x).all(axis=1).mean()
    assert same == pytest.approx(q * q, abs=0.01) and math.log(same / flipped) <= 2.0 + 0.05


def test_exponential_mechanism_matches_its_probabilities_on_100k_faces(population):
    selection = build_selection(population, ["Male", "Young", "Blond_Hair"], epsilon=3.0)
    analytic = selection.output_probabilities(selection.prior)
    # Exactly ε-DP: for every output, the ratio across all inputs stays within e^ε.
    ratios = analytic.max(axis=0) / analytic.min(axis=0)
    assert ratios.max() <= math.exp(3.0) * (1 + 1e-9)
    inputs = selection.prior[[0, -1]]                 # two different combinations
    x = np.repeat(inputs, SIMULATED // 2, axis=0)
    y = selection.select(x, random_state=7)
    for row, expected in zip(inputs, selection.output_probabilities(inputs)):
        drawn = y[(x == row).all(axis=1)]
        empirical = np.array([(drawn == c).all(axis=1).mean() for c in selection.candidates])
        assert np.abs(empirical - expected).max() < 0.01
    # Every drawn combination is a plausible one.
    drawn_codes = {tuple(r) for r in y}
    assert drawn_codes <= {tuple(c) for c in selection.candidates}


def test_closed_form_t_matches_simulation(population):
    """The closed form is what a large population actually shows."""
    selection = build_selection(population, ["Male", "Eyeglasses"], epsilon=2.0, mechanism="randomised_response")
    rng = np.random.default_rng(3)
    x = rng.random((SIMULATED, 2)) < selection.prevalence
    y = selection.select(x, random_state=4)
    measured = measured_t_closeness(x, y, selection.attributes, min_group_faces=30)
    for item, closed in zip(measured, selection.closed_form_distances()):
        assert item["distance"] == pytest.approx(closed, abs=0.01)


def test_infeasible_policy_names_attribute_and_what_would_work(population, tmp_path):
    selection = build_selection(population, ["Male", "Young"], epsilon=8.0)
    violations = check_t_closeness(selection, 0.2)
    assert {v["attribute"] for v in violations} == {"Male", "Young"}
    with pytest.raises(PolicyInfeasible, match=r"'Male'.*use t >= 0\.\d\d, or keep t and lower epsilon"):
        require_feasible(selection, 0.2)
    for position, v in enumerate(violations):  # what the message suggests really works
        assert selection.with_epsilon(v["max_epsilon"]).closed_form_distances()[position] <= 0.2 + 1e-6
        assert v["distance"] <= v["min_t"] < v["distance"] + 0.01
    safe = min(v["max_epsilon"] for v in violations)
    assert check_t_closeness(selection.with_epsilon(safe), 0.2) == []
    # The CLI refuses it with file:line, before any image is read.
    policy = tmp_path / "too-weak.yaml"
    policy.write_text("version: 1\nname: too-weak\nattributes:\n  obfuscate: [Male, Young]\nprivacy:\n"
                      "  epsilon: 8\n  budget: 8\n  t: 0.2\n")
    result = CliRunner().invoke(main, ["policy", "check", str(policy)])
    assert result.exit_code == 1
    assert f"{policy.resolve()}:8:3: the policy cannot be met" in result.output and "'Young'" in result.output


@pytest.mark.shared_data
@pytest.mark.parametrize("name", EXAMPLES)
def test_t_closeness_holds_on_celeba_test_faces(name, population, shared_data):
    """Each example policy on the identity-disjoint CelebA test split (ground-truth labels
    stand in for Stage I's predictions): every judged group is within t."""
    from stages.attributes.data import read_labels, split_of_identity

    policy = load_policy(POLICY_DIR / f"{name}.yaml").policy
    # The split the shipped Stage I model was tested on (seed 0): people it never saw.
    rows = [r for r in read_labels(shared_data / "celeba" / "labels.csv") if split_of_identity(r.identity, 0) == "test"]
    assert len(rows) > 1000
    face_rows = [{"image_id": r.image_id, **dict(zip(ATTRIBUTE_COLUMNS, map(float, r.labels)))} for r in rows]
    selection = build_selection(population, policy.attributes.obfuscate, policy.privacy.epsilon,
                                policy.privacy.mechanism)
    selected = select_face_rows(face_rows, selection, random_state=11)
    original = np.array([[r[ATTRIBUTE_COLUMNS[ATTRIBUTES.index(a)]] >= 0.5 for a in selection.attributes]
                         for r in face_rows])
    released = np.array([[r["target_attributes"][ATTRIBUTES.index(a)] for a in selection.attributes]
                         for r in selected])
    results = measured_t_closeness(original, released, selection.attributes, policy.privacy.min_group_faces)
    judged = [r["distance"] for r in results if r["distance"] is not None]
    assert len(judged) == len(results)           # with ~1,500 faces every attribute is judged
    assert max(judged) <= policy.privacy.t, results
    assert all(r["epsilon_spent"] == policy.privacy.epsilon for r in selected)
    preserved = [ATTRIBUTES.index(a) for a in policy.attributes.preserve]
    for before, after in zip(face_rows, selected):
        assert all(after["target_attributes"][i] == (before[ATTRIBUTE_COLUMNS[i]] >= 0.5) for i in preserved)


def _faces_frame(targets, predicted, epsilon=1.0):
    rows = []
    for index, (target, probs) in enumerate(zip(targets, predicted)):
        rows.append({"image_id": f"p{index}.jpg", "target_attributes": target, "epsilon_spent": epsilon,
                     **dict(zip(ATTRIBUTE_COLUMNS, probs))})
    return pd.DataFrame(rows)


def test_ppas_gate_fails_closed():
    predicted = [[0.9] * 40, [0.1] * 40]
    targets = [[True] * 40, [False] * 40]
    smiling = ATTRIBUTES.index("Smiling")
    ok = gates.ppas_gate(_faces_frame(targets, predicted), [], ["Smiling"], epsilon=1.0, t=0.2)
    assert ok.passed
    changed = [list(t) for t in targets]
    changed[0][smiling] = False                        # a preserved attribute was changed
    bad = gates.ppas_gate(_faces_frame(changed, predicted), [], ["Smiling"], epsilon=1.0, t=0.2)
    assert not bad.passed and bad.failed_image_ids == {"p0.jpg"}
    over = gates.ppas_gate(_faces_frame(targets, predicted, epsilon=2.5), [], [], epsilon=1.0, t=0.2)
    assert not over.passed and over.failed_image_ids == {"p0.jpg", "p1.jpg"}
    short = gates.ppas_gate(_faces_frame([[True] * 39, [False] * 40], predicted), [], [], epsilon=1.0, t=0.2)
    assert not short.passed and "p0.jpg" in short.failed_image_ids
    closeness = [{"attribute": "Male", "groups": [
        {"released": 1, "faces": 40, "original_share": 1.0, "distance": 0.5, "judged": True},
        {"released": 0, "faces": 40, "original_share": 0.0, "distance": 0.5, "judged": False}]}]
    far = gates.ppas_gate(_faces_frame(targets, predicted), closeness, [], epsilon=1.0, t=0.2)
    assert not far.passed and far.failed_image_ids == {"p0.jpg"}   # faces released with Male = 1


def test_ledger_refuses_release_over_budget(tmp_path):
    for index in range(2):
        spend = privacy_ledger.reserve(tmp_path, "hr-photos", 4.0, 10.0, f"run{index}", "p", "sha", "out")
        assert spend.spent_before == 4.0 * index
    before = sorted(p.name for p in (tmp_path / "_lineage" / "privacy").iterdir())
    with pytest.raises(privacy_ledger.PrivacyBudgetExceeded, match=r"spent epsilon 8 of its budget 10 .* needs 4"):
        privacy_ledger.reserve(tmp_path, "hr-photos", 4.0, 10.0, "run2", "p", "sha", "out")
    assert sorted(p.name for p in (tmp_path / "_lineage" / "privacy").iterdir()) == before
    # Another dataset has its own budget.
    assert privacy_ledger.reserve(tmp_path, "other", 4.0, 10.0, "run3", "p", "sha", "out").spent_before == 0


def test_ledger_refunds_a_run_that_published_nothing(tmp_path):
    from flows.release import resume

    privacy_ledger.reserve(tmp_path, "hr-photos", 4.0, 10.0, "kept", "p", "sha", "out")
    privacy_ledger.reserve(tmp_path, "hr-photos", 4.0, 10.0, "failed", "p", "sha", "out")
    assert privacy_ledger.refund(tmp_path, "failed", "it failed before publishing") == 4.0
    assert privacy_ledger.refund(tmp_path, "failed", "twice") == 0.0             # given back once only
    assert privacy_ledger.refund(tmp_path, "never-charged", "no such run") == 0.0
    assert privacy_ledger.spent(tmp_path, "hr-photos") == [4.0]
    ledger = lineage.read_table(tmp_path, "privacy")
    assert sorted(ledger.entry) == ["charge", "charge", "refund"]                # the charge stays on record
    assert ledger.loc[ledger.entry == "refund", "reason"].tolist() == ["it failed before publishing"]
    assert privacy_ledger.reserve(tmp_path, "hr-photos", 4.0, 10.0, "next", "p", "sha", "out").spent_before == 4.0

    # A run killed before publishing anything is refunded when the next run closes it; one
    # that had published a photo keeps its charge.
    release_dir = tmp_path / "release"
    for run_id, released in (("killed-early", []), ("killed-late", ["a.jpg"])):
        privacy_ledger.reserve(tmp_path, "d", 1.0, 10.0, run_id, "p", "sha", str(release_dir))
        lineage.write_table(release_dir, "runs", run_id, [{"run_id": run_id, "status": "running",
                                                           "ledger_dir": str(tmp_path), "epsilon_release": 1.0}])
        lineage.write_table(release_dir, "photos", run_id, lineage.project("photos", [
            {"image_id": name, "status": "released"} for name in released], run_id), "b00000")
    resume.recover_interrupted(release_dir, "later")
    runs = lineage.read_table(release_dir, "runs").set_index("run_id")
    assert runs.loc["killed-early", "epsilon_refunded"] == 1.0 and pd.isna(runs.loc["killed-late", "epsilon_refunded"])
    assert privacy_ledger.spent(tmp_path, "d") == [1.0]


def test_a_failed_release_gives_its_epsilon_back_and_a_partial_one_keeps_it(tmp_path, astronaut, prefect_harness,
                                                                           monkeypatch):
    from PIL import Image

    from flows.release import flow as release_module

    photos = tmp_path / "in"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(astronaut).save(photos / name, quality=90)
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nname: four\ndetection:\n  detector: hog\nobfuscation:\n  method: blur\n"
                      "perturbation:\n  enabled: false\nattributes:\n  obfuscate: [Young]\n"
                      "privacy:\n  epsilon: 4\n  budget: 10\n  t: 0.7\n")
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise RuntimeError("Stage II crashed")

    with monkeypatch.context() as patch:
        patch.setattr(release_module, "select_attributes_task", broken)
        with pytest.raises(RuntimeError, match="Stage II crashed"):
            release_module.release(input=str(photos), output=str(out), policy=str(policy))
    run = lineage.read_table(out, "runs").iloc[0]
    assert run.status == "failed" and run.epsilon_refunded == 4.0
    assert privacy_ledger.spent(out, str(photos.resolve())) == []
    assert "was given back to the dataset's budget" in (out / "report.md").read_text()

    real_publish, calls = release_module.publish_task, []

    def publish_once(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk full")
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(release_module, "publish_task", publish_once)
    with pytest.raises(OSError, match="disk full"):
        release_module.release(input=str(photos), output=str(out), policy=str(policy), batch_size=1)
    runs = lineage.read_table(out, "runs").sort_values("started_at")
    partial = runs.iloc[-1]
    assert partial.status == "failed" and partial.n_released == 1 and pd.isna(partial.epsilon_refunded)
    assert partial.epsilon_spent_before == 0.0                 # the failed run's charge was given back
    assert privacy_ledger.spent(out, str(photos.resolve())) == [4.0]
    assert "stays charged to the dataset" in (out / "report.md").read_text()


def test_three_releases_of_epsilon_4_against_budget_10(tmp_path, astronaut, prefect_harness):
    """Through the release flow: the third release is refused and writes nothing."""
    from PIL import Image

    from flows.release.flow import release

    photos = tmp_path / "in"
    photos.mkdir()
    Image.fromarray(astronaut).save(photos / "a.jpg", quality=90)
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nname: four\ndetection:\n  detector: hog\nattributes:\n  obfuscate: [Young]\n"
                      "privacy:\n  epsilon: 4\n  budget: 10\n  t: 0.7\n")
    out = tmp_path / "out"
    for _ in range(2):
        summary = release(input=str(photos), output=str(out), policy=str(policy), incremental=False)
        assert summary["status"] == "completed"
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(privacy_ledger.PrivacyBudgetExceeded, match="has spent epsilon 8 of its budget 10"):
        release(input=str(photos), output=str(out), policy=str(policy), incremental=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot
    runs = lineage.read_table(out, "runs")
    assert list(runs.sort_values("started_at")["epsilon_spent_before"]) == [0.0, 4.0]
    faces = lineage.read_table(out, "faces")
    assert (faces["epsilon_spent"] == 4.0).all() and faces["target_attributes"].map(len).eq(40).all()


def test_json_schema_validates_examples_and_is_current():
    schema = json.loads((POLICY_DIR / "policy.schema.json").read_text())
    assert schema == json.loads(json.dumps(policy_json_schema())), \
        "policy/policy.schema.json is stale: run `anonymousnet policy schema --write policy/policy.schema.json`"
    import yaml

    for name in EXAMPLES:
        jsonschema.validate(yaml.safe_load((POLICY_DIR / f"{name}.yaml").read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "name": "x", "attributes": {"obfuscate": ["Blond_Hiar"]}}, schema)


def test_explain_reads_for_a_non_programmer(population):
    from policy.settings import plan_selection

    loaded = load_policy(POLICY_DIR / "strict.yaml")
    selection = plan_selection(loaded.policy)
    text = explain(loaded, selection, selection.closed_form_distances().tolist())
    assert "Kept exactly as the model sees them: Smiling." in text
    assert "by at most e^0.5 = 1.65 times" in text
    assert "within 10 percentage points" in text
    assert "After 4 release(s) of the same dataset, further releases are refused" in text
    assert "Photos without a face are published not at all" in text
    assert "nothing is published (abort)" in text
    assert "_" not in text.split("WHAT IS KEPT")[1].split("OUTPUT")[0]   # attribute names in words


def test_diff_says_which_guarantees_got_weaker():
    strict = load_policy(POLICY_DIR / "strict.yaml").policy
    research = load_policy(POLICY_DIR / "research-share.yaml").policy
    changes = dict((text.split(":")[0], verdict) for verdict, text in diff(strict, research))
    assert changes["privacy.epsilon"] == "weaker" and changes["privacy.t"] == "weaker"
    assert changes["identity_check.on_no_face"] == "weaker"
    weaker = [text for verdict, text in diff(strict, research) if verdict == "weaker"]
    assert any("no longer re-chosen" in t and "Male" in t for t in weaker)
    back = dict((text.split(":")[0], verdict) for verdict, text in diff(research, strict))
    assert back["privacy.epsilon"] == "stronger"
    runner = CliRunner()
    result = runner.invoke(main, ["policy", "diff", str(POLICY_DIR / "strict.yaml"),
                                  str(POLICY_DIR / "research-share.yaml"), "--fail-on-weaker"])
    assert result.exit_code == 2 and "WEAKER" in result.output


def test_policy_new_writes_a_valid_commented_policy(tmp_path):
    runner = CliRunner()
    target = tmp_path / "team.yaml"
    assert runner.invoke(main, ["policy", "new", str(target)]).exit_code == 0
    loaded = load_policy(target)
    assert loaded.policy.name == "team" and loaded.text.count("#") > 20
    again = runner.invoke(main, ["policy", "new", str(target)])
    assert again.exit_code != 0 and "nothing was overwritten" in again.output
    assert runner.invoke(main, ["policy", "check", str(target)]).exit_code == 0
