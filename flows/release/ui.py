"""What an operator sees of a release in the Prefect UI: tags, progress and artifacts.

Everything here is a convenience copy of what the release folder already holds (report.md,
the lineage), so a UI call that fails is logged and never fails or changes the release.
Artifact keys are derived from the release folder's name, so the versions of one release
folder's report, gate table and link line up under one key across scheduled runs.
"""
from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run


def artifact_key(kind: str, release_dir: Path) -> str:
    """``kind`` plus the release folder's name, in the alphabet Prefect keys allow."""
    slug = re.sub(r"[^a-z0-9]+", "-", release_dir.name.lower()).strip("-") or "release"
    return f"{kind}-{slug}"[:100]


def _quietly(what: str, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # the release folder already has it; the UI copy is a convenience
        get_run_logger().warning("could not %s in the Prefect UI: %s", what, exc)
        return None


def tag_run(policy_name: str, policy_sha256: str) -> None:
    """Add ``policy:<name>`` and ``policy-sha256:<12 hex>`` to this flow run's tags (a
    deployment's runs are created before the policy is read, so the run tags itself)."""
    def update():
        from prefect.client.orchestration import get_client

        if flow_run.id is None:
            return
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run.id).tags or []
            wanted = [f"policy:{policy_name}", f"policy-sha256:{policy_sha256[:12]}"]
            client.update_flow_run(flow_run.id, tags=sorted(set(current) | set(wanted)))
    _quietly("tag the run with its policy", update)


def mark_crashed(flow_run_ids: list[str], message: str) -> None:
    """Tell Prefect that flow runs found dead by recovery crashed (a process killed with -9
    never reports its end, so without this the UI shows it *Running* forever)."""
    def update():
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            for flow_run_id in flow_run_ids:
                state = client.read_flow_run(flow_run_id).state
                if state is None or not state.is_final():
                    client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
    if flow_run_ids:
        _quietly("mark the interrupted run(s) crashed", update)


class Progress:
    """A progress artifact for the run, updated as batches are published."""

    def __init__(self, total: int, release_dir: Path):
        self.total, self.done = max(total, 1), 0
        # A run with nothing to do is complete from the start.
        self.artifact_id = _quietly("create the progress bar", create_progress_artifact, 0.0 if total else 100.0,
                                    key=artifact_key("release-progress", release_dir),
                                    description=f"Photos handled of {total} in this run")

    def advance(self, photos: int) -> None:
        self.done += photos
        if self.artifact_id is not None:
            _quietly("update the progress bar", update_progress_artifact, self.artifact_id,
                     100.0 * min(self.done, self.total) / self.total)


def gate_rows(events: list[dict]) -> list[dict]:
    """One row per gate outcome (per batch, or for the whole release)."""
    return [{"gate": event["stage"], "batch": "release" if event["batch"] is None else str(event["batch"]),
             "passed": bool(event["gate_passed"]), "items": int(event["items"]),
             "details": (event.get("details") or "")[:300]}
            for event in events if event.get("gate_passed") is not None]


def publish_run_artifacts(report: str, events: list[dict], release_dir: Path, run_id: str, description: str,
                          link_folder: bool = True) -> None:
    """The report (Markdown), the gate outcomes (table) and the release folder (link, unless
    ``link_folder`` is false: a refused run's folder may be one it was not allowed to use)."""
    _quietly("publish the report", create_markdown_artifact, markdown=report,
             key=artifact_key("release-report", release_dir), description=description)
    rows = gate_rows(events)
    if rows:
        _quietly("publish the gate table", create_table_artifact, rows,
                 key=artifact_key("release-gates", release_dir),
                 description=f"Data-quality gates of run {run_id}: one row per gate and batch")
    if link_folder:
        _quietly("link the release folder", create_link_artifact, release_dir.resolve().as_uri(),
                 link_text=f"{release_dir} (report.md, _lineage/, data docs)",
                 key=artifact_key("release-folder", release_dir), description=f"Release folder of run {run_id}")
