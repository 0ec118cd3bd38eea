"""Policy schema (v1): what a release does, as a compliance officer writes it in YAML.

The models forbid unknown keys so a typo is an error, not a silently ignored setting.
``anonymousnet policy schema`` exports it as JSON Schema (``policy/policy.schema.json``) for
editor completion. It covers the whole release: input limits, face detection, obfuscation
(Stage III synthesis with ``gan``, or blur, pixelate, mask), the Stage IV perturbation, the
identity check and its fallbacks, the attributes kept or re-selected (Stage I/II), Stage II's
privacy (mechanism, epsilon, t-closeness, budget) and the output format.
"""
from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages.attributes.names import ATTRIBUTES
from stages.common.obfuscate import SYNTHESIZING_METHODS
from stages.selection.ppas import EXPONENTIAL_MAX_ATTRIBUTES

ObfuscationName = Literal["gan", "gan_surround", "blur", "pixelate", "mask"]


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
    multi_frame: Literal["deidentify", "reject"] = Field(
        "deidentify", description="Animated GIF/PNG/WebP and multi-page TIFF: deidentify every frame and publish them "
                                  "all with their timing, or reject such files (with the reason).")


class DetectionPolicy(_Strict):
    detector: Literal["centerface", "centerface+hog", "hog", "cnn", "hog+cnn"] = Field(
        "centerface", description="centerface: a neural detector made for crowds (small, turned, occluded faces; "
                                  "fast); centerface+hog adds dlib HOG's faces it missed; dlib HOG (frontal faces "
                                  "only), MMOD CNN (slow, more poses), or hog+cnn: HOG's faces plus the CNN's.")
    threshold: float = Field(0.2, gt=0.0, lt=1.0,
                             description="CenterFace's score above which a detection is a face (lower finds more, "
                                         "with more false alarms; a false alarm only costs an obfuscated patch).")
    tile_side: int = Field(1024, ge=256, le=4096,
                           description="CenterFace sees larger photos in overlapping tiles of this side at full "
                                       "resolution, so small faces stay detectable; smaller photos are not upsampled.")
    upsample: int = Field(1, ge=0, le=3, description="Times dlib's detectors upsample the photo to find smaller faces.")
    max_side: int = Field(1600, ge=256, le=10_000,
                          description="Photos are scaled down to this longest side for dlib's detectors only.")
    cnn_max_side: int = Field(800, ge=256, le=4000,
                              description="Longest side for the CNN detector in hog+cnn (its cost grows with pixels).")
    min_synthesis_px: int = Field(40, ge=8, le=1000,
                                  description="Faces narrower than this (pixels) are too small to align and synthesize: "
                                              "they are obfuscated over their enlarged box (box_method) instead.")
    max_landmark_error: float = Field(0.10, gt=0.0, le=1.0,
                                      description="A face whose fitted landmarks are further than this (fraction of the "
                                                  "face width, on average) from the detector's own five points is too "
                                                  "turned or occluded to align: it is obfuscated over its box instead.")
    box_method: Literal["pixelate", "blur", "mask"] = Field(
        "pixelate", description="How a face too small, turned or occluded for synthesis is protected, over its box.")
    box_margin: float = Field(0.25, ge=0.0, le=1.0,
                              description="The box is enlarged by this fraction of its size on every side first.")


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


class GanParams(_Strict):
    batch_size: int = Field(64, ge=1, le=1024, description="Faces the generator renders per pass (larger is faster "
                                                           "on a GPU, costs memory).")
    rerender_views: int = Field(4, ge=0, le=4, description="When the leak gate's check of the whole photo no longer "
                                "finds a rendered face, or finds it still verifying as its original, draw it again "
                                "up to this many times before any fallback method: a new identity code each time "
                                "(a v2 generator; then the mirrored and zoomed views), or other views of its crop "
                                "(v1: mirrored, zoomed, shifted left, shifted right); 0: the first drawing goes to "
                                "the leak gate as it is.")
    # At most stages.synthesis.render.MAX_CODE_DRAWS - 1 - 4 (rerender_views' maximum).
    screened_draws: int = Field(19, ge=0, le=19, description="Further draws (new identity codes, a v2 generator) "
                                "beyond rerender_views, which only the leak gate's screen takes: a draw that, tried "
                                "alone in the photo, still verifies as the original at the face's own landmarks is "
                                "replaced at once, before the whole photo is checked (a fraction of a second, where "
                                "a check costs seconds); the screen may take rerender_views' draws too. 0: "
                                "rerender_views' draws only.")


