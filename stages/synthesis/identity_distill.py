"""Distil dlib's face descriptor into :class:`models.identity_embedding.IdentityNet`.

Teacher: dlib's 128-D descriptor of each aligned crop, with the alignment template as its
landmarks (the crop is aligned to that template, so no detection is needed). Student: the
CNN on the crop at 64 px, trained with mean squared error to the teacher. What matters for
Stage III is that the student's *distances* behave like dlib's, so the metrics are about
pairs: same-person pairs and different-person pairs of the held-out people.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from models.generator import to_gan_input
from models.identity_embedding import IdentityNet
from stages.common.faces import SAME_PERSON
from stages.common.parallel import map_with_progress


def _describe(crop: np.ndarray) -> np.ndarray:
    from stages.common.faces import face_descriptor, template

    return face_descriptor(crop, template(crop.shape[0]))


def teacher_descriptors(crops: np.ndarray, workers: int = 2, progress: bool = True) -> np.ndarray:
    """dlib descriptors (N×128 float32) of aligned crops (N×128×128×3 uint8)."""
    out = np.zeros((len(crops), 128), dtype=np.float32)
    results = map_with_progress(_describe, list(crops), workers, "dlib descriptors", "face", progress, chunksize=64)
    for index, descriptor in enumerate(results):
        out[index] = descriptor
    return out


@dataclass(frozen=True)
class StudentSettings:
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    channels: tuple[int, ...] = (32, 64, 128, 192)


def embed(net: IdentityNet, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return torch.cat([net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]).numpy()


def train_student(crops: np.ndarray, targets: np.ndarray, train: np.ndarray, validation: np.ndarray,
                  settings: StudentSettings, checkpoint: Path, seed: int = 0, progress: bool = True):
    """Train (or resume from ``checkpoint``) and return the best-validation network and the
    per-epoch history."""
    torch.manual_seed(seed)
    images = to_gan_input(crops)
    target = torch.as_tensor(targets, dtype=torch.float32)
    net = IdentityNet(settings.channels)
    optimiser = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.learning_rate, epochs=settings.epochs,
        steps_per_epoch=max(1, int(np.ceil(len(train) / settings.batch_size))))
    history, best, start = [], None, 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        if state.get("epochs") != settings.epochs:
            raise ValueError(f"{checkpoint} belongs to a {state.get('epochs')}-epoch run (its learning-rate "
                             f"schedule is fixed); pass --epochs {state.get('epochs')} or use a new --run-dir")
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        history, start = state["history"], state["epoch"]
        best = state["best"]
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(start, settings.epochs):
        net.train()
        order = torch.as_tensor(train)[torch.randperm(len(train), generator=generator)]
        total = 0.0
        batches = range(0, len(order), settings.batch_size)
        for start_index in tqdm(batches, desc=f"identity epoch {epoch + 1}/{settings.epochs}", unit="batch",
                                leave=False, disable=not progress):
            index = order[start_index:start_index + settings.batch_size]
            loss = F.mse_loss(net(images[index]), target[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(index)
        predicted = embed(net, images[validation])
        error = float(np.linalg.norm(predicted - targets[validation], axis=1).mean())
        history.append({"epoch": epoch + 1, "train_mse": total / len(train), "validation_distance_to_teacher": error})
        if best is None or error < best["error"]:
            best = {"error": error, "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in net.state_dict().items()}}
        torch.save({"net": net.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                    "history": history, "epoch": epoch + 1, "epochs": settings.epochs, "best": best}, checkpoint)
    net.load_state_dict(best["state"])
    net.eval()
    return net, history


def pair_metrics(student: np.ndarray, teacher: np.ndarray, identities: np.ndarray, seed: int = 0,
                 different_pairs: int = 5000) -> dict:
    """How the student's distances track dlib's on pairs of held-out faces: every
    same-person pair and a random sample of different-person pairs."""
    rng = np.random.default_rng(seed)
    same = [(i, j) for person in np.unique(identities) for k, i in enumerate(np.flatnonzero(identities == person))
            for j in np.flatnonzero(identities == person)[k + 1:]]
    a, b = rng.integers(0, len(identities), (2, different_pairs))
    different = [(i, j) for i, j in zip(a, b) if identities[i] != identities[j]]
    result = {}
    for name, pairs in (("same_person", same), ("different_person", different)):
        if not pairs:
            continue
        i, j = np.array(pairs).T
        d_teacher = np.linalg.norm(teacher[i] - teacher[j], axis=1)
        d_student = np.linalg.norm(student[i] - student[j], axis=1)
        result[name] = {
            "pairs": len(pairs),
            "teacher_verifies": float((d_teacher < SAME_PERSON).mean()),
            "student_verifies": float((d_student < SAME_PERSON).mean()),
            "agreement": float(((d_teacher < SAME_PERSON) == (d_student < SAME_PERSON)).mean()),
            "distance_correlation": float(np.corrcoef(d_teacher, d_student)[0, 1]) if len(pairs) > 2 else None,
        }
    result["distance_to_teacher_median"] = float(np.median(np.linalg.norm(student - teacher, axis=1)))
    return result
