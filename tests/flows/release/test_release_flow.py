"""The release flow end to end under prefect_test_harness, on public-domain photos and bad files."""
import io
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from flows.cli import main
from flows.release import lineage
from flows.release.flow import release
from models import registry
from policy.loader import load_policy
from stages.common import obfuscate
from stages.common.faces import detect_faces, face_descriptor
from stages.common.facetable import ATTRIBUTE_COLUMNS
from stages.common.imageio import load_rgb
from stages.common.samples import write_samples

BAD_FILES = {
    "bad/empty.jpg": (b"", "empty file"),
    "bad/notes.txt": (b"not a photo\n", "not an image"),
    "bad/corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "corrupt"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, astronaut):
    root = tmp_path_factory.mktemp("inputs")
    write_samples(root)
    for name, (content, _) in BAD_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    buffer = io.BytesIO()
    Image.fromarray(astronaut).save(buffer, "JPEG")
    (root / "bad" / "truncated.jpg").write_bytes(buffer.getvalue()[:5000])
    Image.new("1", (20_000, 20_000)).save(root / "bad" / "bomb.png")
    return root


@pytest.fixture(scope="module")
def released(inputs, tmp_path_factory, prefect_harness):
    output = tmp_path_factory.mktemp("release")
    summary = release(input=str(inputs), output=str(output), batch_size=4)
    return inputs, output, summary


def test_every_input_is_accounted_for(released):
    inputs, output, summary = released
    photos = lineage.read_table(output, "photos")
    expected = sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*") if p.is_file())
    assert sorted(photos.image_id) == expected
    assert summary["n_inputs"] == len(expected)
    outcome = dict(zip(photos.image_id, photos.status))
    for name, (_, reason) in BAD_FILES.items():
        assert outcome[name] == "rejected"
        assert reason in photos.set_index("image_id").loc[name, "reason"]
    assert outcome["bad/truncated.jpg"] == "rejected" and outcome["bad/bomb.png"] == "rejected"
    assert outcome["astronaut.jpg"] == "released" and outcome["coffee_no_face.jpg"] == "released"
    assert summary["n_leaks_published"] == 0 and summary["status"] == "completed"


def test_outputs_keep_relative_paths_and_never_copy_originals(released):
    inputs, output, _ = released
    photos = lineage.read_table(output, "photos")
    published = photos[photos.status == "released"]
    files = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()
             and not p.relative_to(output).as_posix().startswith(("_lineage/", "_reports/", "_data_docs/"))
             and p.name != "report.md"}
    assert files == set(published.output_path)
    assert "rotated/astronaut_exif_rotated.jpg" in files
    # The gates' great-expectations results, as GX's own Data Docs site, linked from the report.
    index = (output / "_data_docs" / "index.html").read_text()
    for suite in ("gate:ingest:photos-suite", "gate:ppas:faces-suite", "gate:publish:faces-suite",
                  "gate:perturbation-suite", "gate:accounting-suite"):
        assert suite in index, suite
    assert "_data_docs/index.html" in (output / "report.md").read_text()
    input_hashes = set(photos.input_sha256.dropna())
    for row in published.itertuples():
        assert row.output_sha256 not in input_hashes
        assert (output / row.output_path).read_bytes() != (inputs / row.image_id).read_bytes()
    # Nothing of a rejected input appears anywhere in the release folder.
    assert not any("bad" in name for name in files)


def test_outputs_carry_no_metadata_and_faces_are_obfuscated(released, astronaut):
    inputs, output, _ = released
    for name in ("astronaut.jpg", "rotated/astronaut_exif_rotated.jpg", "astronaut_gray.png", "astronaut_alpha.png"):
        data = (output / name).read_bytes()
        image = Image.open(io.BytesIO(data))
        assert not image.getexif() and "icc_profile" not in image.info and "exif" not in image.info
        assert b"DemoCam" not in data and b"Exif" not in data
        published = load_rgb(output / name).rgb
        assert published.shape == astronaut.shape          # rotated input published upright
    # Independent check of the leak gate's guarantee: the verifier matches no published face
    # to any face of the photo it came from. (Each input is its own original: the grey copy's
    # faces describe differently from the colour ones, and matching a face to *another* photo
    # of the same person is the evaluation's de-identification rate, which is not 100%.)
    for name in ("astronaut.jpg", "rotated/astronaut_exif_rotated.jpg", "astronaut_gray.png", "astronaut_alpha.png"):
        source = load_rgb(inputs / name).rgb
        original = [face_descriptor(source, f.landmarks) for f in detect_faces(source)]
        published = load_rgb(output / name).rgb
        for face in detect_faces(published):
            descriptor = face_descriptor(published, face.landmarks)
            assert min(np.linalg.norm(descriptor - o) for o in original) >= 0.6


