"""A differentiable stand-in for the release's face verifier, for Stage III's training loss.

PP-GAN pushes the generator's output away from its input in a face-embedding space. The
embedding we distil is the one the release gate and EVALUATION.md judge by: dlib's 128-D
ResNet descriptor. dlib cannot be differentiated, so a small CNN learns to reproduce the
descriptor from the aligned crop (at the GAN's 64 px). Training another identity model on
CelebA's 10k crops (about two images per person) would learn a weaker notion of identity
than the verifier that decides what gets published.

The teacher is dlib's descriptor of the aligned crop itself, with the alignment template's
landmarks, which stays close to the gate's descriptor on the full photo
(``tests/stages/synthesis/test_generator.py`` checks it on the astronaut). ``anonymousnet train identity``
reports how well the student's distances agree with dlib's on held-out people.
"""
from __future__ import annotations

import torch
from torch import nn

DESCRIPTOR_SIZE = 128


def _block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class IdentityNet(nn.Module):
    """64×64 crop in [-1, 1] -> 128-D descriptor on dlib's scale (distance < 0.6: same person)."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 192), hidden: int = 256):
        super().__init__()
        self.config = {"channels": list(channels), "hidden": hidden}
        layers, previous = [], 3
        for width in channels:
            layers.append(_block(previous, width))
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(previous * 4 * 4, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, DESCRIPTOR_SIZE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
