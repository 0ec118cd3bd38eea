"""The release flow: photos in, a de-identified release out, with lineage and a report.

Reads like its table of contents: policy feasibility (Stage II's plan, and the generator
when the policy synthesizes: before any photo is read) -> discover the inputs -> hold the
release folder, recover what a killed run left, skip what this policy already released
(incremental) -> reserve the release's epsilon in the privacy ledger (the dataset's budget)
-> analyse the batches (ingest -> gate -> Stage I attributes -> gate) -> Stage II attribute
selection over the whole release -> gate (t-closeness needs every face) -> per batch
(anonymize -> perturbation gate when Stage IV is on -> publish gate -> publish, with the
batch's lineage) -> accounting gate -> the sealed runs row and the report -> great-expectations
Data Docs. The policy-to-settings mapping (``ingest_settings``, ``anonymize_settings``) and
``plan_selection`` live in ``policy/settings.py``. Tasks are coarse (a batch of photos);
pixels travel through a private work folder, never through task results. The heavy tasks
(ingest, attributes, anonymize) are submitted, so a Dask task runner (``dask_task_runner``)
runs batches in parallel; the default runs one at a time. Each batch is published with its
lineage before the next (see ``flows/release/resume.py``).
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from flows.release import admission, gates, lineage, privacy_ledger, resume, ui
from flows.release.report import refusal_report, release_report
from flows.version import code_version
from models.registry import model_hashes
from policy.loader import load_policy
from policy.schema import Policy
from policy.settings import anonymize_settings, ingest_settings, plan_selection
from stages.attributes.predict import MODEL_FILES as ATTRIBUTE_MODEL_FILES
from stages.attributes.predict import (
    attribute_drift,
    default_model,
    population_prevalence,
    predict_face_rows,
)
from stages.common.faces import detector_model_names
from stages.common.facetable import leaks, measured_at_box
from stages.common.imageio import sha256_bytes, write_atomic
from stages.common.ingest import InputPhoto, discover_inputs
from stages.common.parallel import resolve_workers, warm_up
from stages.common.pipeline import (
    anonymize_batch,
    ingest_batch,
    load_photo_models,
)
from stages.selection.ppas import (
    Selection,
    select_face_rows,
    t_closeness_of_rows,
)
from stages.synthesis.render import cached_synthesizer


@dataclass(frozen=True)
class Timed:
    """A submitted task's result with its own start and duration: with a parallel task
    runner the flow's wait for a result is not the task's time."""
    value: Any
    started: float
    seconds: float


def _timed(function, *args) -> Timed:
    started = time.time()
    value = function(*args)
    return Timed(value, started, time.time() - started)


# Reading photos can fail transiently on network storage: retry. Detection itself is
# deterministic, so a retry only repeats the same work after an I/O error.
@task(name="ingest", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def ingest_task(photos: list[InputPhoto], policy: Policy, crops_file: str, workers: int = 1) -> Timed:
    return _timed(ingest_batch, photos, ingest_settings(policy, workers), Path(crops_file))


@task(name="gate-ingest", cache_policy=NO_CACHE)
def ingest_gate_task(photo_rows: list[dict], face_rows: list[dict]) -> gates.GateResult:
    return gates.ingest_gate(pd.DataFrame(photo_rows), pd.DataFrame(face_rows))


@task(name="attributes", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def attributes_task(face_rows: list[dict]) -> Timed:
    return _timed(predict_face_rows, face_rows)


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


@task(name="anonymize", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def anonymize_task(photo_rows, face_rows, sources: dict[str, Path], policy: Policy, staging_dir: str,
                   workers: int = 1) -> Timed:
    return _timed(anonymize_batch, photo_rows, face_rows, sources, anonymize_settings(policy, workers),
                  policy.input.max_pixels, Path(staging_dir))


@task(name="gate-perturbation", cache_policy=NO_CACHE)
def perturbation_gate_task(photo_rows: list[dict], face_rows: list[dict], min_psnr_db: float) -> gates.GateResult:
    return gates.perturbation_gate(pd.DataFrame(photo_rows), pd.DataFrame(face_rows), min_psnr_db)


@task(name="gate-publish", cache_policy=NO_CACHE)
def publish_gate_task(photo_rows: list[dict], face_rows: list[dict], release_distance: float) -> gates.GateResult:
    return gates.publish_gate(pd.DataFrame(photo_rows), pd.DataFrame(face_rows), release_distance)


def _output_relative_path(image_id: str, suffix: str) -> Path:
    """The input's relative path, with the suffix of the format actually written."""
    relative = Path(image_id)
    same = relative.suffix.lower() == suffix or (suffix, relative.suffix.lower()) in {(".jpg", ".jpeg"),
                                                                                   (".tif", ".tiff")}
    return relative if same else relative.with_suffix(suffix)


