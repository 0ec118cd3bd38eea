"""dlib's own compiled verifier, for the tests that check the release against something it
does not use: the release describes faces with the PyTorch port (models/face_descriptor.py),
so a fault in the port can neither hide a leak from the independent pass nor agree with itself."""
import functools

import dlib
import numpy as np

from models.registry import verified_path


@functools.lru_cache(maxsize=1)
def _model():
    return dlib.face_recognition_model_v1(str(verified_path("dlib_face_descriptor")))


def compiled_descriptor(chip: np.ndarray) -> np.ndarray:
    """dlib's 128-D descriptor of a 150×150 RGB face chip."""
    return np.asarray(_model().compute_face_descriptor(np.ascontiguousarray(chip)), dtype=np.float64)
