"""Incremental, crash-safe releases: what a run finds in its release folder before it starts.

Three things, all read from the lineage (the release folder's own journal), none from a
home-made scheduler state:

* **One writer at a time.** :func:`release_lock` holds an exclusive ``flock`` on the release
  folder for the whole run. The kernel drops it when the process dies, kill -9 included, so
  a crashed run never leaves a stale lock behind.
* **Recovery.** A run publishes batch by batch: it first writes an *intent* (which files it is
  about to publish, with their sha256), then the files (each atomically), then the batch's
  lineage parts, then drops the intent. :func:`recover_interrupted`, run under the lock, finds
  what a killed run left: half-written ``.partial`` files are deleted; a batch whose intent is
  still there but whose lineage part is not had files published that no lineage accounts for,
  so they are withdrawn (the next run releases those photos again); and the dead run's
  ``running`` row is closed as ``interrupted`` with the counts of the batches it finished.
* **Incremental.** :func:`pending_inputs` drops the photos already released (or rejected, with
  the same bytes) under the same policy sha256 by an earlier run of this folder, so running
  the same schedule again releases nothing new, and a new policy version releases everything
  again. Quarantined photos are tried again: a fresh Stage II draw may pass the gates.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flows.release import lineage, privacy_ledger
from models.registry import sha256_of_file
from stages.common.imageio import write_atomic
from stages.common.ingest import InputPhoto

INTENTS_DIR = ".intents"
WORK_PREFIX = "anonymousnet-"


class ReleaseBusy(RuntimeError):
    """Another release is writing to the same release folder."""


@contextlib.contextmanager
def release_lock(release_dir: Path):
    """Hold the release folder for one run; refuse at once (no waiting) when another holds it."""
    folder = release_dir / lineage.LINEAGE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".release.lock", "a") as handle:  # "a": never truncates, mtime unchanged
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReleaseBusy(f"another release is writing to {release_dir}; wait for it to finish "
                              f"(see the Prefect UI or {folder / 'runs'}) or release into another folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def intent_path(release_dir: Path, run_id: str, part: str) -> Path:
    return release_dir / lineage.LINEAGE_DIR / INTENTS_DIR / f"{run_id}-{part}.json"


def write_intent(release_dir: Path, run_id: str, part: str, files: dict[str, str]) -> Path:
    """Record ``{relative output path: sha256}`` that batch ``part`` is about to publish."""
    path = intent_path(release_dir, run_id, part)
    write_atomic(path, json.dumps(files, indent=1).encode())
    return path


def work_dir_for(run_id: str) -> Path:
    """The run's private work folder (crops, staged outputs), found again by recovery."""
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{run_id}-"))


@dataclass(frozen=True)
class Recovery:
    interrupted_runs: list[str]       # runs closed as interrupted
    interrupted_flow_runs: list[str]  # their Prefect flow-run ids (still "Running" in Prefect)
    withdrawn_files: list[str]        # published without lineage, so removed again
    partial_files: int                # half-written files deleted

    def describe(self) -> str | None:
        if not (self.interrupted_runs or self.withdrawn_files or self.partial_files):
            return None
        return (f"recovered from {len(self.interrupted_runs)} interrupted run(s) "
                f"({', '.join(self.interrupted_runs) or 'none'}): withdrew {len(self.withdrawn_files)} file(s) "
                f"published without lineage, deleted {self.partial_files} half-written file(s)")


def recover_interrupted(release_dir: Path, recovered_by: str) -> Recovery:
    """Make the release folder consistent after runs that died (call it holding the lock)."""
    partial = 0
    for path in release_dir.rglob(".*.partial"):
        path.unlink(missing_ok=True)
        partial += 1
    withdrawn = []
    intents = release_dir / lineage.LINEAGE_DIR / INTENTS_DIR
    withdrawn_runs = set()   # runs whose files were published without lineage, then withdrawn
    for intent in sorted(intents.glob("*.json")) if intents.is_dir() else []:
        run_id, part = intent.stem.rsplit("-", 1)
        if not lineage.part_path(release_dir, "photos", run_id, part).exists():
            withdrawn_runs.add(run_id)
            for relative, sha256 in json.loads(intent.read_text()).items():
                published = release_dir / relative
                if published.is_file() and sha256_of_file(published) == sha256:
                    published.unlink()
                    withdrawn.append(relative)
            for table in ("faces", "events"):
                lineage.part_path(release_dir, table, run_id, part).unlink(missing_ok=True)
        intent.unlink()
    runs = lineage.read_table(release_dir, "runs")
    dead = runs[runs.status == "running"]
    interrupted, flow_runs = [], []
    if not dead.empty:   # the photos and faces tables are read only when there is a run to close
        photos = lineage.read_table(release_dir, "photos")
        faces = lineage.read_table(release_dir, "faces")
        for run in dead.to_dict("records"):
            run_photos = photos[photos.run_id == run["run_id"]]
            counts = run_photos.status.value_counts()
            run.update(status="interrupted", finished_at=None,
                       error=f"the run stopped before it finished (killed or crashed); its finished batches are "
                             f"kept, the rest was released by run {recovered_by}",
                       n_inputs=len(run_photos), n_released=int(counts.get("released", 0)),
                       n_quarantined=int(counts.get("quarantined", 0)), n_rejected=int(counts.get("rejected", 0)),
                       n_faces=int((faces.run_id == run["run_id"]).sum()))
            run["models"] = dict(run["models"]) if run.get("models") is not None else None
            if run["n_released"] == 0 and run["run_id"] not in withdrawn_runs and isinstance(run.get("ledger_dir"), str):
                # Nothing of it was ever published (a withdrawn file was, for a moment): its
                # selections reached nobody, so its reservation goes back to the dataset.
                run["epsilon_refunded"] = privacy_ledger.refund(
                    run["ledger_dir"], run["run_id"], f"the run was interrupted before publishing any photo; "
                                                      f"found by run {recovered_by}")
            lineage.seal_run(release_dir, run)   # what it left, as recovery left it
            for stale in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}{run['run_id']}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            interrupted.append(run["run_id"])
            if isinstance(run.get("flow_run_id"), str):
                flow_runs.append(run["flow_run_id"])
    return Recovery(interrupted, flow_runs, withdrawn, partial)


def _content_sha256(photo: InputPhoto) -> str | None:
    if photo.path is None:
        return None
    try:
        return sha256_of_file(photo.path)
    except OSError:
        return None  # unreadable now: not the file that was released, so it is handled again


def pending_inputs(release_dir: Path, policy_sha256: str,
                   inputs: list[InputPhoto]) -> tuple[list[InputPhoto], list[InputPhoto]]:
    """(photos to handle, photos skipped) for an incremental run under ``policy_sha256``."""
    runs = lineage.read_table(release_dir, "runs")
    done_runs = set(runs.run_id[runs.policy_sha256 == policy_sha256])
    if not done_runs:
        return inputs, []
    photos = lineage.read_table(release_dir, "photos")
    photos = photos[photos.run_id.isin(done_runs) & photos.status.isin(["released", "rejected"])]
    done = {(row.image_id, row.input_sha256 if isinstance(row.input_sha256, str) else None)
            for row in photos.itertuples()}
    names = {image_id for image_id, _ in done}
    todo, skipped = [], []
    for photo in inputs:
        if photo.image_id in names and (photo.image_id, _content_sha256(photo)) in done:
            skipped.append(photo)
        else:
            todo.append(photo)
    return todo, skipped
