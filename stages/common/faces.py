"""Face detection, 68 landmarks, alignment to a canonical template, and the face mask.

Detection: CenterFace (``stages.common.centerface``, a detector made for crowds: small, turned and
occluded faces) for releases; dlib's HOG detector (the verifier's own, and this module's
default) and the MMOD CNN detector as options. dlib's detectors run on a copy of the photo
scaled down to ``max_side`` so that 4000-pixel photos cost what 1600-pixel ones do.
Landmarks are dlib's 68 points fitted on the full-resolution photo; for a CenterFace face
they are fitted in the box dlib's predictor expects, and checked against CenterFace's own
five points (``landmark_error``), so a face whose fit is unreliable is known as such. Alignment is the
least-squares similarity transform (Umeyama 1991) taking the 68 landmarks onto
:data:`template`, stored together with its inverse so edited faces can be put back.

The mask follows Li & Lyu ("De-identification without losing faces"): the convex hull of
the eyebrow and lower-face (jaw) landmarks, with points interpolated on each side between
the jaw's top and the eyebrow's outer end, feathered outward so the hull itself is fully
covered.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import cv2
import dlib
import numpy as np

from models.registry import verified_path

ALIGNED_SIZE = 128
JAW = list(range(0, 17))
EYEBROWS = list(range(17, 27))
CHIN = 8
DETECTORS = ("centerface", "centerface+hog", "hog", "cnn", "hog+cnn")
# dlib's shape predictor was trained on HOG-detector boxes, which sit lower and narrower than
# CenterFace's (forehead to chin): left, top, right, bottom of the HOG box in units of the
# CenterFace box's width and height. Medians over 106 faces both found in every third photo
# of ../shared/data/wild/celeba_in_the_wild (interquartile ranges about +-0.05).
CENTERFACE_TO_DLIB_BOX = (-0.034, 0.158, 1.038, 0.964)
# Two detections are one face when their boxes overlap by more than this fraction of the
# smaller box (used to merge the HOG and CNN detectors' findings).
SAME_FACE_OVERLAP = 0.3
CHIP_SIZE = 150    # dlib's face chip, what its verifier describes
SAME_PERSON = 0.6   # dlib's documented verifier threshold, as the gate and EVALUATION.md use it


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]   # left, top, right, bottom in photo pixels
    score: float
    landmarks: np.ndarray                     # 68 x 2 (x, y) in photo pixels
    detector: str = "hog"                     # which detector found it: centerface | hog | cnn
    # Mean distance between dlib's landmarks and the detector's own five points (eyes, nose,
    # mouth corners) over the box width; None when the detector gives no points (dlib's).
    landmark_error: float | None = None


@dataclass(frozen=True)
class AlignedFace:
    crop: np.ndarray          # size x size x 3 uint8
    matrix: np.ndarray        # 2 x 3, photo -> aligned crop
    inverse: np.ndarray       # 2 x 3, aligned crop -> photo
    landmarks: np.ndarray     # 68 x 2 in crop pixels


@functools.lru_cache(maxsize=1)
def _template_unit() -> np.ndarray:
    """The 68-point mean shape in unit coordinates of the aligned crop (see
    ``anonymousnet train template``, which fitted it on CelebA)."""
    data = json.loads(verified_path("face_template_68").read_text())
    return np.asarray(data["points"], dtype=np.float64).reshape(68, 2)


def template(size: int = ALIGNED_SIZE) -> np.ndarray:
    return _template_unit() * size


@functools.lru_cache(maxsize=None)
def _face_detector(kind: str):
    if kind == "hog":
        return dlib.get_frontal_face_detector()
    return dlib.cnn_face_detection_model_v1(str(verified_path("dlib_mmod_detector")))


@functools.lru_cache(maxsize=1)
def _landmark_predictor():
    return dlib.shape_predictor(str(verified_path("dlib_landmarks_68")))


@functools.lru_cache(maxsize=1)
def descriptor_network():
    """dlib's face-recognition ResNet with dlib's weights, run by PyTorch (the dlib wheel has
    no BLAS: ~10x slower for the same numbers; see models/face_descriptor.py)."""
    from models.face_descriptor import (
        DlibFaceDescriptor,  # torch: only where faces are described
    )

    return DlibFaceDescriptor.from_file(verified_path("dlib_face_descriptor"))


def detector_model_names(detector: str) -> list[str]:
    """Model files a release with ``detector`` loads (the leak check always uses CenterFace
    and HOG, the verifier's detector)."""
    names = ["centerface", "dlib_hog_detector"] + (["dlib_mmod_detector"] if "cnn" in detector else [])
    return names + ["dlib_landmarks_68", "dlib_face_descriptor", "face_template_68"]


def _shape_to_array(shape) -> np.ndarray:
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], dtype=np.float64)


