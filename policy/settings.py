"""What a policy means for each stage: the pure mapping from a validated ``Policy`` to the
settings the stages take, and Stage II's mechanism for it.

The release flow, the evaluation, the benchmarks and the training flows all read a policy
through these, so a release and its measurements can never disagree on what a key means,
and nothing outside the release has to import the release flow.
"""
from __future__ import annotations

from policy.schema import Policy
from stages.attributes.predict import shipped_population
from stages.common.anonymize import AnonymizeSettings
from stages.common.pipeline import IngestSettings
from stages.perturbation.apply import installed_perturbation
from stages.selection.ppas import Selection, build_selection, require_feasible


def ingest_settings(policy: Policy, workers: int = 1) -> IngestSettings:
    detection = policy.detection
    return IngestSettings(detector=detection.detector, upsample=detection.upsample, max_side=detection.max_side,
                          cnn_max_side=detection.cnn_max_side, threshold=detection.threshold,
                          tile_side=detection.tile_side, max_pixels=policy.input.max_pixels,
                          multi_frame=policy.input.multi_frame, workers=workers)


def anonymize_settings(policy: Policy, workers: int = 1) -> AnonymizeSettings:
    check, obfuscation = policy.identity_check, policy.obfuscation
    return AnonymizeSettings(
        method=obfuscation.method,
        method_params={name: obfuscation.params_for(name) for name in ("blur", "pixelate", "mask")},
        fallback=list(check.fallback), on_leak=check.on_leak, on_no_face=check.on_no_face,
        release_distance=check.release_distance, feather_fraction=obfuscation.feather_fraction,
        # The leak check re-detects with EVALUATION.md's verifier (HOG at the policy's upsample)
        # and with CenterFace at the policy's threshold (stages.common.identity.CHECK_DETECTORS).
        upsample=policy.detection.upsample,
        max_side=policy.detection.max_side, threshold=policy.detection.threshold,
        tile_side=policy.detection.tile_side, min_synthesis_px=policy.detection.min_synthesis_px,
        max_landmark_error=policy.detection.max_landmark_error, box_method=policy.detection.box_method,
        box_margin=policy.detection.box_margin, output_format=policy.output.format,
        jpeg_quality=policy.output.jpeg_quality, synthesis_batch=obfuscation.gan.batch_size,
        frame_detection=ingest_settings(policy).detection(),
        rerender_views=obfuscation.gan.rerender_views, screened_draws=obfuscation.gan.screened_draws,
        workers=workers,
        perturbation=(installed_perturbation(policy.perturbation.xi, policy.perturbation.min_psnr_db,
                                             tuple(policy.attributes.preserve))
                      if policy.perturbation.enabled else None))


def plan_selection(policy: Policy) -> Selection:
    """Stage II's mechanism for ``policy``, refused (PolicyInfeasible) when its t cannot hold."""
    selection = build_selection(shipped_population(), policy.attributes.obfuscate, policy.privacy.epsilon,
                                policy.privacy.mechanism)
    require_feasible(selection, policy.privacy.t)
    return selection
