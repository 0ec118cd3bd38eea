"""The one lineage writer: Parquet records of what a release run did, in the release folder.

Layout (append-only: a run adds files, never rewrites another run's; the one exception is
its own runs row, written as ``running`` when it starts and replaced when it ends)::

    RELEASE/_lineage/runs/<run_id>.parquet           one row: the run
    RELEASE/_lineage/photos/<run_id>-<part>.parquet  one row per input photo
    RELEASE/_lineage/faces/<run_id>-<part>.parquet   one row per detected face
    RELEASE/_lineage/events/<run_id>-<part>.parquet  one row per stage event (task or gate)
    LEDGER/_lineage/privacy/<run_id>.parquet   one row: the epsilon a release spent from its
                                               dataset's budget (LEDGER defaults to RELEASE;
                                               share one ledger across release folders)

A run writes its photos, faces and events one part per published batch (``b00003``) and a
last part at the end, so a run killed half-way leaves exactly the batches it finished
(``flows/release/resume.py`` closes such a run as ``interrupted``). Read any table across runs with :func:`read_table` (or ``pyarrow.dataset`` / DuckDB over
the folder). Column meanings are in the schemas below and in README "Lineage". No
biometric data (face descriptors) and no pixels are ever written here.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from stages.common.facetable import FACE_SCHEMA, WORK_ONLY_COLUMNS
from stages.common.imageio import temporary_beside
from stages.common.sface import SFACE_RELEASE, SFACE_SAME_PERSON

LINEAGE_DIR = "_lineage"
LINEAGE_VERSION = "1"

RUN_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("flow_run_id", pa.string()),            # Prefect flow-run id (UI link)
    # Who started the run and with what (flows/release/admission.py): the flow run's name, its
    # deployment (none for a command-line run), trigger (schedule | deployment run (UI, API or
    # CLI) | direct call), the parameters it ran with (JSON, defaults filled in), those that
    # differ from its deployment's, and the job variables it was given (JSON).
    pa.field("flow_run_name", pa.string()),
    pa.field("deployment_id", pa.string()),
    pa.field("deployment_name", pa.string()),
    pa.field("trigger", pa.string()),
    pa.field("parameters", pa.string()),
    pa.field("parameters_overridden", pa.list_(pa.string())),
    pa.field("job_variables", pa.string()),
    # running | completed | failed | interrupted | refused (stopped by admission before
    # reading any photo: an unapproved policy, a folder outside the roots; ``error`` says why)
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("started_at", pa.timestamp("us", tz="UTC")),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    pa.field("input_location", pa.string()),
    pa.field("input_root", pa.string()),
    pa.field("release_dir", pa.string()),
    pa.field("policy_path", pa.string()),
    pa.field("policy_name", pa.string()),
    pa.field("policy_sha256", pa.string()),
    pa.field("policy_text", pa.string()),            # the policy file's full content
    pa.field("models", pa.map_(pa.string(), pa.string())),   # model name -> sha256
    pa.field("code_version", pa.string()),
    pa.field("n_inputs", pa.int64()),                # photos this run handled
    # Found in the input but already released (or rejected, same bytes) under this policy's
    # sha256 by an earlier run of this release folder: incremental releases skip them.
    pa.field("n_skipped", pa.int64()),
    pa.field("n_released", pa.int64()),
    pa.field("n_quarantined", pa.int64()),
    pa.field("n_rejected", pa.int64()),
    pa.field("n_faces", pa.int64()),
    pa.field("n_faces_fallback", pa.int64()),        # faces that needed a fallback method
    pa.field("n_leaks_published", pa.int64()),       # must be 0
    pa.field("n_unmeasured_published", pa.int64()),  # faces published without a distance at their box: must be 0
    # Faces protected over their (enlarged) detection box: too small, turned or covered to align.
    pa.field("n_faces_box", pa.int64()),
    # Stage I: predicted attribute prevalences against CelebA's (JSON: faces, threshold,
    # assessed, drifted = [{attribute, release, population}]).
    pa.field("attribute_drift", pa.string()),
    # Stage II (PPAS): the dataset whose budget this run spent, epsilon per face (= per release:
    # each face is a different photo's person, parallel composition), the dataset's total
    # before this run, and measured t-closeness (JSON: per attribute, groups and distance).
    pa.field("dataset", pa.string()),
    pa.field("ledger_dir", pa.string()),
    pa.field("epsilon_release", pa.float64()),
    pa.field("epsilon_spent_before", pa.float64()),
    pa.field("epsilon_budget", pa.float64()),
    # epsilon_release given back to the dataset's budget: the run failed or was interrupted
    # before it published any photo (0 or missing: the charge stands)
    pa.field("epsilon_refunded", pa.float64()),
    pa.field("t_closeness", pa.string()),
    # The seal (``anonymousnet verify``): sha256 of every file this run wrote under the
    # release folder (its lineage parts, privacy rows kept here, its report), keyed by path
    # relative to the release folder, and of the previous run's runs file, so that changing
    # any earlier run's records breaks the chain.
    pa.field("sealed_files", pa.map_(pa.string(), pa.string())),
    pa.field("previous_run_id", pa.string()),
    pa.field("previous_run_sha256", pa.string()),
])

PHOTO_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),   # path relative to the input root
    pa.field("status", pa.string(), nullable=False),     # released | quarantined | rejected
    pa.field("reason", pa.string()),                     # why not released (or a note)
    pa.field("input_sha256", pa.string()),
    pa.field("input_bytes", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("source_format", pa.string()),
    pa.field("source_mode", pa.string()),
    pa.field("exif_rotated", pa.bool_()),
    pa.field("frames", pa.int32()),                      # frames (pages) in the input file
    pa.field("fps", pa.float64()),                       # a video's frame rate (kept in its release)
    pa.field("n_tracks", pa.int32()),                    # a video's tracks: people followed through it
    pa.field("video_rounds", pa.int32()),                # passes over its frames until each track had one decision
    pa.field("n_faces", pa.int32()),
    pa.field("output_path", pa.string()),                # relative to the release folder
    pa.field("output_format", pa.string()),
    pa.field("output_sha256", pa.string()),
    pa.field("seconds", pa.float64()),
    pa.field("perturbation_seconds", pa.float64()),      # of which Stage IV (apply and measure)
    pa.field("check_detectors", pa.string()),            # who looked for faces in the output: centerface+hog
])

FACE_LINEAGE_SCHEMA = pa.schema(
    [pa.field("run_id", pa.string(), nullable=False)]
    + [field for field in FACE_SCHEMA if field.name not in WORK_ONLY_COLUMNS]
)

EVENT_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    # discover | recover | skip-released | ingest | gate:ingest | attributes | gate:attributes
    # | select-attributes | gate:ppas | anonymize | gate:perturbation | gate:publish | publish
    # | gate:accounting
    pa.field("stage", pa.string(), nullable=False),
    # null for the run-wide events: discover, recover, skip-released, select-attributes, gate:ppas, gate:accounting
    pa.field("batch", pa.int32()),
    pa.field("started_at", pa.timestamp("us", tz="UTC")),
    pa.field("seconds", pa.float64()),
    pa.field("items", pa.int64()),
    pa.field("gate_passed", pa.bool_()),                 # null for non-gate events
    pa.field("details", pa.string()),                    # gate failures, parameters (JSON)
])

# The privacy ledger: one row per release that spent budget, written *before* any photo is
# touched, and a refund row for a run that then failed before publishing anything.
PRIVACY_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("epsilon", pa.float64(), nullable=False),
    pa.field("budget", pa.float64()),
    pa.field("policy_name", pa.string()),
    pa.field("policy_sha256", pa.string()),
    pa.field("release_dir", pa.string()),
    pa.field("recorded_at", pa.timestamp("us", tz="UTC")),
    # charge (the reservation, written before any photo is read) | refund (the same run gave
    # it back: it failed or was interrupted before publishing anything; file <run_id>-refund)
    pa.field("entry", pa.string()),
    pa.field("reason", pa.string()),                     # why a refund was given
])

SCHEMAS = {"privacy": PRIVACY_SCHEMA, "runs": RUN_SCHEMA, "photos": PHOTO_SCHEMA, "faces": FACE_LINEAGE_SCHEMA, "events": EVENT_SCHEMA}


def _table(name: str, rows: list[dict] | pd.DataFrame) -> pa.Table:
    schema = SCHEMAS[name]
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    clean = []
    for row in rows:
        unknown = set(row) - set(schema.names)
        if unknown:
            raise KeyError(f"lineage table {name!r} has no columns {sorted(unknown)}")
        clean.append({key: (None if _is_missing(value) else value) for key, value in row.items()})
    return pa.Table.from_pylist(clean, schema=schema)


def _is_missing(value) -> bool:
    return value is None or value is pd.NaT or (isinstance(value, float) and value != value)


def part_path(release_dir: str | Path, name: str, run_id: str, part: str | None = None) -> Path:
    """Where run ``run_id``'s rows of table ``name`` (one ``part`` of them) are written."""
    return Path(release_dir) / LINEAGE_DIR / name / (f"{run_id}-{part}.parquet" if part else f"{run_id}.parquet")


