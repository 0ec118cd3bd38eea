"""Stage III networks: a StarGAN-style generator conditioned on target attributes, and a
PatchGAN discriminator with an auxiliary attribute classifier (Choi et al. 2018).

Both work on the aligned crop at ``GAN_SIZE`` (the 128-px crop averaged down): on the 2-core
CPU of CI and a release, the generator's cost grows with pixels, and a face pasted back
into a photo is rarely more than ~150 px wide, so 64 px keeps the structure the SSIM
regulator and the verifier see while keeping synthesis fast. Images are in [-1, 1].
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

GAN_SIZE = 64


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.InstanceNorm2d(channels, affine=True), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.InstanceNorm2d(channels, affine=True))

    def forward(self, x):
        return x + self.body(x)


class Generator(nn.Module):
    """x (N×3×S×S) and target attributes c (N×k in {0,1}) -> a face with those attributes.

    The attributes are tiled as k extra input channels (StarGAN); two stride-2
    down-samplings, ``blocks`` residual blocks, two up-samplings back to S×S.
    """

    def __init__(self, attributes: int, width: int = 32, blocks: int = 4):
        super().__init__()
        self.config = {"attributes": attributes, "width": width, "blocks": blocks}
        layers = [nn.Conv2d(3 + attributes, width, 7, padding=3, bias=False),
                  nn.InstanceNorm2d(width, affine=True), nn.ReLU(inplace=True)]
        channels = width
        for _ in range(2):
            layers += [nn.Conv2d(channels, channels * 2, 4, stride=2, padding=1, bias=False),
                       nn.InstanceNorm2d(channels * 2, affine=True), nn.ReLU(inplace=True)]
            channels *= 2
        layers += [ResidualBlock(channels) for _ in range(blocks)]
        for _ in range(2):
            # Nearest up-sampling then a convolution, not a transposed convolution: the latter's
            # uneven kernel overlap paints a checkerboard that a short CPU training run does
            # not get rid of (Odena et al., "Deconvolution and checkerboard artifacts", 2016).
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False),
                       nn.InstanceNorm2d(channels // 2, affine=True), nn.ReLU(inplace=True)]
            channels //= 2
        layers += [nn.Conv2d(channels, 3, 7, padding=3), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        tiled = c.float()[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return self.net(torch.cat([x, tiled], dim=1))


class Discriminator(nn.Module):
    """PatchGAN critic (a real/fake score per patch, no normalisation as WGAN-GP needs)
    plus an auxiliary head with one logit per conditioned attribute."""

    def __init__(self, attributes: int, width: int = 32, size: int = GAN_SIZE, depth: int = 4):
        super().__init__()
        self.config = {"attributes": attributes, "width": width, "size": size, "depth": depth}
        layers, channels = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.01)], width
        for _ in range(depth - 1):
            layers += [nn.Conv2d(channels, channels * 2, 4, stride=2, padding=1), nn.LeakyReLU(0.01)]
            channels *= 2
        self.trunk = nn.Sequential(*layers)
        final = size // 2 ** depth
        self.source = nn.Conv2d(channels, 1, 3, padding=1)
        self.classify = nn.Conv2d(channels, attributes, final)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return self.source(features), self.classify(features).flatten(1)


def to_gan_input(crops, device: torch.device | str = "cpu", size: int | None = GAN_SIZE) -> torch.Tensor:
    """N×128×128×3 uint8 aligned crops -> N×3×size×size in [-1, 1] (``size`` None: as they are)."""
    tensor = torch.as_tensor(crops, device=device)
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 crops, got shape {tuple(tensor.shape)}")
    tensor = tensor.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if size is not None and tensor.shape[-1] != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="area")
    return tensor


def gradient_penalty(critic: Discriminator, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): (‖∇D(x̂)‖₂ − 1)² on random interpolates x̂."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    score, _ = critic(mixed)
    gradient, = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    return ((gradient.flatten(1).norm(dim=1) - 1) ** 2).mean()