def test_published_files_have_ordinary_modes(released):
    """Readable by others who share the release folder, as any file written under the
    user's umask would be (the temporary files they go through are created 0600)."""
    _, output, _ = released
    umask = os.umask(0o022)
    os.umask(umask)
    for path in output.rglob("*"):   # the folder itself is pytest's (0700)
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
        else:
            assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path


def test_lineage_schema_and_run_record(released):
    _, output, summary = released
    for name, schema in lineage.SCHEMAS.items():
        files = list((output / "_lineage" / name).glob("*.parquet"))
        # One photos part per published batch (of 4 photos); faces and events parts for the
        # batches that have rows (events also one at the end); one file for the run row and
        # the ledger.
        expected = {"runs": 1, "privacy": 1, "photos": -(-summary["n_inputs"] // 4)}
        assert len(files) == expected[name] if name in expected else len(files) >= 1, name
        for file in files:
            stored = pq.read_schema(file)
            assert stored.remove_metadata().equals(schema), name
            assert stored.metadata[b"anonymousnet.lineage_version"] == lineage.LINEAGE_VERSION.encode()
    assert not list(output.rglob("*.partial")) and not list((output / "_lineage" / ".intents").glob("*"))
    runs = lineage.read_table(output, "runs")
    run = runs.iloc[0]
    assert run.status == "completed" and run.n_skipped == 0
    assert run.policy_name == "default" and len(run.policy_sha256) == 64 and "identity_check" in run.policy_text
    assert dict(run.models)["dlib_face_descriptor"] == "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
    assert run.flow_run_id and run.n_released + run.n_quarantined + run.n_rejected == run.n_inputs
    faces = lineage.read_table(output, "faces")
    assert len(faces) == summary["n_faces"] and len(faces.landmarks.iloc[0]) == 136
    # Stage I: the 40 attribute probabilities of every ingested face, in lineage.
    ingested = faces[faces.found_by == "ingest"]
    probabilities = ingested[list(ATTRIBUTE_COLUMNS)].to_numpy(dtype=float)
    assert probabilities.shape == (len(ingested), 40) and len(ingested) > 0
    assert np.all(np.isfinite(probabilities)) and np.all((probabilities >= 0) & (probabilities <= 1))
    assert dict(run.models)["attributes_forests"] == registry.load_manifest()["attributes_forests"]["sha256"]
    drift = json.loads(run.attribute_drift)
    assert drift["faces"] == len(ingested) and not drift["assessed"]   # a handful of faces: too few to judge
    # Stage II: 40 targets per face, preserved attributes as predicted, epsilon accounted.
    targets = np.array(ingested.target_attributes.tolist())
    assert targets.shape == (len(ingested), 40) and (ingested.epsilon_spent == 2.0).all()
    smiling = ATTRIBUTE_COLUMNS.index("attr_Smiling")
    assert np.array_equal(targets[:, smiling], probabilities[:, smiling] >= 0.5)
    changed = ingested.changed_attributes.map(len).to_numpy()
    assert np.array_equal(changed, (targets != (probabilities >= 0.5)).sum(axis=1))
    assert run.epsilon_release == 2.0 and run.epsilon_spent_before == 0.0 and run.epsilon_budget == 10.0
    assert len(json.loads(run.t_closeness)["attributes"]) == len(load_policy().policy.attributes.obfuscate)
    ledger = lineage.read_table(output, "privacy")
    assert list(ledger.run_id) == [run.run_id] and ledger.epsilon.iloc[0] == 2.0
    events = lineage.read_table(output, "events")
    assert {"ingest", "gate:ingest", "attributes", "gate:attributes", "select-attributes", "gate:ppas", "anonymize",
            "gate:perturbation", "gate:publish", "publish", "gate:accounting"} <= set(events.stage)
    assert events[events.stage.str.startswith("gate")].gate_passed.all()
    # Stage IV: every face published as synthesized carries the perturbation, measured, or
    # says why it was withdrawn.
    synthesized = faces[faces.method == "gan"]
    carried = synthesized[synthesized.perturbed.astype(bool)]
    assert len(carried) and (synthesized.perturbed.astype(bool) | synthesized.perturbation_withdrawn.notna()).all()
    assert carried.profiler_fooled.notna().all() and carried.perturbation_withdrawn.isna().all()
    assert (carried.perturbation_psnr_db >= load_policy().policy.perturbation.min_psnr_db).all()
    assert set(synthesized.perturbation_withdrawn.dropna()) <= {"lost", "verifies"}
    assert not faces[faces.method != "gan"].perturbed.fillna(False).any()
    assert dict(run.models)["perturbation"] == registry.load_manifest()["perturbation"]["sha256"]
    observed = json.loads(events[events.stage == "gate:perturbation"].details.iloc[0])["observed"]
    assert observed["faces_perturbed"] >= 1 and 0 <= observed["fooling_rate"] <= 1
    photos = lineage.read_table(output, "photos")
    assert (photos.perturbation_seconds.dropna() >= 0).all() and photos.perturbation_seconds.max() > 0


def test_report_and_lineage_show(released):
    _, output, summary = released
    report = (output / "report.md").read_text()
    assert f"run {summary['run_id']}" in report and "identity leaks published" in report
    assert "bad/empty.jpg" in report and "## Attributes (Stage I)" in report
    assert "## Attribute selection (Stage II)" in report and "epsilon 2 per face" in report
    result = CliRunner().invoke(main, ["lineage", "show", str(output)])
    assert result.exit_code == 0 and "leaks published: 0" in result.output and "bad/notes.txt" in result.output
    # The default policy synthesizes: the report and lineage say how, view by view.
    assert "## Face synthesis (Stage III)" in report and "published from another view" in report
    assert "by the view they were rendered from" in result.output
    assert "## Adversarial perturbation (Stage IV)" in report and "the white-box profiler" in report
    assert "Stage IV perturbation on" in result.output


def test_unchanged_faces_are_never_published(inputs, tmp_path, prefect_harness, monkeypatch):
    """Replace blur by a method that changes nothing: the gate must catch every face."""
    monkeypatch.setitem(obfuscate.METHODS, "blur", lambda crop, params: crop.copy())
    photos_in = tmp_path / "in"
    photos_in.mkdir()
    shutil.copy(inputs / "astronaut.jpg", photos_in / "astronaut.jpg")
    policy = tmp_path / "quarantine.yaml"
    policy.write_text("version: 1\nname: quarantine-on-leak\nidentity_check:\n  on_leak: quarantine\n")
    summary = release(input=str(photos_in), output=str(tmp_path / "q"), policy=str(policy))
    assert summary["n_quarantined"] == 1 and summary["n_released"] == 0
    assert not (tmp_path / "q" / "astronaut.jpg").exists()
    reason = lineage.read_table(tmp_path / "q", "photos").reason.iloc[0]
    assert "still verifies after blur" in reason and "to its original" in reason

    blur_first = tmp_path / "blur-first.yaml"
    blur_first.write_text("version: 1\nname: blur-first\nobfuscation:\n  method: blur\n")
    summary = release(input=str(photos_in), output=str(tmp_path / "f"), policy=str(blur_first))
    faces = lineage.read_table(tmp_path / "f", "faces")
    assert summary["n_released"] == 1 and summary["n_faces_fallback"] >= 1
    leaked = faces[faces.methods_tried.map(lambda tried: tried[0] == "blur" and len(tried) > 1)]
    assert len(leaked) >= 1 and (leaked.method != "blur").all()
    assert (faces.leak_distance >= 0.6).all()


def test_a_synthesized_face_that_still_verifies_goes_to_the_fallback(inputs, tmp_path, prefect_harness,
                                                                     monkeypatch):
    """policy/default.yaml renders faces with the generator; one that "renders" the
    original face back must be caught by the leak gate and published only after the fallback."""
    from stages.synthesis import render as synthesis

    class Draws(list):          # the original face, drawn twice: the second draw verifies too
        def view_name(self, index):
            return "aligned"

        def code_seed(self, index):
            return None

    class Unchanged:
        def renders(self, crops, targets, batch_size=64):
            return [Draws([np.array(crop, copy=True)] * 2) for crop in crops]

    monkeypatch.setattr(synthesis, "cached_synthesizer", lambda folder=None: Unchanged())
    photos_in = tmp_path / "in"
    photos_in.mkdir()
    shutil.copy(inputs / "astronaut.jpg", photos_in / "astronaut.jpg")
    summary = release(input=str(photos_in), output=str(tmp_path / "out"),
                      policy=str(Path(__file__).resolve().parents[3] / "policy" / "default.yaml"))
    faces = lineage.read_table(tmp_path / "out", "faces")
    assert summary["n_released"] == 1 and summary["n_leaks_published"] == 0
    assert (faces.methods_tried.map(lambda tried: tried[0]) == "gan").all()
    real = faces.loc[faces.box_top.idxmin()]                  # the astronaut, not the mission patch
    assert real.method != "gan" and len(real.methods_tried) > 1
    assert pd.isna(real.render_view)         # published with a fallback method, not a rendering
    assert not real.perturbed                 # Stage IV perturbs synthesized faces only
    assert (faces[faces.method == "gan"].render_view == "aligned").all()
    assert (faces.leak_distance >= 0.6).all()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Face synthesis (Stage III)" in report and "went to a fallback" in report
    # Drawn once more before the fallback (it verified at its box), then gan_surround from the
    # first draw again (both draws, with the hair and outline pixelated, still the original),
    # then a fallback method: all passed over by the screen, before any check of the whole
    # photo, which then measured what was published.
    assert list(real.methods_tried) == ["gan", "gan_surround", "blur"]
    assert list(real.redrawn_for) == ["at box", "at box"] and real.screened_out == 4
    assert "because it still verified as its original" in report and "1 face(s) drawn again" in report
    assert "taken by the screen" in report
    from click.testing import CliRunner

    from flows.cli import main
    shown = CliRunner().invoke(main, ["lineage", "show", str(tmp_path / "out")]).output
    assert "further draws before any fallback" in shown and "'at box': 2" in shown
    assert "draws and fallback steps the screen took" in shown


def test_release_into_input_folder_is_refused(inputs, prefect_harness):
    with pytest.raises(ValueError, match="must not be inside the input"):
        release(input=str(inputs), output=str(inputs / "out"))


def test_report_is_published_as_a_prefect_artifact(released):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, _, summary = released
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="release-report-")))
    assert any(f"run {summary['run_id']}" in (artifact.data or "") for artifact in artifacts)


