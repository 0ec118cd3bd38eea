"""Policy schema (v0): what a release does, as a compliance officer writes it in YAML.

The models forbid unknown keys so a typo is an error, not a silently ignored setting.
Later issues extend this schema (attributes, privacy budget, synthesis, perturbation).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ObfuscationName = Literal["blur", "pixelate", "mask"]


class PolicyValueError(ValueError):
    """A cross-field problem, with the path (relative to the model) of the key to point at."""

    def __init__(self, message: str, at: tuple[str, ...]):
        super().__init__(message)
        self.at = at


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputPolicy(_Strict):
    max_pixels: int = Field(40_000_000, ge=10_000, le=500_000_000,
                            description="Photos with more pixels are rejected before decoding (decompression-bomb guard).")


class DetectionPolicy(_Strict):
    detector: Literal["hog", "cnn", "hog+cnn"] = Field(
        "hog+cnn", description="dlib HOG (fast, frontal faces only), MMOD CNN (slow, more poses), or both: HOG's faces "
                               "plus the CNN's faces that HOG missed (profiles, faces looking down).")
    upsample: int = Field(1, ge=0, le=3, description="Times the detector upsamples the photo to find smaller faces.")
    max_side: int = Field(1600, ge=256, le=10_000,
                          description="Photos are scaled down to this longest side for detection only.")
    cnn_max_side: int = Field(800, ge=256, le=4000,
                              description="Longest side for the CNN detector in hog+cnn (its cost grows with pixels).")


class BlurParams(_Strict):
    sigma_fraction: float = Field(0.08, gt=0, le=0.5, description="Gaussian sigma as a fraction of the aligned face width.")


class PixelateParams(_Strict):
    blocks: int = Field(8, ge=2, le=64, description="Cells across the aligned face (fewer is stronger).")


class MaskParams(_Strict):
    color: tuple[int, int, int] = Field((128, 128, 128), description="RGB fill colour.")

    @model_validator(mode="after")
    def _colour_range(self):
        if any(not 0 <= c <= 255 for c in self.color):
            raise PolicyValueError("each colour component must be between 0 and 255", at=("color",))
        return self


class ObfuscationPolicy(_Strict):
    method: ObfuscationName = Field("blur", description="How every detected face is obfuscated.")
    feather_fraction: float = Field(0.06, ge=0, le=0.3, description="Width of the mask's soft edge, as a fraction of face width.")
    blur: BlurParams = BlurParams()
    pixelate: PixelateParams = PixelateParams()
    mask: MaskParams = MaskParams()

    def params_for(self, method: str) -> dict:
        return getattr(self, method).model_dump()


class IdentityCheckPolicy(_Strict):
    """How the released photos are checked for identity leaks (see stages/identity.py)."""

    threshold: float = Field(0.6, gt=0, le=2,
                             description="Verifier distance below which an output face counts as its original (dlib: 0.6).")
    safety_margin: float = Field(
        0.05, ge=0, le=0.5,
        description="A face is released only at a distance of at least threshold + safety_margin: re-encoding and "
                    "detector jitter move the distance by a few hundredths, so a face just above the threshold "
                    "could verify for another run of the same verifier.")
    on_leak: Literal["fallback", "quarantine"] = Field(
        "fallback", description="A leaking face gets the fallback methods in order (re-checked each time), or its photo is quarantined.")
    fallback: list[ObfuscationName] = Field(["pixelate", "mask"], description="Stronger methods tried in order on a leaking face.")
    on_no_face: Literal["release", "quarantine"] = Field("release", description="What to do with photos in which no face is found.")

    @property
    def release_distance(self) -> float:
        """The smallest verifier distance at which a face may be published."""
        return self.threshold + self.safety_margin

    @model_validator(mode="after")
    def _fallback_needed(self):
        if self.threshold + self.safety_margin > 2:
            raise PolicyValueError("threshold + safety_margin exceeds 2, the largest descriptor distance: no face "
                                   "could ever be released; lower one of them", at=("safety_margin",))
        if self.on_leak == "fallback" and not self.fallback:
            raise PolicyValueError("on_leak is 'fallback' but the fallback list is empty: name at least one "
                                   "method (e.g. [mask]) or set on_leak: quarantine", at=("fallback",))
        if len(set(self.fallback)) != len(self.fallback):
            raise PolicyValueError("the fallback list names a method twice", at=("fallback",))
        return self


class OutputPolicy(_Strict):
    format: Literal["same", "jpeg", "png"] = Field("same", description="'same' keeps JPEG/PNG/WebP/TIFF/BMP, other formats become PNG.")
    jpeg_quality: int = Field(95, ge=50, le=100)


class Policy(_Strict):
    version: Literal[0] = Field(0, description="Policy language version.")
    name: str = Field(..., min_length=1, max_length=100)
    description: str = ""
    input: InputPolicy = InputPolicy()
    detection: DetectionPolicy = DetectionPolicy()
    obfuscation: ObfuscationPolicy = ObfuscationPolicy()
    identity_check: IdentityCheckPolicy = IdentityCheckPolicy()
    output: OutputPolicy = OutputPolicy()

    @model_validator(mode="after")
    def _fallback_differs(self):
        if self.identity_check.on_leak == "fallback" and self.identity_check.fallback == [self.obfuscation.method]:
            raise PolicyValueError(f"the only fallback is the main method '{self.obfuscation.method}' itself: "
                                   "a face that leaks with it would leak again; name a stronger method such as mask",
                                   at=("identity_check", "fallback"))
        return self
