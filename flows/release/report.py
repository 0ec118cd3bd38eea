"""The Markdown report of a release run (written to the release folder and to the Prefect UI)."""
from __future__ import annotations

import json
from collections import Counter

from policy.schema import Policy
from policy.tools import unrendered_notes
from stages.common.facetable import measured_at_box
from stages.common.obfuscate import SYNTHESIZING_METHODS
from stages.common.sface import SFACE_RELEASE, SFACE_SAME_PERSON

MAX_ROWS = 200


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def release_report(run: dict, photos: list[dict], faces: list[dict], events: list[dict], policy: Policy) -> str:
    check = policy.identity_check
    lines = [
        f"# Release report: run {run['run_id']}",
        "",
        f"- Status: **{run.get('status')}**" + (f" ({run['error']})" if run.get("error") else ""),
        f"- Input: `{run['input_location']}` ({run['n_inputs']} files handled"
        + (f"; {run['n_skipped']} already released under this policy, skipped" if run.get("n_skipped") else "")
        + ")",
        f"- Release folder: `{run['release_dir']}`",
        f"- Policy: **{policy.name}** (`{run['policy_path']}`, sha256 `{run['policy_sha256'][:16]}`)",
        f"- Method: {policy.obfuscation.method}; on leak: {check.on_leak}"
        + (f" → {', '.join(check.fallback)}" if check.on_leak == "fallback" else "")
        + f"; verifier threshold {check.threshold} (faces released at ≥ {check.release_distance:.2f}), and "
        f"SFace's similarity threshold {SFACE_SAME_PERSON} (faces released below {SFACE_RELEASE:.3f}); "
        f"photos without faces: {check.on_no_face}",
        f"- Code: `{run['code_version']}`; started {run['started_at']:%Y-%m-%d %H:%M:%S} UTC",
        *_origin_lines(run),
        "- Data-quality checks (great-expectations Data Docs): [`_data_docs/index.html`](_data_docs/index.html)",
        *_recovery_lines(events),
        "",
        "## Outcome",
        "",
        "| released | quarantined | rejected | faces | faces needing a fallback | faces protected over their box "
        "| identity leaks published (dlib or SFace) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {run['n_released']} | {run['n_quarantined']} | {run['n_rejected']} | {run['n_faces']} "
        f"| {run['n_faces_fallback']} | {run.get('n_faces_box') or 0} | **{run['n_leaks_published']}** |",
        "",
        *_leak_check_lines(photos, faces, policy),
    ]
    gate_rows = [e for e in events if e["gate_passed"] is not None]
    if gate_rows:
        lines += ["## Gates", "", "| gate | batch | passed | failures |", "|---|---:|---|---|"]
        for event in gate_rows:
            failures = json.loads(event["details"])["failures"] if event["details"] else []
            lines.append(f"| {event['stage']} | {'' if event['batch'] is None else event['batch']} "
                         f"| {'yes' if event['gate_passed'] else 'NO'} | {_cell('; '.join(failures)) or '-'} |")
        lines.append("")
    lines += _video_section(photos, faces)
    lines += _drift_section(run)
    lines += _selection_section(run, faces, policy)
    lines += _synthesis_section(faces, policy)
    lines += _perturbation_section(run, photos, faces, policy)
    held = [p for p in photos if p["status"] != "released"]
    if held:
        lines += ["## Not released", "", "| photo | outcome | reason |", "|---|---|---|"]
        for row in held[:MAX_ROWS]:
            lines.append(f"| `{_cell(row['image_id'])}` | {row['status']} | {_cell(row.get('reason'))} |")
        if len(held) > MAX_ROWS:
            lines.append(f"| … {len(held) - MAX_ROWS} more in lineage | | |")
        lines.append("")
    if faces:
        lines += ["## Faces", "", "| photo | face | Stage II: changed attributes | method (tried) | found again "
                  "| at its box | other faces | status |", "|---|---:|---|---|---:|---:|---:|---|"]
        for face in faces[:MAX_ROWS]:
            tried = " → ".join(face.get("methods_tried") or [])
            changed = face.get("changed_attributes")
            changed = "–" if changed is None else (", ".join(changed) or "none")
            lines.append(f"| `{_cell(face['image_id'])}` | {face['face_index']} | {_cell(changed)} "
                         f"| {face.get('method')} ({tried}) | {_shown(face.get('leak_distance'), 'not found again')} "
                         f"| {_shown(face.get('leak_distance_at_box'), 'not measured')} "
                         f"| {_shown(face.get('membership_distance'), '–')} | {face.get('status')} |")
        if len(faces) > MAX_ROWS:
            lines.append(f"| … {len(faces) - MAX_ROWS} more in lineage | | | | | | | |")
        lines.append("")
    lines += ["Verifier distances (dlib's ResNet descriptor) of each published face: to its original where a "
              "detector found it again, described at its original box, and to the nearest other original face "
              f"of the photo; below {check.threshold} would be the same person.",
              "Lineage: `_lineage/` in the release folder (`anonymousnet lineage show`)."]
    return "\n".join(lines) + "\n"


