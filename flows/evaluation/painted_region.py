"""How much of a face must be replaced before the verifiers stop recognising its person.

The question is the generator's, not any generator's answer: each subject of LFW DevTrain's
same-person pairs (photo A) gets *another real person's* face pasted in, colour-matched, over
the landmark hull and over the hull with some of the forehead (``faces.mask_polygon``). A
real face is the best painting any generator could make, so what the verifiers still
recognise of A's person is what the region left untouched gives away: the floor under every
generator that paints that region. Each verifier is asked whether the result is the person
of photo B (another photo of them) and of A itself.

``anonymousnet evaluate-painted-region --pairs ../shared/data/lfw_devtrain/pairs.csv
--images ../shared/data/lfw_devtrain/images``
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.common.compose import compose_face
from stages.common.faces import SAME_PERSON, align_face, detect_faces, face_descriptor
from stages.common.imageio import ImageRejected, load_rgb
from stages.common.sface import SFACE_SAME_PERSON, sface_descriptor

FOREHEADS = (0.0, 0.25, 0.45)
DONORS = 2          # other people pasted into each subject
DONOR_STRIDE = 37   # donor j of subject i: the subject (i + 37·j) mod N, never the same person


def _subject(rgb: np.ndarray):
    """The detected face nearest the image centre (EVALUATION.md's subject), or None."""
    from flows.evaluation.evaluate import VERIFIER_UPSAMPLE

    faces = detect_faces(rgb, detector="hog", upsample=VERIFIER_UPSAMPLE)
    centre = np.array(rgb.shape[1::-1], float) / 2
    return min(faces, key=lambda f: np.linalg.norm(np.array([(f.box[0] + f.box[2]) / 2,
                                                               (f.box[1] + f.box[3]) / 2]) - centre), default=None)


def painted_region(pairs_csv: Path, images: Path, limit: int = 150, foreheads: tuple[float, ...] = FOREHEADS,
                   progress: bool = False) -> dict:
    """Per region: the share of pasted subjects each verifier still calls B's person and A's."""
    pairs = pd.read_csv(pairs_csv)
    same = pairs[pairs["same"].astype(int) == 1].head(limit)
    started = time.time()
    subjects = []
    for rel_a, rel_b in zip(same["rel_a"], same["rel_b"]):
        try:
            photo_a, photo_b = load_rgb(images / rel_a).rgb, load_rgb(images / rel_b).rgb
        except ImageRejected:
            continue
        face_a, face_b = _subject(photo_a), _subject(photo_b)
        if face_a is None or face_b is None:
            continue
        subjects.append({"person": Path(rel_a).parent.name, "photo": photo_a, "face": face_a,
                         "aligned": align_face(photo_a, face_a.landmarks),
                         "dlib": (face_descriptor(photo_a, face_a.landmarks), face_descriptor(photo_b, face_b.landmarks)),
                         "sface": (sface_descriptor(photo_a, face_a.landmarks),
                                   sface_descriptor(photo_b, face_b.landmarks))})
    verdicts = {forehead: [] for forehead in foreheads}
    for index, subject in enumerate(tqdm(subjects, desc="painted region", unit="face", disable=not progress)):
        for step in range(1, DONORS + 1):
            donor = subjects[(index + DONOR_STRIDE * step) % len(subjects)]
            if donor["person"] == subject["person"]:
                continue
            crop = align_face(donor["photo"], donor["face"].landmarks).crop
            for forehead in foreheads:
                pasted = compose_face(subject["photo"], subject["aligned"], crop, colour_match=True, forehead=forehead)
                landmarks = subject["face"].landmarks
                dlib, sface = face_descriptor(pasted, landmarks), sface_descriptor(pasted, landmarks)
                verdicts[forehead].append({
                    "dlib_as_b": np.linalg.norm(dlib - subject["dlib"][1]) < SAME_PERSON,
                    "dlib_as_a": np.linalg.norm(dlib - subject["dlib"][0]) < SAME_PERSON,
                    "sface_as_b": float(sface @ subject["sface"][1]) >= SFACE_SAME_PERSON,
                    "sface_as_a": float(sface @ subject["sface"][0]) >= SFACE_SAME_PERSON})
    regions = {}
    for forehead, rows in verdicts.items():
        frame = pd.DataFrame(rows)
        regions[f"{forehead:g}"] = {"pasted": int(len(frame))} | {
            f"{column}_share": float(frame[column].mean()) for column in frame.columns}
    return {"protocol": "another real person's face pasted (colour-matched) into each LFW subject over the "
                        "landmark hull plus `forehead` of the chin-to-eyebrows distance; the share each verifier "
                        "still calls the subject's person (B: another photo of them; A: the photo itself)",
            "pairs_csv": str(pairs_csv), "subjects": len(subjects), "donors_per_subject": DONORS,
            "wall_seconds": round(time.time() - started, 1), "regions": regions}


def region_table(results: dict) -> str:
    lines = ["| painted region | pasted | dlib as B | dlib as A | SFace as B | SFace as A |",
             "|---|---:|---:|---:|---:|---:|"]
    for forehead, shares in results["regions"].items():
        name = "landmark hull" if float(forehead) == 0 else f"hull + {forehead} of the forehead"
        lines.append(f"| {name} | {shares['pasted']} | " + " | ".join(
            f"{100 * shares[f'{column}_share']:.1f}%" for column in ("dlib_as_b", "dlib_as_a", "sface_as_b",
                                                                      "sface_as_a")) + " |")
    return "\n".join(lines)
