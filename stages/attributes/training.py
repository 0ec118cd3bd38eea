"""Training Stage I: the CNN with sigmoid cross-entropy, then 40 random forests on its
penultimate features, Platt-calibrated on the validation split, and the metrics.

Plain Python (the Prefect flow in ``flows/training/attributes.py`` wires these steps). The CNN
training writes a checkpoint after every epoch and resumes from it, so an interrupted run
loses at most one epoch.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from torch.nn import functional as F
from tqdm import tqdm

from models.attributes import (
    INPUT_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    AttributeModel,
    AttributeNet,
    PackedForests,
    log_odds,
)


@dataclass(frozen=True)
class CnnSettings:
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    channels: tuple[int, ...] = (24, 48, 96, 192)
    convs: tuple[int, ...] = (1, 1, 2, 2)
    feature_size: int = 256
    dropout: float = 0.3
    max_shift: int = 4           # pixels at 64x64
    jitter: float = 0.2          # brightness / contrast / saturation, relative


@dataclass(frozen=True)
class ForestSettings:
    # Bounded so the 40 forests stay a few MB: 40 x trees x (2 x leaves) nodes.
    trees: int = 40
    max_leaf_nodes: int = 64
    min_samples_leaf: int = 5
    max_features: str = "sqrt"


def downscale(crops: np.ndarray) -> np.ndarray:
    """128x128 aligned crops -> 64x64 uint8 (2x2 mean), once, so each epoch skips it."""
    n, size = len(crops), crops.shape[1]
    factor = size // INPUT_SIZE
    blocks = crops.reshape(n, INPUT_SIZE, factor, INPUT_SIZE, factor, 3).astype(np.float32)
    return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images.permute(0, 3, 1, 2).float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


def augment(images: torch.Tensor, settings: CnnSettings, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, shift by up to ``max_shift`` pixels and colour jitter of a
    batch of N x 64 x 64 x 3 uint8 images; returns the normalised network input."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    n = len(x)
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    shift = settings.max_shift
    if shift:
        padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
        x = torch.stack([padded[i, :, dy:dy + INPUT_SIZE, dx:dx + INPUT_SIZE]
                         for i, (dy, dx) in enumerate(offsets.tolist())])
    if settings.jitter:
        def factor() -> torch.Tensor:
            return 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * settings.jitter
        x = x * factor()                                                     # brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor() + mean                                      # contrast
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * factor() + gray                                      # saturation
        x = x.clamp(0, 1)
    return (x - PIXEL_MEAN) / PIXEL_STD


@torch.no_grad()
def head_probabilities(net: AttributeNet, images64: np.ndarray, batch_size: int = 512) -> np.ndarray:
    net.eval()
    device = next(net.parameters()).device
    out = [torch.sigmoid(net(_normalise(torch.as_tensor(images64[s:s + batch_size], device=device)))).cpu().numpy()
           for s in range(0, len(images64), batch_size)]
    return np.concatenate(out)


@torch.no_grad()
def penultimate_features(net: AttributeNet, images64: np.ndarray, batch_size: int = 512) -> np.ndarray:
    net.eval()
    device = next(net.parameters()).device
    out = [net.features(_normalise(torch.as_tensor(images64[s:s + batch_size], device=device))).cpu().numpy()
           for s in range(0, len(images64), batch_size)]
    return np.concatenate(out)


def mean_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(((probabilities >= 0.5) == labels.astype(bool)).mean())


def train_cnn(images64: np.ndarray, labels: np.ndarray, train: np.ndarray, validation: np.ndarray,
              settings: CnnSettings, checkpoint: Path, seed: int = 0, device: str = "cpu",
              progress: bool = True) -> tuple[AttributeNet, list[dict]]:
    """Train with sigmoid cross-entropy (AdamW, one-cycle schedule); keep the epoch with the
    best validation mean accuracy. Resumes from ``checkpoint`` when it exists."""
    torch.manual_seed(seed)
    net = AttributeNet(settings.channels, settings.convs, settings.feature_size, labels.shape[1],
                       settings.dropout).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = -(-len(train) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=settings.learning_rate,
                                                   total_steps=settings.epochs * steps_per_epoch, pct_start=0.2)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    best = {"accuracy": -1.0, "state": None}
    start_epoch = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["settings"] != asdict(settings) or state["seed"] != seed:
            raise ValueError(f"{checkpoint} was written with other settings or seed; delete it or use another "
                             f"run folder to start over")
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
    targets = torch.as_tensor(labels, dtype=torch.float32)
    pixels = torch.as_tensor(images64)
    for epoch in range(start_epoch, settings.epochs):
        net.train()
        started = time.perf_counter()
        order = torch.as_tensor(train)[torch.randperm(len(train), generator=generator)]
        total, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"CNN epoch {epoch + 1}/{settings.epochs}", unit="batch",
                   disable=not progress, leave=False)
        for step in bar:
            index = order[step * settings.batch_size:(step + 1) * settings.batch_size]
            batch = augment(pixels[index], settings, generator).to(device)
            loss = F.binary_cross_entropy_with_logits(net(batch), targets[index].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(index)
            seen += len(index)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        validation_accuracy = mean_accuracy(head_probabilities(net, images64[validation]), labels[validation])
        history.append({"epoch": epoch + 1, "train_loss": round(total / seen, 5),
                        "validation_accuracy": round(validation_accuracy, 5),
                        "seconds": round(time.perf_counter() - started, 1)})
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {total / seen:.4f}, validation mean accuracy {validation_accuracy:.4f}")
        if validation_accuracy > best["accuracy"]:
            best = {"accuracy": validation_accuracy, "epoch": epoch + 1,
                    "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
        partial = checkpoint.with_suffix(".partial")
        torch.save({"net": net.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                    "generator": generator.get_state(), "history": history, "best": best, "epoch": epoch + 1,
                    "settings": asdict(settings), "seed": seed}, partial)
        partial.replace(checkpoint)
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    net.eval()
    return net.cpu(), history


def fit_forests(features: np.ndarray, labels: np.ndarray, settings: ForestSettings, seed: int = 0,
                progress: bool = True, jobs: int = -1) -> list[RandomForestClassifier]:
    """One bounded random forest per attribute on the penultimate features."""
    forests = []
    for column in tqdm(range(labels.shape[1]), desc="forests", unit="attribute", disable=not progress):
        forest = RandomForestClassifier(n_estimators=settings.trees, max_leaf_nodes=settings.max_leaf_nodes,
                                        min_samples_leaf=settings.min_samples_leaf,
                                        max_features=settings.max_features, random_state=seed + column, n_jobs=jobs)
        forest.fit(features, labels[:, column])
        forest.n_jobs = None   # prediction in the release runs single-threaded per forest
        forests.append(forest)
    return forests


def fit_calibration(raw: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per attribute, Platt scaling (a, b) so that sigmoid(a * logit(p) + b) is calibrated
    on held-out faces. An attribute with one class only in ``labels`` keeps (1, 0)."""
    calibration = np.tile([1.0, 0.0], (raw.shape[1], 1))
    for column in range(raw.shape[1]):
        if len(np.unique(labels[:, column])) < 2:
            continue
        fit = LogisticRegression(C=1e4).fit(log_odds(raw[:, [column]]), labels[:, column])
        calibration[column] = [fit.coef_[0, 0], fit.intercept_[0]]
    return calibration


