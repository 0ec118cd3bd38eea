"""Stage III training: StarGAN's objective plus PP-GAN's identity terms.

Critic:    L_D = −D(x) + D(G(x, c')) + λ_cls·BCE(D_cls(x), c) + λ_gp·GP
Generator: L_G = −D(G(x, c')) + λ_cls·BCE(D_cls(G(x, c')), c') + λ_rec·|x − G(G(x, c'), c)|₁
                 + λ_ver·mean(max(0, m − ‖E(G(x, c')) − E(x)‖)²) + λ_ssim·(1 − SSIM(G(x, c'), x))

with c the real attributes, c' the targets (the batch's attribute vectors shuffled, as
StarGAN), E the frozen identity model distilled from dlib (``models/identity_embedding.py``)
and m the verification margin: the contrastive loss of a *different-person* pair pushes the
output at least m from its input in the verifier's space (PP-GAN's verification term); the
SSIM term keeps the structure (pose, expression) of the input (PP-GAN's regulator). Setting
λ_ver or λ_ssim to 0 gives the ablation rows (StarGAN only / + verification / + SSIM).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from models.generator import Discriminator, Generator, gradient_penalty
from stages.synthesis.render import face_context, gaussian_kernel, synthesize_face

# Attributes the generator is conditioned on: those of the example policies that show inside
# the face mask the release pastes back (gender, age, beard, make-up, expression, glasses).
# Hair lies outside the mask: the published photo keeps the original hair whatever the
# targets say, so conditioning on hair would ask the generator for something no one sees.
GAN_ATTRIBUTES = ("Male", "Young", "No_Beard", "Heavy_Makeup", "Smiling", "Mouth_Slightly_Open", "Eyeglasses")


@dataclass(frozen=True)
class GanSettings:
    steps: int = 20_000
    batch_size: int = 16
    # StarGAN uses lr 1e-4 and 5 critic updates per generator update over 200k steps on a GPU.
    # On the 2-core CPU a run gets a few thousand generator updates, so it takes bigger steps
    # and updates the generator every 2nd critic step (WGAN-GP stays stable at 1-2 with Adam).
    learning_rate: float = 2e-4
    critic_steps: int = 2
    lambda_gp: float = 10.0
    lambda_cls: float = 1.0
    lambda_rec: float = 10.0
    lambda_ver: float = 1.0
    lambda_ssim: float = 1.0
    margin: float = 0.9            # verifier distance the output should reach (0.6 + headroom)
    # CPU-sized (0.6 s per critic step at batch 16 on 2 cores, 2.1 MB of generator weights).
    width: int = 24
    blocks: int = 3
    checkpoint_every: int = 500
    log_every: int = 50         # steps between losses.jsonl records; a multiple of critic_steps


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = gaussian_kernel(sigma, size // 2)
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Gaussian window σ = 1.5, as Wang et al.) of images in [-1, 1], differentiable."""
    a, b = (a + 1) / 2, (b + 1) / 2
    channels = a.shape[1]
    window = _gaussian_window().to(a).expand(channels, 1, -1, -1)
    mean_a = F.conv2d(a, window, groups=channels)
    mean_b = F.conv2d(b, window, groups=channels)
    var_a = F.conv2d(a * a, window, groups=channels) - mean_a ** 2
    var_b = F.conv2d(b * b, window, groups=channels) - mean_b ** 2
    cov = F.conv2d(a * b, window, groups=channels) - mean_a * mean_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a ** 2 + mean_b ** 2 + c1) * (var_a + var_b + c2))
    return value.mean()


def verification_loss(identity, fake: torch.Tensor, real: torch.Tensor, margin: float) -> torch.Tensor:
    """Contrastive loss of a different-person pair: max(0, m − distance)²."""
    with torch.no_grad():
        anchor = identity(real)
    distance = (identity(fake) - anchor).norm(dim=1)
    return F.relu(margin - distance).pow(2).mean()