def write_table(release_dir: str | Path, name: str, run_id: str, rows: list[dict] | pd.DataFrame,
                part: str | None = None) -> Path:
    """Write one run's rows of lineage table ``name`` (or one ``part`` of them); atomic
    (temporary file then rename), so a reader never sees half a file."""
    table = _table(name, rows)
    table = table.replace_schema_metadata({"anonymousnet.lineage_version": LINEAGE_VERSION,
                                           "anonymousnet.table": name})
    target = part_path(release_dir, name, run_id, part)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, temporary = temporary_beside(target)
    os.close(fd)
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


# Tables whose files a run's seal covers (the runs file itself is covered by the next run's).
SEALED_TABLES = ("photos", "faces", "events", "privacy")


def run_files(release_dir: str | Path, run_id: str) -> list[Path]:
    """The lineage files of run ``run_id`` in the sealed tables: ``<run_id>.parquet`` and
    ``<run_id>-<part>.parquet``."""
    found = []
    for name in SEALED_TABLES:
        folder = Path(release_dir) / LINEAGE_DIR / name
        if folder.is_dir():
            found += [path for path in sorted(folder.glob(f"{run_id}*.parquet"))
                      if path.stem == run_id or path.stem.startswith(f"{run_id}-")]
    return found


def previous_run(runs: pd.DataFrame, run_id: str, started_at) -> str | None:
    """The run started last before ``started_at`` (the one this run's seal chains to)."""
    earlier = runs[(runs.run_id != run_id) & (runs.started_at.isna() | (runs.started_at < started_at))]
    if earlier.empty:
        return None
    return str(earlier.sort_values("started_at", na_position="first").iloc[-1].run_id)


