"""The privacy and quality protocol of EVALUATION.md on verification pairs.

For each same-person pair (A, B) of a ``rel_a, rel_b, same`` CSV:

* the verifier (dlib HOG detector, upsample 1, 68 landmarks, ResNet descriptor) describes
  the subject of A and of B (the detected face nearest the image centre; pairs where
  either has no face are counted as not evaluable);
* each method de-identifies A into A' with the release pipeline's own detection, alignment,
  obfuscation and compose (the method alone, before any gate fallback);
* the verifier looks for faces in A'. A' "still verifies as B" when any face found in A'
  is closer than 0.6 to B; "still verifies as A" likewise for A itself.

Reported per method: de-identification rate = 1 - fraction of pairs where A' verifies as B
(over all evaluable pairs, and over the pairs that verified before), self
de-identification rate, detection rate after, PSNR / SSIM / MS-SSIM of A' against A (whole
image), and seconds per face of the de-identification. The row ``original`` is A' = A.
Method ``gan+perturbation`` is ``gan`` with Stage IV's universal perturbation added as the
release adds it (policy's ξ, inside the face mask, before re-detection), on the *same*
renders as the ``gan`` row of the pair, so the two rows differ by the perturbation alone.
Method ``release`` is what a release publishes: the release's own per-photo loop under the
policy (its method, Stage IV, the leak check on the encoded bytes, and its escalation, on
the same renders); a photo it holds back publishes nothing (``released_share``).

Realism and diversity (``realism``), per method: the share of pairs of published subjects
the verifier calls the same person, next to the originals' share, and a Fréchet distance
between Stage I's CNN features of the published faces and of real ones (the B photos).
``--grid DIR`` writes original | each method for the first pairs (never commit it).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from policy.schema import Policy
from policy.settings import anonymize_settings, plan_selection
from stages.attributes.predict import default_model as attribute_model
from stages.common.anonymize import PhotoEscalation, anonymize_photo
from stages.common.compose import compose_faces
from stages.common.faces import (
    SAME_PERSON,
    AlignedFace,
    DetectedFace,
    align_face,
    detect_faces,
    face_descriptor,
    same_person_share,
)
from stages.common.facetable import ATTRIBUTE_COLUMNS
from stages.common.imageio import ImageRejected, decode_bytes, load_rgb
from stages.common.obfuscate import obfuscate
from stages.common.quality import ms_ssim, psnr, ssim
from stages.common.sface import (
    SFACE_SAME_PERSON,
    sface_descriptor,
    sface_same_person_share,
)
from stages.perturbation.apply import (
    ReleasePerturbation,
    apply_perturbation,
    installed_perturbation,
)
from stages.selection.ppas import Selection, stage_two_targets
from stages.synthesis.render import FaceRenders, cached_synthesizer

VERIFIER_THRESHOLD = SAME_PERSON
VERIFIER_UPSAMPLE = 1
GAN_METHODS = ("gan", "gan+perturbation")     # methods that synthesize (Stage III, and Stage IV for the second)
# Methods that use Stage III's renders when the policy synthesizes: one rendering per pair is shared.
SYNTHESIZING = GAN_METHODS + ("release",)


@dataclass(frozen=True)
class Subject:
    """The face the verifier takes for a photo's subject (nearest the image centre)."""
    face: DetectedFace
    descriptor: np.ndarray
    sface: np.ndarray          # the second, dlib-independent verifier's descriptor (unit length)


def _described_faces(rgb: np.ndarray) -> list[Subject]:
    """Every face the verifier's detector finds in ``rgb``, with its descriptor."""
    return [Subject(face, face_descriptor(rgb, face.landmarks), sface_descriptor(rgb, face.landmarks))
            for face in detect_faces(rgb, detector="hog", upsample=VERIFIER_UPSAMPLE)]


def _subject(described: list[Subject], shape: tuple[int, ...]) -> Subject | None:
    if not described:
        return None
    centre = np.array(shape[1::-1], float) / 2
    return min(described, key=lambda s: np.linalg.norm(np.array([(s.face.box[0] + s.face.box[2]) / 2,
                                                                 (s.face.box[1] + s.face.box[3]) / 2]) - centre))


