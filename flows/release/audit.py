"""``anonymousnet verify``: does a release folder hold exactly what its lineage says?

For auditors, and for anyone who received a copy of a release. Three checks:

* **Files.** Every photo lineage records as released (the latest run that released each
  output path) is there with the sha256 lineage recorded; no other file is, apart from the
  release's own records (``_lineage``, ``_reports``, ``_data_docs``, ``report.md``).
* **Seals.** Every run's final row lists the sha256 of each lineage file it wrote (and of
  its report); each is there unchanged and the run wrote no other.
* **Chain.** Each run's row holds the sha256 of the previous run's runs file, so changing,
  adding or removing any earlier run's records breaks the chain. The newest run's row has no
  successor to vouch for it: :func:`verify_release` returns its sha256 (the *anchor*) for
  the auditor to keep and compare next time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from flows.release import lineage
from models.registry import sha256_of_file

# Top-level names that are the release's own records, not published photos.
RECORD_NAMES = {lineage.LINEAGE_DIR, "_reports", "_data_docs", "report.md"}


@dataclass
class Verification:
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    runs_checked: int = 0
    anchor: str | None = None          # sha256 of the newest run's runs file
    newest_run: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _published_expectation(photos: pd.DataFrame, order: dict[str, int]) -> dict[str, tuple[str, str]]:
    """{output path: (sha256, run_id)} of the photo each path should hold: the latest run
    that released something there."""
    released = photos[(photos.status == "released") & photos.output_path.notna()].copy()
    released["order"] = released.run_id.map(order).fillna(-1)
    latest = released.sort_values("order").groupby("output_path").tail(1)
    return {row.output_path: (row.output_sha256, row.run_id) for row in latest.itertuples()}


def _release_files(release_dir: Path) -> list[str]:
    """Every file under the release folder outside its own records (hidden files included:
    a half-written ``.partial`` is something that should not be there)."""
    found = []
    for path in release_dir.rglob("*"):
        relative = path.relative_to(release_dir)
        if path.is_file() and relative.parts[0] not in RECORD_NAMES:
            found.append(relative.as_posix())
    return sorted(found)


def verify_release(release_dir: str | Path, progress: bool = False) -> Verification:
    release_dir = Path(release_dir)
    result = Verification()
    runs = lineage.read_table(release_dir, "runs")
    if runs.empty:
        result.problems.append(f"no lineage under {release_dir / lineage.LINEAGE_DIR}: not a release folder, "
                               "or its lineage was removed")
        return result
    runs = runs.sort_values("started_at", na_position="first")
    order = {run_id: index for index, run_id in enumerate(runs.run_id)}

    # Seals and chain.
    for run in runs.itertuples():
        result.runs_checked += 1
        if run.status == "running":
            result.problems.append(f"run {run.run_id} is still running or was killed: its records are not final "
                                   "(a release into this folder recovers and seals it)")
            continue
        if run.sealed_files is None:
            result.problems.append(f"run {run.run_id} has no seal (written by a version before sealing existed, "
                                   "or its row was replaced): its records cannot be verified")
            continue
        listed = dict(run.sealed_files)
        for relative, expected in listed.items():
            path = release_dir / relative
            if not path.is_file():
                result.problems.append(f"run {run.run_id}: its record {relative} is missing")
            elif sha256_of_file(path) != expected:
                result.problems.append(f"run {run.run_id}: its record {relative} was changed after it was written")
        for path in lineage.run_files(release_dir, run.run_id):
            relative = path.relative_to(release_dir).as_posix()
            if relative not in listed:
                result.problems.append(f"run {run.run_id}: lineage file {relative} is not in its seal (added later)")
        expected_previous = lineage.previous_run(runs, run.run_id, run.started_at)
        chained_to = run.previous_run_id if isinstance(run.previous_run_id, str) else None
        if chained_to != expected_previous:
            result.problems.append(f"run {run.run_id}: chained to run {chained_to or 'none'}, but the run "
                                   f"before it is {expected_previous or 'none'} (a run's records were removed or added)")
        elif expected_previous:
            previous_file = lineage.part_path(release_dir, "runs", expected_previous)
            if sha256_of_file(previous_file) != run.previous_run_sha256:
                result.problems.append(f"run {expected_previous}: its runs record was changed after run "
                                       f"{run.run_id} sealed it")
    for name in lineage.SEALED_TABLES:
        folder = release_dir / lineage.LINEAGE_DIR / name
        for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
            if not any(path.stem == run_id or path.stem.startswith(f"{run_id}-") for run_id in order):
                result.problems.append(f"lineage file {path.relative_to(release_dir).as_posix()} belongs to no "
                                       "recorded run")
    newest = runs.iloc[-1].run_id
    newest_file = lineage.part_path(release_dir, "runs", newest)
    result.newest_run, result.anchor = newest, sha256_of_file(newest_file)

    # Published files.
    expected = _published_expectation(lineage.read_table(release_dir, "photos"), order)
    present = set(_release_files(release_dir))
    for relative in tqdm(sorted(expected), desc="verify", unit="file", disable=not progress):
        sha256, run_id = expected[relative]
        path = release_dir / relative
        if relative not in present:
            result.problems.append(f"missing: {relative} (released by run {run_id})")
        elif sha256_of_file(path) != sha256:
            result.problems.append(f"changed: {relative} is not the file run {run_id} released (sha256 differs)")
        result.files_checked += 1
    for relative in sorted(present - set(expected)):
        result.problems.append(f"extra: {relative} is in the release but no run released it")
    return result
