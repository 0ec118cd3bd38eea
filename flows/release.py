"""The release flow: photos in, a de-identified release out, with lineage and a report.

Reads like its table of contents: policy feasibility and privacy budget (before any photo
is read) -> discover -> analyse each batch (ingest -> gate -> Stage I attributes -> gate) ->
Stage II attribute selection over the whole release -> gate (t-closeness needs every face)
-> per batch (anonymize -> gate -> publish) -> accounting gate -> lineage -> report. Tasks
are coarse (a batch of photos); pixels travel through a private work folder, never through
task results.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from tqdm import tqdm

from flows import gates, lineage, privacy_ledger
from flows.report import release_report
from flows.version import code_version
from models.registry import model_hashes
from policy.loader import load_policy
from policy.schema import Policy
from stages.anonymize import AnonymizeSettings
from stages.attributes import MODEL_FILES as ATTRIBUTE_MODEL_FILES
from stages.attributes import (
    attribute_drift,
    population_prevalence,
    predict_face_rows,
    shipped_population,
)
from stages.faces import detector_model_names
from stages.imageio import write_atomic
from stages.ingest import InputPhoto, discover_inputs
from stages.perturbation import installed_perturbation
from stages.pipeline import IngestSettings, anonymize_batch, ingest_batch
from stages.ppas import (
    Selection,
    build_selection,
    require_feasible,
    select_face_rows,
    t_closeness_of_rows,
)
from stages.synthesis import cached_synthesizer


def _ingest_settings(policy: Policy) -> IngestSettings:
    return IngestSettings(detector=policy.detection.detector, upsample=policy.detection.upsample,
                          max_side=policy.detection.max_side, cnn_max_side=policy.detection.cnn_max_side,
                          max_pixels=policy.input.max_pixels)


def anonymize_settings(policy: Policy) -> AnonymizeSettings:
    check, obfuscation = policy.identity_check, policy.obfuscation
    return AnonymizeSettings(
        method=obfuscation.method,
        method_params={name: obfuscation.params_for(name) for name in ("blur", "pixelate", "mask")},
        fallback=list(check.fallback), on_leak=check.on_leak, on_no_face=check.on_no_face,
        release_distance=check.release_distance, feather_fraction=obfuscation.feather_fraction,
        # The leak check re-detects with EVALUATION.md's verifier: HOG at the policy's upsample.
        detector="hog", upsample=policy.detection.upsample,
        max_side=policy.detection.max_side, output_format=policy.output.format,
        jpeg_quality=policy.output.jpeg_quality, synthesis_batch=obfuscation.gan.batch_size,
        rerender_views=obfuscation.gan.rerender_views,
        perturbation=(installed_perturbation(policy.perturbation.xi, policy.perturbation.min_psnr_db,
                                             tuple(policy.attributes.preserve))
                      if policy.perturbation.enabled else None))


# Reading photos can fail transiently on network storage: retry. Detection itself is
# deterministic, so a retry only repeats the same work after an I/O error.
@task(name="ingest", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def ingest_task(photos: list[InputPhoto], policy: Policy, crops_file: str):
    return ingest_batch(photos, _ingest_settings(policy), Path(crops_file))


@task(name="gate-ingest", cache_policy=NO_CACHE)
def ingest_gate_task(photo_rows: list[dict], face_rows: list[dict]) -> gates.GateResult:
    return gates.ingest_gate(pd.DataFrame(photo_rows), pd.DataFrame(face_rows))


@task(name="attributes", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def attributes_task(face_rows: list[dict]) -> list[dict]:
    return predict_face_rows(face_rows)


@task(name="gate-attributes", cache_policy=NO_CACHE)
def attributes_gate_task(face_rows: list[dict]) -> gates.GateResult:
    return gates.attributes_gate(pd.DataFrame(face_rows))


@task(name="select-attributes", cache_policy=NO_CACHE)
def select_attributes_task(face_rows: list[dict], selection: Selection) -> list[dict]:
    # Fresh randomness from the operating system every run (diffprivlib's secure default).
    return select_face_rows(face_rows, selection)


@task(name="gate-ppas", cache_policy=NO_CACHE)
def ppas_gate_task(face_rows: list[dict], closeness: list[dict], policy: Policy) -> gates.GateResult:
    return gates.ppas_gate(pd.DataFrame(face_rows), closeness, list(policy.attributes.preserve),
                           policy.privacy.epsilon, policy.privacy.t)


def plan_selection(policy: Policy) -> Selection:
    """Stage II's mechanism for ``policy``, refused (PolicyInfeasible) when its t cannot hold."""
    selection = build_selection(shipped_population(), policy.attributes.obfuscate, policy.privacy.epsilon,
                                policy.privacy.mechanism)
    require_feasible(selection, policy.privacy.t)
    return selection


