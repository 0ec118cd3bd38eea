"""Stage I model: a small CNN whose penultimate (fully connected) features feed 40 random
forests, one per CelebA attribute (AnonymousNet, Li & Lin 2019).

The CNN sees the aligned 128x128 crop at 64x64 (2x2 average pooling): CelebA's faces are
about 45 px wide at source, so 64 px keeps all the detail there is while making the
network four times cheaper than at 128. It is trained with sigmoid cross-entropy on the
40 attributes; its own sigmoid head is kept so the forests can be compared with it.

Files of a checkpoint (all verified against ``models/manifest.json`` when shipped):
``attributes_cnn.pt`` (a plain state dict, loaded with ``weights_only=True``),
``attributes_forests.skops`` (the 40 forests, loaded by skops with an explicit list of
trusted types: no pickle), ``attributes.json`` (configuration, Platt calibration of each
forest, and the training metrics).
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
FORESTS_FILE = "attributes_forests.skops"
CONFIG_FILE = "attributes.json"
# Normalisation of the 0..1 pixel values fed to the network.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25
# The only types a forest file may contain; skops refuses anything else, so a crafted
# file cannot make the loader build arbitrary objects.
TRUSTED_FOREST_TYPES = [
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "numpy.dtype",
    "builtins.list",
]


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


@dataclass
class AttributeModel:
    """The CNN, its 40 forests with Platt calibration, and the checkpoint's configuration."""
    net: AttributeNet
    forests: list              # 40 fitted RandomForestClassifier
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
        raw = np.stack([forest.predict_proba(features)[:, 1] for forest in self.forests], axis=1)
        return platt(raw, self.calibration)

    def predict(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Stage I output: calibrated forest probabilities of the 40 attributes per crop."""
        features, _ = self.features_and_head(crops, batch_size)
        if len(features) == 0:
            return np.zeros((0, len(self.forests)), np.float32)
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
    import skops.io

    directory.mkdir(parents=True, exist_ok=True)
    paths = {"cnn": directory / CNN_FILE, "forests": directory / FORESTS_FILE, "config": directory / CONFIG_FILE}
    state = {key: value.detach().cpu() for key, value in model.net.state_dict().items()}
    torch.save(state, paths["cnn"])
    skops.io.dump(model.forests, paths["forests"], compression=8)   # zipfile.ZIP_DEFLATED
    config = dict(model.config, net=model.net.config, calibration=np.round(model.calibration, 6).tolist(),
                  input_size=INPUT_SIZE, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    paths["config"].write_text(json.dumps(config, indent=1) + "\n")
    return paths


def load_network(cnn_path: Path, config_path: Path, device: str = "cpu") -> AttributeModel:
    """The CNN alone (``forests`` empty): its features and head, without the seconds that
    loading the 40 forests takes (Stage IV's white-box profiler reads only the head)."""
    config = json.loads(Path(config_path).read_text())
    net = AttributeNet(**config["net"])
    net.load_state_dict(torch.load(cnn_path, map_location=device, weights_only=True))
    net.to(device).eval()
    return AttributeModel(net=net, forests=[], calibration=np.asarray(config["calibration"]), config=config)


def load_model(cnn_path: Path, forests_path: Path, config_path: Path, device: str = "cpu") -> AttributeModel:
    """Load a checkpoint without unpickling: torch ``weights_only=True`` and skops with
    :data:`TRUSTED_FOREST_TYPES`. Verify hashes before calling this (see ``stages.attributes``)."""
    import skops.io

    network = load_network(cnn_path, config_path, device)
    config, net = network.config, network.net
    untrusted = [t for t in skops.io.get_untrusted_types(file=forests_path) if t not in TRUSTED_FOREST_TYPES]
    if untrusted:
        raise ValueError(f"{forests_path} contains types outside the trusted list: {untrusted}")
    forests = skops.io.load(forests_path, trusted=TRUSTED_FOREST_TYPES)
    from sklearn.ensemble import RandomForestClassifier

    expected = config["net"]["attributes"]
    if not isinstance(forests, list) or len(forests) != expected or not all(
            isinstance(f, RandomForestClassifier) and f.n_features_in_ == config["net"]["feature_size"]
            for f in forests):
        raise ValueError(f"{forests_path} does not hold {expected} random forests over "
                         f"{config['net']['feature_size']} CNN features")
    return AttributeModel(net=net, forests=list(forests), calibration=np.asarray(config["calibration"]),
                          config=config)