def _origin_lines(run: dict) -> list[str]:
    """Who started the run and with what (lineage: runs.trigger, deployment_name, parameters)."""
    if not run.get("trigger"):
        return []
    started = f"- Started by: {run['trigger']}"
    if run.get("deployment_name"):
        started += f" of deployment **{run['deployment_name']}** (`{run.get('deployment_id')}`)"
    if run.get("flow_run_id"):
        started += f"; Prefect flow run `{run.get('flow_run_name')}` (`{run['flow_run_id']}`)"
    lines = [started, f"- Parameters: `{_cell(run.get('parameters') or '{}')}`"]
    overridden = list(run.get("parameters_overridden") or [])
    if run.get("deployment_id"):
        lines.append("- Changed from the deployment's parameters: " + (", ".join(overridden) or "none"))
    if run.get("job_variables"):
        lines.append(f"- Job variables: `{_cell(run['job_variables'])}`")
    return lines


def refusal_report(run: dict, reasons: list[str]) -> str:
    """The report of a run that admission refused before reading any photo."""
    lines = [f"# Release report: run {run['run_id']}", "",
             "- Status: **refused**: nothing was read or published, and no privacy budget was spent",
             f"- Input: `{run['input_location']}`", f"- Release folder: `{run['release_dir']}`",
             f"- Policy: **{run['policy_name']}** (`{run['policy_path']}`, sha256 `{run['policy_sha256'][:16]}`)",
             f"- Code: `{run['code_version']}`; at {run['started_at']:%Y-%m-%d %H:%M:%S} UTC",
             *_origin_lines(run), "", "## Why", ""]
    lines += [f"- {reason}" for reason in reasons]
    return "\n".join(lines) + "\n"


def _leak_check_lines(photos: list[dict], faces: list[dict], policy: Policy) -> list[str]:
    """Who judged the leaks, and what a box-protected face is."""
    judges = sorted({d for p in photos if p.get("check_detectors") for d in p["check_detectors"].split("+")})
    names = {"centerface": "CenterFace (made for crowds)", "hog": "dlib HOG (the verifier's detector)"}
    lines = []
    if judges:
        lines.append("Identity leaks were judged on the published bytes of every photo: faces were searched by "
                     + " and ".join(names.get(j, j) for j in judges)
                     + "; a face found where none was de-identified was de-identified too (or the photo held "
                       "back), and every face found over a de-identified one was measured by dlib's verifier.")
    escalated = [f for f in faces if str(f.get("box_reason") or "").startswith("still verified")]
    boxed = [f for f in faces if f.get("protected_over") == "box" and f not in escalated]
    done = {"pixelate": "pixelated", "blur": "blurred", "mask": "masked"}[policy.detection.box_method]
    if boxed:
        small = sum(str(f.get("box_reason") or "").startswith("small") for f in boxed)
        lines.append(f"{len(boxed)} face(s) were {done} over their enlarged box instead of "
                     f"being synthesized: {small} narrower than {policy.detection.min_synthesis_px} px, "
                     f"{len(boxed) - small} too turned or covered for reliable landmarks (reasons per face in "
                     "lineage, `box_reason`). The verifier does not describe them: at that size or turn dlib's "
                     "descriptor is not evidence of anyone; the box is their protection.")
    if escalated:
        lines.append(f"{len(escalated)} face(s) still verified after every method of the fallback chain and were "
                     f"{done} over their enlarged box as well, then measured again.")
    verifiable = [f for f in faces if f.get("verifiable") is not False]
    not_found = sum(not _finite(f.get("leak_distance")) for f in verifiable)
    unmeasured = sum(not measured_at_box(f) for f in verifiable)
    lines.append(f"Each of the {len(verifiable)} face(s) the verifier describes was also measured at its original box "
                 f"in the published photo, where someone who knows where the faces were would look ({not_found} that "
                 f"no detector found again were measured only there; {unmeasured} not measured at all), and against "
                 "every other original face of its photo.")
    steps = [kind for f in faces for kind in (f.get("escalated_for") or [])]
    if steps:
        counts = {kind: steps.count(kind) for kind in ("found again", "at box", "membership", "sface")}
        lines.append(f"Fallback steps taken: {len(steps)}; {counts['found again']} for a face found again close to "
                     f"its original, {counts['at box']} for one close to it at its box, {counts['membership']} for "
                     f"one close to another original face of its photo (membership), {counts['sface']} for one "
                     "SFace still called its original.")
    screened = sum(int(f.get("screened_out") or 0) for f in faces)
    if screened:
        lines.append(f"{screened} of the further draws and fallback steps were taken by the screen: the face's edit, "
                     "tried alone in the original photo, still verified at its own landmarks, so it was passed over "
                     "before a check of the whole photo. Every face published passed that check.")
    return lines + ([""] if lines else [])


