"""Stage III: render each aligned face with its Stage II target attributes.

What the generator sees. StarGAN edits attributes and keeps the identity, and PP-GAN's
verification term can only push the output away from the input as far as a differentiable
stand-in for the verifier tells it to. So the generator is never shown the identity in the
first place: its input is the aligned crop with the inside of the face (the template's
landmark hull, feathered) replaced by a strong Gaussian blur of itself (``face_context``).
Hair, background, skin tone, lighting and the coarse layout of the face (pose, where the
mouth opens) come through; the fine structure of eyes, nose, mouth and skin that dlib's
verifier relies on does not, and the generator draws new ones. The same context is built
in training and in a release, in torch, so the two can never drift apart.

Drawing again. A rendered face that dlib's detector no longer finds in the photo is not the
"still a face" the release promises, and the leak gate cannot measure it; one that still
verifies as its original is no protection. Both are drawn again before the release falls
back to blur or pixelation. A v2 generator takes an identity code per face (a seeded
random vector, recorded in lineage): each draw uses the face's next code, so it is another
person with the same targets. v1 has no code and is deterministic, so asking again with
the same input gives the same face; a slightly different view of the same crop (mirrored,
zoomed in 5 %, shifted 3 px) gives a different drawing of the same targets, mapped back
onto the original geometry. ``render_draws`` says which code and view each draw uses;
``FaceRenders`` holds a face's draws in that order and renders the later ones only when
asked.
"""
from __future__ import annotations

import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from models.generator import from_gan_output, load_generator, to_gan_input
from models.registry import ModelFileError, run_or_installed
from stages.attributes.names import ATTRIBUTES
from stages.common.faces import face_mask, template

# Blur of the face interior, as a fraction of the crop width: the blur baseline's strength,
# which alone defeats the verifier on 99.7% of LFW pairs (results/evaluation_lfw_devtrain_baselines.json).
CONTEXT_BLUR_FRACTION = 0.08


@lru_cache(maxsize=8)
def _template_mask_array(size: int, forehead: float) -> np.ndarray:
    mask = np.ascontiguousarray(face_mask(template(size), (size, size), feather_fraction=0.06, forehead=forehead),
                                dtype=np.float32)
    mask.setflags(write=False)
    return mask


def template_mask(size: int, forehead: float = 0.0) -> torch.Tensor:
    """1×1×size×size feathered mask of the alignment template's face hull (with ``forehead``,
    see ``faces.mask_polygon``). A new tensor per call: a cached one first made under
    ``torch.inference_mode`` (a release) could not take part in autograd later in the same
    process (training)."""
    return torch.tensor(_template_mask_array(size, float(forehead)))[None, None]


def painted_forehead(generator) -> float:
    """How far above the eyebrows ``generator`` paints (its config's ``forehead``; v1 and
    the first v2 runs paint the landmark hull only: 0)."""
    return float(getattr(generator, "forehead", 0.0))


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian of 2·radius + 1 taps."""
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of N×C×H×W images (reflected borders)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    kernel = gaussian_kernel(sigma, radius).to(images)
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(F.conv2d(padded, horizontal, groups=channels), vertical, groups=channels)


def face_context(images: torch.Tensor, blur_fraction: float = CONTEXT_BLUR_FRACTION,
                 forehead: float = 0.0) -> torch.Tensor:
    """The generator's input: ``images`` (N×3×S×S, aligned) with the face interior (the
    region it paints, ``forehead`` included) blurred."""
    size = images.shape[-1]
    mask = template_mask(size, forehead).to(images)
    return images * (1 - mask) + gaussian_blur(images, blur_fraction * size) * mask


def paste_face(generated: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``images`` with the face interior (``mask``) taken from ``generated``."""
    return images * (1 - mask) + generated * mask


