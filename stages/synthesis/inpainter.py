"""Stage III v2 training: the full-resolution inpainting generator with an identity code.

Why not v1's objective. v1 (``training.py``) asks the generator to reconstruct the real
face from its blurred context (StarGAN's cycle term, L1). The best answer to an L1
reconstruction of a face it cannot see is the average face, so the faces came out soft and
alike (the verifier called ~20% of published pairs the same person). v2 drops the cycle and
draws each face from an identity code z instead:

Critic:    L_D = softplus(D(G(x, c', z))) + softplus(−D(x)) + λ_cls·BCE(D_cls(x), c)
                 + (γ/2)·‖∇D(x)‖²  (R1, every ``r1_every`` steps, scaled up to match)
Generator, with two codes z₁, z₂ for the same face and targets:
           L_G = softplus(−D(G₁)) + λ_cls·BCE(D_cls(G₁), c') + λ_fm·FM
                 + λ_ver·max(0, m − ‖E(G₁) − E(x)‖)²          (PP-GAN; off: InpainterSettings)
                 + λ_div·max(0, m − ‖E(G₁) − E(G₂)‖)²         (two codes: two people)
                 + λ_ms·max(0, τ − |b(G₁) − b(G₂)|₁ / |z₁ − z₂|₁)  (mode seeking, Mao et al. 2019)
                 + λ_spread·mean_ij max(0, ‖V(v(x_i)) − V(v(x_j))‖ − ‖V(v(G_i)) − V(v(G_j))‖)²
                   (or a fixed target distance instead of the originals', ``spread_margin``)
                 + λ_away·max(0, m − ‖V(v(G)) − V(v(x))‖)²
                 + λ_chroma·chroma above the original's        (both: InpainterSettings)
                 + λ_ssim·(1 − SSIM(G₁, x)) + λ_layout·|↓16(G₁) − ↓16(x)|₁

FM matches the mean critic features of fakes to those of reals at every level (Salimans et
al. 2016: a steadier signal than the score alone on little compute); the layout term keeps
what a 16×16 view of the face holds (pose, where the mouth and eyes are, lighting) and
leaves the detail that identifies a person free. E is the identity model distilled from dlib,
applied to the face's luminance blurred by 1 px; b is the luminance blurred by 2 px; v is a
random view (shift, scale, blur, contrast, noise); V is dlib's verifier (PyTorch port).
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from models.generator import (
    InpaintingGenerator,
    PatchCritic,
    from_gan_output,
    r1_penalty,
)
from stages.synthesis.render import (
    face_context,
    gaussian_blur,
    painted_forehead,
    synthesize_face,
    template_mask,
)
from stages.synthesis.training import (
    GAN_ATTRIBUTES,
    frozen,
    resume,
    save_checkpoint,
    save_snapshot,
    ssim,
    start_from_snapshot,
)


@dataclass(frozen=True)
class InpainterSettings:
    steps: int = 30_000
    batch_size: int = 8
    learning_rate: float = 2e-4
    r1_gamma: float = 1.0
    r1_every: int = 4          # lazy R1 (StyleGAN2): the double backward every 4th critic step
    lambda_cls: float = 1.0
    lambda_fm: float = 1.0
    # PP-GAN's verification term is off in v2: against the frozen distilled CNN it taught
    # saturated horizontal bars at the same place in every face within 250 steps (stripes
    # 1.45 with it, 1.11 without; README), and the generator never sees the identity it
    # would push away from (the face interior is blurred; v1's ablation: 98.8% de-identified
    # without the term). The release's leak gate still checks every face with dlib.
    lambda_ver: float = 0.0
    # The contrastive term between two codes is off too: at 0.5 it painted saturated
    # magenta, green and yellow strokes at the eyes and mouth (chroma excess 9.8 at 4,000
    # steps against 0.4 without it; README). Mode seeking alone makes the codes differ.
    lambda_div: float = 0.0
    lambda_ms: float = 1.0
    # Spread: two different people's painted faces at least as far apart as the two originals,
    # to dlib's verifier on randomly shifted, scaled and blurred views. Mode seeking makes
    # codes differ but not people: at 4,000 steps dlib called 14% of the painted pairs of
    # 150 different validation people the same person whatever the codes (real pairs: 0.4%).
    # The distilled CNN cannot judge this (its median distance between real people is 0.48,
    # the painted ones' 0.44; dlib's 0.84 and 0.73). Training against the verifier that
    # measures diversity makes that measure partial; the README says how it is checked.
    lambda_spread: float = 0.0
    # 0: each pair's target is its two originals' distance. That target tells the generator
    # how far apart the two people were, and copying them would meet it. > 0: one fixed
    # target for every pair, which says nothing about who the originals were. (Measured:
    # SFace, never trained against, matched 18.5% of 300 released LFW faces to another photo
    # of the same person both with the originals' target at 5,500 steps and without any
    # spread term at 5,000; v1 13.4%. So v2 itself, not this target, leaks more; README.)
    spread_margin: float = 0.0
    # Away: each painted face at least ``margin`` from its own original, to dlib's verifier
    # on random views (PP-GAN's verification term, judged by the verifier the gate uses
    # instead of the distilled CNN whose blind spots it learned as bars).
    lambda_away: float = 0.0
    # Chroma cap: painted colour no more saturated than the original's, blurred by 4 px, plus
    # 10 levels: the cheapest way for a frozen network's term to be met is a coloured stroke.
    lambda_chroma: float = 0.0
    lambda_ssim: float = 1.0
    lambda_layout: float = 5.0
    margin: float = 0.9        # verifier distance to reach, from the input and between two codes
    mode_seeking_ratio: float = 0.05
    code_size: int = 32
    # How far above the eyebrows the generator paints, as a fraction of the chin-to-eyebrows
    # distance (``faces.mask_polygon``). 0: the landmark hull only. SFace's crop takes in the
    # forehead: with another real person's face pasted over the hull alone, SFace still
    # matched 5.0% of 150 LFW DevTrain subjects to a second photo of them and 6.7% to their
    # own; over the hull and 0.25 of the forehead, 1.7% and 0.3%
    # (``anonymousnet evaluate-painted-region``, results/painted_region_lfw150.json).
    forehead: float = 0.0
    # CPU-sized: 4.7 MB of generator weights, ~0.5 s for a forward and backward of generator
    # and critic at batch 8 on 2 cores.
    width: int = 16
    blocks: int = 2
    critic_width: int = 16
    checkpoint_every: int = 250
    log_every: int = 25         # steps between losses.jsonl records


def to_unit(crops: torch.Tensor) -> torch.Tensor:
    """N×S×S×3 uint8 -> N×3×S×S in [-1, 1] (per batch: the whole training set in float
    would take 1.5 GB)."""
    return crops.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _mean_feature_matching(critic: PatchCritic, real: torch.Tensor, fake_levels: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        *_, real_levels = critic(real, features=True)
    return sum((r.mean(dim=0) - f.mean(dim=0)).abs().mean() for r, f in zip(real_levels, fake_levels))


def _contrastive(a: torch.Tensor, b: torch.Tensor, margin: float) -> torch.Tensor:
    """A different-person pair's contrastive loss: max(0, m − ‖a − b‖)²."""
    return F.relu(margin - (a - b).norm(dim=1)).pow(2).mean()