class ObfuscationPolicy(_Strict):
    method: ObfuscationName = Field("blur", description="How every detected face is obfuscated: gan synthesizes a new "
                                                        "face with the Stage II target attributes (Stage III); "
                                                        "gan_surround does too and covers the rest of the face's "
                                                        "enlarged box (hair, ears, outline) with detection.box_method.")
    feather_fraction: float = Field(0.06, ge=0, le=0.3, description="Width of the mask's soft edge, as a fraction of face width.")
    gan: GanParams = GanParams()
    blur: BlurParams = BlurParams()
    pixelate: PixelateParams = PixelateParams()
    mask: MaskParams = MaskParams()

    def params_for(self, method: str) -> dict:
        return getattr(self, method).model_dump()


class PerturbationPolicy(_Strict):
    """Stage IV: the universal adversarial perturbation added to synthesized faces."""

    enabled: bool = Field(False, description="Add the shipped universal perturbation (`anonymousnet train perturbation`) "
                                             "inside the mask of every face published as synthesized, so that "
                                             "attribute-profiling classifiers misread it (Stage IV).")
    xi: float = Field(8, gt=0, le=32, description="Largest change of any pixel, in grey levels of 255 (the l-inf radius "
                                                 "xi; at most what the installed perturbation was computed for).")
    min_psnr_db: float = Field(34.0, ge=20, le=60,
                               description="Gate: a face whose region has a lower PSNR with the perturbation than "
                                           "without it is held back with its photo (the perturbation's visible cost).")


class IdentityCheckPolicy(_Strict):
    """How the released photos are checked for identity leaks (see stages/common/identity.py)."""

    threshold: float = Field(0.6, gt=0, le=2,
                             description="Verifier distance below which an output face counts as its original (dlib: 0.6).")
    safety_margin: float = Field(
        0.05, ge=0, le=0.5,
        description="A face is released only at a distance of at least threshold + safety_margin: re-encoding and "
                    "detector jitter move the distance by a few hundredths, so a face just above the threshold "
                    "could verify for another run of the same verifier.")
    on_leak: Literal["fallback", "quarantine"] = Field(
        "fallback", description="A leaking face gets the fallback methods in order (re-checked each time), or its photo is quarantined.")
    fallback: list[ObfuscationName] = Field(["pixelate", "mask"], description="Stronger methods tried in order on a "
                                            "leaking face (gan_surround first keeps a face: the synthesized one, with "
                                            "what is around it covered).")
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