def test_manifest_release_accounts_for_refused_rows(inputs, tmp_path, prefect_harness):
    manifest = inputs / "manifest.csv"
    manifest.write_text("path\nastronaut.jpg\ncoffee_no_face.jpg\n../../outside.jpg\n")
    try:
        summary = release(input=str(manifest), output=str(tmp_path / "m"))
    finally:
        manifest.unlink()
    photos = lineage.read_table(tmp_path / "m", "photos").set_index("image_id")
    assert summary["n_inputs"] == 3 and summary["n_released"] == 2 and summary["n_rejected"] == 1
    assert "outside the input root" in photos.loc["../../outside.jpg", "reason"]


def test_a_batch_mixing_bad_photos_with_good_ones_still_releases(astronaut, tmp_path, prefect_harness, monkeypatch):
    """One batch holds good photos, tiny and degenerate images, a face cut by the border, a
    photo whose detector raises and one whose de-identification raises: each gets its own
    outcome with a reason, the good ones are released, and the run completes."""
    from stages.common import faces as faces_module
    from stages.common import pipeline

    photos_in = tmp_path / "in"
    photos_in.mkdir()
    Image.fromarray(astronaut).save(photos_in / "astronaut.png")
    Image.fromarray(astronaut[40:, 200:]).save(photos_in / "border_cut.png")        # the face cut at the left edge
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(photos_in / "one_pixel.png")   # dlib's CNN raises on it
    Image.fromarray(np.full((1, 500, 3), 200, np.uint8)).save(photos_in / "one_row.png")
    Image.fromarray(np.full((7, 7), 90, np.uint8)).save(photos_in / "seven.png")
    Image.fromarray(astronaut[:301, :301]).save(photos_in / "detector_raises.png")
    Image.fromarray(astronaut[:302, :302]).save(photos_in / "anonymize_raises.png")
    real_detect, real_anonymize = faces_module.detect_faces, pipeline.anonymize_photo

    def detect(rgb, **kwargs):
        if rgb.shape[:2] == (301, 301):
            raise RuntimeError("Error detected at line 2957.\nFilter windows must be small enough")
        return real_detect(rgb, **kwargs)

    def anonymize(rgb, *args, **kwargs):
        if rgb.shape[:2] == (302, 302):
            raise ValueError("landmarks outside the image")
        return real_anonymize(rgb, *args, **kwargs)

    monkeypatch.setattr(faces_module, "detect_faces", detect)
    monkeypatch.setattr(pipeline, "anonymize_photo", anonymize)
    policy = tmp_path / "mixed.yaml"
    policy.write_text("version: 1\nname: mixed\ndetection:\n  detector: hog+cnn\nobfuscation:\n  method: blur\n"
                      "perturbation:\n  enabled: false\n")
    summary = release(input=str(photos_in), output=str(tmp_path / "out"), policy=str(policy), batch_size=16,
                      photo_workers=1)
    assert summary["status"] == "completed" and summary["n_inputs"] == 7
    photos = lineage.read_table(tmp_path / "out", "photos").set_index("image_id")
    assert photos.loc["astronaut.png", "status"] == "released"
    assert photos.loc["border_cut.png", "status"] in ("released", "quarantined")
    for name in ("one_pixel.png", "one_row.png", "seven.png"):
        assert photos.loc[name, "status"] == "rejected" and "image too small" in photos.loc[name, "reason"]
    assert photos.loc["detector_raises.png", "status"] == "quarantined"
    assert "face detection failed" in photos.loc["detector_raises.png", "reason"]
    assert "Filter windows" in photos.loc["detector_raises.png", "reason"]          # dlib's message, on one line
    assert photos.loc["anonymize_raises.png", "status"] == "quarantined"
    assert "de-identification failed" in photos.loc["anonymize_raises.png", "reason"]
    published = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").glob("*.png")}
    assert published == set(photos.index[photos.status == "released"])
    assert summary["n_leaks_published"] == 0 and summary["n_unmeasured_published"] == 0