def _grey(images: torch.Tensor) -> torch.Tensor:
    """Luminance (Rec. 601) in all three channels: the diversity terms judge light and
    shade, so two codes cannot tell two people apart by hue alone (at 250 steps a run whose
    terms saw colour gave its codes green, red and yellow eyes and faces instead)."""
    luminance = (images * images.new_tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(dim=1, keepdim=True)
    return luminance.expand(-1, 3, -1, -1)


def _at_identity_size(images: torch.Tensor) -> torch.Tensor:
    """What the distilled identity model sees (64 px), grey and blurred by 1 px: a small
    CNN is fooled by fine coloured stripes that dlib's verifier is not, so the identity
    terms judge the face's structure."""
    return F.interpolate(gaussian_blur(_grey(images), 1.0), size=(64, 64), mode="area")


def _views(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """A random view of each face (shifted by up to 4%, scaled by 0.92-1.08, blurred, its
    contrast changed by up to 15%, noise added): a term judged on these is not met by a
    pattern that only works pixel for pixel (expectation over transformation)."""
    n = len(images)
    scale = 1 + (torch.rand(n, generator=rng) - 0.5) * 0.16
    shift = (torch.rand(n, 2, generator=rng) - 0.5) * 0.08
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    moved = gaussian_blur(moved, 0.5 + 1.5 * float(torch.rand(1, generator=rng)))
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=rng).to(images) - 0.5) * 0.3
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    noise = torch.randn(moved.shape, generator=rng).to(images) * 0.03
    return (mean + (moved - mean) * contrast + noise).clamp(-1, 1)


