"""Stage I model: a small CNN whose penultimate (fully connected) features feed 40 random
forests, one per CelebA attribute (AnonymousNet, Li & Lin 2019).

The CNN sees the aligned 128x128 crop at 64x64 (2x2 average pooling): CelebA's faces are
about 45 px wide at source, so 64 px keeps all the detail there is while making the
network four times cheaper than at 128. It is trained with sigmoid cross-entropy on the
40 attributes; its own sigmoid head is kept so the forests can be compared with it.

Files of a checkpoint (all verified against ``models/manifest.json`` when shipped):
``attributes_cnn.pt`` (a plain state dict, loaded with ``weights_only=True``),
``attributes_forests.npz`` (the 40 forests' trees as plain arrays, read with
``allow_pickle=False`` and predicted with numpy: no pickle, and no seconds spent importing
skops and rebuilding scikit-learn objects at the start of every release),
``attributes.json`` (configuration, Platt calibration of each forest, and the training
metrics).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

INPUT_SIZE = 64
CNN_FILE = "attributes_cnn.pt"
FORESTS_FILE = "attributes_forests.npz"
CONFIG_FILE = "attributes.json"
# Normalisation of the 0..1 pixel values fed to the network.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25
def _conv(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
                         nn.BatchNorm2d(outputs), nn.ReLU(inplace=True))


class AttributeNet(nn.Module):
    """VGG-style CNN: 64x64 RGB -> ``feature_size`` features -> 40 attribute logits.

    Four stages of 3x3 convolutions (``convs`` per stage, ``channels`` wide), each halving
    the resolution, then one fully connected layer on the 4x4 map: flattening keeps where
    things are (hair on top, mouth below), which global pooling would lose.
    """

    def __init__(self, channels: tuple[int, ...] = (24, 48, 96, 192), convs: tuple[int, ...] = (1, 1, 2, 2),
                 feature_size: int = 256, attributes: int = 40, dropout: float = 0.3):
        super().__init__()
        channels, convs = tuple(channels), tuple(convs)
        self.config = {"channels": list(channels), "convs": list(convs), "feature_size": feature_size,
                       "attributes": attributes, "dropout": dropout}
        layers, previous = [], 3
        for width, count in zip(channels, convs):
            for _ in range(count):
                layers.append(_conv(previous, width))
                previous = width
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        side = INPUT_SIZE >> len(channels)
        self.fully_connected = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(previous * side * side, feature_size),
            nn.BatchNorm1d(feature_size), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_size, attributes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (after the fully connected layer's ReLU): the forests' input."""
        return self.fully_connected(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def to_network_input(crops: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """N x 128 x 128 x 3 uint8 aligned crops -> normalised N x 3 x 64 x 64 float tensor."""
    tensor = torch.as_tensor(crops, device=device)
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 crops, got shape {tuple(tensor.shape)}")
    return normalise_unit_images(tensor.permute(0, 3, 1, 2).float().div_(255.0))


def normalise_unit_images(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x S x S images in [0, 1] -> the network's input (area-pooled to 64 px, normalised);
    differentiable, so an attack can work in pixel space."""
    if images.shape[-1] != INPUT_SIZE:
        images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
    return (images - PIXEL_MEAN) / PIXEL_STD


# Arrays of a forest file, each a flat concatenation over every tree of every forest.
FOREST_ARRAYS = ("left", "right", "feature", "threshold", "positive", "roots", "forest_of_tree")


@dataclass(frozen=True, eq=False)
class PackedForests:
    """The 40 random forests as plain arrays, predicted with numpy exactly as scikit-learn
    predicts them: a sample goes left where its feature, as float32, is <= the node's
    threshold; a forest's probability is the mean of its trees' leaf fractions. Every node
    of every tree is one row of ``left``/``right`` (child rows, -1 at a leaf),
    ``feature``, ``threshold`` and ``positive`` (the fraction of the node's training
    samples with the attribute); ``roots`` holds each tree's root row and
    ``forest_of_tree`` the forest it belongs to (trees in forest order)."""
    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    positive: np.ndarray
    roots: np.ndarray
    forest_of_tree: np.ndarray
    n_features: int

    @property
    def n_forests(self) -> int:
        return int(self.forest_of_tree[-1]) + 1 if len(self.forest_of_tree) else 0

    def __len__(self) -> int:
        return self.n_forests

    @classmethod
    def from_sklearn(cls, forests: list) -> PackedForests:
        """Pack fitted ``RandomForestClassifier`` s (binary: P(class 1) is kept)."""
        parts = {name: [] for name in FOREST_ARRAYS}
        offset = 0
        for index, forest in enumerate(forests):
            classes = list(forest.classes_)
            for estimator in forest.estimators_:
                tree = estimator.tree_
                counts = tree.value[:, 0, :]
                totals = counts.sum(axis=1)
                positive = counts[:, classes.index(1)] / np.where(totals > 0, totals, 1) if 1 in classes \
                    else np.zeros(tree.node_count)
                leaf = tree.children_left < 0
                parts["left"].append(np.where(leaf, -1, tree.children_left + offset))
                parts["right"].append(np.where(leaf, -1, tree.children_right + offset))
                parts["feature"].append(np.where(leaf, 0, tree.feature))
                parts["threshold"].append(tree.threshold)
                parts["positive"].append(positive)
                parts["roots"].append([offset])
                parts["forest_of_tree"].append([index])
                offset += tree.node_count
        dtypes = {"threshold": np.float64, "positive": np.float64, "feature": np.int32}
        return cls(**{name: np.concatenate(parts[name]).astype(dtypes.get(name, np.int64)) for name in FOREST_ARRAYS},
                   n_features=int(forests[0].n_features_in_))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, n_features=np.int64(self.n_features),
                            **{name: getattr(self, name) for name in FOREST_ARRAYS})

    @classmethod
    def load(cls, path: Path) -> PackedForests:
        """Read and check a forest file: plain arrays only (``allow_pickle=False``), every
        child row after its parent and inside the file, every feature index in range, so
        a damaged or crafted file is refused instead of predicting garbage or looping."""
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in FOREST_ARRAYS + ("n_features",) if name not in data.files]
            if missing:
                raise ValueError(f"{path} is not a forest file: it lacks {missing}")
            arrays = {name: data[name] for name in FOREST_ARRAYS}
            n_features = int(data["n_features"])
        nodes = len(arrays["left"])
        if any(arrays[name].ndim != 1 for name in FOREST_ARRAYS) or any(
                len(arrays[name]) != nodes for name in ("right", "feature", "threshold", "positive")) or \
                len(arrays["roots"]) != len(arrays["forest_of_tree"]) or not len(arrays["roots"]):
            raise ValueError(f"{path}: the forest arrays do not have matching shapes")
        rows = np.arange(nodes)
        internal = arrays["left"] >= 0
        children_ok = np.all((arrays["left"][internal] > rows[internal]) & (arrays["left"][internal] < nodes)
                             & (arrays["right"][internal] > rows[internal]) & (arrays["right"][internal] < nodes)) \
            and np.all(arrays["right"][~internal] < 0)
        steps = np.diff(arrays["forest_of_tree"])   # trees in forest order, forests numbered from 0
        if not children_ok or not np.all((arrays["feature"] >= 0) & (arrays["feature"] < n_features)) or \
                not np.all((arrays["roots"] >= 0) & (arrays["roots"] < nodes)) or \
                arrays["forest_of_tree"][0] != 0 or np.any((steps < 0) | (steps > 1)):
            raise ValueError(f"{path}: the forest arrays do not describe valid trees")
        return cls(**arrays, n_features=n_features)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """P(attribute present) from each forest: N x forests float64, as scikit-learn's
        ``predict_proba(features)[:, 1]`` of each forest."""
        values = np.asarray(features, dtype=np.float32).astype(np.float64)   # scikit-learn's float32 cast
        if values.ndim != 2 or values.shape[1] != self.n_features:
            raise ValueError(f"the forests take {self.n_features} features per face, not {values.shape[1:]}")
        samples = np.arange(len(values))[:, None]
        nodes = np.broadcast_to(self.roots, (len(values), len(self.roots))).copy()
        while True:
            internal = self.left[nodes] >= 0
            if not internal.any():
                break
            goes_left = values[samples, self.feature[nodes]] <= self.threshold[nodes]
            nodes = np.where(internal, np.where(goes_left, self.left[nodes], self.right[nodes]), nodes)
        trees_per_forest = np.bincount(self.forest_of_tree, minlength=self.n_forests)
        sums = np.zeros((len(values), self.n_forests))
        np.add.at(sums.T, self.forest_of_tree, self.positive[nodes].T)
        return sums / trees_per_forest


@dataclass
class AttributeModel:
    """The CNN, its 40 forests with Platt calibration, and the checkpoint's configuration."""
    net: AttributeNet
    forests: PackedForests | None   # the 40 forests (None: the CNN alone)
    calibration: np.ndarray    # 40 x 2: (slope, intercept) on the forest's log-odds
    config: dict = field(default_factory=dict)

    @torch.no_grad()
    def features_and_head(self, crops: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Penultimate features and the CNN head's sigmoid probabilities for aligned crops."""
        self.net.eval()
        device = next(self.net.parameters()).device
        features, heads = [], []
        for start in range(0, len(crops), batch_size):
            batch = to_network_input(crops[start:start + batch_size], device)
            feature = self.net.features(batch)
            features.append(feature.float().cpu().numpy())
            heads.append(torch.sigmoid(self.net.head(feature)).float().cpu().numpy())
        if not features:
            size = self.net.config["feature_size"]
            return np.zeros((0, size), np.float32), np.zeros((0, self.config["net"]["attributes"]), np.float32)
        return np.concatenate(features), np.concatenate(heads)

    def forest_probabilities(self, features: np.ndarray) -> np.ndarray:
        """Calibrated P(attribute present) from each forest: N x 40 float32 in [0, 1]."""
        return platt(self.forests.predict_proba(features), self.calibration)

    def predict(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Stage I output: calibrated forest probabilities of the 40 attributes per crop."""
        features, _ = self.features_and_head(crops, batch_size)
        if len(features) == 0:
            return np.zeros((0, self.forests.n_forests), np.float32)
        return self.forest_probabilities(features)


def log_odds(probability: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    p = np.clip(probability, floor, 1 - floor)
    return np.log(p / (1 - p))


def platt(raw: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """Platt scaling on the forest's log-odds (a forest's vote fraction is poorly calibrated:
    bagging pulls it toward 0.5)."""
    z = log_odds(raw) * calibration[:, 0] + calibration[:, 1]
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def save_model(model: AttributeModel, directory: Path) -> dict[str, Path]:
    """Write the three checkpoint files into ``directory``; returns their paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"cnn": directory / CNN_FILE, "forests": directory / FORESTS_FILE, "config": directory / CONFIG_FILE}
    state = {key: value.detach().cpu() for key, value in model.net.state_dict().items()}
    torch.save(state, paths["cnn"])
    with open(paths["forests"], "wb") as file:   # np.savez would append .npz to any other name
        model.forests.save(file)
    config = dict(model.config, net=model.net.config, calibration=np.round(model.calibration, 6).tolist(),
                  input_size=INPUT_SIZE, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    paths["config"].write_text(json.dumps(config, indent=1) + "\n")
    return paths


def load_network(cnn_path: Path, config_path: Path, device: str = "cpu") -> AttributeModel:
    """The CNN alone (``forests`` None): its features and head, without the seconds that
    loading the 40 forests takes (Stage IV's white-box profiler reads only the head)."""
    config = json.loads(Path(config_path).read_text())
    net = AttributeNet(**config["net"])
    net.load_state_dict(torch.load(cnn_path, map_location=device, weights_only=True))
    net.to(device).eval()
    return AttributeModel(net=net, forests=None, calibration=np.asarray(config["calibration"]), config=config)


def load_model(cnn_path: Path, forests_path: Path, config_path: Path, device: str = "cpu") -> AttributeModel:
    """Load a checkpoint without unpickling: torch ``weights_only=True`` and the forests'
    plain arrays. Verify hashes before calling this (see ``stages.attributes.predict``)."""
    network = load_network(cnn_path, config_path, device)
    config = network.config
    forests = PackedForests.load(forests_path)
    expected, features = config["net"]["attributes"], config["net"]["feature_size"]
    if forests.n_forests != expected or forests.n_features != features:
        raise ValueError(f"{forests_path} holds {forests.n_forests} forests over {forests.n_features} features, "
                         f"not {expected} random forests over {features} CNN features")
    return AttributeModel(net=network.net, forests=forests, calibration=network.calibration, config=config)
