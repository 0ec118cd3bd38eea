"""The Markdown report of a release run (written to the release folder and to the Prefect UI)."""
from __future__ import annotations

import json

from policy.schema import Policy

MAX_ROWS = 200


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def release_report(run: dict, photos: list[dict], faces: list[dict], events: list[dict], policy: Policy) -> str:
    check = policy.identity_check
    lines = [
        f"# Release report: run {run['run_id']}",
        "",
        f"- Status: **{run.get('status')}**" + (f" ({run['error']})" if run.get("error") else ""),
        f"- Input: `{run['input_location']}` ({run['n_inputs']} files)",
        f"- Release folder: `{run['release_dir']}`",
        f"- Policy: **{policy.name}** (`{run['policy_path']}`, sha256 `{run['policy_sha256'][:16]}`)",
        f"- Method: {policy.obfuscation.method}; on leak: {check.on_leak}"
        + (f" → {', '.join(check.fallback)}" if check.on_leak == "fallback" else "")
        + f"; verifier threshold {check.threshold} (faces released at ≥ {check.release_distance:.2f}); "
        f"photos without faces: {check.on_no_face}",
        f"- Code: `{run['code_version']}`; started {run['started_at']:%Y-%m-%d %H:%M:%S} UTC",
        "",
        "## Outcome",
        "",
        "| released | quarantined | rejected | faces | faces needing a fallback | identity leaks published |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {run['n_released']} | {run['n_quarantined']} | {run['n_rejected']} | {run['n_faces']} "
        f"| {run['n_faces_fallback']} | **{run['n_leaks_published']}** |",
        "",
    ]
    gate_rows = [e for e in events if e["gate_passed"] is not None]
    if gate_rows:
        lines += ["## Gates", "", "| gate | batch | passed | failures |", "|---|---:|---|---|"]
        for event in gate_rows:
            failures = json.loads(event["details"])["failures"] if event["details"] else []
            lines.append(f"| {event['stage']} | {'' if event['batch'] is None else event['batch']} "
                         f"| {'yes' if event['gate_passed'] else 'NO'} | {_cell('; '.join(failures)) or '-'} |")
        lines.append("")
    held = [p for p in photos if p["status"] != "released"]
    if held:
        lines += ["## Not released", "", "| photo | outcome | reason |", "|---|---|---|"]
        for row in held[:MAX_ROWS]:
            lines.append(f"| `{_cell(row['image_id'])}` | {row['status']} | {_cell(row.get('reason'))} |")
        if len(held) > MAX_ROWS:
            lines.append(f"| … {len(held) - MAX_ROWS} more in lineage | | |")
        lines.append("")
    if faces:
        lines += ["## Faces", "", "| photo | face | method (tried) | verifier distance | status |", "|---|---:|---|---:|---|"]
        for face in faces[:MAX_ROWS]:
            distance = face.get("leak_distance")
            shown = "not found again" if distance is None or distance == float("inf") else f"{distance:.3f}"
            tried = " → ".join(face.get("methods_tried") or [])
            lines.append(f"| `{_cell(face['image_id'])}` | {face['face_index']} | {face.get('method')} ({tried}) "
                         f"| {shown} | {face.get('status')} |")
        if len(faces) > MAX_ROWS:
            lines.append(f"| … {len(faces) - MAX_ROWS} more in lineage | | | | |")
        lines.append("")
    lines += ["Verifier distance: dlib ResNet descriptor distance between the original face and the closest "
              f"face found in the published photo; below {check.threshold} would be the same person.",
              "Lineage: `_lineage/` in the release folder (`anonymousnet lineage show`)."]
    return "\n".join(lines) + "\n"