def _finite(value) -> bool:
    return value is not None and value == value and value != float("inf")


def _shown(value, missing: str) -> str:
    """A distance for the faces table: 3 decimals, or what its absence means."""
    return f"{value:.3f}" if _finite(value) else missing


def _drift_section(run: dict) -> list[str]:
    """Stage I: attributes whose predicted prevalence in this release is far from CelebA's."""
    if not run.get("attribute_drift"):
        return []
    drift = json.loads(run["attribute_drift"])
    lines = ["## Attributes (Stage I)", ""]
    if not drift["assessed"]:
        return lines + [f"{drift['faces']} face(s) with predictions: fewer than {drift['min_faces']}, too few to "
                        f"compare with the population.", ""]
    if not drift["drifted"]:
        return lines + [f"Over {drift['faces']} faces, no attribute's predicted prevalence differs from the CelebA "
                        f"population's by {drift['threshold']} or more.", ""]
    lines += [f"Over {drift['faces']} faces, these attributes' predicted prevalence differs from the CelebA "
              f"population's by {drift['threshold']} or more (a different population, or a model out of its "
              f"domain; check before relying on them):", "",
              "| attribute | this release | CelebA population |", "|---|---:|---:|"]
    lines += [f"| {d['attribute']} | {d['release']:.1%} | {d['population']:.1%} |" for d in drift["drifted"]]
    return lines + [""]