def test_verify_finds_every_changed_missing_or_extra_file(released, tmp_path):
    _, output, _ = released
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    runner = CliRunner()
    result = runner.invoke(main, ["verify", str(copy)])
    assert result.exit_code == 0, result.output
    assert "OK: every released file is the one lineage recorded" in result.output
    photos = lineage.read_table(copy, "photos")
    published = sorted(photos.output_path.dropna())
    (copy / published[0]).write_bytes((copy / published[0]).read_bytes() + b"\0")   # changed
    (copy / published[1]).unlink()                                                 # missing
    (copy / "extra.jpg").write_bytes(b"not released")                              # extra
    part = sorted((copy / "_lineage" / "faces").glob("*.parquet"))[0]
    frame = pq.read_table(part)
    pq.write_table(frame.slice(1), part)                                          # lineage edited
    (copy / "_lineage" / "events" / "someone-else.parquet").write_bytes(b"x")      # lineage added
    result = runner.invoke(main, ["verify", str(copy)])
    assert result.exit_code != 0
    assert f"changed: {published[0]}" in result.output and f"missing: {published[1]}" in result.output
    assert "extra: extra.jpg" in result.output
    assert f"{part.relative_to(copy).as_posix()} was changed after it was written" in result.output
    assert "someone-else.parquet belongs to no recorded run" in result.output
    assert "5 problem(s) found" in result.output


