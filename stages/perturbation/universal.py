"""Stage IV: DeepFool and the universal adversarial perturbation (UAP) built from it.

The attacker modelled here is a *profiler*: a classifier that reads chosen attributes
(gender, age, ...) off a released face. Its verdict on a face is the vector of those
attributes, each a binary decision ``logit > 0``; it is *fooled* on a face when that vector
changes, i.e. when at least one attribute it wants flips (the multi-label reading of
Moosavi-Dezfooli et al.'s "k(x + v) != k(x)"). Per-attribute flip rates are reported too,
because a universal perturbation tends to push every face the same way: a gender
classifier can be flipped for one gender far more easily than for both.

Everything works on batches of images in [0, 1] (N×3×H×W); ``classifier`` maps such a
batch to N×K logits of the profiler's K attributes, differentiably.

* :func:`deepfool` (Moosavi-Dezfooli et al. 2016) finds, per image, a small perturbation
  that crosses the nearest of the K decision boundaries, by linearising the classifier and
  stepping to that boundary until one attribute flips (ℓ2 or ℓ∞ geometry).
* :func:`universal_perturbation` (Moosavi-Dezfooli et al. 2017) passes over training
  images, runs DeepFool on ``x + v`` where the verdict has not yet changed, adds the result
  to ``v`` and projects ``v`` back onto the ℓ∞ (or ℓ2) ball of radius ξ, until the fooling
  rate reaches 1 − δ or the passes run out.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

Classifier = Callable[[torch.Tensor], torch.Tensor]
NORMS = ("inf", "2")


def _dual_norm(gradients: torch.Tensor, norm: str) -> torch.Tensor:
    """‖g‖ in the dual of the attack norm, per row of N×D: ℓ1 for ℓ∞, ℓ2 for ℓ2."""
    return gradients.abs().sum(dim=1) if norm == "inf" else gradients.norm(dim=1)


def _step_direction(gradients: torch.Tensor, norm: str) -> torch.Tensor:
    """Direction of steepest increase of w·r per unit of the attack norm (ℓ∞: sign(w),
    ℓ2: w / ‖w‖₂)."""
    if norm == "inf":
        return gradients.sign()
    return gradients / gradients.norm(dim=1, keepdim=True).clamp_min(1e-12)


def verdict(classifier: Classifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The profiler's binary verdict (N×K bool) on ``images``, in batches, without gradients."""
    with torch.no_grad():
        return torch.cat([classifier(images[start:start + batch_size]) > 0
                          for start in range(0, max(len(images), 1), batch_size)])


