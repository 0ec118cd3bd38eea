"""Stage IV in a release: the shipped universal perturbation (``stages.perturbation.universal``, computed
by ``anonymousnet train perturbation``) added to every synthesized face inside its face mask,
at the policy's ξ, and what it did.

The pattern lives in aligned-crop geometry, like the rendered face; it is warped into the
photo with the face's own inverse alignment and faded by the same feathered landmark mask,
after Stage III's compose and colour matching, so what lands in the pixels is the pattern
itself and nothing outside the replaced face changes. A profiler that detects and aligns
the face gets the pattern back in the geometry it was computed for.

Its effect is measured per face on what is published: the white-box profiler (Stage I's
CNN head on the perturbation's attributes) reads the face re-aligned from the encoded photo
and from the same photo without Stage IV; the face *fooled* it when the verdict differs.
The cost is the PSNR of the face's region with against without the perturbation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from stages.attributes.names import ATTRIBUTES
from stages.common.compose import face_region
from stages.common.faces import AlignedFace
from stages.common.quality import psnr


class PerturbationMismatch(ValueError):
    """The policy asks Stage IV for what the installed perturbation cannot give; ``at`` is the
    policy setting concerned (for a file:line error)."""

    def __init__(self, message: str, at: tuple[str, ...]):
        super().__init__(message)
        self.at = at


@dataclass(frozen=True)
class ReleasePerturbation:
    """The perturbation a release applies: the shipped pattern scaled to the policy's ξ."""
    pattern: np.ndarray             # S×S×3 float32 in grey levels (0–255 scale), aligned-crop geometry
    xi_grey_levels: float           # largest change of any pixel
    attributes: tuple[str, ...]     # what the white-box profiler reads (the pattern's target)
    min_psnr_db: float              # the policy's bound on the cost, checked per face by the gate
    preserve: tuple[str, ...] = ()  # what the policy preserves (the pattern was computed to keep it)

    @property
    def crop_psnr_db(self) -> float:
        """PSNR of an aligned crop with against without the pattern (before rounding)."""
        return pattern_psnr(self.pattern)


def pattern_psnr(pattern: np.ndarray) -> float:
    mse = float(np.mean(np.square(pattern, dtype=np.float64)))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def scale_to_policy(pattern: np.ndarray, trained_xi: float, norm: str, attributes: tuple[str, ...],
                    xi_grey_levels: float, min_psnr_db: float, kept: tuple[str, ...] = (),
                    preserve: tuple[str, ...] = ()) -> ReleasePerturbation:
    """``pattern`` (S×S×3 in [0, 1] units, computed for radius ``trained_xi`` in ``norm`` and
    to keep the attributes ``kept``) as a policy preserving ``preserve`` applies it. A smaller
    ξ shrinks it (it stays inside the smaller ball); a larger one, a cost the policy forbids
    even in the aligned crop, or a preserved attribute the pattern was not computed to keep,
    is refused before any photo is read."""
    if norm != "inf":
        raise PerturbationMismatch(f"the installed perturbation was computed in the l{norm} norm; the policy's xi "
                                   "is a per-pixel (l-inf) bound: recompute it with --norm inf", ("perturbation", "xi"))
    trained = trained_xi * 255.0
    if xi_grey_levels > trained + 1e-6:
        raise PerturbationMismatch(
            f"the policy asks for xi = {xi_grey_levels:g} grey levels but the installed perturbation was computed for "
            f"{trained:.3g}: lower perturbation.xi or recompute it with `anonymousnet train perturbation --xi "
            f"{xi_grey_levels:g}/255 --synthesized --inside-mask --install`", ("perturbation", "xi"))
    unknown = [name for name in attributes if name not in ATTRIBUTES]
    if unknown or not attributes:
        raise PerturbationMismatch(f"the installed perturbation names no known profiler attributes "
                                   f"({list(attributes)}); recompute it with `anonymousnet train perturbation`",
                                   ("perturbation", "enabled"))
    unkept = [name for name in preserve if name not in kept]
    if unkept:
        raise PerturbationMismatch(
            f"the policy preserves {', '.join(unkept)}, which the installed perturbation was not computed to keep "
            f"(it keeps {', '.join(kept) or 'nothing'}) and may change: recompute it with `anonymousnet train "
            f"perturbation --keep {','.join(preserve)} --synthesized --inside-mask --install`, or set "
            "perturbation.enabled: false", ("attributes", "preserve"))
    scaled = ReleasePerturbation((pattern * 255.0 * (xi_grey_levels / trained)).astype(np.float32),
                                 float(xi_grey_levels), tuple(attributes), float(min_psnr_db), tuple(preserve))
    if scaled.crop_psnr_db < min_psnr_db:
        raise PerturbationMismatch(
            f"at xi = {xi_grey_levels:g} the perturbation costs {scaled.crop_psnr_db:.1f} dB PSNR over an aligned face, "
            f"below the policy's perturbation.min_psnr_db {min_psnr_db:g}: every face would fail the gate; lower xi or "
            "min_psnr_db", ("perturbation", "min_psnr_db"))
    return scaled