@task(name="publish", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def publish_task(photo_rows: list[dict], release_dir: str, run_id: str, part: str) -> list[dict]:
    """Move staged outputs into the release folder atomically, under the input's relative
    path, after recording the intent (what is about to appear) for crash recovery."""
    published, payloads = [], {}
    confinement = admission.Confinement.from_environment()
    for row in photo_rows:
        row = dict(row)
        staged = row.pop("staged_file", None)
        suffix = row.pop("output_suffix", None)
        relative = _output_relative_path(row["image_id"], suffix).as_posix() if suffix else None
        if row["status"] == "released" and admission.escapes_release_roots(Path(release_dir) / relative, confinement):
            row.update(status="quarantined", reason=f"{relative}: a folder on its way in the release folder is a "
                                                    "link that leads outside the release roots; not written")
        if row["status"] == "released":
            payloads[relative] = Path(staged).read_bytes()
            row.update(output_path=relative, output_sha256=sha256_bytes(payloads[relative]))
        published.append(row)
    resume.write_intent(Path(release_dir), run_id, part, {row["output_path"]: row["output_sha256"]
                                                          for row in published if row["status"] == "released"})
    for relative, data in payloads.items():
        write_atomic(Path(release_dir) / relative, data)
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
           gate: gates.GateResult | None = None, details: dict | None = None, seconds: float | None = None) -> dict:
    """One row of the events table; a gate's great-expectations results ride along in
    memory (``validations``, not written to lineage) for the release's Data Docs."""
    return {"run_id": run_id, "stage": stage, "batch": batch,
            "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc),
            "seconds": time.time() - started if seconds is None else seconds, "items": items,
            "gate_passed": None if gate is None else gate.passed,
            "details": gate.details() if gate else (json.dumps(details) if details else None),
            "validations": gate.validations if gate else []}


def _data_docs(release_dir: Path, events: list[dict]) -> None:
    """The run's gate results as great-expectations Data Docs in RELEASE/_data_docs/."""
    validations = [(event["run_id"], "release" if event["batch"] is None else f"batch-{event['batch']:05d}", result)
                   for event in events for result in event.get("validations") or []]
    if validations:
        gates.build_data_docs(release_dir / DATA_DOCS_DIR, validations)


DATA_DOCS_DIR = "_data_docs"