def find_and_align(rgb: np.ndarray, policy: Policy) -> tuple[list[DetectedFace], list[AlignedFace]]:
    """The release's own detection and alignment of every face in ``rgb``."""
    detection = policy.detection
    faces = detect_faces(rgb, detector=detection.detector, upsample=detection.upsample, max_side=detection.max_side,
                         cnn_max_side=detection.cnn_max_side, threshold=detection.threshold,
                         tile_side=detection.tile_side)
    return faces, [align_face(rgb, face.landmarks) for face in faces]


@dataclass(frozen=True)
class Synthesis:
    """What the ``gan`` method needs besides the policy: Stage II's mechanism for the
    policy and the generator (a run's ``model/`` folder, or None for the shipped one), and
    for ``gan+perturbation`` Stage IV's perturbation at the policy's ξ."""
    selection: Selection
    generator: str | None = None
    perturbation: ReleasePerturbation | None = None


def plan_synthesis(methods: list[str], policy: Policy, generator: str | None = None) -> Synthesis | None:
    """What the chosen methods need besides the policy, loaded (and verified) once, here:
    a missing generator or perturbation fails before any pair is read."""
    if not (any(method in GAN_METHODS for method in methods)
            or ("release" in methods and anonymize_settings(policy).uses_generator)):
        return None
    perturbation = None
    if "gan+perturbation" in methods:
        perturbation = installed_perturbation(policy.perturbation.xi, policy.perturbation.min_psnr_db,
                                              tuple(policy.attributes.preserve))
    cached_synthesizer(generator)
    return Synthesis(plan_selection(policy), generator, perturbation)


def synthesize(aligned: list[AlignedFace], synthesis: Synthesis, batch_size: int = 64) -> list[FaceRenders]:
    """The release's Stage I -> Stage II -> Stage III on aligned faces: each face's renders,
    the first view rendered now."""
    if not aligned:
        return []
    crops = np.stack([a.crop for a in aligned])
    targets = stage_two_targets(crops, synthesis.selection)
    return cached_synthesizer(synthesis.generator).renders(crops, targets, batch_size)


def compose_detectable(rgb: np.ndarray, faces: list[DetectedFace], aligned: list[AlignedFace],
                       renders: list[FaceRenders], policy: Policy,
                       perturbation: ReleasePerturbation | None = None) -> tuple[np.ndarray, dict]:
    """The release's Stage III compose (and Stage IV's perturbation, when given) before the
    leak gate's fallback: the release's own steps (``stages.common.anonymize.PhotoEscalation``)
    up to the escalation, with the verifier's detector (HOG) as the only one that looks. A
    face that carries the perturbation and that the check loses or finds verifying is
    composed again without it; a rendered face the check does not find is drawn again
    (``policy.obfuscation.gan.rerender_views`` at most; a face that verifies is not: that is
    the gate's business, which the method alone does not have). Every face is
    rendered (none is protected over its box: this is the method alone). Returns the photo
    and what was done: whether the detector found any face in the first composition, how many
    faces were rendered again, how many had the perturbation withdrawn."""
    settings = dataclasses.replace(
        anonymize_settings(policy), method="gan", fallback=[], on_leak="quarantine", check_detectors=("hog",),
        min_synthesis_px=0, max_landmark_error=float("inf"), output_format="png", perturbation=perturbation)
    photo = PhotoEscalation(rgb, "PNG", faces, aligned, settings, renders)
    first_found = None
    while True:
        composition = photo.compose_and_check()
        if first_found is None:
            first_found = composition.report.output_faces_found > 0
        if not (photo.withdraw_perturbation(composition.report) or photo.redraw(composition.report, verifying=False)):
            withdrawn = sum(outcome.withdrawn is not None for outcome in photo.faces)
            return composition.output, {
                "detected_first_render": first_found,
                "faces_rerendered": sum(outcome.draw > 0 for outcome in photo.faces),
                "perturbation_withdrawn": withdrawn if perturbation is not None else None}


