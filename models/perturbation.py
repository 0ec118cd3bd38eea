"""Stage IV's shipped universal perturbation: ``perturbation.npz`` (one float32 array, read
without pickle) and ``perturbation.json`` (how it was computed and what it measured), both
verified against ``models/manifest.json``; written by ``anonymousnet train perturbation
--install``."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.registry import ModelFileError, run_or_installed

RETRAIN = "`anonymousnet train perturbation --synthesized --inside-mask --install`"


@dataclass(frozen=True)
class ShippedPerturbation:
    pattern: np.ndarray            # S×S×3 float32, in [0, 1] units, aligned-crop geometry
    xi: float                      # the radius it was computed for (ℓ∞: per pixel, [0, 1] units)
    norm: str                      # "inf" or "2"
    attributes: tuple[str, ...]    # what the white-box profiler read
    keep: tuple[str, ...]          # attributes it was computed to leave alone
    config: dict                   # the training run's perturbation.json

    @property
    def size(self) -> int:
        return self.pattern.shape[0]


def load_perturbation(folder: str | Path | None = None) -> ShippedPerturbation:
    """The perturbation of a training run's folder, or (``None``) the shipped one."""
    arrays, config_file = run_or_installed(
        folder, {"perturbation": "perturbation.npz", "perturbation_config": "perturbation.json"},
        "the run folder of an `anonymousnet train perturbation` run",
        f"no Stage IV perturbation is installed: compute one with {RETRAIN}, "
        "or set perturbation.enabled: false in the policy")
    config = json.loads(config_file.read_text())
    try:
        with np.load(arrays, allow_pickle=False) as stored:
            chw = np.asarray(stored["perturbation"], dtype=np.float32)
        if chw.ndim != 3 or chw.shape[0] != 3 or chw.shape[1] != chw.shape[2]:
            raise ValueError(f"shape {chw.shape}, expected 3×S×S")
        xi, norm = float(config["xi"]), str(config["norm"])
    except (KeyError, ValueError, OSError) as error:
        raise ModelFileError(f"the perturbation in {arrays.parent} cannot be read ({error}); recompute it with "
                             f"{RETRAIN} or restore models/ from git") from error
    return ShippedPerturbation(pattern=np.ascontiguousarray(chw.transpose(1, 2, 0)), xi=xi, norm=norm,
                               attributes=tuple(config.get("attributes", ())), keep=tuple(config.get("keep", ())),
                               config=config)