@task(name="anonymize", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def anonymize_task(photo_rows, face_rows, sources: dict[str, Path], policy: Policy, staging_dir: str):
    return anonymize_batch(photo_rows, face_rows, sources, anonymize_settings(policy),
                           policy.input.max_pixels, Path(staging_dir))


@task(name="gate-perturbation", cache_policy=NO_CACHE)
def perturbation_gate_task(photo_rows: list[dict], face_rows: list[dict], min_psnr_db: float) -> gates.GateResult:
    return gates.perturbation_gate(pd.DataFrame(photo_rows), pd.DataFrame(face_rows), min_psnr_db)


@task(name="gate-publish", cache_policy=NO_CACHE)
def publish_gate_task(photo_rows: list[dict], face_rows: list[dict], release_distance: float) -> gates.GateResult:
    return gates.publish_gate(pd.DataFrame(photo_rows), pd.DataFrame(face_rows), release_distance)


@task(name="publish", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def publish_task(photo_rows: list[dict], release_dir: str) -> list[dict]:
    """Move staged outputs into the release folder atomically, under the input's relative path."""
    from stages.imageio import sha256_bytes

    published = []
    for row in photo_rows:
        row = dict(row)
        staged = row.pop("staged_file", None)
        suffix = row.pop("output_suffix", None)
        if row["status"] == "released":
            relative = Path(row["image_id"])
            if relative.suffix.lower() != suffix and not (
                    suffix == ".jpg" and relative.suffix.lower() == ".jpeg") and not (
                    suffix == ".tif" and relative.suffix.lower() == ".tiff"):
                relative = relative.with_suffix(suffix)
            data = Path(staged).read_bytes()
            write_atomic(Path(release_dir) / relative, data)
            row.update(output_path=relative.as_posix(), output_sha256=sha256_bytes(data))
        published.append(row)
    return published


def _enforce(gate: gates.GateResult, photo_rows: list[dict], face_rows: list[dict], batch: int | None) -> None:
    """Fail closed on a gate: a table-level failure stops the run; photos with failing rows
    are quarantined in place (their staged output dropped)."""
    if gate.table_failed:
        where = "the whole release" if batch is None else f"batch {batch}"
        raise RuntimeError(f"{gate.name} failed for {where}: {gate.failures}")
    why = f"failed {gate.name}: " + "; ".join(gate.failures)
    for row in photo_rows:
        if row["image_id"] in gate.failed_image_ids and row["status"] not in ("rejected", "quarantined"):
            row.update(status="quarantined", reason=why)
            row.pop("staged_file", None)
    for face in face_rows:
        if face["image_id"] in gate.failed_image_ids:
            face["status"] = "quarantined"


def _event(run_id: str, stage: str, batch: int | None, started: float, items: int,
           gate: gates.GateResult | None = None, details: dict | None = None) -> dict:
    return {"run_id": run_id, "stage": stage, "batch": batch,
            "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc),
            "seconds": time.time() - started, "items": items,
            "gate_passed": None if gate is None else gate.passed,
            "details": gate.details() if gate else (json.dumps(details) if details else None)}


@flow(name="release", log_prints=True)
def release(input: str, output: str, policy: str | None = None, batch_size: int = 16,
            manifest_root: str | None = None, show_progress: bool = False, dataset: str | None = None,
            ledger: str | None = None) -> dict:
    """De-identify every face in the photos at ``input`` (a folder or a CSV/Parquet manifest)
    under ``policy`` and write the release to ``output``. ``dataset`` names whose privacy
    budget the release spends (default: the input's resolved location); ``ledger`` is the
    folder holding the privacy ledger (default: the release folder). Returns the run's
    summary row."""
    logger = get_run_logger()
    loaded = load_policy(policy)
    privacy = loaded.policy.privacy
    selection = plan_selection(loaded.policy)          # an infeasible policy stops here
    uses_generator = anonymize_settings(loaded.policy).uses_generator
    if uses_generator:
        cached_synthesizer(None)                        # a missing or tampered generator stops here too
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
    release_dir = Path(output).resolve()
    started_at = dt.datetime.now(dt.timezone.utc)
    t0 = time.time()
    input_root, inputs = discover_inputs(input, manifest_root)
    if release_dir == input_root or input_root in release_dir.parents:
        raise ValueError(f"the release folder {release_dir} must not be inside the input {input_root}")
    dataset = dataset or str(Path(input).resolve())
    ledger_dir = Path(ledger).resolve() if ledger else release_dir
    spend = privacy_ledger.reserve(ledger_dir, dataset, selection.epsilon_per_face, privacy.budget, run_id,
                                   loaded.policy.name, loaded.sha256, str(release_dir))
    sources = {p.image_id: p.path for p in inputs if p.path is not None}
    events = [_event(run_id, "discover", None, t0, len(inputs), details={"input_root": str(input_root)})]
    logger.info("run %s: %d input file(s) under %s, policy %s (%s); dataset %r has spent epsilon %g of %g, "
                "this release spends %g", run_id, len(inputs), input_root, loaded.policy.name, loaded.sha256[:12],
                dataset, spend.spent_before, spend.budget, spend.epsilon)
    check = loaded.policy.identity_check
    photos_done, faces_done = [], []
    work_dir = Path(tempfile.mkdtemp(prefix=f"anonymousnet-{run_id}-"))
    run_row = {"run_id": run_id, "flow_run_id": str(flow_run.id) if flow_run.id else None,
               "started_at": started_at, "input_location": str(Path(input).resolve()),
               "input_root": str(input_root), "release_dir": str(release_dir),
               "policy_path": str(loaded.path), "policy_name": loaded.policy.name,
               "policy_sha256": loaded.sha256, "policy_text": loaded.text, "code_version": code_version(),
               "models": model_hashes(detector_model_names(loaded.policy.detection.detector)
                                      + list(ATTRIBUTE_MODEL_FILES) + ["attribute_population",
                                                                        "attribute_combinations"]
                                      + (["generator", "generator_config"] if uses_generator else [])
                                      + (["perturbation", "perturbation_config"]
                                         if loaded.policy.perturbation.enabled else [])),
               "n_inputs": len(inputs), "dataset": dataset, "ledger_dir": str(ledger_dir),
               "epsilon_release": spend.epsilon, "epsilon_spent_before": spend.spent_before,
               "epsilon_budget": spend.budget}
    try:
        batches = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
        analysed = []
        for index, batch in enumerate(tqdm(batches, unit="batch", desc="analyse", disable=not show_progress)):
            t = time.time()
            photo_rows, face_rows = ingest_task(batch, loaded.policy, str(work_dir / "crops" / f"{index:05d}.npz"))
            events.append(_event(run_id, "ingest", index, t, len(batch)))
            t = time.time()
            gate = ingest_gate_task(photo_rows, face_rows)
            events.append(_event(run_id, gate.name, index, t, len(photo_rows), gate))
            _enforce(gate, photo_rows, face_rows, index)
            if face_rows:
                t = time.time()
                face_rows = attributes_task(face_rows)
                events.append(_event(run_id, "attributes", index, t, len(face_rows)))
                t = time.time()
                gate = attributes_gate_task(face_rows)
                events.append(_event(run_id, gate.name, index, t, len(face_rows), gate))
                _enforce(gate, photo_rows, face_rows, index)
            analysed.append((photo_rows, face_rows))
        # Stage II over the whole release: selection is per face, but t-closeness is a
        # property of the groups of faces sharing released values, so the gate needs them all.
        all_faces = [face for _, faces in analysed for face in faces]
        t = time.time()
        selected = iter(select_attributes_task(all_faces, selection))
        analysed = [(photo_rows, [next(selected) for _ in face_rows]) for photo_rows, face_rows in analysed]
        all_faces = [face for _, faces in analysed for face in faces]
        events.append(_event(run_id, "select-attributes", None, t, len(all_faces)))
        t = time.time()
        closeness = t_closeness_of_rows(all_faces, selection, privacy.min_group_faces)
        run_row["t_closeness"] = json.dumps({"t": privacy.t, "min_group_faces": privacy.min_group_faces,
                                             "attributes": closeness})
        gate = ppas_gate_task(all_faces, closeness, loaded.policy) if all_faces else None
        if gate is not None:
            events.append(_event(run_id, gate.name, None, t, len(all_faces), gate))
            if not gate.passed and privacy.on_violation == "abort":
                why = f"{gate.name} failed, so nothing was published (privacy.on_violation: abort): " \
                      f"{'; '.join(gate.failures)}"
                for photo_rows, face_rows in analysed:   # lineage still accounts for every photo
                    photos_done += [row | {"status": "quarantined", "reason": why}
                                    if row["status"] != "rejected" else row for row in photo_rows]
                    faces_done += [face | {"status": "quarantined"} for face in face_rows]
                raise RuntimeError(why)
            for photo_rows, face_rows in analysed:
                _enforce(gate, photo_rows, face_rows, None)
        with tqdm(total=len(inputs), unit="photo", desc="release", disable=not show_progress) as progress:
            for index, (photo_rows, face_rows) in enumerate(analysed):
                t = time.time()
                photo_rows, face_rows = anonymize_task(photo_rows, face_rows, sources, loaded.policy,
                                                       str(work_dir / "staged"))
                events.append(_event(run_id, "anonymize", index, t, len(photo_rows)))
                if loaded.policy.perturbation.enabled:
                    t = time.time()
                    gate = perturbation_gate_task(photo_rows, face_rows, loaded.policy.perturbation.min_psnr_db)
                    events.append(_event(run_id, gate.name, index, t, len(face_rows), gate))
                    _enforce(gate, photo_rows, face_rows, index)
                t = time.time()
                gate = publish_gate_task(photo_rows, face_rows, check.release_distance)
                events.append(_event(run_id, gate.name, index, t, len(photo_rows), gate))
                _enforce(gate, photo_rows, face_rows, index)
                t = time.time()
                photo_rows = publish_task(photo_rows, str(release_dir))
                events.append(_event(run_id, "publish", index, t, sum(r["status"] == "released" for r in photo_rows)))
                photos_done += photo_rows
                faces_done += face_rows
                progress.update(len(photo_rows))
        t = time.time()
        photos_frame = pd.DataFrame(photos_done, columns=["image_id", "status"])
        gate = gates.accounting_gate(photos_frame, [p.image_id for p in inputs])
        events.append(_event(run_id, "gate:accounting", None, t, len(photos_done), gate))
        if not gate.passed:
            raise RuntimeError(f"accounting gate failed: {gate.failures}")
        attrs = loaded.policy.attributes
        run_row["attribute_drift"] = json.dumps(attribute_drift(
            faces_done, population_prevalence(), attrs.drift_threshold, attrs.drift_min_faces))
        run_row["status"] = "completed"
    except BaseException as exc:
        run_row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        summary = _write_lineage(release_dir, run_row, photos_done, faces_done, events, check.threshold)
        report = release_report(summary, photos_done, faces_done, events, loaded.policy)
        write_atomic(release_dir / "_reports" / f"{run_id}.md", report.encode())
        write_atomic(release_dir / "report.md", report.encode())
        try:
            create_markdown_artifact(markdown=report, key="release-report",
                                     description=f"Release {run_id} of {input} under policy {loaded.policy.name}")
        except Exception as exc:  # the report file is already written; the UI copy is a convenience
            logger.warning("could not publish the report artifact: %s", exc)
    logger.info("run %s: released %d, quarantined %d, rejected %d of %d; report %s", run_id,
                summary["n_released"], summary["n_quarantined"], summary["n_rejected"], summary["n_inputs"],
                release_dir / "report.md")
    return summary


def _write_lineage(release_dir: Path, run_row: dict, photos: list[dict], faces: list[dict],
                   events: list[dict], threshold: float) -> dict:
    statuses = pd.Series([p["status"] for p in photos], dtype=object)
    released = {p["image_id"] for p in photos if p["status"] == "released"}
    run_row.update(
        finished_at=dt.datetime.now(dt.timezone.utc),
        n_released=int((statuses == "released").sum()), n_quarantined=int((statuses == "quarantined").sum()),
        n_rejected=int((statuses == "rejected").sum()), n_faces=len(faces),
        n_faces_fallback=sum(len(f.get("methods_tried") or []) > 1 for f in faces),
        n_leaks_published=sum(f["image_id"] in released and (f.get("leak_distance") is None
                                                              or f["leak_distance"] < threshold) for f in faces))
    run_id = run_row["run_id"]
    lineage.write_table(release_dir, "photos", run_id, lineage.project("photos", photos, run_id))
    lineage.write_table(release_dir, "faces", run_id, lineage.project("faces", faces, run_id))
    lineage.write_table(release_dir, "events", run_id, events)
    lineage.write_table(release_dir, "runs", run_id, [run_row])
    return run_row