def deidentify(rgb: np.ndarray, faces: list[DetectedFace], aligned: list[AlignedFace], method: str, policy: Policy,
               synthesis: Synthesis | None = None, renders: list[FaceRenders] | None = None,
               source_format: str = "PNG") -> tuple[np.ndarray | None, dict]:
    """A': every face obfuscated with ``method`` and composed back; with what ``gan`` did
    besides (whether its first composition was detected, faces rendered again). ``renders``:
    Stage III's renders of ``aligned`` when already made (shared by the gan methods).
    Method ``release`` is the release's whole per-photo loop under ``policy``
    (``anonymize_photo``: its method, Stage IV, the leak check and its escalation) on the
    bytes it would publish; A' is None when it holds the photo back."""
    if method == "release":
        return _released(rgb, faces, aligned, policy, renders, source_format)
    if method in GAN_METHODS:
        if synthesis is None or (method == "gan+perturbation" and synthesis.perturbation is None):
            raise ValueError(f"method {method} needs the policy's Stage II selection (Synthesis, plan_synthesis)")
        if renders is None:
            renders = synthesize(aligned, synthesis, policy.obfuscation.gan.batch_size)
        perturbation = synthesis.perturbation if method == "gan+perturbation" else None
        return compose_detectable(rgb, faces, aligned, renders, policy, perturbation)
    edited = [obfuscate(a.crop, method, policy.obfuscation.params_for(method)) for a in aligned]
    return compose_faces(rgb, aligned, edited, policy.obfuscation.feather_fraction), {}


def _released(rgb: np.ndarray, faces: list[DetectedFace], aligned: list[AlignedFace], policy: Policy,
              renders: list[FaceRenders] | None, source_format: str) -> tuple[np.ndarray | None, dict]:
    result = anonymize_photo(rgb, source_format, faces, aligned, anonymize_settings(policy), renders)
    released = result.status == "released"
    escalated = sum(len(outcome.methods_tried) > 1 for outcome in result.faces)
    return (decode_bytes(result.encoded) if released else None,
            {"released": released, "faces_escalated": escalated if released else None,
             "faces_synthesized": sum(o.synthesized for o in result.faces) if released else None,
             "faces_surround": sum(o.surrounded for o in result.faces) if released else None})


def evaluate_pair(job: tuple[Path, Path, list[str], Policy, Synthesis | None, bool]) -> list[dict]:
    """Every method's row for one same-person pair (A, B). ``keep_images``: the rows also
    carry A' itself (``image_after``, for the sample grid)."""
    path_a, path_b, methods, policy, synthesis, keep_images = job
    pair = {"rel_a": path_a.name, "rel_b": path_b.name}
    try:
        loaded_a, image_b = load_rgb(path_a), load_rgb(path_b).rgb
    except ImageRejected as exc:
        return [pair | {"method": m, "evaluable": False, "note": str(exc)} for m in ["original", *methods]]
    image_a = loaded_a.rgb
    subject_a = _subject(_described_faces(image_a), image_a.shape)
    subject_b = _subject(_described_faces(image_b), image_b.shape)
    if subject_a is None or subject_b is None:
        return [pair | {"method": m, "evaluable": False, "note": "verifier found no face in A or B"}
                for m in ["original", *methods]]
    verified_before = float(np.linalg.norm(subject_a.descriptor - subject_b.descriptor)) < VERIFIER_THRESHOLD
    # Detection and alignment are shared by every method; their time is charged to each.
    started = time.perf_counter()
    faces, aligned = find_and_align(image_a, policy)
    detection_seconds = time.perf_counter() - started
    renders, render_seconds = None, 0.0
    if synthesis is not None and any(method in SYNTHESIZING for method in methods):
        # One Stage II draw and one rendering per pair, shared by the methods that synthesize (and charged to each).
        started = time.perf_counter()
        renders = synthesize(aligned, synthesis, policy.obfuscation.gan.batch_size)
        render_seconds = time.perf_counter() - started
    rows = []
    for method in ["original", *methods]:
        started = time.perf_counter()
        extra: dict = {"crop_real": align_face(image_b, subject_b.face.landmarks).crop} if method == "original" else {}
        if method == "original":
            output, treated, seconds = image_a, 0, 0.0
        else:
            output, extra = deidentify(image_a, faces, aligned, method, policy, synthesis, renders,
                                       loaded_a.source_format)
            treated = len(aligned)
            seconds = detection_seconds + time.perf_counter() - started
            seconds += render_seconds if method in SYNTHESIZING else 0.0
        rows.append(pair | {"method": method, "evaluable": True, "verified_before": verified_before,
                            "faces_treated": treated, "seconds": seconds}
                    | _judged(image_a, output, subject_a, subject_b, keep_images) | extra)
    return rows