def _boxes(rgb: np.ndarray, kind: str, upsample: int, max_side: int) -> list[tuple[tuple, float]]:
    """(box in photo pixels, score) from one dlib detector run on a copy scaled to ``max_side``."""
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small = rgb if scale == 1.0 else cv2.resize(
        rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    small = np.ascontiguousarray(small)
    if kind == "hog":
        rects, scores, _ = _face_detector("hog").run(small, upsample, 0.0)
        found = list(zip(rects, scores))
    else:
        found = [(d.rect, d.confidence) for d in _face_detector("cnn")(small, upsample)]
    return [((r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale), float(s)) for r, s in found]


def box_overlap(a: tuple, b: tuple) -> float:
    """Intersection over the smaller box's area (1.0 when one box contains the other)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / max(min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])), 1e-9)


def _dlib_rect(box: tuple) -> dlib.rectangle:
    return dlib.rectangle(int(round(box[0])), int(round(box[1])), int(round(box[2])), int(round(box[3])))


def _five_points(landmarks: np.ndarray) -> np.ndarray:
    """dlib's 68 points reduced to CenterFace's five: eye centres, nose tip, mouth corners
    (in image order: the subject's right eye is on the left)."""
    return np.stack([landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0), landmarks[30],
                     landmarks[48], landmarks[54]])


def _centerface_faces(rgb: np.ndarray, threshold: float, tile_side: int) -> list[DetectedFace]:
    from stages.common.centerface import detect_face_boxes

    faces = []
    for found in detect_face_boxes(rgb, threshold, tile_side):
        width = found.box[2] - found.box[0]
        landmarks = landmarks_in_box(rgb, found.box, "centerface")
        error = float(np.linalg.norm(_five_points(landmarks) - found.points, axis=1).mean() / max(width, 1.0))
        faces.append(DetectedFace(box=found.box, score=found.score, landmarks=landmarks, detector="centerface",
                                  landmark_error=error))
    return faces


def landmarks_in_box(rgb: np.ndarray, box: tuple, detector: str) -> np.ndarray:
    """dlib's 68 landmarks fitted inside a face box that ``detector`` drew (a CenterFace box
    is first mapped to the box dlib's detector draws around the same face, which is what
    the landmark model was trained in)."""
    if detector == "centerface":
        left, top, right, bottom = box
        width, height = right - left, bottom - top
        fraction = CENTERFACE_TO_DLIB_BOX
        box = (left + fraction[0] * width, top + fraction[1] * height,
               left + fraction[2] * width, top + fraction[3] * height)
    return _shape_to_array(_landmark_predictor()(np.ascontiguousarray(rgb), _dlib_rect(box)))


def detect_faces(rgb: np.ndarray, detector: str = "hog", upsample: int = 1,
                 max_side: int = 1600, cnn_max_side: int = 800, threshold: float = 0.5,
                 tile_side: int = 1024) -> list[DetectedFace]:
    """Faces in an RGB photo, ordered left to right (so face_index is stable).

    ``centerface`` finds faces with CenterFace (score above ``threshold``; the photo at its
    own resolution, in tiles of ``tile_side`` when larger) and fits dlib's landmarks in each.
    ``hog+cnn`` takes HOG's faces and adds the CNN's faces that overlap none of them: HOG
    is fast and precise on frontal faces, the MMOD CNN also finds profiles and faces
    looking down, which HOG misses. The CNN runs at upsample 0 on a copy scaled to
    ``cnn_max_side`` (its cost grows with pixels: about 2.7 s at 800 px on one CPU core).
    ``centerface+hog`` adds HOG's faces that overlap none of CenterFace's.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    faces = _centerface_faces(rgb, threshold, tile_side) if detector.startswith("centerface") else []
    found = []
    if detector in ("hog", "hog+cnn", "centerface+hog"):
        found = [(box, score, "hog") for box, score in _boxes(rgb, "hog", upsample, max_side)]
    if detector == "cnn":
        found = [(box, score, "cnn") for box, score in _boxes(rgb, "cnn", upsample, max_side)]
    elif detector == "hog+cnn":
        found += [(box, score, "cnn") for box, score in _boxes(rgb, "cnn", 0, cnn_max_side)
                  if all(box_overlap(box, other) <= SAME_FACE_OVERLAP for other, _, _ in found)]
    predictor = _landmark_predictor()
    for box, score, kind in found:
        if any(box_overlap(box, face.box) > SAME_FACE_OVERLAP for face in faces):
            continue
        landmarks = _shape_to_array(predictor(rgb, _dlib_rect(box)))
        faces.append(DetectedFace(box=box, score=score, landmarks=landmarks, detector=kind))
    faces.sort(key=lambda face: (face.box[0], face.box[1]))
    return faces


def face_chip(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The 150 x 150 aligned chip dlib's ResNet describes (its own alignment of ``landmarks``):
    the descriptor is a function of these pixels alone."""
    points = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in landmarks])
    left, top = landmarks.min(axis=0)
    right, bottom = landmarks.max(axis=0)
    rect = dlib.rectangle(int(left), int(top), int(right), int(bottom))
    shape = dlib.full_object_detection(rect, points)
    return np.asarray(dlib.get_face_chip(np.ascontiguousarray(rgb), shape, size=CHIP_SIZE, padding=0.25))