def train_gan(images: torch.Tensor, labels: torch.Tensor, identity, settings: GanSettings, run_dir: Path,
              seed: int = 0, device: str = "cpu", progress: bool = True,
              preview: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Train (or resume from ``run_dir/gan_checkpoint.pt``) on ``images`` (N×3×64×64 in
    [-1, 1]) with ``labels`` (N×k in {0,1}); losses go to ``run_dir/losses.jsonl`` and a
    sample grid to ``run_dir/samples.png`` at every checkpoint. Returns the generator."""
    torch.manual_seed(seed)
    k = labels.shape[1]
    generator = Generator(k, settings.width, settings.blocks).to(device)
    critic = Discriminator(k, settings.width).to(device)
    optimise_g = torch.optim.Adam(generator.parameters(), lr=settings.learning_rate, betas=(0.5, 0.999))
    optimise_d = torch.optim.Adam(critic.parameters(), lr=settings.learning_rate, betas=(0.5, 0.999))
    identity = frozen(identity, device)
    checkpoint = run_dir / "gan_checkpoint.pt"
    step = resume(checkpoint, generator, critic, optimise_g, optimise_d, device)
    rng = torch.Generator().manual_seed(seed + step)
    log = open(run_dir / "losses.jsonl", "a")
    bar = tqdm(total=settings.steps, initial=step, desc="GAN", unit="step", disable=not progress)
    started = time.perf_counter()
    try:
        while step < settings.steps:
            index = torch.randint(0, len(images), (settings.batch_size,), generator=rng)
            real, c = images[index].to(device), labels[index].float().to(device)
            target = c[torch.randperm(len(c), generator=rng)]
            # Critic.
            source_real, class_real = critic(real)
            with torch.no_grad():
                fake = synthesize_face(generator, real, target)
            source_fake, _ = critic(fake)
            d_loss = (-source_real.mean() + source_fake.mean()
                      + settings.lambda_cls * F.binary_cross_entropy_with_logits(class_real, c)
                      + settings.lambda_gp * gradient_penalty(critic, real, fake))
            optimise_d.zero_grad()
            d_loss.backward()
            optimise_d.step()
            record = {"step": step + 1, "d_loss": d_loss.item()}
            # Generator, every critic_steps critic updates.
            if (step + 1) % settings.critic_steps == 0:
                fake = synthesize_face(generator, real, target)
                source, classes = critic(fake)
                terms = {"adv": -source.mean(),
                         "cls": F.binary_cross_entropy_with_logits(classes, target),
                         "rec": (real - synthesize_face(generator, fake, c)).abs().mean(),
                         "ver": verification_loss(identity, fake, real, settings.margin),
                         "ssim": 1 - ssim(fake, real)}
                g_loss = (terms["adv"] + settings.lambda_cls * terms["cls"] + settings.lambda_rec * terms["rec"]
                          + settings.lambda_ver * terms["ver"] + settings.lambda_ssim * terms["ssim"])
                optimise_g.zero_grad()
                g_loss.backward()
                optimise_g.step()
                record |= {"g_loss": g_loss.item()} | {f"g_{name}": value.item() for name, value in terms.items()}
            step += 1
            bar.update()
            if step % settings.log_every == 0:   # a multiple of critic_steps: the generator's terms are in it
                log.write(json.dumps(record | {"seconds": round(time.perf_counter() - started, 1)}) + "\n")
                log.flush()
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                save_checkpoint(checkpoint, generator, critic, optimise_g, optimise_d, step, settings)
                if preview is not None:
                    write_sample_grid(generator, preview, run_dir / "samples.png", device)
    finally:
        bar.close()
        log.close()
    generator.eval()
    return generator


def frozen(network: torch.nn.Module, device: str) -> torch.nn.Module:
    """``network`` on ``device`` in eval mode with no gradients of its own (the identity model
    the verification terms judge by: the generator learns against it, it does not learn)."""
    network = network.to(device).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


def resume(path: Path, generator, critic, optimise_g, optimise_d, device: str) -> int:
    """Load a run's checkpoint (or a snapshot, :func:`save_snapshot`) into the networks and
    optimisers; the step it reached (0: none). A snapshot holds no optimiser state: Adam
    starts afresh from its weights."""
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=True, map_location=device)
    try:
        generator.load_state_dict(state["generator"])
        critic.load_state_dict(state["critic"])
    except RuntimeError as error:
        raise ValueError(f"{path} was trained with other settings ({state.get('settings')}); train with those, "
                         f"or start a new run folder without it: {error}") from error
    if "optimise_g" in state:
        optimise_g.load_state_dict(state["optimise_g"])
        optimise_d.load_state_dict(state["optimise_d"])
    return state["step"]


def save_snapshot(path: Path, generator, critic, step: int, settings, losses: Path) -> None:
    """A small file a later session resumes from on another machine (the run folder is
    scratch and does not survive one): both networks' weights in float16, the step, the
    settings and the loss log so far. Adam's moments are left out: they are as large as the
    weights twice over, and with β₁ = 0 and β₂ = 0.99 they rebuild within ~100 steps."""
    partial = path.with_suffix(".partial")
    torch.save({"generator": {k: v.half() for k, v in generator.state_dict().items()},
                "critic": {k: v.half() for k, v in critic.state_dict().items()},
                "step": step, "settings": asdict(settings),
                "losses": losses.read_text() if losses.exists() else ""}, partial)
    partial.replace(path)


def start_from_snapshot(snapshot: Path | None, run_dir: Path) -> Path:
    """The checkpoint to resume from: the run folder's own, else ``snapshot`` (its loss log
    copied into the new run folder first, so the training curve goes on)."""
    checkpoint = run_dir / "gan_checkpoint.pt"
    if checkpoint.exists() or snapshot is None:
        return checkpoint
    if not snapshot.exists():
        raise FileNotFoundError(f"no snapshot at {snapshot}: give one that `train generator` wrote, or leave "
                                "--start-from out to start from scratch")
    losses = run_dir / "losses.jsonl"
    if not losses.exists():
        losses.write_text(torch.load(snapshot, weights_only=True, map_location="cpu").get("losses", ""))
    return snapshot


def save_checkpoint(path: Path, generator, critic, optimise_g, optimise_d, step: int, settings: GanSettings) -> None:
    partial = path.with_suffix(".partial")
    torch.save({"generator": generator.state_dict(), "critic": critic.state_dict(),
                "optimise_g": optimise_g.state_dict(), "optimise_d": optimise_d.state_dict(),
                "step": step, "settings": asdict(settings)}, partial)
    partial.replace(path)   # a crash mid-save never leaves a truncated checkpoint


def write_sample_grid(generator: Generator, preview: torch.Tensor, path: Path, device: str = "cpu") -> None:
    """PNG grid: each row one input face, the generator's input (face interior blurred),
    then the face with each of a few attributes flipped (Male, Young, No_Beard, Smiling). The grid shows CelebA faces: it lives in the
    run folder and is never committed."""
    from PIL import Image

    flips = [GAN_ATTRIBUTES.index(name) for name in ("Male", "Young", "No_Beard", "Smiling")]
    generator.eval()
    with torch.no_grad():
        images, labels = preview
        images, labels = images.to(device), labels.float().to(device)
        columns = [images, face_context(images)]
        for attribute in flips:
            target = labels.clone()
            target[:, attribute] = 1 - target[:, attribute]
            columns.append(synthesize_face(generator, images, target))
        grid = torch.cat([torch.cat(list(column), dim=1) for column in columns], dim=2)   # 3 × H·n × W·cols
    generator.train()
    array = ((grid.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    Image.fromarray(array).save(path)
