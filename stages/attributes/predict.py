"""Stage I in a release: the 40 attribute probabilities of every aligned face, and the
check of a release's predicted prevalences against CelebA's population.

The shipped checkpoint is verified against ``models/manifest.json`` before it is loaded
(torch ``weights_only=True``, the forests as plain arrays without pickle), so a tampered or
missing model stops the run with an error that says how to restore it.
"""
from __future__ import annotations

import functools
import json
import threading

import numpy as np

from models.registry import ModelFileError, verified_path
from stages.attributes.names import ATTRIBUTES
from stages.common.facetable import ATTRIBUTE_COLUMNS, load_crops

MODEL_FILES = ("attributes_cnn", "attributes_forests", "attributes_config")


# A release loads the model in a background thread while the batches are detected
# (flows.release.flow); a task that needs it meanwhile waits for that load instead of starting a
# second one.
_loading = threading.Lock()


def default_model():
    """The shipped Stage I model (CNN + 40 forests), verified, on the CPU."""
    with _loading:
        return _load_default_model()


@functools.lru_cache(maxsize=1)
def _load_default_model():
    from models.attributes import load_model

    paths = [verified_path(name) for name in MODEL_FILES]
    try:
        return load_model(*paths)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ModelFileError(f"the Stage I model in {paths[0].parent} cannot be loaded ({error}); retrain it "
                             f"with `anonymousnet train attributes --install` or restore models/ from git") from error


# Callers reset the loaded model like an lru_cache (tests, a freshly installed model).
default_model.cache_clear = _load_default_model.cache_clear


@functools.lru_cache(maxsize=1)
def default_network():
    """The shipped Stage I CNN alone (no forests), verified: Stage IV's white-box profiler."""
    from models.attributes import load_network

    cnn, config = verified_path("attributes_cnn"), verified_path("attributes_config")
    try:
        return load_network(cnn, config)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ModelFileError(f"the Stage I CNN in {cnn.parent} cannot be loaded ({error}); retrain it "
                             f"with `anonymousnet train attributes --install` or restore models/ from git") from error


@functools.lru_cache(maxsize=1)
def population_prevalence() -> np.ndarray:
    """P(attribute) over all 202,599 CelebA images (``attribute_population.json``)."""
    data = json.loads(verified_path("attribute_population").read_text())
    if tuple(data["attributes"]) != ATTRIBUTES:
        raise ModelFileError("attribute_population.json lists other attributes than Stage I predicts")
    return np.asarray(data["prevalence"], dtype=np.float64)


def predict_face_rows(face_rows: list[dict], model=None, batch_size: int = 256) -> list[dict]:
    """Add the 40 ``attr_<Name>`` probabilities to each face row, reading its aligned crop
    from the run's work folder (``crop_file``, ``crop_row``)."""
    if not face_rows:
        return face_rows
    model = model or default_model()
    probabilities = model.predict(np.stack(load_crops(face_rows)), batch_size=batch_size)
    return [row | dict(zip(ATTRIBUTE_COLUMNS, map(float, values))) for row, values in zip(face_rows, probabilities)]


def attribute_drift(face_rows: list[dict], prevalence: np.ndarray, threshold: float, min_faces: int) -> dict:
    """Predicted prevalence in a release (mean probability over its faces) against the
    population prior. An attribute drifts when the two differ by at least ``threshold``;
    with fewer than ``min_faces`` faces the comparison says nothing and is not made."""
    rows = [r for r in face_rows if all(r.get(c) is not None for c in ATTRIBUTE_COLUMNS)]
    result = {"faces": len(rows), "threshold": threshold, "min_faces": min_faces,
              "assessed": len(rows) >= min_faces, "drifted": []}
    if not result["assessed"]:
        return result
    predicted = np.array([[r[c] for c in ATTRIBUTE_COLUMNS] for r in rows]).mean(axis=0)
    for name, release, prior in zip(ATTRIBUTES, predicted, prevalence):
        if abs(release - prior) >= threshold:
            result["drifted"].append({"attribute": name, "release": round(float(release), 4),
                                      "population": round(float(prior), 4)})
    return result


@functools.lru_cache(maxsize=1)
def shipped_population():
    """CelebA's prevalences and attribute combinations (``attribute_combinations.npz``,
    verified; plain arrays, no pickle) for Stage II."""
    from stages.selection.ppas import Population

    with np.load(verified_path("attribute_combinations"), allow_pickle=False) as stored:
        codes, counts = stored["codes"].astype(np.uint64), stored["counts"].astype(np.int64)
    return Population(prevalence=population_prevalence(), codes=codes, counts=counts)