@functools.lru_cache(maxsize=4)
def _chip_grid(size: int) -> torch.Tensor:
    """1×150×150×2 ``grid_sample`` grid: where each pixel of dlib's 150-px face chip (its
    ``get_face_chip`` of the template's landmarks, as the release describes a face) comes
    from in an aligned crop of ``size`` px. Found by asking dlib for the chip of a crop whose
    pixels hold their own coordinates and fitting an affine map to the answer (dlib truncates
    to 8 bits: hence the half pixel). The descriptor of a chip sampled so lay 0.003 from
    dlib's own on the astronaut (the test asks < 0.03; 0.08 without the half pixel)."""
    from stages.common.faces import CHIP_SIZE, face_chip, template

    if size > 256:
        raise ValueError(f"aligned crops of {size} px: the coordinate trick needs <= 256")
    rows, columns = np.mgrid[0:size, 0:size]
    coordinates = np.stack([columns, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    chip = face_chip(coordinates, template(size)).astype(np.float64)
    v, u = np.mgrid[0:CHIP_SIZE, 0:CHIP_SIZE]
    design = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
    mapping, *_ = np.linalg.lstsq(design, chip[..., :2].reshape(-1, 2), rcond=None)
    source = (design @ mapping).reshape(CHIP_SIZE, CHIP_SIZE, 2) + 0.5
    return torch.tensor((2 * source + 1) / size - 1, dtype=torch.float32)[None]


def dlib_descriptors(images: torch.Tensor) -> torch.Tensor:
    """dlib's 128-D descriptors of aligned crops (N×3×S×S in [-1, 1]), differentiable: the
    release's verifier on the chips it would cut."""
    from stages.common.faces import descriptor_network

    grid = _chip_grid(images.shape[-1]).to(images).expand(len(images), -1, -1, -1)
    chips = F.grid_sample((images + 1) * 127.5, grid, padding_mode="border", align_corners=False)
    return descriptor_network().to(images.device)(chips.permute(0, 2, 3, 1))


def _spread(fake_identity: torch.Tensor, real_identity: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Each pair of painted faces at least as far apart as their two originals (``margin``
    0) or as ``margin``: mean of max(0, target_ij − ‖E(G_i) − E(G_j)‖)² over the batch's pairs."""
    upper = torch.triu_indices(len(fake_identity), len(fake_identity), 1)
    fake = torch.cdist(fake_identity, fake_identity)[upper[0], upper[1]]
    target = torch.cdist(real_identity, real_identity)[upper[0], upper[1]] if margin <= 0 \
        else torch.full_like(fake, margin)
    return F.relu(target - fake).pow(2).mean()


def _chroma_excess(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean, inside the mask, of how far the painted chroma (max − min channel) lies above
    the original's chroma blurred by 4 px plus 10 levels."""
    def chroma(images):
        return images.max(dim=1, keepdim=True).values - images.min(dim=1, keepdim=True).values
    excess = F.relu(chroma(fake) - gaussian_blur(chroma(real), 4.0) - 10 / 127.5)
    return (excess * mask).sum() / (mask.sum() * len(fake))


def generator_terms(generator, critic, identity, real, target, settings: InpainterSettings,
                    rng: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Each term of L_G on one batch (two codes per face); with the first code's faces."""
    n = len(real)
    codes = torch.randn(2 * n, settings.code_size, generator=rng).to(real)
    fakes = synthesize_face(generator, real.repeat(2, 1, 1, 1), target.repeat(2, 1), codes)
    first, second = fakes[:n], fakes[n:]
    source, classes, levels = critic(first, features=True)
    mask = template_mask(real.shape[-1], painted_forehead(generator)).to(real)
    # Mode seeking on the faces' luminance blurred by 2 px: two codes should differ in
    # shapes and regions, not in pixel noise or hue, the cheapest ways to differ.
    difference = gaussian_blur(_grey(first)[:, :1] - _grey(second)[:, :1], 2.0)
    painted = (difference.abs() * mask).sum(dim=(1, 2, 3)) / mask.sum()
    ratio = painted / (codes[:n] - codes[n:]).abs().mean(dim=1)
    with torch.no_grad():
        anchor, second_identity = identity(_at_identity_size(torch.cat([real, second]))).split(n)
    first_identity = identity(_at_identity_size(first))
    spread = away = real.new_zeros(())
    if settings.lambda_spread or settings.lambda_away:
        with torch.no_grad():
            real_views = dlib_descriptors(_views(real, rng))
        painted_views = dlib_descriptors(_views(first, rng))
        spread = _spread(painted_views, real_views, settings.spread_margin)
        away = _contrastive(painted_views, real_views, settings.margin)
    terms = {"adv": F.softplus(-source).mean(),
             "cls": F.binary_cross_entropy_with_logits(classes, target),
             "fm": _mean_feature_matching(critic, real, levels),
             "ver": _contrastive(first_identity, anchor, settings.margin),
             "div": _contrastive(first_identity, second_identity, settings.margin),
             "ms": F.relu(settings.mode_seeking_ratio - ratio).mean(),
             "spread": spread,
             "away": away,
             "chroma": _chroma_excess(first, real, mask),
             "ssim": 1 - ssim(first, real),
             "layout": (F.adaptive_avg_pool2d(first, 16) - F.adaptive_avg_pool2d(real, 16)).abs().mean()}
    return terms, first


def _weighted(terms: dict, settings: InpainterSettings) -> torch.Tensor:
    return sum(value * (1.0 if name == "adv" else getattr(settings, f"lambda_{name}")) for name, value in terms.items())


def _stripes_and_chroma(images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean |vertical step| / mean |horizontal step| inside ``mask``, mean chroma of each
    row inside ``mask`` in 8-bit levels) of N×3×S×S images in [-1, 1]."""
    levels = (images + 1) * 127.5
    down = (levels[:, :, 1:] - levels[:, :, :-1]).abs().mean(dim=1)
    across = (levels[..., 1:] - levels[..., :-1]).abs().mean(dim=1)
    both_down, both_across = mask[1:] * mask[:-1], mask[:, 1:] * mask[:, :-1]
    ratio = (down * both_down).sum() / both_down.sum() / ((across * both_across).sum() / both_across.sum())
    chroma = levels.max(dim=1).values - levels.min(dim=1).values
    rows = (chroma * mask).sum(dim=(0, 2)) / (mask.sum(dim=1) * len(images)).clamp(min=1)
    return ratio, rows


def bar_measures(generator: InpaintingGenerator, images: torch.Tensor, labels: torch.Tensor,
                 codes: int = 2, seed: int = 0) -> dict:
    """Two numbers for the saturated horizontal bars the first v2 runs painted across the
    eyes, nose and mouth, against the real faces ``images`` themselves:

    ``stripes``: how much more the painted faces change from row to row than from column to
    column, relative to the real faces (1: as real faces; bars make it larger);
    ``chroma_excess``: how far the most colourful row of the painted faces lies above the
    real faces' same row, in 8-bit levels of (max − min channel) (bars are saturated).

    On the 48 CelebA validation faces the training logs them on, a "generator" that pastes
    other real faces in scores 0.95 and 5.2, one that paints nothing (the blurred context)
    0.69 and 2.4, and the objective whose bars the README describes 1.50 and 13.8 at 250
    steps."""
    draw = torch.Generator().manual_seed(seed)
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        mask = (template_mask(images.shape[-1], painted_forehead(generator)).to(images)[0, 0] > 0.5).float()
        labels = labels.float().to(images)
        painted = torch.cat([synthesize_face(generator, images, labels,
                                             torch.randn(len(images), generator.code_size, generator=draw).to(images))
                             for _ in range(codes)])
        real_ratio, real_rows = _stripes_and_chroma(images, mask)
        ratio, rows = _stripes_and_chroma(painted, mask)
    generator.train(was_training)
    return {"stripes": round(float(ratio / real_ratio), 3), "chroma_excess": round(float((rows - real_rows).max()), 2)}


def verifier_same_shares(generator: InpaintingGenerator, images: torch.Tensor, labels: torch.Tensor,
                         seed: int = 1, real_share: float | None = None) -> dict:
    """Diversity as the issue measures it, on aligned validation faces of different people
    (N×3×S×S in [-1, 1]): the share of pairs dlib's verifier calls the same person among the
    faces painted with one random code each, and among the real faces (``real_share``: known
    already, not described again). On 150 such CelebA faces v2 at 4,000 steps scored 14.4%
    against 0.4% (LFW DevTrain's published faces: 16.4% against 1.5%), so it tracks the
    release's figure in seconds. With ``lambda_spread`` or ``lambda_away`` the generator
    trains against this same verifier, and the figure is then partly its own lesson: the
    evaluation asks SFace too (``evaluate-generator-diversity``)."""
    from stages.common.faces import face_descriptor, same_person_share, template

    draw = torch.Generator().manual_seed(seed)
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        codes = torch.randn(len(images), generator.code_size, generator=draw).to(images)
        painted = synthesize_face(generator, images, labels.float().to(images), codes)
    generator.train(was_training)
    landmarks = template(images.shape[-1])

    def share(faces: torch.Tensor) -> float:
        return round(same_person_share([face_descriptor(face, landmarks) for face in from_gan_output(faces)]), 4)

    return {"painted": share(painted), "real": share(images) if real_share is None else real_share}


def critic_loss(critic, real, c, fake, settings: InpainterSettings, with_r1: bool) -> torch.Tensor:
    if with_r1:
        penalty, source_real, class_real = r1_penalty(critic, real)
        penalty = settings.r1_gamma / 2 * penalty * settings.r1_every
    else:
        (source_real, class_real), penalty = critic(real), real.new_zeros(())
    source_fake, _ = critic(fake)
    return (F.softplus(source_fake).mean() + F.softplus(-source_real).mean()
            + settings.lambda_cls * F.binary_cross_entropy_with_logits(class_real, c) + penalty)


def train_inpainter(crops: torch.Tensor, labels: torch.Tensor, identity, settings: InpainterSettings,
                    run_dir: Path, seed: int = 0, device: str = "cpu", progress: bool = True,
                    preview: tuple[torch.Tensor, torch.Tensor] | None = None,
                    start_from: Path | None = None,
                    people: tuple[torch.Tensor, torch.Tensor] | None = None) -> InpaintingGenerator:
    """Train (or resume from ``run_dir/gan_checkpoint.pt``, else from the snapshot
    ``start_from``) on aligned ``crops`` (N×S×S×3 uint8) with ``labels`` (N×k in {0,1});
    losses to ``losses.jsonl``; at every checkpoint a sample grid to ``samples.png`` and a
    snapshot to ``snapshot.pt`` (what carries the run to another machine), and with
    ``people`` (validation faces of different people, and their labels) the verifier-same
    shares (:func:`verifier_same_shares`). Returns the generator."""
    torch.manual_seed(seed)
    k, size = labels.shape[1], crops.shape[1]
    generator = InpaintingGenerator(k, settings.code_size, settings.width, settings.blocks, size,
                                    forehead=settings.forehead).to(device)
    critic = PatchCritic(k, settings.critic_width, size).to(device)
    optimise_g = torch.optim.Adam(generator.parameters(), lr=settings.learning_rate, betas=(0.0, 0.99))
    optimise_d = torch.optim.Adam(critic.parameters(), lr=settings.learning_rate, betas=(0.0, 0.99))
    identity = frozen(identity, device)
    checkpoint = run_dir / "gan_checkpoint.pt"
    step = resume(start_from_snapshot(start_from, run_dir), generator, critic, optimise_g, optimise_d, device)
    rng = torch.Generator().manual_seed(seed + step)
    log = open(run_dir / "losses.jsonl", "a")
    bar = tqdm(total=settings.steps, initial=step, desc="GAN v2", unit="step", disable=not progress)
    started = time.perf_counter()
    real_share = None
    try:
        while step < settings.steps:
            index = torch.randint(0, len(crops), (settings.batch_size,), generator=rng)
            real, c = to_unit(crops[index]).to(device), labels[index].float().to(device)
            target = c[torch.randperm(len(c), generator=rng)]
            with torch.no_grad():
                codes = torch.randn(len(real), settings.code_size, generator=rng).to(real)
                fake = synthesize_face(generator, real, target, codes)
            d_loss = critic_loss(critic, real, c, fake, settings, with_r1=step % settings.r1_every == 0)
            optimise_d.zero_grad()
            d_loss.backward()
            optimise_d.step()
            terms, _ = generator_terms(generator, critic, identity, real, target, settings, rng)
            g_loss = _weighted(terms, settings)
            optimise_g.zero_grad()
            g_loss.backward()
            optimise_g.step()
            step += 1
            bar.update()
            if step % settings.log_every == 0:
                record = {"step": step, "d_loss": d_loss.item(), "g_loss": g_loss.item()}
                record |= {f"g_{name}": value.item() for name, value in terms.items()}
                log.write(json.dumps(record | {"seconds": round(time.perf_counter() - started, 1)}) + "\n")
                log.flush()
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                save_checkpoint(checkpoint, generator, critic, optimise_g, optimise_d, step, settings)
                if preview is not None:
                    bars = bar_measures(generator, preview[0].to(device), preview[1])
                    log.write(json.dumps({"step": step} | {f"bars_{k}": v for k, v in bars.items()}) + "\n")
                    log.flush()
                    write_code_grid(generator, (preview[0][:6], preview[1][:6]), run_dir / "samples.png", device)
                if people is not None:
                    shares = verifier_same_shares(generator, people[0].to(device), people[1], real_share=real_share)
                    real_share = shares["real"]   # the real faces never change: described once a run
                    log.write(json.dumps({"step": step} | {f"same_share_{k}": v for k, v in shares.items()}) + "\n")
                    log.flush()
                save_snapshot(run_dir / "snapshot.pt", generator, critic, step, settings, run_dir / "losses.jsonl")
    finally:
        bar.close()
        log.close()
    generator.eval()
    return generator


def write_code_grid(generator: InpaintingGenerator, preview: tuple[torch.Tensor, torch.Tensor], path: Path,
                    device: str = "cpu", codes: int = 4, seed: int = 0) -> None:
    """PNG grid: each row one input face, its context, the face drawn with ``codes``
    different identity codes (same targets), then with Male and Smiling flipped (first
    code). CelebA faces: it lives in the run folder and is never committed."""
    from PIL import Image

    generator.eval()
    draw = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        images, labels = preview
        images, labels = images.to(device), labels.float().to(device)
        z = [torch.randn(len(images), generator.code_size, generator=draw).to(images) for _ in range(codes)]
        columns = [images, face_context(images, forehead=painted_forehead(generator))] + [synthesize_face(generator, images, labels, code) for code in z]
        for name in ("Male", "Smiling"):
            target = labels.clone()
            target[:, GAN_ATTRIBUTES.index(name)] = 1 - target[:, GAN_ATTRIBUTES.index(name)]
            columns.append(synthesize_face(generator, images, target, z[0]))
        grid = torch.cat([torch.cat(list(column), dim=1) for column in columns], dim=2)
    generator.train()
    array = ((grid.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    Image.fromarray(array).save(path)
