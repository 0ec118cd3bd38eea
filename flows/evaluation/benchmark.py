"""Faces per second per stage and end to end, on a folder of photos.

Each timed pass runs every photo through the release's own stage functions (no Prefect
overhead): load, detect + 68 landmarks, align, describe the originals (verifier), Stage I
attributes (batched over the pass's faces, as a release batches them), then for each method (blur, pixelate, mask) obfuscate, compose, encode and identity-check. A stage's
rate is faces / seconds summed over the pass; the reported figure is the median over
passes. End to end for a method is the sum of its path's stages; blur is the in-run
reference the other methods (and later stages) are quoted against as a ratio.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from policy.loader import load_policy
from stages.attributes.predict import default_model as attribute_model
from stages.common.compose import compose_faces
from stages.common.faces import align_face, detect_faces, face_descriptor
from stages.common.identity import check_identity_leaks
from stages.common.imageio import (
    ImageRejected,
    decode_bytes,
    encode_clean,
    load_rgb,
    output_format_for,
)
from stages.common.ingest import discover_folder
from stages.common.obfuscate import obfuscate

METHODS = ("blur", "pixelate", "mask")
SHARED_STAGES = ("load", "detect", "align", "describe", "attributes")
ATTRIBUTE_BATCH = 256
METHOD_STAGES = ("obfuscate", "compose", "encode", "identity_check")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _one_pass(paths: list[Path], policy, progress: bool, label: str) -> tuple[dict[str, float], int, list[dict]]:
    """Seconds per stage summed over the photos, faces found, and per-photo stage seconds."""
    seconds: dict[str, float] = defaultdict(float)
    per_photo: list[dict] = []
    faces_total = 0
    crops = []
    detection = policy.detection
    for path in tqdm(paths, desc=label, unit="photo", disable=not progress):
        clock = time.perf_counter()
        try:
            image = load_rgb(path, policy.input.max_pixels)
        except ImageRejected:
            continue
        rgb = image.rgb
        before = dict(seconds)
        seconds["load"] += time.perf_counter() - clock
        clock = time.perf_counter()
        faces = detect_faces(rgb, detection.detector, detection.upsample, detection.max_side, detection.cnn_max_side,
                             detection.threshold, detection.tile_side)
        seconds["detect"] += time.perf_counter() - clock
        clock = time.perf_counter()
        aligned = [align_face(rgb, f.landmarks) for f in faces]
        seconds["align"] += time.perf_counter() - clock
        crops += [a.crop for a in aligned]
        clock = time.perf_counter()
        originals = [face_descriptor(rgb, f.landmarks) for f in faces]
        seconds["describe"] += time.perf_counter() - clock
        faces_total += len(faces)
        fmt, _ = output_format_for(image.source_format, policy.output.format)
        for method in METHODS:
            params = policy.obfuscation.params_for(method)
            clock = time.perf_counter()
            edited = [obfuscate(a.crop, method, params) for a in aligned]
            seconds[f"{method}:obfuscate"] += time.perf_counter() - clock
            clock = time.perf_counter()
            output = compose_faces(rgb, aligned, edited, policy.obfuscation.feather_fraction)
            seconds[f"{method}:compose"] += time.perf_counter() - clock
            clock = time.perf_counter()
            encoded = encode_clean(output, fmt, policy.output.jpeg_quality)
            seconds[f"{method}:encode"] += time.perf_counter() - clock
            clock = time.perf_counter()
            check_identity_leaks(decode_bytes(encoded), rgb, faces, originals,   # as in a release
                                 detection.upsample, detection.max_side, detection.threshold, detection.tile_side)
            seconds[f"{method}:identity_check"] += time.perf_counter() - clock
        if faces:
            per_photo.append({"faces": len(faces),
                              **{k: v - before.get(k, 0.0) for k, v in seconds.items()}})
    if crops:
        attribute_seconds = time_attributes(np.stack(crops), ATTRIBUTE_BATCH)
        seconds["attributes"] = attribute_seconds
        for row in per_photo:   # a batch's cost is the same per face: share it out
            row["attributes"] = attribute_seconds * row["faces"] / len(crops)
    return dict(seconds), faces_total, per_photo


def time_attributes(crops: np.ndarray, batch_size: int) -> float:
    """Seconds for Stage I (CNN features + 40 forests) over ``crops`` in batches."""
    model = attribute_model()
    clock = time.perf_counter()
    for start in range(0, len(crops), batch_size):
        model.predict(crops[start:start + batch_size], batch_size=batch_size)
    return time.perf_counter() - clock


def _aligned_crops(images: Path, limit: int | None, progress: bool) -> tuple[int, np.ndarray]:
    """(photos, every aligned face crop) of the photos under ``images`` (untimed set-up)."""
    paths = [p.path for p in discover_folder(images) if p.path is not None][:limit]
    crops = []
    for path in tqdm(paths, desc="align", unit="photo", disable=not progress):
        try:
            rgb = load_rgb(path).rgb
        except ImageRejected:
            continue
        crops += [align_face(rgb, f.landmarks).crop for f in detect_faces(rgb)]
    if not crops:
        raise ValueError(f"no faces found in {len(paths)} photos under {images}; nothing to time")
    return len(paths), np.stack(crops)


def _rates(images: Path, photos: int, faces: int, batch_size: int, passes: list[float]) -> dict:
    import torch

    return {"images": str(images), "photos": photos, "faces": faces, "batch_size": batch_size,
            "repeats": len(passes), "torch_threads": torch.get_num_threads(),
            "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "machine": f"{_cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "seconds_per_pass": [round(s, 4) for s in passes],
            "faces_per_second_median": faces / statistics.median(passes),
            "faces_per_second_min": faces / max(passes), "faces_per_second_max": faces / min(passes)}


def benchmark_attributes(images: Path, batch_size: int = ATTRIBUTE_BATCH, repeats: int = 5,
                         limit: int | None = None, progress: bool = True) -> dict:
    """Stage I alone: faces/s of CNN + forests on the aligned faces of ``images`` (aligned
    once, untimed), median over ``repeats`` passes, at ``batch_size``."""
    photos, crops = _aligned_crops(images, limit, progress)
    time_attributes(crops[:batch_size], batch_size)   # warm-up: model load and hashing
    passes = [time_attributes(crops, batch_size) for _ in range(repeats)]
    return _rates(images, photos, len(crops), batch_size, passes)


def benchmark_synthesis(images: Path, batch_size: int = 64, repeats: int = 5, limit: int | None = None,
                        policy_path: str | None = None, generator: str | None = None, progress: bool = True) -> dict:
    """Stage III alone: faces/s of the generator (face context, forward pass, upsampling to
    the crop) on the aligned faces of ``images`` at ``batch_size``, with the targets Stage I
    and the policy's Stage II give them (computed once, untimed); median over passes. On the
    GPU when one is present."""
    from policy.settings import plan_selection
    from stages.selection.ppas import stage_two_targets
    from stages.synthesis.render import load_synthesizer

    policy = load_policy(policy_path).policy
    photos, crops = _aligned_crops(images, limit, progress)
    targets = stage_two_targets(crops, plan_selection(policy))
    synthesizer = load_synthesizer(generator)
    synthesizer.render(crops[:batch_size], targets[:batch_size], batch_size)   # warm-up

    def one_pass() -> float:
        clock = time.perf_counter()
        synthesizer.render(crops, targets, batch_size)
        return time.perf_counter() - clock

    passes = [one_pass() for _ in tqdm(range(repeats), desc="synthesis", unit="pass", disable=not progress)]
    return _rates(images, photos, len(crops), batch_size, passes) | {"generator": generator or "shipped"}


def benchmark(images: Path, repeats: int = 3, limit: int | None = None, policy_path: str | None = None,
              progress: bool = True) -> dict:
    policy = load_policy(policy_path).policy
    paths = [p.path for p in discover_folder(images) if p.path is not None]
    if limit:
        paths = paths[:limit]
    # Untimed warm-up: loading and hashing the dlib models (about a second) is not per-face work.
    _one_pass(paths[:1], policy, progress=False, label="warm-up")
    passes, photos = [], []
    faces = 0
    for index in range(repeats):
        seconds, faces, per_photo = _one_pass(paths, policy, progress, f"pass {index + 1}/{repeats}")
        passes.append(seconds)
        photos += per_photo
    if faces == 0:
        raise ValueError(f"no faces found in {len(paths)} photos under {images}; nothing to time")

    def rate(keys: list[str]) -> float:
        return statistics.median(faces / sum(p[k] for k in keys) for p in passes)

    stages = {stage: rate([stage]) for stage in SHARED_STAGES}
    end_to_end = {}
    for method in METHODS:
        for stage in METHOD_STAGES:
            stages[f"{method}:{stage}"] = rate([f"{method}:{stage}"])
        end_to_end[method] = rate(list(SHARED_STAGES) + [f"{method}:{s}" for s in METHOD_STAGES])
    reference = end_to_end["blur"]

    def per_face_median(keys: list[str]) -> float:
        # Median over photos (of every pass) of a photo's seconds per face: robust to outliers.
        return statistics.median(sum(p[k] for k in keys) / p["faces"] for p in photos)

    medians = {stage: per_face_median([stage]) for stage in stages}
    medians.update({f"{method}:end_to_end": per_face_median(list(SHARED_STAGES) + [f"{method}:{s}" for s in METHOD_STAGES])
                    for method in METHODS})
    return {
        "images": str(images), "photos": len(paths), "faces": faces, "repeats": repeats,
        "policy": policy.name, "detector": f"{policy.detection.detector} upsample {policy.detection.upsample} "
                                           f"max_side {policy.detection.max_side}",
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "faces_per_second": stages,
        "end_to_end_faces_per_second": end_to_end,
        "ratio_to_blur": {method: value / reference for method, value in end_to_end.items()},
        "median_seconds_per_face_over_photos": medians,
    }


def markdown_table(results: dict) -> str:
    lines = [f"{results['photos']} photos, {results['faces']} faces, median of {results['repeats']} pass(es) "
             f"({results['machine']}; detector {results['detector']})", "",
             "| stage | faces/s |", "|---|---:|"]
    for stage, value in results["faces_per_second"].items():
        lines.append(f"| {stage} | {value:.1f} |")
    lines += ["", "| end to end (no Prefect) | faces/s | ratio to blur | median s/face over photos |",
              "|---|---:|---:|---:|"]
    medians = results["median_seconds_per_face_over_photos"]
    for method, value in results["end_to_end_faces_per_second"].items():
        lines.append(f"| {method} | {value:.2f} | {results['ratio_to_blur'][method]:.2f} "
                     f"| {medians[method + ':end_to_end']:.3f} |")
    return "\n".join(lines)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def _command(name: str) -> str:
    """A console script installed beside this Python (the virtual environment's bin/)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise RuntimeError(f"{name} is not installed beside {sys.executable}; run `make install`")
    return str(path)


def _deface_once(photos: list[Path], folder: Path) -> float:
    """Seconds of one ``deface`` command over ``photos`` (linked flat into ``folder``, where it
    writes its ``*_anonymized`` outputs): CenterFace detection and blur, one model load."""
    folder.mkdir(parents=True)
    for index, photo in enumerate(photos):
        (folder / f"{index:05d}_{photo.name}").symlink_to(photo.resolve())
    started = time.perf_counter()
    subprocess.run([_command("deface"), str(folder)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _release_once(images: Path, output: Path, batch_size: int, policy_path: str | None) -> tuple[float, dict]:
    """Seconds of one ``anonymousnet release`` command (its own Prefect server unless
    PREFECT_API_URL names one, the flow, gates, lineage, report) and its run row."""
    command = [_command("anonymousnet"), "release", "-i", str(images), "-o", str(output),
               "--batch-size", str(batch_size)] + (["-p", policy_path] if policy_path else [])
    started = time.perf_counter()
    finished = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode:
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    from flows.release import lineage

    run = lineage.read_table(output, "runs").iloc[0]
    return seconds, {"faces": int(run.n_faces), "released": int(run.n_released), "leaks": int(run.n_leaks_published),
                     "flow_seconds": (run.finished_at - run.started_at).total_seconds()}


def benchmark_release(images: Path, repeats: int = 3, batch_size: int = 32, policy_path: str | None = None,
                      progress: bool = True) -> dict:
    """The whole ``anonymousnet release`` command against ``deface`` (CenterFace + blur, the
    plain detect-and-blur tool) on the same photos, interleaved ``repeats`` times in this
    call; medians and their ratio. Both commands are timed from start to exit, model loading
    included; the release's own Prefect flow time is reported beside it."""
    photos = [p.path for p in discover_folder(images) if p.path is not None and p.path.suffix.lower() in IMAGE_SUFFIXES]
    if not photos:
        raise ValueError(f"no photos under {images}")
    deface_seconds, release_seconds, runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="anonymousnet-benchmark-") as scratch:
        for index in tqdm(range(repeats), desc="release vs deface", unit="repeat", disable=not progress):
            deface_seconds.append(_deface_once(photos, Path(scratch) / f"deface-{index}"))
            seconds, run = _release_once(Path(images), Path(scratch) / f"release-{index}", batch_size, policy_path)
            release_seconds.append(seconds)
            runs.append(run)
    faces = runs[0]["faces"]
    release_median, deface_median = statistics.median(release_seconds), statistics.median(deface_seconds)
    return {
        "images": str(images), "photos": len(photos), "faces": faces, "repeats": repeats, "batch_size": batch_size,
        "policy": load_policy(policy_path).policy.name,
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "prefect_api": os.environ.get("PREFECT_API_URL") or "temporary local server (started by each release)",
        "release_seconds": [round(s, 2) for s in release_seconds],
        "release_flow_seconds": [round(r["flow_seconds"], 2) for r in runs],
        "deface_seconds": [round(s, 2) for s in deface_seconds],
        "release_seconds_median": release_median, "deface_seconds_median": deface_median,
        "release_faces_per_second": faces / release_median,
        "release_flow_faces_per_second": faces / statistics.median(r["flow_seconds"] for r in runs),
        "ratio_to_deface": release_median / deface_median,
        "leaks_published": [r["leaks"] for r in runs],
    }


def release_table(results: dict) -> str:
    return "\n".join([
        f"{results['photos']} photos, {results['faces']} faces, median of {results['repeats']} interleaved repeats "
        f"({results['machine']}; Prefect: {results['prefect_api']})", "",
        "| command | seconds (median) | faces/s | ratio to deface |", "|---|---:|---:|---:|",
        f"| anonymousnet release (policy {results['policy']}) | {results['release_seconds_median']:.1f} "
        f"| {results['release_faces_per_second']:.2f} | **{results['ratio_to_deface']:.1f}x** |",
        f"| of which the Prefect flow | {statistics.median(results['release_flow_seconds']):.1f} "
        f"| {results['release_flow_faces_per_second']:.2f} | |",
        f"| deface (CenterFace + blur) | {results['deface_seconds_median']:.1f} | | 1.0x |",
        "", f"identity leaks published per release: {results['leaks_published']}"])


def benchmark_video(repeats: int = 3, frames: int = 24, size: tuple[int, int] = (640, 360), fps: float = 24.0,
                    policy_path: str | None = None, progress: bool = True) -> dict:
    """A public-domain clip with two faces (``stages.common.samples.two_face_clip_frames``,
    ``size`` at ``fps``) released as a video, and the same decoded frames released as PNG
    photos through the photo path, interleaved ``repeats`` times; medians of each release's
    own flow time (the Prefect server's start left out) as frames and faces per second."""
    from PIL import Image

    from flows.release import lineage
    from stages.common.samples import two_face_clip_frames, write_clip
    from stages.common.video import load_video

    video_runs, photo_runs = [], []
    with tempfile.TemporaryDirectory(prefix="anonymousnet-video-benchmark-") as scratch:
        scratch = Path(scratch)
        clip = write_clip(scratch / "video" / "two_faces.mp4", two_face_clip_frames(frames, size), fps)
        (scratch / "photos").mkdir()
        for index, frame in enumerate(load_video(clip, max_pixels=size[0] * size[1]).frames):
            Image.fromarray(frame).save(scratch / "photos" / f"frame_{index:04d}.png")
        for index in tqdm(range(repeats), desc="video vs photos", unit="repeat", disable=not progress):
            _, run = _release_once(scratch / "video", scratch / f"video-release-{index}", 32, policy_path)
            run["rounds"] = int(lineage.read_table(scratch / f"video-release-{index}", "photos").video_rounds.iloc[0])
            video_runs.append(run)
            photo_runs.append(_release_once(scratch / "photos", scratch / f"photo-release-{index}", 32,
                                            policy_path)[1])
    video_seconds = [run["flow_seconds"] for run in video_runs]
    photo_seconds = [run["flow_seconds"] for run in photo_runs]
    video_median, photo_median = statistics.median(video_seconds), statistics.median(photo_seconds)
    return {
        "clip": f"{size[0]}x{size[1]}, {frames} frames at {fps:g} fps, two faces (skimage astronaut and its mirror)",
        "repeats": repeats, "policy": load_policy(policy_path).policy.name,
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "video_flow_seconds": [round(s, 2) for s in video_seconds],
        "photo_flow_seconds": [round(s, 2) for s in photo_seconds],
        "video_faces": [r["faces"] for r in video_runs], "photo_faces": [r["faces"] for r in photo_runs],
        # Passes over the video's frames: 1 when no track had to escalate, more when one did
        # (its frames checked again with the track's new decision).
        "video_rounds": [r["rounds"] for r in video_runs],
        "video_released": [r["released"] for r in video_runs], "photos_released": [r["released"] for r in photo_runs],
        "leaks_published": [r["leaks"] for r in video_runs + photo_runs],
        "video_frames_per_second": frames / video_median, "photo_frames_per_second": frames / photo_median,
        "video_faces_per_second": statistics.median(r["faces"] for r in video_runs) / video_median,
        "photo_faces_per_second": statistics.median(r["faces"] for r in photo_runs) / photo_median,
        "video_to_photo_time_ratio": video_median / photo_median,
    }


def video_table(results: dict) -> str:
    return "\n".join([
        f"{results['clip']}; median of {results['repeats']} interleaved repeats of each release's flow time "
        f"({results['machine']}; policy {results['policy']})", "",
        "| path | seconds (median) | frames/s | faces/s |", "|---|---:|---:|---:|",
        f"| video (tracks, one decision each) | {statistics.median(results['video_flow_seconds']):.1f} "
        f"| {results['video_frames_per_second']:.2f} | {results['video_faces_per_second']:.2f} |",
        f"| the same frames as PNG photos | {statistics.median(results['photo_flow_seconds']):.1f} "
        f"| {results['photo_frames_per_second']:.2f} | {results['photo_faces_per_second']:.2f} |",
        "", f"video / photos time: {results['video_to_photo_time_ratio']:.2f}x; passes over the video's frames "
        f"per release: {results['video_rounds']}; "
        f"identity leaks published per release: {results['leaks_published']}"])
