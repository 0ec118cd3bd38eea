"""Obfuscate every face of a photo, compose it back, and release it only if no face in the
encoded output still verifies as its original.

The identity check runs on the *encoded* bytes that would be published (decoded again), so
what was checked is exactly what is released. A leaking face is re-done with the policy's
fallback methods, strongest last, each re-checked; when they are exhausted, or the policy
says so, or the output shows a face the pipeline never processed, the photo is quarantined
and nothing of it is published.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stages.compose import compose_face
from stages.faces import AlignedFace, DetectedFace, face_descriptor
from stages.identity import check_identity_leaks
from stages.imageio import decode_bytes, encode_clean, output_format_for
from stages.obfuscate import obfuscate


@dataclass
class AnonymizeSettings:
    method: str
    method_params: dict[str, dict]          # parameters per method name
    fallback: list[str]
    on_leak: str                            # "fallback" | "quarantine"
    on_no_face: str                         # "release" | "quarantine"
    threshold: float
    feather_fraction: float
    detector: str = "hog"
    upsample: int = 1
    max_side: int = 1600
    output_format: str = "same"
    jpeg_quality: int = 95


@dataclass
class AnonymizeResult:
    status: str                             # "released" | "quarantined"
    reason: str | None
    encoded: bytes | None                   # the bytes to publish (None when quarantined)
    output_format: str | None
    suffix: str | None
    face_methods: list[str] = field(default_factory=list)
    face_methods_tried: list[list[str]] = field(default_factory=list)
    face_distances: list[float] = field(default_factory=list)
    face_status: list[str] = field(default_factory=list)


def anonymize_photo(rgb: np.ndarray, source_format: str, faces: list[DetectedFace],
                    aligned: list[AlignedFace], settings: AnonymizeSettings) -> AnonymizeResult:
    fmt, suffix = output_format_for(source_format, settings.output_format)
    if not faces and settings.on_no_face == "quarantine":
        return AnonymizeResult("quarantined", "no face found and the policy quarantines such photos",
                               None, fmt, suffix)
    originals = [face_descriptor(rgb, face.landmarks) for face in faces]
    chains = [[settings.method] + (settings.fallback if settings.on_leak == "fallback" else [])
              for _ in faces]
    step = [0] * len(faces)
    edited = [obfuscate(a.crop, settings.method, settings.method_params.get(settings.method)) for a in aligned]
    while True:
        output = rgb
        for align, crop in zip(aligned, edited):
            output = compose_face(output, align, crop, settings.feather_fraction)
        encoded = encode_clean(output, fmt, settings.jpeg_quality)
        report = check_identity_leaks(decode_bytes(encoded), faces, originals, settings.detector,
                                      settings.upsample, settings.max_side)
        leaking = report.leaking(settings.threshold)
        result = AnonymizeResult(
            "released", None, encoded, fmt, suffix,
            face_methods=[chain[i] for chain, i in zip(chains, step)],
            face_methods_tried=[chain[: i + 1] for chain, i in zip(chains, step)],
            face_distances=report.distances,
            face_status=["leaking" if i in leaking else "anonymized" for i in range(len(faces))],
        )
        if report.unprocessed_faces:
            result.status, result.encoded = "quarantined", None
            result.reason = (f"{len(report.unprocessed_faces)} face(s) found in the output that ingest did not "
                             f"detect; photo held back unprocessed")
            return result
        if not leaking:
            return result
        exhausted = [i for i in leaking if step[i] + 1 >= len(chains[i])]
        if exhausted:
            result.status, result.encoded = "quarantined", None
            tried = "/".join(chains[exhausted[0]][: step[exhausted[0]] + 1])
            result.reason = (f"face {exhausted[0]} still verifies as its original after {tried} "
                             f"(distance {report.distances[exhausted[0]]:.3f} < {settings.threshold})")
            return result
        for i in leaking:
            step[i] += 1
            method = chains[i][step[i]]
            edited[i] = obfuscate(aligned[i].crop, method, settings.method_params.get(method))