def _video_section(photos: list[dict], faces: list[dict]) -> list[str]:
    """Per video: frames, rate, tracks (people followed through it), each track's method, and
    how fast it went. Every frame was checked like a photo; a video is released whole or not."""
    videos = [p for p in photos if _finite(p.get("fps"))]
    if not videos:
        return []
    lines = ["## Videos", "",
             "Each video is released whole or not at all, at its frame rate and size, with lossless PNG frames and "
             "no audio or metadata. Each track (one person through the video) gets one Stage II draw, one "
             "identity code and one method in all its frames; every frame is checked like a photo.", "",
             "| video | outcome | frames | fps | tracks | methods of its tracks | faces checked (frames × tracks) "
             "| passes over its frames | seconds | frames/s |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for video in videos[:MAX_ROWS]:
        mine = [f for f in faces if f["image_id"] == video["image_id"]]
        chosen = [f for f in mine if f.get("found_by") == "ingest"]
        methods = Counter(f.get("method") for f in chosen)
        seconds = video.get("seconds") or 0.0
        frames = video.get("frames") or 0
        lines.append(f"| `{_cell(video['image_id'])}` | {video['status']} | {frames} | {video['fps']:.3g} "
                     f"| {video.get('n_tracks') or 0} | {', '.join(f'{m}: {n}' for m, n in sorted(methods.items())) or '–'} "
                     f"| {sum(f.get('track') is not None and f.get('track') == f.get('track') for f in mine)} "
                     f"| {video.get('video_rounds') or '–'} | {seconds:.1f} | {frames / seconds if seconds else 0:.2f} |")
    if len(videos) > MAX_ROWS:
        lines.append(f"| … {len(videos) - MAX_ROWS} more in lineage | | | | | | | | | |")
    split = [f for f in faces if f.get("track_consistent") is False]
    if split:
        lines.append(f"\n{len(split)} track(s) kept different methods or draws in some frames after "
                     "the rounds a video may take (each frame passed the check on its own).")
    return lines + [""]


def _synthesis_section(faces: list[dict], policy: Policy) -> list[str]:
    """Stage III: how many faces the generator rendered and how many of those the leak gate
    sent on to a fallback."""
    if policy.obfuscation.method not in SYNTHESIZING_METHODS or not faces:
        return []
    rendered = [f for f in faces if (f.get("methods_tried") or [None])[0] in SYNTHESIZING_METHODS]
    kept = sum(f.get("method") == "gan" for f in rendered)
    surround = sum(f.get("method") == "gan_surround" for f in rendered)
    fallback = [f for f in rendered if f.get("method") not in SYNTHESIZING_METHODS]
    methods = Counter(f.get("method") for f in fallback)
    redraws = Counter(kind for f in rendered for kind in (f.get("redrawn_for") or []))
    return ["## Face synthesis (Stage III)", "",
            f"- {len(rendered)} of {len(faces)} face(s) rendered by the generator with their Stage II targets; "
            f"{kept} published as rendered, {surround} as rendered with the hair, ears and outline around them "
            f"covered (gan_surround), {len(fallback)} were not yet far enough from their original for the "
            "leak gate (or could not be rendered) and went to a fallback that does not keep a face"
            + (" (" + ", ".join(f"{m}: {n}" for m, n in sorted(methods.items())) + ")" if methods else ""),
            f"- {sum(1 for f in rendered if f.get('redrawn_for'))} face(s) drawn again (a new identity code, or "
            f"another view of the crop) before any fallback: {redraws.get('lost', 0)} time(s) because the verifier "
            f"lost the drawing, {sum(redraws.values()) - redraws.get('lost', 0)} because it still verified as its "
            f"original; {sum(1 for f in rendered if f.get('render_view') not in (None, 'aligned'))} published from "
            "another view",
            f"- Faces without Stage II targets (found only by the leak check): "
            f"{sum(1 for f in faces if f.get('target_attributes') is None)}"] + [
            f"- Note: {note}" for note in unrendered_notes(policy)] + [""]


def _perturbation_section(run: dict, photos: list[dict], faces: list[dict], policy: Policy) -> list[str]:
    """Stage IV: how many published faces carry the perturbation, what it cost and how often
    the white-box profiler was fooled, and the time it added to the release."""
    settings = policy.perturbation
    if not settings.enabled:
        return []
    released = {p["image_id"] for p in photos if p["status"] == "released"}
    perturbed = [f for f in faces if f["image_id"] in released and f.get("perturbed")]
    lines = ["## Adversarial perturbation (Stage IV)", "",
             f"- Policy: xi {settings.xi:g} grey levels (l-inf), inside the face mask of synthesized faces; "
             f"gate: PSNR ≥ {settings.min_psnr_db:g} dB per face"]
    measured = [f for f in perturbed if f.get("profiler_fooled") is not None]
    if measured:
        costs = sorted(f["perturbation_psnr_db"] for f in perturbed if f.get("perturbation_psnr_db") is not None)
        fooled = sum(bool(f["profiler_fooled"]) for f in measured)
        lines += [f"- {len(perturbed)} published face(s) carry it; the white-box profiler (Stage I's CNN on the "
                  f"perturbation's attributes) changed its verdict on {fooled} of {len(measured)} "
                  f"({fooled / len(measured):.1%})",
                  f"- Cost: PSNR of each face region against the photo without it, median "
                  f"{costs[len(costs) // 2]:.1f} dB, lowest {costs[0]:.1f} dB",
                  f"- Preserved attributes ({', '.join(policy.attributes.preserve) or 'none'}): the profiler's "
                  f"verdict on one of them changed on "
                  f"{sum(bool(f.get('preserved_changed')) for f in measured)} of {len(measured)} face(s)"]
    else:
        lines.append("- No published face carries it")
    withdrawn = Counter(f.get("perturbation_withdrawn") for f in faces
                        if f["image_id"] in released and f.get("perturbation_withdrawn"))
    if withdrawn:
        lines.append(f"- Withdrawn from {sum(withdrawn.values())} synthesized face(s), which were checked again "
                     f"without it: the verifier no longer found the face with it ({withdrawn.get('lost', 0)}), or "
                     f"it brought the face within the release distance of its original ({withdrawn.get('verifies', 0)})")
    spent = sum(p.get("perturbation_seconds") or 0.0 for p in photos)
    if run.get("finished_at") is not None and run.get("started_at") is not None:
        total = (run["finished_at"] - run["started_at"]).total_seconds()
        if total > 0:
            lines.append(f"- Time: {spent:.1f} s of the release's {total:.0f} s ({spent / total:.1%}), applying and "
                         "measuring it")
    return lines + [""]


def _selection_section(run: dict, faces: list[dict], policy: Policy) -> list[str]:
    """Stage II: what was re-selected, the privacy spent, and measured t-closeness."""
    privacy, attributes = policy.privacy, policy.attributes
    if run.get("epsilon_release") is None:
        return []
    lines = ["## Attribute selection (Stage II)", "",
             f"- Preserved as predicted: {', '.join(attributes.preserve) or 'none'}; re-selected: "
             f"{', '.join(attributes.obfuscate) or 'none'} ({privacy.mechanism})",
             f"- Privacy: epsilon {run['epsilon_release']:g} per face; dataset `{_cell(run.get('dataset'))}` had spent "
             f"{run['epsilon_spent_before']:g} of its budget {run['epsilon_budget']:g} before this release, "
             f"{run['epsilon_budget'] - run['epsilon_spent_before'] - run['epsilon_release'] + (run.get('epsilon_refunded') or 0):g} "
             "remains",
             "- Targets are recorded per face in lineage (`target_attributes`); method `gan` renders them "
             "(Stage III below), the other methods only record them.", ""]
    if run.get("epsilon_refunded"):
        lines[-1:-1] = [f"- The run failed before publishing any photo, so its epsilon {run['epsilon_refunded']:g} "
                        "was given back to the dataset's budget (the ledger keeps the charge and the refund)"]
    elif run.get("status") in ("failed", "interrupted") and run["epsilon_release"]:
        lines[-1:-1] = [f"- The run stopped after publishing {run.get('n_released') or 0} photo(s): its epsilon "
                        f"{run['epsilon_release']:g} stays charged to the dataset (what it published used it)"]
    selected = [f for f in faces if f.get("changed_attributes") is not None]
    if selected:
        mean_changed = sum(len(f["changed_attributes"]) for f in selected) / len(selected)
        lines[-1:-1] = [f"- {len(selected)} face(s), {mean_changed:.2f} attribute(s) changed per face on average"]
    closeness = json.loads(run["t_closeness"]) if run.get("t_closeness") else None
    if closeness and closeness["attributes"]:
        lines += [f"t-closeness (t = {closeness['t']}): share of faces that originally had the attribute, per group "
                  f"of faces released with the same value, against the whole release; groups under "
                  f"{closeness['min_group_faces']} faces are shown but not judged.", "",
                  "| attribute | release share | released 0: faces, share | released 1: faces, share | distance |",
                  "|---|---:|---:|---:|---:|"]
        for item in closeness["attributes"]:
            cells = {g["released"]: f"{g['faces']}, {g['original_share']:.2f}" + ("" if g["judged"] else " (not judged)")
                     for g in item["groups"]}
            distance = "not judged" if item["distance"] is None else f"{item['distance']:.3f}"
            lines.append(f"| {item['attribute']} | {item['batch_share']:.2f} | {cells.get(0, '–')} | "
                         f"{cells.get(1, '–')} | {distance} |")
        lines.append("")
    return lines


def _recovery_lines(events: list[dict]) -> list[str]:
    """What this run found of earlier runs that were killed, if anything."""
    lines = []
    for event in events:
        if event["stage"] == "recover" and event.get("details"):
            found = json.loads(event["details"])
            lines.append(f"- Recovered interrupted run(s) {', '.join(found['interrupted_runs']) or '(none)'}: "
                         f"withdrew {len(found['withdrawn_files'])} file(s) published without lineage, deleted "
                         f"{found['partial_files']} half-written file(s); their photos are released in this run")
    return lines