def attribute_metrics(probabilities: np.ndarray, labels: np.ndarray, train_prevalence: np.ndarray,
                      names: tuple[str, ...]) -> dict:
    """Accuracy, balanced accuracy and the majority-class baseline (the class that is more
    common in the training split, predicted for every face), per attribute and mean."""
    predicted = probabilities >= 0.5
    truth = labels.astype(bool)
    rows = []
    for column, name in enumerate(names):
        p, t = predicted[:, column], truth[:, column]
        recalls = [float((p[t == value] == value).mean()) for value in (True, False) if (t == value).any()]
        majority = train_prevalence[column] >= 0.5
        rows.append({"attribute": name, "accuracy": float((p == t).mean()),
                     "balanced_accuracy": float(np.mean(recalls)),
                     "majority_baseline": float((t == majority).mean()),
                     "test_prevalence": float(t.mean())})
    return {"mean_accuracy": float(np.mean([r["accuracy"] for r in rows])),
            "mean_balanced_accuracy": float(np.mean([r["balanced_accuracy"] for r in rows])),
            "mean_majority_baseline": float(np.mean([r["majority_baseline"] for r in rows])),
            "faces": len(labels), "per_attribute": rows}


def assemble_model(net: AttributeNet, forests: list, calibration: np.ndarray, config: dict) -> AttributeModel:
    return AttributeModel(net=net.cpu().eval(), forests=PackedForests.from_sklearn(forests), calibration=calibration,
                          config=config)