def _judged(image_a: np.ndarray, output: np.ndarray | None, subject_a: Subject, subject_b: Subject,
            keep_images: bool) -> dict:
    """What the verifier and the quality measures make of A' (None: nothing published)."""
    if output is None:
        return {"detected_after": False, "distance_to_b": float("inf"), "distance_to_a": float("inf"),
                "verifies_as_b": False, "verifies_as_a": False, "sface_verifies_as_b": False,
                "sface_verifies_as_a": False, "sface_subject_after": None,
                "psnr": np.nan, "ssim": np.nan, "ms_ssim": np.nan,
                "subject_after": None, "crop_after": None, "image_after": None}
    found = _described_faces(output)
    to_b = min((float(np.linalg.norm(s.descriptor - subject_b.descriptor)) for s in found), default=float("inf"))
    to_a = min((float(np.linalg.norm(s.descriptor - subject_a.descriptor)) for s in found), default=float("inf"))
    subject_after = _subject(found, output.shape)
    # SFace's verdicts, on the same faces: a second opinion the generator never trained against.
    sface_b = max((float(s.sface @ subject_b.sface) for s in found), default=-1.0)
    sface_a = max((float(s.sface @ subject_a.sface) for s in found), default=-1.0)
    return {"detected_after": bool(found), "distance_to_b": to_b, "distance_to_a": to_a,
            "verifies_as_b": to_b < VERIFIER_THRESHOLD, "verifies_as_a": to_a < VERIFIER_THRESHOLD,
            "sface_verifies_as_b": sface_b >= SFACE_SAME_PERSON, "sface_verifies_as_a": sface_a >= SFACE_SAME_PERSON,
            "sface_subject_after": None if subject_after is None else subject_after.sface,
            "psnr": psnr(image_a, output), "ssim": ssim(image_a, output), "ms_ssim": ms_ssim(image_a, output),
            # For the realism and diversity measures (``realism``): the published subject as the
            # verifier describes it, and what A' shows where A's subject was, aligned like it.
            "subject_after": None if subject_after is None else subject_after.descriptor,
            "crop_after": align_face(output, subject_a.face.landmarks).crop,
            "image_after": output if keep_images else None}


def _finite_median(values: pd.Series) -> float | None:
    finite = values[np.isfinite(values.astype(float))]
    return float(finite.median()) if len(finite) else None


def summarize(rows: pd.DataFrame) -> dict[str, dict]:
    summary = {}
    for method, group in rows.groupby("method", sort=False):
        usable = group[group["evaluable"]]
        verified = usable[usable["verified_before"]]
        treated = usable["faces_treated"].sum()
        summary[method] = {
            "pairs": int(len(group)), "evaluable_pairs": int(len(usable)),
            "verification_rate_before": float(usable["verified_before"].mean()),
            "deid_rate": float(1 - usable["verifies_as_b"].mean()),
            "deid_rate_of_verified": float(1 - verified["verifies_as_b"].mean()) if len(verified) else None,
            "self_deid_rate": float(1 - usable["verifies_as_a"].mean()),
            # The same two rates by SFace, over the same pairs (its own verdict before is not
            # asked: the pairs are the same people either way).
            "sface_deid_rate": float(1 - usable["sface_verifies_as_b"].mean()),
            "sface_self_deid_rate": float(1 - usable["sface_verifies_as_a"].mean()),
            "detection_rate_after": float(usable["detected_after"].mean()),
            "psnr": float(usable["psnr"].replace(np.inf, np.nan).mean()) if method != "original" else None,
            "ssim": float(usable["ssim"].mean()), "ms_ssim": float(usable["ms_ssim"].mean()),
            "seconds_per_face": float(usable["seconds"].sum() / treated) if treated else None,
            "faces_treated": int(treated),
            # Medians over the pairs where the verifier found a face in A' (distance finite).
            "median_distance_to_b": _finite_median(usable["distance_to_b"]),
            "median_distance_to_a": _finite_median(usable["distance_to_a"]),
            "median_seconds_per_photo": float(usable["seconds"].median()) if method != "original" else None,
        }
        if "detected_first_render" in usable and len(usable) and usable["detected_first_render"].notna().all():
            # gan: the detector's verdict on the first rendering, before any re-render
            summary[method]["detection_rate_first_render"] = float(usable["detected_first_render"].astype(bool).mean())
            summary[method]["faces_rerendered"] = int(usable["faces_rerendered"].sum())
        if "released" in usable and len(usable) and usable["released"].notna().all():
            # release: photos the release held back publish nothing (counted as not detected)
            summary[method]["released_share"] = float(usable["released"].astype(bool).mean())
            summary[method]["faces_escalated"] = int(usable["faces_escalated"].fillna(0).sum())
            summary[method]["faces_synthesized"] = int(usable["faces_synthesized"].fillna(0).sum())
            # of those, published with the rest of their enlarged box covered (gan_surround)
            summary[method]["faces_surround"] = int(usable["faces_surround"].fillna(0).sum())
        if "perturbation_withdrawn" in usable and len(usable) and usable["perturbation_withdrawn"].notna().all():
            # gan+perturbation: faces composed without it because it lost them or brought them back
            summary[method]["faces_perturbation_withdrawn"] = int(usable["perturbation_withdrawn"].sum())
    return summary


