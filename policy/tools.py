"""Tools for compliance officers: explain a policy in plain words, compare two versions,
and start a new one. Plain Python (the CLI in ``flows/cli.py`` prints what these return)."""
from __future__ import annotations

import math
from pathlib import Path

from policy.loader import DEFAULT_POLICY, LoadedPolicy
from policy.schema import Policy
from stages.attributes.names import ATTRIBUTES
from stages.common.obfuscate import SYNTHESIZING_METHODS
from stages.selection.ppas import Selection

VERBS = {"gan": "replaced by a newly synthesized face that carries the Stage II target attributes",
         "gan_surround": "replaced by a newly synthesized face, with its hair, ears and outline covered as a face "
                         "too small to synthesize is",
         "blur": "blurred", "pixelate": "pixelated", "mask": "covered with a solid mask"}
DETECTORS = {"centerface": "with a neural detector made for crowds: small, turned and partly hidden faces too",
             "centerface+hog": "with a neural detector made for crowds, plus dlib's frontal-face detector",
             "hog": "frontal faces only (fast)", "cnn": "frontal faces, profiles and faces looking down (slow)",
             "hog+cnn": "frontal faces, profiles and faces looking down"}


def _names(names) -> str:
    names = [n.replace("_", " ") for n in names]
    return ", ".join(names) if names else "none"


def rendered_attributes() -> tuple[str, ...] | None:
    """The attributes the installed Stage III generator renders (None when none is installed)."""
    import json

    from models.registry import ModelFileError, load_manifest, verified_path

    if "generator_config" not in load_manifest():
        return None
    try:
        return tuple(json.loads(verified_path("generator_config").read_text())["attributes"])
    except (ModelFileError, KeyError, ValueError):
        return None


def unrendered_notes(policy: Policy, rendered: tuple[str, ...] | None = None) -> list[str]:
    """What a policy re-chooses but the published photo cannot show: with method gan, the
    obfuscated attributes the generator does not render (hair lies outside the face mask the
    release pastes back, so the photo keeps the original's). The guarantee then covers the
    recorded targets, not those pixels; say so rather than let the policy promise it."""
    if policy.obfuscation.method not in SYNTHESIZING_METHODS:
        return []
    rendered = rendered if rendered is not None else rendered_attributes()
    if rendered is None:
        return ["method gan needs the Stage III generator, which is not installed "
                "(`anonymousnet train generator --install`)"]
    missing = [a for a in policy.attributes.obfuscate if a not in rendered]
    if not missing:
        return []
    return [f"attributes.obfuscate lists {_names(missing)}, which the generator does not render (it renders "
            f"{_names(list(rendered))}); the published photo shows the original's {_names(missing)}, so the "
            "privacy guarantee covers only the recorded targets for them. Move them to preserve, or accept this."]


def explain(loaded: LoadedPolicy, selection: Selection | None, closed_form: list[float] | None = None) -> str:
    """What a policy keeps, what it changes and what its numbers guarantee, for a reader who
    is not a programmer. ``selection``/``closed_form`` come from Stage II on the shipped
    population (None when the model files are missing)."""
    policy = loaded.policy
    attrs, privacy, check = policy.attributes, policy.privacy, policy.identity_check
    others = [a for a in ATTRIBUTES if a not in attrs.preserve and a not in attrs.obfuscate]
    method = VERBS[policy.obfuscation.method]
    fallback = (f"; if a face recognition system still recognises the person, it is "
                f"{', then '.join(VERBS[m] for m in check.fallback)} instead" if check.on_leak == "fallback" else "")
    lines = [f"Policy \"{policy.name}\" ({loaded.path}, sha256 {loaded.sha256[:12]})", ""]
    if policy.description.strip():
        lines += [policy.description.strip(), ""]
    lines += [
        "WHAT IS KEPT",
        f"- Kept exactly as the model sees them: {_names(attrs.preserve)}.",
        f"- Also kept, because the policy does not mention them: {len(others)} other attributes "
        f"({_names(others[:6])}{', ...' if len(others) > 6 else ''}).",
        "- Photos without a face are published " + ("as they are, with their metadata (EXIF, GPS) removed."
                                                    if check.on_no_face == "release" else
                                                    "not at all: they are held back (a face may have been missed)."),
        "",
        "WHAT CHANGES",
        f"- Every face found ({DETECTORS[policy.detection.detector]}) is {method}{fallback}. A face is published only "
        f"when the recogniser no longer matches it to the person (its distance must reach "
        f"{check.release_distance:.2f}; below {check.threshold} counts as the same person). A face that still "
        + ("leaks after all of these is held back with its photo." if check.on_leak == "fallback"
           else "leaks is held back with its photo."),
        f"- A face narrower than {policy.detection.min_synthesis_px} pixels, or too turned or covered for its "
        f"landmarks to be trusted, is {VERBS[policy.detection.box_method]} over its whole box (enlarged by "
        f"{policy.detection.box_margin:.0%} on each side) instead: never left as it was.",
    ]
    if attrs.obfuscate:
        how = ("picks a combination that real people have" if privacy.mechanism == "exponential"
               else "keeps or flips each one separately")
        lines.append(f"- Re-chosen at random for every face ({how}): {_names(attrs.obfuscate)}.")
        if selection is not None:
            lines.append(f"  On average {selection.expected_changes():.1f} of these {selection.k} change per face "
                         "(computed on the CelebA population).")
    else:
        lines.append("- No attribute is re-chosen (attributes.obfuscate is empty), so epsilon and t do not apply.")
    lines += [f"- Note: {note}" for note in unrendered_notes(policy)]
    if policy.perturbation.enabled:
        lines.append(f"- Every synthesized face also gets a faint fixed pattern (at most {policy.perturbation.xi:g} "
                     "grey levels of 255 per pixel, inside the face) meant to make classifiers that guess gender and age "
                     "from faces misread many of them. A face the pattern would change visibly (PSNR below "
                     f"{policy.perturbation.min_psnr_db:g} dB) is held back with its photo.")
    lines += ["", "WHAT THE NUMBERS GUARANTEE"]
    if attrs.obfuscate:
        odds = math.exp(privacy.epsilon)
        lines += [
            f"- epsilon = {privacy.epsilon:g}: whatever someone knew before, seeing a released face changes the odds of "
            f"any guess about the person's original re-chosen attributes ({_names(attrs.obfuscate[:3])}"
            f"{', ...' if len(attrs.obfuscate) > 3 else ''}) by at most "
            f"e^{privacy.epsilon:g} = {odds:.3g} times. Smaller is more private (0.5 strict, 1 to 2 usual, 4 or more weak).",
            f"- t = {privacy.t:g}: among the faces released with the same value of a re-chosen attribute (say, all "
            f"faces released with \"{attrs.obfuscate[0].replace('_', ' ')}\"), the share that really had it is within "
            f"{privacy.t * 100:.0f} percentage points of the share among everyone."
            + (f" For this policy it is at most {max(closed_form):.3f} on the CelebA population "
               f"({attrs.obfuscate[closed_form.index(max(closed_form))].replace('_', ' ')})."
               if closed_form else ""),
            f"- Budget {privacy.budget:g}: every release of a dataset spends epsilon {privacy.epsilon:g}, because the "
            f"same people are shown again. After {math.floor(privacy.budget / privacy.epsilon + 1e-9)} release(s) of "
            "the same dataset, further releases are refused before anything is written.",
            "- If a release fails the privacy check after attribute selection: "
            + ("nothing is published (abort)." if privacy.on_violation == "abort"
               else "the photos concerned are held back, the rest is published (quarantine)."),
        ]
    lines.append("- Every released face is checked: if the recogniser still matches it to the original person, it "
                 "is not published as is.")
    out = policy.output
    lines += ["", f"OUTPUT: {'same format as the input' if out.format == 'same' else out.format}, JPEG quality "
                  f"{out.jpeg_quality}; no metadata from the input (EXIF, GPS, XMP, ICC) is kept."]
    return "\n".join(lines) + "\n"