def seal_run(release_dir: str | Path, run_row: dict, extra_files: list[Path] = ()) -> Path:
    """Write run ``run_row``'s final runs row with its seal: the sha256 of its lineage files
    and ``extra_files`` (under the release folder), and of the previous run's runs file."""
    from models.registry import sha256_of_file

    release_dir = Path(release_dir)
    run_id = run_row["run_id"]
    files = run_files(release_dir, run_id) + [Path(f) for f in extra_files if Path(f).is_file()]
    runs = read_table(release_dir, "runs")
    previous = previous_run(runs, run_id, run_row.get("started_at") or pd.Timestamp.max.tz_localize("UTC"))
    run_row.update(sealed_files={path.relative_to(release_dir).as_posix(): sha256_of_file(path) for path in files},
                   previous_run_id=previous,
                   previous_run_sha256=sha256_of_file(part_path(release_dir, "runs", previous)) if previous else None)
    return write_table(release_dir, "runs", run_id, [run_row])


def read_table(release_dir: str | Path, name: str) -> pd.DataFrame:
    """All runs' rows of lineage table ``name`` (empty frame when there are none)."""
    folder = Path(release_dir) / LINEAGE_DIR / name
    files = sorted(str(p) for p in folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        return SCHEMAS[name].empty_table().to_pandas()
    return ds.dataset(files, schema=SCHEMAS[name], format="parquet").to_table().to_pandas()


def summarize(release_dir: str | Path) -> str:
    """Plain-text summary of a release folder's lineage (``anonymousnet lineage show``)."""
    release_dir = Path(release_dir)
    runs = read_table(release_dir, "runs")
    if runs.empty:
        raise FileNotFoundError(f"no lineage under {release_dir / LINEAGE_DIR}; is {release_dir} a release folder?")
    photos = read_table(release_dir, "photos")
    faces = read_table(release_dir, "faces")
    lines = [f"Release {release_dir}: {len(runs)} run(s)"]
    for run in runs.sort_values("started_at").itertuples():
        lines.append(
            f"- run {run.run_id} [{run.status}] {run.started_at:%Y-%m-%d %H:%M:%S} policy {run.policy_name} "
            f"(sha256 {str(run.policy_sha256)[:12]}), code {run.code_version}\n"
            f"  inputs {run.n_inputs}"
            + (f" (and {int(run.n_skipped)} already released under this policy, skipped)"
               if run.n_skipped == run.n_skipped and run.n_skipped else "")
            + f": released {run.n_released}, quarantined {run.n_quarantined}, "
            f"rejected {run.n_rejected}; faces {run.n_faces} ({run.n_faces_fallback} needed a fallback"
            + (f", {int(run.n_faces_box)} protected over their box" if pd.notna(getattr(run, "n_faces_box", None))
               else "") + "); "
            f"leaks published: {run.n_leaks_published}")
        if isinstance(run.trigger, str):
            lines.append(f"  started by {run.trigger}" + (f" of deployment {run.deployment_name}"
                                                           if isinstance(run.deployment_name, str) else "")
                         + (f", parameters changed from the deployment's: {', '.join(run.parameters_overridden)}"
                            if run.parameters_overridden is not None and len(run.parameters_overridden) else ""))
        if run.status == "refused":
            lines.append(f"  {run.error}")
    latest = runs.sort_values("started_at").iloc[-1].run_id
    latest_photos = photos[photos.run_id == latest]
    not_released = latest_photos[latest_photos.status != "released"]
    if len(not_released):
        lines.append(f"Not released in run {latest}:")
        for row in not_released.itertuples():
            lines.append(f"  {row.status:<11} {row.image_id}: {row.reason}")
    if "fps" in latest_photos and latest_photos.fps.notna().any():
        videos = latest_photos[latest_photos.fps.notna()]
        lines.append(f"Videos in run {latest}: {len(videos)} ({int((videos.status == 'released').sum())} released), "
                     f"{int(videos.frames.sum())} frames, {int(videos.n_tracks.fillna(0).sum())} track(s)")
    latest_faces = faces[faces.run_id == latest]
    if len(latest_faces):
        lines.extend(face_summary_lines(latest, latest_faces))
    return "\n".join(lines)


def face_summary_lines(run_id: str, faces: pd.DataFrame) -> list[str]:
    """The face lines of ``summarize`` for one run's faces."""
    lines = []
    methods = faces.method.value_counts().to_dict()
    finite = faces.leak_distance[faces.leak_distance < float("inf")]
    at_box = faces.leak_distance_at_box
    lines.append(f"Faces in run {run_id}: methods {methods}; "
                 + (f"closest verifier distance {finite.min():.3f}" if len(finite) else
                    "no face was found again in any output"))
    not_found = faces[~(faces.leak_distance < float("inf"))]
    lines.append(f"  verifier found {len(finite)} face(s) again"
                 + (f" (median distance {finite.median():.3f})" if len(finite) else "")
                 + f"; {len(not_found)} not found again (methods {not_found.method.value_counts().to_dict()}, "
                 f"detectors {not_found.detector.value_counts().to_dict()})")
    # A distance no smaller than the face-removed one shows nothing of anyone (README).
    evidence = at_box[~(at_box >= faces.blank_distance)]
    lines.append(f"  at their original box: {int((at_box < float('inf')).sum())} face(s) measured, closest "
                 f"{at_box.min():.3f}, closest that counts as evidence (below the same measurement with the "
                 f"face removed) {evidence.min():.3f}; "
                 f"{int((~(at_box < float('inf'))).sum())} not measured. Membership (closest "
                 f"to another original face of the photo): {faces.membership_distance.min():.3f}; "
                 f"fallback steps for membership: "
                 f"{sum(list(kinds).count('membership') for kinds in faces.escalated_for.dropna())}")
    if "sface_similarity" in faces:
        similarity = faces.sface_similarity.astype(float)
        measured = similarity[np.isfinite(similarity)]
        # As for dlib above: a similarity no higher than with the face removed is no evidence.
        blank = faces.sface_blank_similarity.astype(float).reindex(measured.index)
        evidence = measured[~(measured <= blank)]
        lines.append(f"  SFace (the second verifier): {len(measured)} face(s) measured"
                     + (f", highest similarity to their original {measured.max():.3f}, highest that "
                        f"counts as evidence (above the same measurement with the face removed) "
                        f"{evidence.max() if len(evidence) else float('-inf'):.3f} (threshold "
                        f"{SFACE_SAME_PERSON}, released below {SFACE_RELEASE:.3f})" if len(measured) else "")
                     + f"; fallback steps for SFace: "
                     f"{sum(list(kinds).count('sface') for kinds in faces.escalated_for.dropna())}")
    views = faces.render_view.dropna()
    if len(views):
        lines.append(f"  synthesized faces published, by the view they were rendered from: "
                     f"{views.value_counts().to_dict()}")
    if "redrawn_for" in faces:
        reasons = [kind for kinds in faces.redrawn_for.dropna() for kind in kinds]
        if reasons:
            lines.append(f"  further draws before any fallback (a new identity code or view): "
                         f"{dict(Counter(reasons))}")
    if "screened_out" in faces and faces.screened_out.fillna(0).sum():
        lines.append(f"  draws and fallback steps the screen took (the edit alone verified at its own landmarks): "
                     f"{int(faces.screened_out.fillna(0).sum())}")
    perturbed = faces[faces.perturbed.fillna(False).astype(bool)
                             & faces.profiler_fooled.notna()]
    if len(perturbed):
        changed = sum(len(names) > 0 for names in perturbed.preserved_changed if names is not None)
        lines.append(f"  Stage IV perturbation on {len(perturbed)} face(s): white-box profiler fooled on "
                     f"{int(perturbed.profiler_fooled.astype(bool).sum())}; PSNR cost median "
                     f"{perturbed.perturbation_psnr_db.median():.1f} dB, lowest "
                     f"{perturbed.perturbation_psnr_db.min():.1f} dB; a preserved attribute changed on {changed}; "
                     f"withdrawn from {faces.perturbation_withdrawn.notna().sum()} face(s)")
    return lines


def project(name: str, rows: list[dict], run_id: str) -> list[dict]:
    """Rows reduced to the columns of lineage table ``name`` (work-folder fields dropped),
    stamped with ``run_id``."""
    columns = SCHEMAS[name].names
    return [{column: (run_id if column == "run_id" else row.get(column)) for column in columns} for row in rows]