def chip_descriptor(chip: np.ndarray) -> np.ndarray:
    """dlib's 128-D ResNet descriptor of a :func:`face_chip`."""
    return descriptor_network().describe(chip)


def face_descriptor(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """dlib's 128-D ResNet descriptor of the face at ``landmarks`` (68 points)."""
    return chip_descriptor(face_chip(rgb, landmarks))


def pair_distances(descriptors: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """The verifier's distance between each pair of ``descriptors`` (each pair once)."""
    stacked = np.stack(list(descriptors)).astype(np.float64)
    distances = np.linalg.norm(stacked[:, None, :] - stacked[None, :, :], axis=-1)
    return distances[np.triu_indices(len(stacked), k=1)]


def same_person_share(descriptors: list[np.ndarray] | np.ndarray) -> float | None:
    """Share of the pairs of ``descriptors`` the verifier calls the same person (< 0.6)."""
    if len(descriptors) < 2:
        return None
    return float((pair_distances(descriptors) < SAME_PERSON).mean())


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2x3 matrix of the rotation + uniform scale + translation that maps ``source`` points
    onto ``target`` points with least squared error (Umeyama; reflections excluded)."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    mean_s, mean_t = source.mean(axis=0), target.mean(axis=0)
    centred_s, centred_t = source - mean_s, target - mean_t
    covariance = centred_t.T @ centred_s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    variance_s = (centred_s ** 2).sum() / len(source)
    scale = np.trace(np.diag(singular) @ sign) / variance_s
    translation = mean_t - scale * rotation @ mean_s
    return np.hstack([scale * rotation, translation[:, None]])


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> AlignedFace:
    matrix = similarity_transform(landmarks, template(size))
    crop = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return AlignedFace(crop=crop, matrix=matrix, inverse=invert_affine(matrix),
                       landmarks=apply_affine(matrix, landmarks))


def mask_polygon(landmarks: np.ndarray, side_points: int = 3, forehead: float = 0.0) -> np.ndarray:
    """Convex hull of jaw + eyebrows, with points interpolated between each jaw top and the
    outer end of the eyebrow above it (Li & Lyu). ``forehead`` > 0 takes in the forehead
    too: the eyebrows raised by that fraction of the chin-to-eyebrows distance, along the
    face's own up (so a tilted face's forehead is followed)."""
    points = [landmarks[JAW], landmarks[EYEBROWS]]
    for jaw_end, brow_end in ((0, 17), (16, 26)):
        fractions = np.linspace(0, 1, side_points + 2)[1:-1, None]
        points.append(landmarks[jaw_end] + fractions * (landmarks[brow_end] - landmarks[jaw_end]))
    if forehead > 0:
        up = landmarks[EYEBROWS].mean(axis=0) - landmarks[CHIN]
        points.append(landmarks[EYEBROWS] + forehead * up)
    hull = cv2.convexHull(np.concatenate(points).astype(np.float32))
    return hull.reshape(-1, 2).astype(np.float64)


def face_mask(landmarks: np.ndarray, shape: tuple[int, int], feather_fraction: float = 0.06,
              forehead: float = 0.0) -> np.ndarray:
    """Float mask in [0, 1] of ``shape`` (H, W): 1 on the landmark hull (with ``forehead``,
    see :func:`mask_polygon`), fading to 0 over a band outside it whose width is
    ``feather_fraction`` of the face width."""
    polygon = mask_polygon(landmarks, forehead=forehead)
    binary = np.zeros(shape, dtype=np.uint8)
    # Rasterise at 4x sub-pixel precision so the hull edge is placed exactly.
    cv2.fillConvexPoly(binary, np.round(polygon * 4).astype(np.int32), 1, lineType=cv2.LINE_8, shift=2)
    face_width = float(np.ptp(landmarks[:, 0]))
    feather = max(1.0, feather_fraction * face_width)
    radius = int(np.ceil(feather))
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        binary = cv2.dilate(binary, kernel)
    # sigma = radius / 3 keeps the mask >= 0.99 on the hull itself, corners included
    # (Phi(3) = 0.9987 along a straight edge; a convex corner loses a little more).
    mask = cv2.GaussianBlur(binary.astype(np.float32), (0, 0), sigmaX=max(radius / 3.0, 0.5))
    return np.clip(mask, 0.0, 1.0)


def fit_template(landmark_sets: list[np.ndarray], iterations: int = 10,
                 jaw_width: float = 0.60, eye_line: float = 0.42) -> np.ndarray:
    """Generalised Procrustes mean of many 68-point shapes, placed in a unit square crop:
    the jaw (points 0-16) spans ``jaw_width`` of the crop, centred, with the eye centres at
    height ``eye_line``. Returns 68 x 2 unit coordinates."""
    shapes = [np.asarray(s, dtype=np.float64) for s in landmark_sets]
    mean = shapes[0] - shapes[0].mean(axis=0)
    for _ in range(iterations):
        mean = mean / np.linalg.norm(mean)
        aligned = [apply_affine(similarity_transform(s, mean), s) for s in shapes]
        mean = np.mean(aligned, axis=0)
        mean = mean - mean.mean(axis=0)
    scale = jaw_width / np.linalg.norm(mean[16] - mean[0])
    unit = mean * scale
    eyes = np.vstack([unit[36:42].mean(axis=0), unit[42:48].mean(axis=0)]).mean(axis=0)
    unit[:, 0] += 0.5 - (unit[0, 0] + unit[16, 0]) / 2
    unit[:, 1] += eye_line - eyes[1]
    return unit
