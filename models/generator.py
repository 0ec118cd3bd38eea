"""Stage III networks: a StarGAN-style generator conditioned on target attributes, and a
PatchGAN discriminator with an auxiliary attribute classifier (Choi et al. 2018).

Both work on the aligned crop at ``GAN_SIZE`` (the 128-px crop averaged down): on the 2-core
CPU of CI and a release, the generator's cost grows with pixels, and a face pasted back
into a photo is rarely more than ~150 px wide, so 64 px keeps the structure the SSIM
regulator and the verifier see while keeping synthesis fast. Images are in [-1, 1].
"""
from __future__ import annotations

import numpy as np
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
        self.code_size, self.size = 0, GAN_SIZE   # v1 draws one face per input: no identity code

    def forward(self, x: torch.Tensor, c: torch.Tensor, codes: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
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


def from_gan_output(images: torch.Tensor) -> np.ndarray:
    """N×3×S×S in [-1, 1] -> N×S×S×3 uint8 (rounded, as a released file holds them)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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


# --- Stage III v2: a full-resolution inpainting generator with a per-face identity code ---

INPAINT_SIZE = 128   # the aligned crop's own resolution: nothing is upsampled into the photo


class StyledNorm(nn.Module):
    """Instance normalisation whose scale and shift come from the style vector (AdaIN, as
    StyleGAN): the identity code and the targets steer every decoder layer. The affine map
    starts at zero, so training starts from plain instance normalisation and the code's
    influence is learnt (the diversity terms ask for it)."""

    def __init__(self, channels: int, style: int):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.affine = nn.Linear(style, 2 * channels)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(style)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class StyledBlock(nn.Module):
    """conv 3×3 -> styled norm -> LeakyReLU, twice, with a residual connection."""

    def __init__(self, channels: int, style: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = StyledNorm(channels, style)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = StyledNorm(channels, style)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.norm1(self.conv1(x), style), 0.2)
        return x + self.norm2(self.conv2(y), style)


class UpBlock(nn.Module):
    """Nearest up-sampling, a convolution, then the encoder's features of that resolution
    (the skip connection: the context outside the mask at full detail) merged in."""

    def __init__(self, inputs: int, skip: int, outputs: int, style: int):
        super().__init__()
        self.conv = nn.Conv2d(inputs, outputs, 3, padding=1)
        self.norm = StyledNorm(outputs, style)
        self.merge = nn.Conv2d(outputs + skip, outputs, 3, padding=1)
        self.merge_norm = StyledNorm(outputs, style)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.norm(self.conv(F.interpolate(x, scale_factor=2, mode="nearest")), style), 0.2)
        return F.leaky_relu(self.merge_norm(self.merge(torch.cat([x, skip], dim=1)), style), 0.2)


class InpaintingGenerator(nn.Module):
    """(context, targets, identity code, mask) -> a face painted inside the mask.

    A U-Net at the crop's resolution: the encoder sees the crop with the face interior
    blurred, the mask and the tiled targets; the decoder's every normalisation is steered
    by a style vector mapped from the identity code and the targets; skip connections
    bring the context at each resolution, so borders, hair and lighting line up with the
    photo. The caller keeps the original outside the mask (``paste_face``).
    """

    def __init__(self, attributes: int, code_size: int = 32, width: int = 16, blocks: int = 2,
                 size: int = INPAINT_SIZE, levels: int = 3, forehead: float = 0.0):
        super().__init__()
        self.config = {"kind": "inpainting", "attributes": attributes, "code_size": code_size, "width": width,
                       "blocks": blocks, "size": size, "levels": levels}
        if forehead:   # left out at 0, so the configs of generators trained before it load unchanged
            self.config["forehead"] = forehead
        # How far above the eyebrows it paints (``stages.common.faces.mask_polygon``): part of
        # what it was trained to do, so the release composes the same region.
        self.code_size, self.size, self.forehead = code_size, size, forehead
        style = 8 * width
        self.mapping = nn.Sequential(nn.Linear(code_size + attributes, style), nn.LeakyReLU(0.2),
                                     nn.Linear(style, style), nn.LeakyReLU(0.2))
        widths = [width * min(2 ** level, 8) for level in range(levels + 1)]
        self.stem = nn.Sequential(nn.Conv2d(3 + 1 + attributes, widths[0], 3, padding=1), nn.LeakyReLU(0.2))
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[level], widths[level + 1], 4, stride=2, padding=1),
                          nn.InstanceNorm2d(widths[level + 1], affine=True), nn.LeakyReLU(0.2))
            for level in range(levels))
        self.middle = nn.ModuleList(StyledBlock(widths[-1], style) for _ in range(blocks))
        self.up = nn.ModuleList(UpBlock(widths[level + 1], widths[level], widths[level], style)
                                for level in reversed(range(levels)))
        self.out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, context: torch.Tensor, targets: torch.Tensor, codes: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        n, _, height, width = context.shape
        if codes is None:   # no code given: the mean identity (used only in tests and previews)
            codes = context.new_zeros(n, self.code_size)
        if mask is None:
            raise ValueError("the inpainting generator needs the face mask it paints inside (1×1×H×W)")
        mask = mask.to(context).expand(n, 1, height, width)
        targets = targets.float()
        style = self.mapping(torch.cat([codes, targets], dim=1))
        x = self.stem(torch.cat([context, mask, targets[:, :, None, None].expand(-1, -1, height, width)], dim=1))
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(x)
        for block in self.middle:
            x = block(x, style)
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip, style)
        # The blurred context plus a painted residual: colour and lighting start right.
        return (context + self.out(x)).clamp(-1, 1)


class PatchCritic(nn.Module):
    """Realism critic at full resolution for the non-saturating loss with R1: a score per
    patch and one logit per conditioned attribute; ``features`` for feature matching."""

    def __init__(self, attributes: int, width: int = 16, size: int = INPAINT_SIZE, depth: int = 5):
        super().__init__()
        self.config = {"attributes": attributes, "width": width, "size": size, "depth": depth}
        self.layers, channels = nn.ModuleList(), 3
        for level in range(depth):
            out = width * min(2 ** level, 8)
            self.layers.append(nn.Sequential(nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)))
            channels = out
        self.source = nn.Conv2d(channels, 1, 3, padding=1)
        self.classify = nn.Conv2d(channels, attributes, size // 2 ** depth)

    def forward(self, x: torch.Tensor, features: bool = False):
        levels = []
        for layer in self.layers:
            x = layer(x)
            levels.append(x)
        scores = (self.source(x), self.classify(x).flatten(1))
        return (*scores, levels) if features else scores


def r1_penalty(critic: PatchCritic, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R1 (Mescheder et al. 2018): ‖∇D(x)‖² on real images; with the critic's outputs on them."""
    real = real.detach().requires_grad_(True)
    score, classes = critic(real)
    gradient, = torch.autograd.grad(score.sum(), real, create_graph=True)
    return gradient.pow(2).flatten(1).sum(dim=1).mean(), score, classes


def load_generator(config: dict) -> nn.Module:
    """The network a ``generator.json`` config describes (v1 StarGAN-style or v2 inpainting)."""
    config = dict(config)
    if config.pop("kind", None) == "inpainting":
        return InpaintingGenerator(**config)
    return Generator(**config)