def test_each_run_seals_its_lineage_and_chains_to_the_one_before(tmp_path):
    import datetime as dt

    from flows.release.audit import verify_release

    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for day, run_id in enumerate(("r1", "r2", "r3")):
        lineage.write_table(tmp_path, "photos", run_id, lineage.project("photos", [
            {"image_id": f"{run_id}.jpg", "status": "rejected", "reason": "corrupt"}], run_id), "b00000")
        lineage.seal_run(tmp_path, {"run_id": run_id, "status": "completed", "started_at": start + dt.timedelta(day)})
    result = verify_release(tmp_path)
    assert result.ok and result.runs_checked == 3 and result.newest_run == "r3", result.problems
    runs = lineage.read_table(tmp_path, "runs").set_index("run_id")
    assert runs.loc["r2", "previous_run_id"] == "r1" and pd.isna(runs.loc["r1", "previous_run_id"])
    assert dict(runs.loc["r2", "sealed_files"]) == {"_lineage/photos/r2-b00000.parquet": ANY_SHA256}

    rewritten = runs.loc["r1"].to_dict() | {"run_id": "r1", "status": "failed"}   # history rewritten
    rewritten["sealed_files"] = dict(rewritten["sealed_files"])
    lineage.write_table(tmp_path, "runs", "r1", [rewritten])
    assert verify_release(tmp_path).problems == ["run r1: its runs record was changed after run r2 sealed it"]
    lineage.part_path(tmp_path, "runs", "r2").unlink()                              # a run removed
    problems = verify_release(tmp_path).problems
    assert any("run r3: chained to run r2, but the run before it is r1" in p for p in problems)
    assert any("r2-b00000.parquet belongs to no recorded run" in p for p in problems)