def _closest_attribute(name: str) -> str:
    lowered = {a.lower(): a for a in ATTRIBUTES}
    if name.lower() in lowered:
        return lowered[name.lower()]
    match = difflib.get_close_matches(name, ATTRIBUTES, n=1, cutoff=0.5) or difflib.get_close_matches(
        name.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered.get(match[0], match[0]) if match else ""


class AttributesPolicy(_Strict):
    """Which of Stage I's 40 CelebA attributes a release keeps and which it re-selects."""

    preserve: list[str] = Field(
        [], description="Attributes released as predicted (e.g. the expression the data is needed for). "
                        "Attributes in neither list are also kept as predicted.")
    obfuscate: list[str] = Field(
        [], description="Attributes re-selected by Stage II under epsilon-differential privacy and t-closeness.")
    drift_threshold: float = Field(
        0.25, gt=0, le=1,
        description="The report flags an attribute whose predicted prevalence in a release differs from its "
                    "CelebA population prevalence by at least this much (e.g. 0.25: 30% predicted vs 60% expected).")
    drift_min_faces: int = Field(20, ge=1, description="Releases with fewer faces are too small to judge drift.")

    @model_validator(mode="after")
    def _known_and_disjoint(self):
        for field in ("preserve", "obfuscate"):
            seen = set()
            for index, name in enumerate(getattr(self, field)):
                if name not in ATTRIBUTES:
                    closest = _closest_attribute(name)
                    hint = f"did you mean '{closest}'?" if closest else "see `anonymousnet policy explain` for the list"
                    raise PolicyValueError(f"unknown attribute '{name}'; {hint} (names are CelebA's, e.g. "
                                           f"Smiling, Male, Black_Hair)", at=(field, index))
                if name in seen:
                    raise PolicyValueError(f"'{name}' is listed twice in {field}; keep one", at=(field, index))
                seen.add(name)
        for index, name in enumerate(self.obfuscate):
            if name in self.preserve:
                raise PolicyValueError(f"'{name}' is both preserved and obfuscated; remove it from one of the lists",
                                       at=("obfuscate", index))
        return self


class PrivacyPolicy(_Strict):
    """Stage II: how obfuscated attributes are re-selected and how much privacy that costs."""

    mechanism: Literal["exponential", "randomised_response"] = Field(
        "exponential", description="exponential: draw a combination of the obfuscated attributes that is plausible "
                                   f"in CelebA (at most {EXPONENTIAL_MAX_ATTRIBUTES} attributes); randomised_response: "
                                   "keep or flip each attribute independently (any number).")
    epsilon: float = Field(
        1.0, gt=0, le=20,
        description="Differential-privacy parameter per face: seeing a face's released attributes changes the odds "
                    "of any guess about its original obfuscated attributes by at most a factor e^epsilon.")
    t: float = Field(
        0.2, gt=0, le=1,
        description="t-closeness: among faces released with the same value of an obfuscated attribute, the share "
                    "that originally had it differs from the whole population's share by at most t.")
    budget: float = Field(
        10.0, gt=0, description="Total epsilon a dataset may spend across all its releases; a release that would "
                                "exceed it is refused before anything is written.")
    min_group_faces: int = Field(
        30, ge=1, description="The gate after Stage II judges measured t-closeness only on groups of at least this "
                              "many faces (smaller groups are dominated by sampling noise; the closed form covers them).")
    on_violation: Literal["abort", "quarantine"] = Field(
        "abort", description="When the gate after Stage II fails: abort the release before any photo is published, "
                             "or quarantine the photos of the faces concerned.")

    @model_validator(mode="after")
    def _budget_possible(self):
        if self.epsilon > self.budget:
            raise PolicyValueError(f"one release spends epsilon = {self.epsilon} per face but the budget is "
                                   f"{self.budget}: no release could ever run; raise budget or lower epsilon",
                                   at=("budget",))
        return self


class OutputPolicy(_Strict):
    format: Literal["same", "jpeg", "png"] = Field("same", description="'same' keeps JPEG/PNG/WebP/TIFF/BMP, other formats become PNG.")
    jpeg_quality: int = Field(95, ge=50, le=100)


class Policy(_Strict):
    version: Literal[1] = Field(..., description="Policy language version (1).")
    name: str = Field(..., min_length=1, max_length=100)
    description: str = ""
    input: InputPolicy = InputPolicy()
    detection: DetectionPolicy = DetectionPolicy()
    obfuscation: ObfuscationPolicy = ObfuscationPolicy()
    perturbation: PerturbationPolicy = PerturbationPolicy()
    identity_check: IdentityCheckPolicy = IdentityCheckPolicy()
    attributes: AttributesPolicy = AttributesPolicy()
    privacy: PrivacyPolicy = PrivacyPolicy()
    output: OutputPolicy = OutputPolicy()

    @model_validator(mode="after")
    def _fallback_differs(self):
        if self.identity_check.on_leak == "fallback" and self.identity_check.fallback == [self.obfuscation.method]:
            raise PolicyValueError(f"the only fallback is the main method '{self.obfuscation.method}' itself: "
                                   "a face that leaks with it would leak again; name a stronger method such as mask",
                                   at=("identity_check", "fallback"))
        synthesizes = self.obfuscation.method in SYNTHESIZING_METHODS or (
            self.identity_check.on_leak == "fallback" and any(m in SYNTHESIZING_METHODS for m in self.identity_check.fallback))
        if self.perturbation.enabled and not synthesizes:
            raise PolicyValueError(f"perturbation is enabled but no face is synthesized (method "
                                   f"'{self.obfuscation.method}'): Stage IV perturbs the faces Stage III renders; "
                                   "set obfuscation.method: gan or perturbation.enabled: false",
                                   at=("perturbation", "enabled"))
        obfuscated = len(self.attributes.obfuscate)
        if self.privacy.mechanism == "exponential" and obfuscated > EXPONENTIAL_MAX_ATTRIBUTES:
            raise PolicyValueError(f"{obfuscated} obfuscated attributes, but the exponential mechanism takes at most "
                                   f"{EXPONENTIAL_MAX_ATTRIBUTES}; obfuscate fewer or set mechanism: "
                                   "randomised_response", at=("attributes", "obfuscate"))
        return self


def policy_json_schema() -> dict:
    """JSON Schema of the policy language for editors (``policy/policy.schema.json``), with
    the attribute names as an enum so completion offers them."""
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "AnonymousNet release policy (v1)"
    for field in ("preserve", "obfuscate"):
        schema["$defs"]["AttributesPolicy"]["properties"][field]["items"] = {"enum": list(ATTRIBUTES)}
    return schema