def frechet_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula)."""
    from scipy import linalg

    mean_a, mean_b = features.mean(axis=0), reference.mean(axis=0)
    cov_a, cov_b = np.cov(features, rowvar=False), np.cov(reference, rowvar=False)
    with warnings.catch_warnings():   # singular with fewer faces than features: still the best estimate
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def realism(rows: pd.DataFrame) -> dict[str, dict]:
    """Per method, diversity and realism of what is published: the share of pairs of
    published subjects the verifier calls the same person (the row ``original``: the real A
    photos), and the Fréchet distance between Stage I's CNN features of the published faces
    (A' aligned where A's subject was) and of real faces (the B photos' subjects, aligned
    the same way). Stage I's features are the only learned face features we have offline
    that were trained on appearance (40 CelebA attributes) rather than on identity; the row
    ``original`` (real A against real B) is the distance two sets of real faces have."""
    usable = rows[rows["evaluable"]]
    reals = _arrays(usable.get("crop_real", pd.Series(dtype=object)))
    reference = attribute_model().features_and_head(np.stack(reals))[0] if len(reals) > 1 else None
    measured = {}
    for method, group in usable.groupby("method", sort=False):
        descriptors, crops = _arrays(group["subject_after"]), _arrays(group["crop_after"])
        distance = None
        if reference is not None and len(crops) > 1:
            distance = frechet_distance(attribute_model().features_and_head(np.stack(crops))[0], reference)
        measured[method] = {"published_subjects": len(descriptors),
                            "verifier_same_share": same_person_share(descriptors),
                            "sface_same_share": sface_same_person_share(_arrays(group["sface_subject_after"])),
                            "frechet_distance_stage1": distance}
    return measured


def _arrays(values: pd.Series) -> list[np.ndarray]:
    """The arrays of a column that holds arrays where measured (None or NaN elsewhere)."""
    return [value for value in values if isinstance(value, np.ndarray)]


def write_grid(rows: pd.DataFrame, folder: Path, height: int = 160) -> Path | None:
    """Original | A' per method, one pair per line, for the pairs that kept their images:
    ``folder/grid.png`` (never commit it: it shows research photos)."""
    from PIL import Image

    kept = rows[rows["evaluable"] & rows["image_after"].map(lambda image: isinstance(image, np.ndarray))] \
        if "image_after" in rows else rows.iloc[:0]
    if kept.empty:
        return None
    lines = []
    for _, pair in kept.groupby(["rel_a", "rel_b"], sort=False):
        tiles = [Image.fromarray(np.asarray(image)) for image in pair["image_after"]]
        tiles = [tile.resize((max(1, round(tile.width * height / tile.height)), height)) for tile in tiles]
        line = Image.new("RGB", (sum(tile.width for tile in tiles) + 4 * len(tiles), height), "white")
        for index, tile in enumerate(tiles):
            line.paste(tile, (sum(t.width + 4 for t in tiles[:index]), 0))
        lines.append(line)
    grid = Image.new("RGB", (max(line.width for line in lines), sum(line.height + 4 for line in lines)), "white")
    for index, line in enumerate(lines):
        grid.paste(line, (0, index * (height + 4)))
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / "grid.png")
    return folder / "grid.png"


def evaluate(pairs_csv: Path, images: Path, methods: list[str], policy: Policy, limit: int | None = None,
             workers: int = 2, progress: bool = False, generator: str | None = None,
             grid: Path | None = None, grid_pairs: int = 24) -> dict:
    """EVALUATION.md's protocol over the same-person pairs of ``pairs_csv``, with the realism
    and diversity measures (``realism``); ``grid``: a folder for the sample grid of the first
    ``grid_pairs`` pairs (original | each method)."""
    pairs = pd.read_csv(pairs_csv)
    missing = {"rel_a", "rel_b", "same"} - set(pairs.columns)
    if missing:
        raise ValueError(f"{pairs_csv} lacks column(s) {sorted(missing)}; expected rel_a, rel_b, same")
    same = pairs[pairs["same"].astype(int) == 1]
    if limit:
        same = same.head(limit)
    synthesis = plan_synthesis(methods, policy, generator)
    jobs = [(images / a, images / b, methods, policy, synthesis, grid is not None and index < grid_pairs)
            for index, (a, b) in enumerate(zip(same["rel_a"], same["rel_b"]))]
    started = time.time()
    rows: list[dict] = []
    bar = tqdm(total=len(jobs), unit="pair", desc="evaluate", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: forking a process with live threads (Prefect's client, logging)
        # can deadlock the child on a lock held at fork time. dlib models load once per worker.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(evaluate_pair, jobs, chunksize=4):
                rows += result
                bar.update()
    else:
        for job in jobs:
            rows += evaluate_pair(job)
            bar.update()
    bar.close()
    frame = pd.DataFrame(rows)
    summary = summarize(frame)
    for method, measured in realism(frame).items():
        summary[method] |= measured
    grid_file = write_grid(frame, grid) if grid is not None else None
    return {"protocol": "EVALUATION.md privacy + quality on same-person pairs; verifier dlib ResNet, "
                        f"HOG upsample {VERIFIER_UPSAMPLE}, threshold {VERIFIER_THRESHOLD}",
            "pairs_csv": str(pairs_csv), "images": str(images), "same_pairs": int(len(jobs)),
            "policy": policy.name, "wall_seconds": time.time() - started, "workers": workers,
            "generator": (generator or "shipped") if synthesis else None,
            "grid": str(grid_file) if grid_file else None, "methods": summary}


def markdown_table(results: dict) -> str:
    def fmt(value, digits=3, percent=False):
        if value is None:
            return "-"
        return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"

    lines = [f"Same-person pairs: {results['same_pairs']} ({results['pairs_csv']})", "",
             "| method | de-ID rate | de-ID of verified | self de-ID | detected after | PSNR | SSIM | MS-SSIM | s/face |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, m in results["methods"].items():
        lines.append(f"| {method} | {fmt(m['deid_rate'], percent=True)} | {fmt(m['deid_rate_of_verified'], percent=True)} "
                     f"| {fmt(m['self_deid_rate'], percent=True)} | {fmt(m['detection_rate_after'], percent=True)} "
                     f"| {fmt(m['psnr'], 2)} | {fmt(m['ssim'], 4)} | {fmt(m['ms_ssim'], 4)} | {fmt(m['seconds_per_face'], 3)} |")
    for method, m in results["methods"].items():
        if "detection_rate_first_render" in m:
            lines.append(f"\n{method}: detected after the first rendering {fmt(m['detection_rate_first_render'], percent=True)}; "
                         f"{m['faces_rerendered']} face(s) drawn again because dlib lost them"
                         + (f"; the perturbation withdrawn from {m['faces_perturbation_withdrawn']} of "
                            f"{m['faces_treated']} face(s) (lost or within the release distance of the original "
                            "with it)" if "faces_perturbation_withdrawn" in m else ""))
    for method, m in results["methods"].items():
        if m.get("verifier_same_share") is not None or m.get("frechet_distance_stage1") is not None:
            lines.append(f"\n{method}: the verifier calls {fmt(m.get('verifier_same_share'), percent=True)} of the pairs "
                         f"of its {m['published_subjects']} published subjects the same person (SFace: "
                         f"{fmt(m.get('sface_same_share'), percent=True)}); Fréchet distance "
                         f"to real faces (Stage I features) {fmt(m.get('frechet_distance_stage1'), 2)}"
                         + (f"; {fmt(m['released_share'], percent=True)} of the photos released, "
                            f"{m['faces_escalated']} face(s) escalated, {m['faces_synthesized']} published synthesized "
                            f"({m.get('faces_surround', 0)} of them with their surroundings covered)"
                            if "released_share" in m else ""))
    lines.append("\nThe second verifier (SFace, independent of dlib's): " + "; ".join(
        f"{method} de-ID {fmt(m.get('sface_deid_rate'), percent=True)}, self de-ID "
        f"{fmt(m.get('sface_self_deid_rate'), percent=True)}" for method, m in results["methods"].items()))
    first = next(iter(results["methods"].values()))
    lines.append(f"\nEvaluable pairs: {first['evaluable_pairs']} of {first['pairs']}; verification rate before: "
                 f"{fmt(first['verification_rate_before'], percent=True)}")
    preservation = results.get("attribute_preservation")
    if preservation:
        names = preservation["preserved"]
        lines += ["", f"Attribute preservation (Stage I accuracy on the preserved attributes, CelebA test split, "
                      f"{preservation['faces']} faces):", "",
                  "| faces | mean | ratio to original | " + " | ".join(names) + " |",
                  "|---|---:|---:|" + "---:|" * len(names)]
        rows = [("original", preservation["original"] | {"ratio_to_original": 1.0})]
        rows += list(preservation["methods"].items())
        for method, m in rows:
            lines.append(f"| {method} | {fmt(m['mean'], percent=True)} | {fmt(m['ratio_to_original'], 3)} | "
                         + " | ".join(fmt(m["per_attribute"][n], percent=True) for n in names) + " |")
    return "\n".join(lines)


def attribute_preservation(celeba: Path, methods: list[str], policy: Policy, generator: str | None = None,
                           limit: int | None = None, cache_dir: Path | None = None, seed: int = 0,
                           progress: bool = False) -> dict:
    """Stage I's accuracy, against CelebA's labels, on the policy's preserved attributes of
    the identity-disjoint test split (the people Stage I never trained on): on the original
    aligned faces and on the same faces de-identified by each method. ``limit``: use only
    the first N labelled images (their test-split share).

    The de-identified face is the method's crop pasted into the aligned original through
    the release's own compose (feathered landmark mask at the alignment template, colour
    matching for ``gan``), then judged by the release's Stage I, as a release would judge a
    re-detected face."""
    from flows.training.attributes import align_task, split_rows
    from stages.common.faces import ALIGNED_SIZE, AlignedFace, template

    images, labels = celeba / "img_align_celeba_89x109", celeba / "labels.csv"
    # Stage I's training flow keeps its aligned crops here: the same alignment, done once.
    cache = cache_dir or Path(".data/train-attributes/aligned-cache")
    aligned_file = align_task(str(images), str(labels), str(cache), limit, 2, progress)
    data = split_rows(str(labels), aligned_file, seed, limit)
    test = data["splits"]["test"]
    with np.load(aligned_file) as stored:
        crops = stored["crops"][test]
    preserved = list(policy.attributes.preserve)
    columns = [ATTRIBUTE_COLUMNS.index(f"attr_{name}") for name in preserved]
    truth = data["labels"][test][:, columns].astype(bool)
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    faces = [AlignedFace(crop=c, matrix=identity, inverse=identity, landmarks=template(ALIGNED_SIZE)) for c in crops]
    synthesis = plan_synthesis(methods, policy, generator)

    def accuracy(batch: np.ndarray) -> dict:
        predicted = attribute_model().predict(batch)[:, columns] >= 0.5
        per_attribute = (predicted == truth).mean(axis=0)
        return {"mean": float(per_attribute.mean()),
                "per_attribute": {name: float(v) for name, v in zip(preserved, per_attribute)}}

    results = {"faces": int(len(test)), "preserved": preserved, "original": accuracy(crops), "methods": {}}
    rendered = None
    feather = policy.obfuscation.feather_fraction
    for method in methods:
        if method in GAN_METHODS:
            # Aligned crops have no photo around them to re-detect in: the first view, one
            # rendering shared by the gan methods.
            rendered = rendered or [renders[0] for renders in synthesize(faces, synthesis,
                                                                         policy.obfuscation.gan.batch_size)]
            edited = rendered
        else:
            edited = [obfuscate(f.crop, method, policy.obfuscation.params_for(method)) for f in faces]
        synthesized = method in GAN_METHODS
        forehead = cached_synthesizer(synthesis.generator).forehead if synthesized else 0.0
        composed = [compose_faces(f.crop, [f], [e], feather, [synthesized], [forehead]) for f, e in zip(faces, edited)]
        if method == "gan+perturbation":
            composed = [apply_perturbation(c, [f], [True], synthesis.perturbation, feather)
                        for f, c in zip(faces, composed)]
        composed = np.stack(composed)
        scores = accuracy(composed)
        scores["ratio_to_original"] = scores["mean"] / results["original"]["mean"]
        results["methods"][method] = scores
    return results