class _AnySha256:
    def __eq__(self, other):
        return isinstance(other, str) and len(other) == 64 and all(c in "0123456789abcdef" for c in other)


ANY_SHA256 = _AnySha256()


def test_every_frame_of_a_multi_frame_file_is_deidentified(astronaut, tmp_path, prefect_harness):
    """An animated GIF and a two-page TIFF: every frame de-identified and checked, all frames
    and their timing published; ``input.multi_frame: reject`` rejects them with the reason."""
    from skimage import data

    photos_in = tmp_path / "in"
    photos_in.mkdir()
    shifted = np.roll(astronaut, (40, -60), axis=(0, 1))
    coffee = np.asarray(Image.fromarray(data.coffee()).resize((512, 512)))
    originals = [astronaut, shifted, coffee]
    gif_frames = [Image.fromarray(frame).quantize(256) for frame in originals]
    gif_frames[0].save(photos_in / "animated.gif", save_all=True, append_images=gif_frames[1:],
                       duration=[100, 150, 200], loop=0)
    pages = [Image.fromarray(frame) for frame in (shifted, astronaut)]
    pages[0].save(photos_in / "pages.tif", save_all=True, append_images=pages[1:])
    policy = tmp_path / "frames.yaml"
    policy.write_text("version: 1\nname: frames\nobfuscation:\n  method: blur\nperturbation:\n  enabled: false\n")
    summary = release(input=str(photos_in), output=str(tmp_path / "out"), policy=str(policy))
    assert summary["status"] == "completed" and summary["n_released"] == 2 and summary["n_leaks_published"] == 0
    photos = lineage.read_table(tmp_path / "out", "photos").set_index("image_id")
    assert photos.loc["animated.gif", "frames"] == 3 and photos.loc["pages.tif", "frames"] == 2
    faces = lineage.read_table(tmp_path / "out", "faces")
    gif_faces = faces[faces.image_id == "animated.gif"]
    assert {0, 1} <= set(gif_faces.frame) and gif_faces.face_index.is_unique
    real = gif_faces[gif_faces.found_by != "identity-check"]   # the astronaut, not her mission patch (HOG's)
    assert set(real.frame) == {0, 1} and (real.leak_distance_at_box >= 0.6).all()

    with Image.open(tmp_path / "out" / photos.loc["animated.gif", "output_path"]) as published:
        assert published.format == "PNG" and published.n_frames == 3
        frames, durations = [], []
        for index in range(3):
            published.seek(index)
            durations.append(published.info["duration"])
            frames.append(np.asarray(published.convert("RGB")))
    assert durations == [100, 150, 200]
    with Image.open(tmp_path / "out" / photos.loc["pages.tif", "output_path"]) as published:
        assert published.n_frames == 2
    decoded = [np.asarray(frame.convert("RGB")) for frame in gif_frames]
    for original, output in zip(decoded[:2], frames[:2]):   # the astronaut in each frame no longer verifies
        for face in detect_faces(original, detector="hog"):
            if face.box[1] < 300:   # her face; the mission patch below it is no one (0.49 from a grey chip)
                distance = np.linalg.norm(face_descriptor(original, face.landmarks)
                                          - face_descriptor(output, face.landmarks))
                assert distance >= 0.6
    assert np.abs(frames[2].astype(int) - decoded[2]).mean() < 1.0   # the frame without a face is kept as it was

    reject = tmp_path / "reject.yaml"
    reject.write_text("version: 1\nname: no-frames\ninput:\n  multi_frame: reject\nobfuscation:\n  method: blur\n")
    release(input=str(photos_in), output=str(tmp_path / "rejected"), policy=str(reject))
    refused = lineage.read_table(tmp_path / "rejected", "photos").set_index("image_id")
    assert (refused.status == "rejected").all()
    assert "multi-frame image (3 frames)" in refused.loc["animated.gif", "reason"]