def _without_components_along(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``vectors`` (N×K×D) minus their orthogonal projection onto the span of ``basis``
    (N×J×D), per image."""
    q, _ = torch.linalg.qr(basis.transpose(1, 2))                   # N×D×J, orthonormal columns
    return vectors - torch.einsum("ndj,nkj->nkd", q, torch.einsum("ndj,nkd->nkj", q, vectors))


def deepfool(classifier: Classifier, images: torch.Tensor, norm: str = "inf", overshoot: float = 0.02,
             max_iterations: int = 50, keep: Classifier | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepFool for a K-attribute binary profiler: per image, the perturbation ``r`` (same
    shape as ``images``) that makes at least one attribute's decision flip, and whether it
    did within ``max_iterations`` (N bool).

    Each attribute k's boundary is ``f_k(x) = 0``. Linearised at the current point, it lies
    ``|f_k| / ‖∇f_k‖_*`` away (dual norm); the step goes to the nearest boundary, and the
    accumulated perturbation is scaled by ``1 + overshoot`` so the point lands past it. The
    clean verdict is kept fixed, so "flipped" always means "differs from the original".

    ``keep`` (a second classifier, J logits) names decisions the perturbation must leave
    alone (the attributes a release preserves): each gradient is first stripped of its
    components along the J gradients of ``keep`` at the same point, so every step moves
    along directions that, to first order, change none of those logits (ℓ2 steps only: the
    sign of a projected gradient is no longer orthogonal to them)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if keep is not None and norm != "2":
        raise ValueError("keep needs l2 steps (norm '2')")
    images = images.detach()
    count = len(images)
    flat = images[0].numel() if count else 0
    with torch.no_grad():
        original = classifier(images) > 0
    total = torch.zeros_like(images)
    flipped = torch.zeros(count, dtype=torch.bool, device=images.device)
    for _ in range(max_iterations):
        active = (~flipped).nonzero().flatten()
        if len(active) == 0:
            break
        point = (images[active] + (1 + overshoot) * total[active]).requires_grad_(True)
        logits = classifier(point)
        now = logits > 0
        changed = (now != original[active]).any(dim=1)
        flipped[active[changed]] = True
        still = ~changed
        if not still.any():
            break
        gradients = _logit_gradients(logits, point, flat)
        if keep is not None:
            held = _logit_gradients(keep(point), point, flat)
            gradients = _without_components_along(gradients, held)
        logits, gradients = logits.detach()[still], gradients[still]
        # Distance to each boundary under the linearisation; pick the nearest.
        distances = logits.abs() / _dual_norm(gradients.reshape(-1, flat), norm).reshape(logits.shape).clamp_min(1e-12)
        nearest = distances.argmin(dim=1)
        rows = torch.arange(len(nearest), device=images.device)
        w = gradients[rows, nearest]                       # N'×D gradient of the chosen logit
        size = distances[rows, nearest] + 1e-4             # just past the boundary
        towards = -logits[rows, nearest].sign()            # move the logit towards zero and beyond
        step = (size * towards)[:, None] * _step_direction(w, norm)
        indices = active[still]
        total[indices] += step.reshape((-1, *images.shape[1:]))
    return ((1 + overshoot) * total).detach(), flipped


def _logit_gradients(logits: torch.Tensor, point: torch.Tensor, flat: int) -> torch.Tensor:
    """N×K×D: the gradient of each of the K logits for every image, one backward pass per
    logit (the images are independent, so d(sum_i f_k(x_i))/dx_i = df_k(x_i)/dx_i)."""
    return torch.stack([torch.autograd.grad(logits[:, k].sum(), point, retain_graph=True)[0].reshape(len(point), flat)
                        for k in range(logits.shape[1])], dim=1)


def project(perturbation: torch.Tensor, radius: float | torch.Tensor, norm: str) -> torch.Tensor:
    """``perturbation`` projected onto the ℓ∞ or ℓ2 ball of ``radius``; for ℓ∞ the radius may
    be a tensor broadcastable to the perturbation (a bound per pixel: a box)."""
    if norm == "inf":
        if isinstance(radius, torch.Tensor):
            return torch.maximum(torch.minimum(perturbation, radius), -radius)
        return perturbation.clamp(-radius, radius)
    if isinstance(radius, torch.Tensor):
        raise ValueError("a per-pixel radius needs the l-inf norm")
    length = perturbation.norm()
    return perturbation * min(1.0, radius / float(length)) if length > 0 else perturbation


def fooling_rate(classifier: Classifier, images: torch.Tensor, perturbation: torch.Tensor,
                 batch_size: int = 256) -> dict:
    """How often ``perturbation`` changes the profiler's verdict on ``images`` (pixel values
    kept in [0, 1]): overall (any attribute flipped) and per attribute."""
    clean = verdict(classifier, images, batch_size)
    attacked = verdict(classifier, (images + perturbation).clamp(0, 1), batch_size)
    flips = (clean != attacked)
    return {"fooling_rate": float(flips.any(dim=1).float().mean()) if len(images) else 0.0,
            "per_attribute": [float(rate) for rate in flips.float().mean(dim=0)] if len(images) else [],
            "images": int(len(images))}


@dataclass
class UapResult:
    perturbation: torch.Tensor            # 3×H×W, in pixel units of [0, 1] images: the best pass's
    fooling_rate: float                   # its fooling rate on the training images
    passes: int                           # passes run
    history: list[dict] = field(default_factory=list)   # per pass: fooling rate, ‖v‖∞, ‖v‖₂


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield order[start:start + batch_size]


def universal_perturbation(classifier: Classifier, images: torch.Tensor, radius: float | torch.Tensor,
                           norm: str = "inf",
                           delta: float = 0.2, max_passes: int = 10, batch_size: int = 64,
                           overshoot: float = 0.02, deepfool_iterations: int = 50, step_scale: float = 0.25,
                           step_norm: str = "2", support: torch.Tensor | None = None, seed: int = 0,
                           keep: Classifier | None = None, progress: bool = False) -> UapResult:
    """Moosavi-Dezfooli et al.'s universal perturbation, batched.

    A pass visits the training ``images`` in shuffled batches. For the images of a batch
    whose verdict ``v`` does not yet change, DeepFool (on ``x + v``) gives each a minimal
    extra perturbation; these are added to ``v`` one after the other, each followed by the
    projection onto the ball of ``radius`` (the paper's sequential update, with DeepFool
    evaluated once per batch rather than once per image, which is what makes it practical
    on a CPU). Each DeepFool step is scaled by ``step_scale`` before it is added: a full
    step for one face can undo what ``v`` does for the faces before it (a profiler's two
    genders pull in opposite directions), and damping it keeps ``v`` moving where most
    faces agree. The DeepFool steps are ℓ2 steps by default whatever the ball (``step_norm``),
    as in the paper's own implementation: an ℓ2 step weights each pixel by its gradient,
    so summing steps of many faces keeps the pixels they agree on, where sign (ℓ∞) steps
    would add every pixel's noise at full size. Stops when the fooling rate on the training
    images reaches ``1 - delta`` or after ``max_passes``, and returns the ``v`` of the pass with the highest rate (later
    passes, chasing the faces that are hardest to move, can lose more than they gain).
    ``support`` (broadcastable to one image, values in [0, 1]) confines ``v`` to where it may
    be applied, e.g. the face mask: every step is multiplied by it before it is added.
    ``keep``: decisions every DeepFool step is made orthogonal to (see :func:`deepfool`).
    ``radius`` may be a tensor (ℓ∞ only): a bound per pixel, e.g. what a face's texture hides."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    largest = float(radius.max()) if isinstance(radius, torch.Tensor) else radius
    if largest <= 0 or (isinstance(radius, torch.Tensor) and bool((radius < 0).any())):
        raise ValueError(f"radius (xi) must be positive, got {largest}")
    if not 0 < step_scale <= 1:
        raise ValueError(f"step_scale must be in (0, 1], got {step_scale}")
    generator = torch.Generator().manual_seed(seed)
    perturbation = torch.zeros_like(images[0])
    history, best_rate, best = [], -1.0, perturbation
    clean = verdict(classifier, images)
    passes = 0
    for passes in range(1, max_passes + 1):
        batches = list(_batches(len(images), batch_size, generator))
        for indices in tqdm(batches, desc=f"UAP pass {passes}", unit="batch", disable=not progress, leave=False):
            batch = images[indices]
            attacked = (batch + perturbation).clamp(0, 1)
            unchanged = (verdict(classifier, attacked) == clean[indices]).all(dim=1)
            if not unchanged.any():
                continue
            extra, _ = deepfool(classifier, attacked[unchanged], step_norm, overshoot, deepfool_iterations, keep)
            if support is not None:
                extra = extra * support
            for step in extra:
                perturbation = project(perturbation + step_scale * step, radius, norm)
        rate = fooling_rate(classifier, images, perturbation)["fooling_rate"]
        history.append({"pass": passes, "fooling_rate": rate, "linf": float(perturbation.abs().max()),
                        "l2": float(perturbation.norm())})
        if rate > best_rate:
            best_rate, best = rate, perturbation.clone()
        if rate >= 1 - delta:
            break
    return UapResult(best.detach(), best_rate, passes, history)
