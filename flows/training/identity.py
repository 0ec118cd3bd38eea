"""``anonymousnet train identity``: distil dlib's face descriptor into a small CNN, the
differentiable identity model of Stage III's verification loss (see
``models/identity_embedding.py`` for why).

align CelebA with our own aligner (the cache Stage I uses) -> dlib descriptors of the
crops (cached) -> the same identity-disjoint split as Stage I -> student CNN (checkpoint
every epoch, resumable) -> pair metrics on the held-out people -> ``identity_embedding.pt``
and ``identity_embedding.json`` in the run folder, and with ``--install`` in ``models/``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.training.attributes import _identity_overlap, align_task, split_rows
from flows.version import code_version
from models.generator import to_gan_input
from models.registry import install_repo_model
from stages.synthesis.identity_distill import (
    StudentSettings,
    embed,
    pair_metrics,
    teacher_descriptors,
    train_student,
)

MODEL_FILE = "identity_embedding.pt"
CONFIG_FILE = "identity_embedding.json"


@task(name="teacher-descriptors", cache_policy=NO_CACHE)
def teacher_task(aligned: str, workers: int, progress: bool) -> str:
    """dlib descriptors of every aligned crop, cached beside the aligned crops."""
    target = Path(aligned).with_name(Path(aligned).stem.replace("aligned_", "teacher_") + ".npz")
    if not target.exists():
        with np.load(aligned) as stored:
            descriptors = teacher_descriptors(stored["crops"], workers=workers, progress=progress)
        partial = target.with_suffix(".partial.npz")
        np.savez(partial, descriptors=descriptors)
        partial.replace(target)
    return str(target)


def stage_one_cache(run_dir: str | Path) -> Path:
    """Stage I's aligned-crop cache, shared: run ``<root>/train-identity/<name>`` uses
    ``<root>/train-attributes/aligned-cache``."""
    return Path(run_dir).resolve().parent.parent / "train-attributes" / "aligned-cache"


@flow(name="train-identity")
def train_identity(images: str, labels: str, run_dir: str = ".data/train-identity/default", epochs: int = 40,
                   seed: int = 0, limit: int | None = None, install: bool = False, workers: int = 2,
                   progress: bool = True) -> dict:
    logger = get_run_logger()
    started = time.perf_counter()
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    aligned = align_task(images, labels, str(stage_one_cache(run_dir)), limit, workers, progress)
    data = split_rows(labels, aligned, seed, limit)
    if _identity_overlap(data):
        raise RuntimeError("identity split leaks people across splits")
    with np.load(teacher_task(aligned, workers, progress)) as stored:
        targets = stored["descriptors"]
    with np.load(aligned) as stored:
        crops = stored["crops"]
    settings = StudentSettings(epochs=epochs)
    net, history = train_student(crops, targets, data["splits"]["train"], data["splits"]["validation"], settings,
                                 run / "identity_checkpoint.pt", seed=seed, progress=progress)
    test = data["splits"]["test"]
    student = embed(net, to_gan_input(crops[test]))
    metrics = pair_metrics(student, targets[test], data["identities"][test], seed=seed)
    summary = {"code_version": code_version(), "seed": seed, "settings": asdict(settings),
               "split_sizes": {k: len(v) for k, v in data["splits"].items()}, "history": history,
               "test": metrics, "seconds": round(time.perf_counter() - started, 1)}
    model_dir = run / "model"
    model_dir.mkdir(exist_ok=True)
    torch.save(net.state_dict(), model_dir / MODEL_FILE)
    (model_dir / CONFIG_FILE).write_text(json.dumps({"config": net.config, "test": metrics}, indent=1) + "\n")
    (run / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    if install:
        summary["installed"] = install_identity(model_dir)
    logger.info("held-out pairs: %s", json.dumps(metrics))
    return summary


def install_identity(model_dir: Path) -> dict[str, str]:
    return {name: install_repo_model(name, model_dir / file, what + "; retrain with `anonymousnet train identity`")
            for name, file, what in (("identity_embedding", MODEL_FILE, "Stage III identity model (dlib descriptor "
                                                                         "distilled into a CNN; torch state dict)"),
                                     ("identity_embedding_config", CONFIG_FILE, "its configuration and test metrics"))}