@dataclass(frozen=True)
class RenderView:
    """A view of the aligned crop the generator renders from: an affine map of the crop's
    normalised coordinates ([-1, 1]², ``torch.nn.functional.affine_grid``'s convention),
    undone on the rendered face before it is pasted back."""
    name: str
    mirrored: bool = False
    zoom: float = 1.0        # > 1: the face fills more of the view
    shift: float = 0.0       # of the crop width; > 0 moves the face right in the view

    @property
    def is_identity(self) -> bool:
        return not self.mirrored and self.zoom == 1.0 and self.shift == 0.0

    def sampling(self, inverse: bool = False) -> torch.Tensor:
        """2×3 matrix: view pixel -> where to sample the crop (``inverse``: crop -> view)."""
        flip = -1.0 if self.mirrored else 1.0
        # view = zoom * flip(crop) + 2 * shift  =>  crop = flip((view - 2 * shift) / zoom)
        scale, offset = flip / self.zoom, -flip * 2 * self.shift / self.zoom
        if inverse:
            scale, offset = flip * self.zoom, 2 * self.shift
        return torch.tensor([[scale, 0.0, offset], [0.0, abs(scale), 0.0]])

    def warp(self, images: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        theta = self.sampling(inverse).to(images).expand(images.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# The order in which Stage III tries views of a face that dlib lost: the crop as aligned,
# then lossless mirroring, then small geometric jitter (5 % zoom, 3 px of 128 either way).
RENDER_VIEWS = (RenderView("aligned"), RenderView("mirrored", mirrored=True), RenderView("zoomed", zoom=1.05),
                RenderView("shifted-left", shift=-3 / 128), RenderView("shifted-right", shift=3 / 128))


@dataclass(frozen=True)
class RenderDraw:
    """One drawing of a face: which of its identity codes (0: the first) from which view."""
    code: int
    view: RenderView


# How many times a face can be drawn with identity codes: the first draw, up to 4 more after
# checks of the whole photo (GanParams.rerender_views), and up to MAX_SCREENED_DRAWS the leak
# gate's screen passes over (GanParams.screened_draws).
MAX_CODE_DRAWS = 24


def render_draws(code_size: int) -> tuple[RenderDraw, ...]:
    """The order in which a face is drawn. With identity codes: a new code at every draw, the
    first three from the crop as aligned, then mirrored and zoomed (a face the verifier lost
    may need another geometry as well as another person), then the crop as aligned again.
    Without: the views in turn."""
    if code_size == 0:
        return tuple(RenderDraw(0, view) for view in RENDER_VIEWS)
    views = (RENDER_VIEWS[0],) * 3 + RENDER_VIEWS[1:3]
    views += (RENDER_VIEWS[0],) * (MAX_CODE_DRAWS - len(views))
    return tuple(RenderDraw(index, view) for index, view in enumerate(views))


def code_seed(face_seed: int, code: int) -> int:
    return (face_seed + code) % 2 ** 63


def identity_codes(seeds: Sequence[int], size: int) -> np.ndarray:
    """N×size standard normal identity codes, each from its own seed (reproducible per face)."""
    return np.stack([torch.randn(size, generator=torch.Generator().manual_seed(int(seed))).numpy()
                     for seed in seeds]).astype(np.float32)


def synthesize_face(generator, images: torch.Tensor, targets: torch.Tensor,
                    codes: torch.Tensor | None = None) -> torch.Tensor:
    """A new face inside the mask, the original outside: what the critic judges in training
    and what the release pastes into the photo. The generator only has to paint the face;
    hair and background, which the release keeps anyway, cost it nothing. ``codes``: the
    identity codes of a v2 generator (v1 has none)."""
    forehead = painted_forehead(generator)
    mask = template_mask(images.shape[-1], forehead).to(images)
    return paste_face(generator(face_context(images, forehead=forehead), targets, codes, mask), images, mask)


class Synthesizer:
    """The trained generator, applied to aligned crops in batches (GPU when present)."""

    def __init__(self, generator, attributes: tuple[str, ...], device: str | None = None,
                 folder: str | None = None):
        self.folder = folder        # where it was loaded from (None: the shipped one)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.generator = generator.to(self.device).eval()
        self.attributes = tuple(attributes)
        unknown = [name for name in self.attributes if name not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"the generator is conditioned on unknown attribute(s) {unknown}")
        self.columns = [ATTRIBUTES.index(name) for name in self.attributes]
        self.forehead = painted_forehead(generator)   # the release composes this region of each render

    @property
    def code_size(self) -> int:
        return self.generator.code_size

    def render(self, crops: np.ndarray, targets: np.ndarray, batch_size: int = 64,
               view: RenderView = RENDER_VIEWS[0], codes: np.ndarray | None = None) -> np.ndarray:
        """N aligned uint8 crops (N×S×S×3) with their 40 target attributes (N×40, 0/1) ->
        N synthesized crops of the same size, rendered from ``view`` of each crop, with
        ``codes`` (N×code_size) as their identity codes (v2; None: the mean identity)."""
        crops = np.asarray(crops)
        targets = np.asarray(targets, dtype=np.float32)
        if len(crops) != len(targets):
            raise ValueError(f"{len(crops)} crops but {len(targets)} target vectors")
        out = np.empty_like(crops)
        with torch.inference_mode():
            for start in range(0, len(crops), batch_size):
                # Outside the mask, the original crop at full resolution (not a round trip
                # through the generator's size).
                original = to_gan_input(crops[start:start + batch_size], self.device, size=None)
                size = original.shape[-1]
                seen = original if view.is_identity else view.warp(original)
                images = seen
                if size != self.generator.size:
                    images = F.interpolate(seen, size=(self.generator.size,) * 2, mode="area")
                condition = torch.as_tensor(targets[start:start + batch_size][:, self.columns], device=self.device)
                code = None if codes is None else torch.as_tensor(codes[start:start + batch_size], device=self.device)
                fake = self.generator(face_context(images, forehead=self.forehead), condition, code,
                                      template_mask(images.shape[-1], self.forehead).to(images))
                if fake.shape[-1] != size:
                    fake = F.interpolate(fake, size=(size, size), mode="bicubic", align_corners=False)
                fake = fake.clamp(-1, 1)
                mask = template_mask(size, self.forehead).to(original)
                if view.is_identity:
                    fake = paste_face(fake, original, mask)
                else:
                    # Back onto the crop's geometry: the face and the mask it was drawn in.
                    mask = view.warp(mask, inverse=True)
                    fake = paste_face(view.warp(fake, inverse=True), original, mask)
                out[start:start + batch_size] = from_gan_output(fake)
        return out

    def renders(self, crops: np.ndarray, targets: np.ndarray, batch_size: int = 64,
                seeds: Sequence[int] | None = None) -> list[FaceRenders]:
        """Each face's draws (:class:`FaceRenders`), the first of all of them rendered now in
        batches. ``seeds``: each face's identity-code seed (None: fresh random ones; a
        generator without codes ignores them)."""
        if self.code_size == 0:
            seeds = [None] * len(crops)
        elif seeds is None:
            seeds = [secrets.randbits(63) for _ in range(len(crops))]
        codes = None if self.code_size == 0 else identity_codes([code_seed(s, 0) for s in seeds], self.code_size)
        first = self.render(crops, targets, batch_size, codes=codes)
        return [FaceRenders(self, crop, target, face, seed)
                for crop, target, face, seed in zip(crops, targets, first, seeds)]


class FaceRenders(Sequence):
    """One face drawn in each of ``render_draws`` in turn; a draw is rendered the first time
    it is asked for. ``seed``: the face's identity-code seed (None: a generator without codes)."""

    def __init__(self, synthesizer: Synthesizer, crop: np.ndarray, target: np.ndarray, first: np.ndarray,
                 seed: int | None = None):
        self.synthesizer, self.crop, self.target = synthesizer, crop, np.asarray(target, dtype=np.float32)
        self.seed, self.code_size, self.folder = seed, synthesizer.code_size, synthesizer.folder
        self.forehead = synthesizer.forehead
        self._rendered: dict[int, np.ndarray] = {0: first}

    def __getstate__(self) -> dict:
        # Sent to a photo worker (stages.common.parallel) without the generator: there, a further
        # draw is rendered by that process's own copy of the same one (shipped, or a run's).
        return {"crop": self.crop, "target": self.target, "seed": self.seed, "code_size": self.code_size,
                "folder": self.folder, "forehead": self.forehead, "_rendered": self._rendered}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.synthesizer = None

    @property
    def draws(self) -> tuple[RenderDraw, ...]:
        return render_draws(self.code_size)

    def __len__(self) -> int:
        return len(self.draws)

    def view_name(self, index: int) -> str:
        return self.draws[index].view.name

    def code_seed(self, index: int) -> int | None:
        """The seed of the identity code draw ``index`` used (None: no codes)."""
        return None if self.seed is None else code_seed(self.seed, self.draws[index].code)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index not in self._rendered:
            if self.synthesizer is None:
                self.synthesizer = cached_synthesizer(self.folder)
            seed = self.code_seed(index)
            codes = None if seed is None else identity_codes([seed], self.code_size)
            self._rendered[index] = self.synthesizer.render(self.crop[None], self.target[None], 1,
                                                            self.draws[index].view, codes)[0]
        return self._rendered[index]


def load_synthesizer(folder: str | None = None, device: str | None = None) -> Synthesizer:
    """The generator of a training run's ``model/`` folder, or (``None``) the shipped one,
    verified against ``models/manifest.json``."""
    weights, config_file = run_or_installed(
        folder, {"generator": "generator.pt", "generator_config": "generator.json"},
        "the model/ folder of an `anonymousnet train generator` run",
        "no Stage III generator is installed: train one with `anonymousnet train generator --install`, "
        "or choose obfuscation method blur, pixelate or mask in the policy")
    description = json.loads(config_file.read_text())
    try:
        generator = load_generator(description["config"])
        generator.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    except (KeyError, TypeError, RuntimeError) as error:
        raise ModelFileError(f"the generator in {weights.parent} cannot be loaded ({error}); retrain it with "
                             "`anonymousnet train generator --install` or restore models/ from git") from error
    return Synthesizer(generator, tuple(description["attributes"]), device, folder)


@lru_cache(maxsize=2)
def cached_synthesizer(folder: str | None = None) -> Synthesizer:
    """One loaded generator per process (release workers, evaluation workers)."""
    return load_synthesizer(folder)