@lru_cache(maxsize=4)
def installed_perturbation(xi_grey_levels: float, min_psnr_db: float,
                           preserve: tuple[str, ...] = ()) -> ReleasePerturbation:
    """The shipped perturbation (sha256-verified, ``models.perturbation``) at the policy's ξ,
    for a policy preserving ``preserve``."""
    from models.perturbation import load_perturbation

    shipped = load_perturbation()
    return scale_to_policy(shipped.pattern, shipped.xi, shipped.norm, shipped.attributes, xi_grey_levels,
                           min_psnr_db, shipped.keep, tuple(preserve))


def apply_perturbation(photo: np.ndarray, aligned: list[AlignedFace], perturb: list[bool],
                       perturbation: ReleasePerturbation, feather_fraction: float) -> np.ndarray:
    """``photo`` (already composed) with the pattern added inside the mask of each face whose
    ``perturb`` is True."""
    output = photo
    size = perturbation.pattern.shape[0]
    for align, wanted in zip(aligned, perturb):
        if not wanted:
            continue
        if align.crop.shape[0] != size:
            # Fail closed: a face skipped here would be recorded as perturbed at no PSNR cost.
            raise PerturbationMismatch(f"the perturbation is {size} px but a face was aligned at "
                                       f"{align.crop.shape[0]} px; recompute it at the aligned size "
                                       f"(anonymousnet train perturbation)", at=("perturbation",))

        region = face_region(output.shape, align, size, feather_fraction)
        if region is None:
            continue
        # Outside the crop the pattern is zero (constant border), not smeared.
        layer = region.warp(perturbation.pattern, border=cv2.BORDER_CONSTANT) * region.alpha
        if output is photo:
            output = photo.copy()
        pixels = region.of(output)
        pixels[...] = np.clip(np.rint(pixels.astype(np.float32) + layer), 0, 255).astype(np.uint8)
    return output


def region_psnr(before: np.ndarray, after: np.ndarray, align: AlignedFace, crop_size: int) -> float:
    """PSNR between ``before`` and ``after`` over the rectangle face ``align`` covers."""
    region = face_region(before.shape, align, crop_size)
    return math.inf if region is None else psnr(region.of(before), region.of(after))


def profiler_verdicts(crops: np.ndarray, attributes: tuple[str, ...], model=None) -> np.ndarray:
    """The white-box profiler's binary verdict (N×K bool): Stage I's CNN head on
    ``attributes``, decision at probability 0.5 (logit 0), as the perturbation was computed."""
    if model is None:
        from stages.attributes.predict import default_network

        model = default_network()
    columns = [ATTRIBUTES.index(name) for name in attributes]
    _, heads = model.features_and_head(crops)
    return heads[:, columns] >= 0.5


def realign(photo: np.ndarray, align: AlignedFace, crop_size: int) -> np.ndarray:
    """The aligned crop of face ``align`` read back from ``photo`` (what a profiler that
    aligns faces the way the release does would look at)."""
    return cv2.warpAffine(photo, align.matrix, (crop_size, crop_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


@dataclass
class PerturbationEffect:
    psnr_db: list[float]            # per perturbed face, region PSNR against the photo without Stage IV
    fooled: list[bool]              # per perturbed face, the white-box verdict changed
    preserved_changed: list[list[str]]   # per perturbed face, preserved attributes whose verdict changed


def measure_effect(clean: np.ndarray, perturbed_before_encoding: np.ndarray, published: np.ndarray,
                   faces: list[AlignedFace], perturbation: ReleasePerturbation, model=None) -> PerturbationEffect:
    """What Stage IV did to ``faces`` (the perturbed ones): the PSNR cost in the photo's own
    pixels (before encoding, so the encoder's loss is not charged to it) and whether the
    white-box profiler's verdict on the *published* face differs from its verdict on the
    same face without the perturbation; the same for the attributes the policy preserves
    (which should not change)."""
    if not faces:
        return PerturbationEffect([], [], [])
    size = perturbation.pattern.shape[0]
    costs = [float(region_psnr(clean, perturbed_before_encoding, align, size)) for align in faces]
    crops = np.stack([realign(image, align, size) for image in (clean, published) for align in faces])
    names = perturbation.attributes + perturbation.preserve
    verdicts = profiler_verdicts(crops, names, model)
    changed = verdicts[:len(faces)] != verdicts[len(faces):]
    targets = len(perturbation.attributes)
    return PerturbationEffect(costs, [bool(flag) for flag in changed[:, :targets].any(axis=1)],
                              [[name for name, flag in zip(perturbation.preserve, row[targets:]) if flag]
                               for row in changed])