# For each key a change can make the policy's protection stronger or weaker: the direction
# in which the value protects more.
_STRONGER_WHEN = {
    "privacy.epsilon": "lower", "privacy.t": "lower", "privacy.budget": "lower",
    "privacy.min_group_faces": "lower", "identity_check.threshold": "higher",
    "identity_check.safety_margin": "higher", "detection.upsample": "higher",
    "detection.threshold": "lower", "detection.min_synthesis_px": "higher",
    "detection.max_landmark_error": "lower", "detection.box_margin": "higher",
    "obfuscation.blur.sigma_fraction": "higher", "obfuscation.pixelate.blocks": "lower",
    "input.max_pixels": None,
    "perturbation.xi": "higher", "perturbation.min_psnr_db": None,
}
_STRONGER_CHOICE = {
    "identity_check.on_no_face": {"quarantine": 1, "release": 0},
    "privacy.on_violation": {"abort": 1, "quarantine": 0},
    "detection.detector": {"hog": 0, "cnn": 1, "hog+cnn": 2, "centerface": 3, "centerface+hog": 4},
    "perturbation.enabled": {False: 0, True: 1},
}


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def diff(old: Policy, new: Policy) -> list[tuple[str, str]]:
    """(verdict, explanation) per changed setting; verdict is stronger, weaker or changed."""
    before, after = _flatten(old.model_dump()), _flatten(new.model_dump())
    changes = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if key == "attributes.obfuscate":
            added, removed = [x for x in b if x not in a], [x for x in a if x not in b]
            if added:
                changes.append(("stronger", f"{key}: now also re-chosen: {', '.join(added)}"))
            if removed:
                changes.append(("weaker", f"{key}: no longer re-chosen (now released as predicted): "
                                          f"{', '.join(removed)}"))
            continue
        if key == "attributes.preserve":
            changes.append(("changed", f"{key}: {a} -> {b} (kept as predicted; privacy changes only through "
                                       "attributes.obfuscate)"))
            continue
        direction = _STRONGER_WHEN.get(key)
        if direction and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            stronger = (b < a) if direction == "lower" else (b > a)
            changes.append(("stronger" if stronger else "weaker", f"{key}: {a} -> {b} ({direction} protects more)"))
        elif key in _STRONGER_CHOICE and a in _STRONGER_CHOICE[key] and b in _STRONGER_CHOICE[key]:
            rank = _STRONGER_CHOICE[key]
            changes.append(("stronger" if rank[b] > rank[a] else "weaker", f"{key}: {a} -> {b}"))
        else:
            changes.append(("changed", f"{key}: {a} -> {b}"))
    return changes


def starter(name: str) -> str:
    """A new policy file: the default policy, fully commented, under a new name."""
    text = DEFAULT_POLICY.read_text()
    lines = text.splitlines(keepends=True)
    out = []
    for line in lines:
        if line.startswith("name: "):
            line = f"name: {name}\n"
        out.append(line)
    header = (f"# Policy \"{name}\", started from the default policy. Check it with\n"
              f"#   anonymousnet policy check {name}.yaml\n"
              f"# and read it back in plain words with `anonymousnet policy explain {name}.yaml`.\n")
    return header + "".join(out)


def write_new(path: Path, name: str) -> Path:
    if path.exists():
        raise FileExistsError(f"{path} exists; choose another file name (nothing was overwritten)")
    path.write_text(starter(name))
    return path
