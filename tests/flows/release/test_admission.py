"""Admission: approved policies only, confined folders, and who started a run (issue 22).
The same refusals through a real server, worker and deployment are in
tests/infra/test_operations.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from flows.release import lineage
from flows.release.admission import Confinement, Refused, RunOrigin, admit
from policy.approvals import ApprovedPolicies
from policy.loader import load_policy

REPO = Path(__file__).resolve().parents[3]
FAST = REPO / "policy" / "frontal-fast.yaml"


def _weaker_copy(source: Path, target: Path, epsilon: float) -> Path:
    text = source.read_text()
    assert "epsilon:" in text
    lines = [f"  epsilon: {epsilon}" if line.strip().startswith("epsilon:") else line for line in text.splitlines()]
    target.write_text("\n".join(lines) + "\n")
    return target


def test_a_folder_list_approves_by_content_and_finds_the_last_version(tmp_path):
    store = ApprovedPolicies(tmp_path / "approved")
    first = load_policy(FAST)
    written = store.approve(first, approver="officer", note="ticket 1")
    assert store.is_approved(first.sha256) and written.read_bytes() == FAST.read_bytes()
    # Renaming the approved copy changes nothing: approval is by the bytes' sha256.
    written.rename(written.with_name("renamed.yaml"))
    assert store.is_approved(first.sha256)
    weaker = load_policy(_weaker_copy(FAST, tmp_path / "weaker.yaml", 8))
    assert not store.is_approved(weaker.sha256)
    assert store.last_approved(first.policy.name).sha256 == first.sha256
    assert store.last_approved("no-such-policy") is None
    store.approve(weaker, approver="officer")
    assert store.last_approved(first.policy.name).sha256 == weaker.sha256
    log = [json.loads(line) for line in (tmp_path / "approved" / "approvals.log").read_text().splitlines()]
    assert [(r["approved_by"], r["sha256"]) for r in log] == [("officer", first.sha256), ("officer", weaker.sha256)]
    # A file edited after approval is no longer the approved version.
    edited = tmp_path / "approved" / "renamed.yaml"
    edited.write_text(edited.read_text() + "# edited\n")
    assert not store.is_approved(first.sha256)


def test_a_digests_file_in_sha256sum_format(tmp_path):
    loaded = load_policy(FAST)
    digests = tmp_path / "approved.sha256"
    digests.write_text(f"# approved policies\n{loaded.sha256}  {FAST}\n")
    store = ApprovedPolicies(digests)
    assert not store.is_folder and store.is_approved(loaded.sha256)
    assert store.last_approved(loaded.policy.name).sha256 == loaded.sha256
    weaker = load_policy(_weaker_copy(FAST, tmp_path / "weaker.yaml", 8))
    store.approve(weaker)
    assert store.is_approved(weaker.sha256) and digests.read_text().count("\n") == 3
    missing = ApprovedPolicies(tmp_path / "nowhere.txt")
    with pytest.raises(ValueError, match="does not exist"):
        missing.digests()


def _confinement(tmp_path, approve: bool = True) -> Confinement:
    store = ApprovedPolicies(tmp_path / ("approved" if approve else "approved-none"))
    store.location.mkdir(parents=True, exist_ok=True)
    if approve:
        store.approve(load_policy(FAST))
    (tmp_path / "in").mkdir(exist_ok=True)
    return Confinement(store, (tmp_path / "in",), (tmp_path / "out",))


DEPLOYED = RunOrigin(flow_run_id="f", flow_run_name="calm-fox", deployment_id="d", deployment_name="nightly",
                     trigger="schedule", parameters={"input": "x", "dataset": None, "ledger": None},
                     deployment_parameters={"input": "x", "dataset": None, "ledger": None})


def test_admission_refuses_with_every_reason(tmp_path):
    loaded = load_policy(FAST)
    inside_in, inside_out = str(tmp_path / "in"), str(tmp_path / "out" / "nightly")
    admit(loaded, inside_in, inside_out, None, None, DEPLOYED, _confinement(tmp_path))   # admitted
    with pytest.raises(Refused, match="is not approved.*policy approve") as refused:
        admit(loaded, inside_in, inside_out, None, None, DEPLOYED, _confinement(tmp_path, approve=False))
    assert refused.value.release_dir_allowed
    # A symbolic link inside a root that points outside it is outside.
    (tmp_path / "in" / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(Refused) as refused:
        admit(loaded, str(tmp_path / "in" / "escape"), "/tmp/anywhere", str(tmp_path / "ledgers"), None, DEPLOYED,
              _confinement(tmp_path))
    text = str(refused.value)
    assert "input" in text and "outside the input roots" in text
    assert "output /tmp/anywhere is outside the release roots" in text and "ledger" in text
    assert not refused.value.release_dir_allowed
    # The release folder's records may not be carried out of the roots by a planted link.
    (tmp_path / "out" / "linked").mkdir(parents=True)
    (tmp_path / "out" / "linked" / "_lineage").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(Refused, match="_lineage is a link that leads outside") as refused:
        admit(loaded, inside_in, str(tmp_path / "out" / "linked"), None, None, DEPLOYED, _confinement(tmp_path))
    assert not refused.value.release_dir_allowed
    # The budget's parameters are the deployment's; the worker's settings are the worker's.
    changed = RunOrigin(**{**DEPLOYED.__dict__, "parameters": {"input": "x", "dataset": "fresh", "ledger": None},
                           "job_variables": {"env": {"ANONYMOUSNET_APPROVED_POLICIES": "/tmp/mine", "OTHER": "1"}}})
    assert changed.overridden() == ["dataset"]
    with pytest.raises(Refused, match="'dataset' was changed.*ANONYMOUSNET_APPROVED_POLICIES; set them on the worker"):
        admit(loaded, inside_in, inside_out, None, None, changed, _confinement(tmp_path))


def test_deployment_runs_need_the_settings_and_manual_runs_do_not(tmp_path):
    loaded = load_policy(FAST)
    with pytest.raises(Refused, match="ANONYMOUSNET_APPROVED_POLICIES, ANONYMOUSNET_INPUT_ROOTS, "
                                      "ANONYMOUSNET_RELEASE_ROOTS set on the worker"):
        admit(loaded, "/a", "/b", None, None, DEPLOYED, Confinement())
    admit(loaded, "/a", "/b", None, None, RunOrigin(), Confinement())    # a laptop: nothing configured
    environ = {"ANONYMOUSNET_INPUT_ROOTS": f"{tmp_path / 'one'}:{tmp_path / 'two'}",
               "ANONYMOUSNET_APPROVED_POLICIES": str(tmp_path / "approved")}
    confinement = Confinement.from_environment(environ)
    assert confinement.input_roots == (tmp_path / "one", tmp_path / "two") and confinement.release_roots is None
    admit(loaded, str(tmp_path / "two" / "x"), "/b", None, None, RunOrigin(),
          Confinement(None, confinement.input_roots, None))
    with pytest.raises(Refused, match="cannot be read.*does not exist"):   # configured, so held to it
        admit(loaded, str(tmp_path / "two" / "x"), "/b", None, None, RunOrigin(), confinement)


def _photo_folder(root: Path, astronaut) -> Path:
    root.mkdir(parents=True)
    Image.fromarray(astronaut).save(root / "astronaut.png")
    return root


def test_a_refused_release_reads_no_photo_and_is_recorded(tmp_path, monkeypatch, astronaut, prefect_harness):
    from flows.release import flow

    inputs = _photo_folder(tmp_path / "in" / "photos", astronaut)
    output = tmp_path / "out" / "release"
    (tmp_path / "approved").mkdir()
    monkeypatch.setenv("ANONYMOUSNET_APPROVED_POLICIES", str(tmp_path / "approved"))
    monkeypatch.setenv("ANONYMOUSNET_INPUT_ROOTS", str(tmp_path / "in"))
    monkeypatch.setenv("ANONYMOUSNET_RELEASE_ROOTS", str(tmp_path / "out"))

    def no_photo_may_be_read(*args, **kwargs):
        raise AssertionError("a refused run listed or read its input")

    monkeypatch.setattr(flow, "discover_inputs", no_photo_may_be_read)
    with pytest.raises(Refused, match="is not approved"):
        flow.release(input=str(inputs), output=str(output), policy=str(FAST))
    runs = lineage.read_table(output, "runs")
    assert list(runs.status) == ["refused"] and "is not approved" in runs.error.iloc[0]
    assert runs.trigger.iloc[0] == "direct call" and json.loads(runs.parameters.iloc[0])["input"] == str(inputs)
    assert lineage.read_table(output, "photos").empty and not (output / "astronaut.png").exists()
    report = (output / "report.md").read_text()
    assert "**refused**" in report and "policy approve" in report
    # Outside the release roots: refused, and nothing is written there.
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(Refused, match="outside the release roots"):
        flow.release(input=str(inputs), output=str(elsewhere), policy=str(FAST))
    assert not elsewhere.exists()
    monkeypatch.undo()
    # Approved and inside the roots, the same release runs, and lineage says who started it.
    ApprovedPolicies(tmp_path / "approved").approve(load_policy(FAST))
    for name, value in (("APPROVED_POLICIES", tmp_path / "approved"), ("INPUT_ROOTS", tmp_path / "in"),
                        ("RELEASE_ROOTS", tmp_path / "out")):
        monkeypatch.setenv(f"ANONYMOUSNET_{name}", str(value))
    summary = flow.release(input=str(inputs), output=str(output), policy=str(FAST), photo_workers=1)
    assert summary["status"] == "completed" and summary["n_released"] == 1
    runs = lineage.read_table(output, "runs").sort_values("started_at")
    assert list(runs.status) == ["refused", "completed"]
    assert runs.flow_run_id.notna().all() and runs.flow_run_name.notna().all() and runs.deployment_id.isna().all()
    assert "- Started by: direct call; Prefect flow run" in (output / "report.md").read_text()
    shown = lineage.summarize(output)
    assert "[refused]" in shown and "is not approved" in shown and shown.count("started by direct call") == 2
    shutil.rmtree(tmp_path / "approved")


def test_policy_approve_shows_the_diff_and_asks(tmp_path):
    from flows.cli import main

    runner, approved = CliRunner(), tmp_path / "approved"
    done = runner.invoke(main, ["policy", "approve", str(FAST), "--approved", str(approved), "--yes"])
    assert done.exit_code == 0, done.output
    assert "no earlier approved version" in done.output and "approved policy 'frontal-fast'" in done.output
    weaker = _weaker_copy(FAST, tmp_path / "frontal-fast-v2.yaml", 4)
    refused = runner.invoke(main, ["policy", "approve", str(weaker), "--approved", str(approved)], input="n\n")
    assert refused.exit_code == 1 and "WEAKER    privacy.epsilon" in refused.output
    assert not ApprovedPolicies(approved).is_approved(load_policy(weaker).sha256)
    done = runner.invoke(main, ["policy", "approve", str(weaker), "--approved", str(approved)], input="y\n")
    assert done.exit_code == 0 and ApprovedPolicies(approved).is_approved(load_policy(weaker).sha256)
    again = runner.invoke(main, ["policy", "approve", str(weaker), "--approved", str(approved)])
    assert again.exit_code == 0 and "already approved" in again.output
    nowhere = runner.invoke(main, ["policy", "approve", str(FAST)], env={"ANONYMOUSNET_APPROVED_POLICIES": ""})
    assert nowhere.exit_code == 2 and "--approved" in nowhere.output


def test_a_link_planted_in_the_release_folder_is_not_followed_out_of_the_roots(tmp_path, monkeypatch, astronaut,
                                                                               prefect_harness):
    from flows.release import flow

    inputs = tmp_path / "in" / "photos"
    _photo_folder(inputs / "hr", astronaut)
    Image.fromarray(astronaut).save(inputs / "kept.png")
    output, elsewhere = tmp_path / "out" / "release", tmp_path / "elsewhere"
    output.mkdir(parents=True)
    elsewhere.mkdir()
    (output / "hr").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.setenv("ANONYMOUSNET_RELEASE_ROOTS", str(tmp_path / "out"))
    summary = flow.release(input=str(inputs), output=str(output), policy=str(FAST), photo_workers=1)
    assert summary["n_released"] == 1 and summary["n_quarantined"] == 1
    photos = lineage.read_table(output, "photos").set_index("image_id")
    assert photos.loc["hr/astronaut.png", "status"] == "quarantined"
    assert "link that leads outside the release roots" in photos.loc["hr/astronaut.png", "reason"]
    assert list(elsewhere.iterdir()) == [] and (output / "kept.png").is_file()
    faces = lineage.read_table(output, "faces")
    assert set(faces[faces.image_id == "hr/astronaut.png"].status) == {"quarantined"}