def dask_task_runner(workers: int = 2, address: str | None = None):
    """A Dask task runner: a local cluster of ``workers`` processes (one thread each, the
    machine's cores shared out to torch), or the scheduler at ``address`` (a real cluster).

    Workers report task runs to the Prefect API they inherit: point ``PREFECT_API_URL`` at
    a running server first, or each worker starts a temporary server of its own (slow)."""
    import os

    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    threads = max(1, (os.cpu_count() or 1) // workers)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "env": {"OMP_NUM_THREADS": str(threads)}})


def warm_up_models(policy: Policy, workers: int) -> None:
    """Load models while the run gets going, so no task waits for them: the photo workers'
    (detectors, verifier, profiler) in the workers, Stage I's 40 forests (seconds of loading)
    and great-expectations in a thread of this process. Only with the photo pool: under Dask
    the tasks run in other processes, which load what they use. Loads happen once per
    process, so calling this again (the CLI calls it before Prefect's server starts, the
    flow once it knows there is work) costs nothing."""
    if workers <= 1:
        return
    warm_up(functools.partial(load_photo_models, policy.perturbation.enabled), workers)

    def load_here() -> None:
        try:
            default_model()
            gates.warm_up()
        except Exception:   # noqa: BLE001 - the task that needs it loads it again and reports the error
            pass

    threading.Thread(target=load_here, name="warm-up", daemon=True).start()


# One batch at a time unless a caller swaps in a parallel runner (release.with_options(
# task_runner=dask_task_runner(2))): Stage I/III on 2 cores do not gain from threads.
@flow(name="release", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def release(input: str, output: str, policy: str | None = None, batch_size: int = 16,
            manifest_root: str | None = None, show_progress: bool = False, dataset: str | None = None,
            ledger: str | None = None, incremental: bool = True, photo_workers: int = 0) -> dict:
    """De-identify every face in the photos at ``input`` (a folder or a CSV/Parquet manifest)
    under ``policy`` and write the release to ``output``. ``dataset`` names whose privacy
    budget the release spends (default: the input's resolved location); ``ledger`` is the
    folder holding the privacy ledger (default: the release folder). ``incremental`` skips
    photos this release folder already released under the same policy (by content and
    policy sha256); ``False`` releases everything again. ``photo_workers`` processes share
    each batch's photos (0: one per core; give 1 when the task runner already runs batches
    in parallel, as the Dask runner does). Returns the run's summary row."""
    logger = get_run_logger()
    loaded = load_policy(policy)
    origin = admission.current_origin()
    try:   # an unapproved policy or a folder outside the worker's roots stops here, before any photo
        admission.admit(loaded, input, output, ledger, manifest_root, origin,
                        admission.Confinement.from_environment())
    except admission.Refused as refused:
        _record_refusal(refused, loaded, origin, input, Path(output).resolve(), logger)
        raise
    privacy = loaded.policy.privacy
    selection = plan_selection(loaded.policy)          # an infeasible policy stops here
    uses_generator = anonymize_settings(loaded.policy).uses_generator
    if uses_generator:
        cached_synthesizer(None)                        # a missing or tampered generator stops here too
    ui.tag_run(loaded.policy.name, loaded.sha256)
    run_id = _new_run_id()
    release_dir = Path(output).resolve()
    started_at = dt.datetime.now(dt.timezone.utc)
    t0 = time.time()
    input_root, inputs = discover_inputs(input, manifest_root)
    if release_dir == input_root or input_root in release_dir.parents:
        raise ValueError(f"the release folder {release_dir} must not be inside the input {input_root}")
    dataset = dataset or str(Path(input).resolve())
    ledger_dir = Path(ledger).resolve() if ledger else release_dir
    events = [_event(run_id, "discover", None, t0, len(inputs), details={"input_root": str(input_root)})]
    with resume.release_lock(release_dir):
        inputs, skipped = _recover_and_skip(release_dir, run_id, loaded.sha256, inputs, incremental, events, logger)
        if inputs:
            warm_up_models(loaded.policy, resolve_workers(photo_workers))
        # A run with nothing new re-selects nothing, so it spends nothing.
        spend = privacy_ledger.reserve(ledger_dir, dataset, selection.epsilon_per_face if inputs else 0.0,
                                       privacy.budget, run_id, loaded.policy.name, loaded.sha256, str(release_dir))
        logger.info("run %s: %d input file(s) to release under %s (%d already released under this policy), "
                    "policy %s (%s); dataset %r has spent epsilon %g of %g, this release spends %g", run_id,
                    len(inputs), input_root, len(skipped), loaded.policy.name, loaded.sha256[:12], dataset,
                    spend.spent_before, spend.budget, spend.epsilon)
        run_row = _run_row(run_id, started_at, input, input_root, release_dir, loaded, uses_generator,
                           len(inputs), len(skipped), dataset, ledger_dir, spend) | origin.lineage_fields()
        lineage.write_table(release_dir, "runs", run_id, [run_row])   # "running" until it ends
        journal = _BatchJournal(release_dir, run_id)
        work_dir = resume.work_dir_for(run_id)
        try:
            _release_batches(loaded, selection, inputs, batch_size, run_id, release_dir, work_dir, events,
                             journal, run_row, show_progress, resolve_workers(photo_workers))
            attrs = loaded.policy.attributes
            run_row["attribute_drift"] = json.dumps(attribute_drift(
                journal.faces, population_prevalence(), attrs.drift_threshold, attrs.drift_min_faces))
            run_row["status"] = "completed"
        except BaseException as exc:
            _record_failure(run_row, exc, journal, ledger_dir, run_id)
            raise
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
            summary = _close_run(release_dir, run_id, run_row, events, journal, loaded, input, logger)
    logger.info("run %s: released %d, quarantined %d, rejected %d of %d (%d already released); report %s", run_id,
                summary["n_released"], summary["n_quarantined"], summary["n_rejected"], summary["n_inputs"],
                summary["n_skipped"], release_dir / "report.md")
    return summary


def _recover_and_skip(release_dir: Path, run_id: str, policy_sha256: str, inputs: list[InputPhoto],
                      incremental: bool, events: list[dict], logger) -> tuple[list[InputPhoto], list]:
    """Recover what a killed run left in the release folder, then (``incremental``) drop the
    inputs this policy already released there; returns the inputs left and those skipped."""
    t = time.time()
    recovery = resume.recover_interrupted(release_dir, run_id)
    if recovery.describe():
        logger.warning("run %s: %s", run_id, recovery.describe())
        ui.mark_crashed(recovery.interrupted_flow_runs,
                        f"killed before it finished; recovered by release run {run_id} (see its report)")
        events.append(_event(run_id, "recover", None, t, len(recovery.interrupted_runs),
                             details={"interrupted_runs": recovery.interrupted_runs,
                                      "withdrawn_files": recovery.withdrawn_files,
                                      "partial_files": recovery.partial_files}))
    skipped = []
    if incremental:
        t = time.time()
        inputs, skipped = resume.pending_inputs(release_dir, policy_sha256, inputs)
        events.append(_event(run_id, "skip-released", None, t, len(skipped)))
    return inputs, skipped


def _run_row(run_id: str, started_at: dt.datetime, input_location: str, input_root: Path, release_dir: Path,
             loaded, uses_generator: bool, n_inputs: int, n_skipped: int, dataset: str, ledger_dir: Path,
             spend) -> dict:
    """The run's row of the runs table as it starts (``running``): where, under which policy,
    code and models, and what it spends of the dataset's privacy budget (who started it is
    added from :class:`admission.RunOrigin`)."""
    return {"run_id": run_id, "status": "running",
            "started_at": started_at, "input_location": str(Path(input_location).resolve()),
            "input_root": str(input_root), "release_dir": str(release_dir),
            "policy_path": str(loaded.path), "policy_name": loaded.policy.name,
            "policy_sha256": loaded.sha256, "policy_text": loaded.text, "code_version": code_version(),
            "models": model_hashes(detector_model_names(loaded.policy.detection.detector)
                                   + list(ATTRIBUTE_MODEL_FILES) + ["attribute_population",
                                                                     "attribute_combinations"]
                                   + (["generator", "generator_config"] if uses_generator else [])
                                   + (["perturbation", "perturbation_config"]
                                      if loaded.policy.perturbation.enabled else [])),
            "n_inputs": n_inputs, "n_skipped": n_skipped, "dataset": dataset,
            "ledger_dir": str(ledger_dir), "epsilon_release": spend.epsilon,
            "epsilon_spent_before": spend.spent_before, "epsilon_budget": spend.budget}


def _new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def _record_refusal(refused: admission.Refused, loaded, origin: admission.RunOrigin, input_location: str,
                    release_dir: Path, logger) -> None:
    """A refused run is recorded like a failed one: a sealed runs row (status ``refused``,
    the reasons) and a report in the release folder, when that folder is one this worker may
    write to, and the report as the run's Prefect artifact in any case."""
    now = dt.datetime.now(dt.timezone.utc)
    run_id = _new_run_id()
    run_row = {"run_id": run_id, "status": "refused", "error": str(refused), "started_at": now,
               "finished_at": now, "input_location": str(Path(input_location).expanduser().resolve()),
               "release_dir": str(release_dir), "policy_path": str(loaded.path), "policy_name": loaded.policy.name,
               "policy_sha256": loaded.sha256, "policy_text": loaded.text, "code_version": code_version(),
               "n_inputs": 0, "n_skipped": 0, "n_released": 0, "n_quarantined": 0, "n_rejected": 0, "n_faces": 0,
               "n_faces_fallback": 0, "n_leaks_published": 0, "n_unmeasured_published": 0, "n_faces_box": 0,
               } | origin.lineage_fields()
    report = refusal_report(run_row, refused.reasons)
    logger.error("run %s refused: %s", run_id, "; ".join(refused.reasons))
    if refused.release_dir_allowed:
        try:
            with resume.release_lock(release_dir):
                run_report = release_dir / "_reports" / f"{run_id}.md"
                write_atomic(run_report, report.encode())
                write_atomic(release_dir / "report.md", report.encode())
                lineage.seal_run(release_dir, run_row, [run_report])
        except (OSError, resume.ReleaseBusy) as exc:
            logger.warning("run %s: the refusal could not be recorded in %s: %s", run_id, release_dir, exc)
    ui.publish_run_artifacts(report, [], release_dir, run_id, f"Refused release {run_id} of {input_location}",
                             link_folder=refused.release_dir_allowed)


def _record_failure(run_row: dict, exc: BaseException, journal: _BatchJournal, ledger_dir: Path,
                    run_id: str) -> None:
    """Mark the run failed; if it published nothing, its selections reached nobody: refund
    its privacy budget."""
    run_row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    if not journal.published_any():   # its selections reached nobody: give the budget back
        run_row["epsilon_refunded"] = privacy_ledger.refund(
            ledger_dir, run_id, f"the run failed before publishing any photo: {run_row['error'][:300]}")


def _close_run(release_dir: Path, run_id: str, run_row: dict, events: list[dict], journal: _BatchJournal,
               loaded, input_location: str, logger) -> dict:
    """End the run however it went: the rest of its lineage, the report, the sealed runs row,
    the Data Docs and the Prefect artifacts; returns the run's summary row."""
    summary = journal.close(run_row, events, loaded.policy.identity_check.threshold)
    run_report = release_dir / "_reports" / f"{run_id}.md"
    try:
        report = release_report(summary, journal.photos, journal.faces, events, loaded.policy)
        write_atomic(run_report, report.encode())
        write_atomic(release_dir / "report.md", report.encode())
    finally:   # the final runs row, sealed over its lineage and report (anonymousnet verify)
        lineage.seal_run(release_dir, run_row, [run_report])
    try:
        _data_docs(release_dir, events)
    except Exception as exc:  # the gates' verdicts are in lineage; the HTML is their rendering
        logger.warning("could not build the great-expectations Data Docs: %s", exc)
    ui.publish_run_artifacts(report, events, release_dir, run_id,
                             f"Release {run_id} of {input_location} under policy {loaded.policy.name}")
    return summary


Batch = tuple[list[dict], list[dict]]   # one batch's photo rows and face rows


def _release_batches(loaded, selection: Selection, inputs: list[InputPhoto], batch_size: int, run_id: str,
                     release_dir: Path, work_dir: Path, events: list[dict], journal: _BatchJournal,
                     run_row: dict, show_progress: bool, workers: int = 1) -> None:
    """Analyse every batch, select attributes over the release, then anonymize, gate and
    publish batch by batch (each published batch journaled before the next)."""
    policy = loaded.policy
    sources = {p.image_id: p.path for p in inputs if p.path is not None}
    progress = ui.Progress(len(inputs), release_dir)
    analysed = _analyse_batches(policy, inputs, batch_size, run_id, work_dir, events, show_progress, workers)
    analysed = _select_attributes(analysed, selection, policy, run_id, events, journal, run_row)
    _anonymize_and_publish(analysed, sources, policy, len(inputs), run_id, release_dir, work_dir, events, journal,
                           progress, show_progress, workers)
    t = time.time()
    photos_frame = pd.DataFrame(journal.photos, columns=["image_id", "status"])
    gate = gates.accounting_gate(photos_frame, [p.image_id for p in inputs])
    events.append(_event(run_id, "gate:accounting", None, t, len(journal.photos), gate))
    if not gate.passed:
        raise RuntimeError(f"accounting gate failed: {gate.failures}")


def _run_gate(gate_task, arguments: tuple, photo_rows: list[dict], face_rows: list[dict], items: int,
              batch: int, run_id: str, events: list[dict]) -> gates.GateResult:
    """Run a batch's gate task on ``arguments``, record its event (``items`` rows checked)
    and enforce it on the batch's rows (fail closed)."""
    t = time.time()
    gate = gate_task(*arguments)
    events.append(_event(run_id, gate.name, batch, t, items, gate))
    _enforce(gate, photo_rows, face_rows, batch)
    return gate


def _analyse_batches(policy: Policy, inputs: list[InputPhoto], batch_size: int, run_id: str, work_dir: Path,
                     events: list[dict], show_progress: bool, workers: int) -> list[Batch]:
    """Per batch: ingest -> gate -> Stage I attributes -> gate; returns every batch's rows."""
    batches = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
    ingesting = [ingest_task.submit(batch, policy, str(work_dir / "crops" / f"{index:05d}.npz"), workers)
                 for index, batch in enumerate(batches)]
    analysed, predicting = [], {}
    for index, future in enumerate(tqdm(ingesting, unit="batch", desc="analyse", disable=not show_progress)):
        ingested = future.result()
        photo_rows, face_rows = ingested.value
        events.append(_event(run_id, "ingest", index, ingested.started, len(photo_rows), seconds=ingested.seconds))
        _run_gate(ingest_gate_task, (photo_rows, face_rows), photo_rows, face_rows, len(photo_rows), index,
                  run_id, events)
        if face_rows:
            predicting[index] = attributes_task.submit(face_rows)
        analysed.append((photo_rows, face_rows))
    for index, future in predicting.items():
        predicted = future.result()
        photo_rows, face_rows = analysed[index][0], predicted.value
        events.append(_event(run_id, "attributes", index, predicted.started, len(face_rows),
                             seconds=predicted.seconds))
        _run_gate(attributes_gate_task, (face_rows,), photo_rows, face_rows, len(face_rows), index, run_id, events)
        analysed[index] = (photo_rows, face_rows)
    return analysed


def _select_attributes(analysed: list[Batch], selection: Selection, policy: Policy, run_id: str,
                       events: list[dict], journal: _BatchJournal, run_row: dict) -> list[Batch]:
    """Stage II over the whole release, then its gate: selection is per face, but
    t-closeness is a property of the groups of faces sharing released values, so the gate
    needs them all. Returns the batches with their faces' selected attributes."""
    privacy = policy.privacy
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
    gate = ppas_gate_task(all_faces, closeness, policy) if all_faces else None
    if gate is not None:
        events.append(_event(run_id, gate.name, None, t, len(all_faces), gate))
        if not gate.passed and privacy.on_violation == "abort":
            why = f"{gate.name} failed, so nothing was published (privacy.on_violation: abort): " \
                  f"{'; '.join(gate.failures)}"
            for photo_rows, face_rows in analysed:   # lineage still accounts for every photo
                journal.keep([row | {"status": "quarantined", "reason": why} if row["status"] != "rejected" else row
                              for row in photo_rows], [face | {"status": "quarantined"} for face in face_rows])
            raise RuntimeError(why)
        for photo_rows, face_rows in analysed:
            _enforce(gate, photo_rows, face_rows, None)
    return analysed


def _anonymize_and_publish(analysed: list[Batch], sources: dict[str, Path], policy: Policy, total: int, run_id: str,
                           release_dir: Path, work_dir: Path, events: list[dict], journal: _BatchJournal,
                           progress: ui.Progress, show_progress: bool, workers: int) -> None:
    """Per batch: anonymize -> gate (perturbation, when Stage IV is on) -> gate (publish) ->
    publish, each batch journaled with its lineage before the next."""
    anonymizing = [anonymize_task.submit(photo_rows, face_rows,
                                         {row["image_id"]: sources[row["image_id"]] for row in photo_rows
                                          if row["image_id"] in sources},
                                         policy, str(work_dir / "staged"), workers)
                   for photo_rows, face_rows in analysed]
    with tqdm(total=total, unit="photo", desc="release", disable=not show_progress) as bar:
        for index, future in enumerate(anonymizing):
            anonymized = future.result()
            photo_rows, face_rows = anonymized.value
            events.append(_event(run_id, "anonymize", index, anonymized.started, len(photo_rows),
                                 seconds=anonymized.seconds))
            if policy.perturbation.enabled:
                _run_gate(perturbation_gate_task, (photo_rows, face_rows, policy.perturbation.min_psnr_db),
                          photo_rows, face_rows, len(face_rows), index, run_id, events)
            _run_gate(publish_gate_task, (photo_rows, face_rows, policy.identity_check.release_distance),
                      photo_rows, face_rows, len(photo_rows), index, run_id, events)
            t = time.time()
            part = f"b{index:05d}"
            photo_rows = publish_task(photo_rows, str(release_dir), run_id, part)
            held = {row["image_id"] for row in photo_rows if row["status"] == "quarantined"}
            for face in face_rows:   # a photo publish refused to write holds its faces too
                if face["image_id"] in held:
                    face["status"] = "quarantined"
            events.append(_event(run_id, "publish", index, t, sum(r["status"] == "released" for r in photo_rows)))
            journal.publish(part, photo_rows, face_rows, events)
            progress.advance(len(photo_rows))
            bar.update(len(photo_rows))


class _BatchJournal:
    """This run's lineage, written as it goes: one part per published batch (faces, events,
    then photos: a batch counts as published once its photos part exists), the rest and the
    final runs row when the run ends."""

    def __init__(self, release_dir: Path, run_id: str):
        self.release_dir, self.run_id = release_dir, run_id
        self.photos: list[dict] = []
        self.faces: list[dict] = []
        self.written_photos = self.written_faces = self.written_events = 0

    def published_any(self) -> bool:
        return any(photo["status"] == "released" for photo in self.photos)

    def keep(self, photo_rows: list[dict], face_rows: list[dict]) -> None:
        self.photos += photo_rows
        self.faces += face_rows

    def _write(self, part: str, events: list[dict]) -> None:
        """Write the rows not yet written, one file per table that has any (photos last)."""
        tables = {"faces": lineage.project("faces", self.faces[self.written_faces:], self.run_id),
                  "events": [{k: v for k, v in event.items() if k != "validations"}
                             for event in events[self.written_events:]],
                  "photos": lineage.project("photos", self.photos[self.written_photos:], self.run_id)}
        for name, rows in tables.items():
            if rows:
                lineage.write_table(self.release_dir, name, self.run_id, rows, part)
        self.written_photos, self.written_faces, self.written_events = len(self.photos), len(self.faces), len(events)

    def publish(self, part: str, photo_rows: list[dict], face_rows: list[dict], events: list[dict]) -> None:
        self.keep(photo_rows, face_rows)
        self._write(part, events)
        resume.intent_path(self.release_dir, self.run_id, part).unlink(missing_ok=True)

    def close(self, run_row: dict, events: list[dict], threshold: float) -> dict:
        """Write what no batch part holds and complete the run's final row (counts); returns
        it. The caller seals and writes it (:func:`flows.release.lineage.seal_run`) once the report exists."""
        photos, faces = self.photos, self.faces
        statuses = pd.Series([p["status"] for p in photos], dtype=object)
        released = {p["image_id"] for p in photos if p["status"] == "released"}
        run_row.update(
            finished_at=dt.datetime.now(dt.timezone.utc),
            n_released=int((statuses == "released").sum()), n_quarantined=int((statuses == "quarantined").sum()),
            n_rejected=int((statuses == "rejected").sum()), n_faces=len(faces),
            n_faces_fallback=sum(len(f.get("methods_tried") or []) > 1 for f in faces),
            n_faces_box=sum(f.get("protected_over") == "box" for f in faces),
            n_leaks_published=sum(f["image_id"] in released and leaks(f, threshold) for f in faces),
            n_unmeasured_published=sum(f["image_id"] in released and f.get("verifiable") is not False
                                       and not measured_at_box(f) for f in faces))
        if len(photos) > self.written_photos or len(faces) > self.written_faces or len(events) > self.written_events:
            self._write("end", events)
        return run_row
