"""``anonymousnet train perturbation``: Stage IV's universal adversarial perturbation.

align CelebA with our own aligner (Stage I's cache) -> the same identity-disjoint split ->
a profiler that reads the chosen attributes (default Male, Young) off an aligned crop: the
shipped Stage I CNN's own head, white-box -> the universal perturbation (DeepFool-based,
``stages.perturbation.universal``) on training faces -> measured on the test people's faces (never
used to compute it): white-box fooling rate, transfer to Stage I as the release runs it
(the CNN's features through the 40 random forests) and to an unseen profiler when one is
given, PSNR cost, and how often the attributes it must keep (``keep``: by default what the
default policy preserves; every DeepFool step is made orthogonal to their gradients) change
-> ``perturbation.npz`` + ``perturbation.json`` in the run folder, and with
``--install`` into ``models/`` (sha256 in the manifest).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from prefect import flow, get_run_logger

from flows.training.attributes import align_task, device_for_training, split_rows
from flows.training.identity import stage_one_cache
from flows.version import code_version
from models.attributes import AttributeNet, normalise_unit_images
from models.registry import install_repo_model, sha256_of_file, verified_path
from stages.attributes.names import ATTRIBUTES
from stages.attributes.predict import default_model
from stages.attributes.training import CnnSettings, downscale, train_cnn
from stages.common.quality import psnr
from stages.perturbation.universal import fooling_rate, universal_perturbation
from stages.synthesis.render import template_mask

PERTURBATION_FILE = "perturbation.npz"
CONFIG_FILE = "perturbation.json"


def default_release_targets(crops: np.ndarray) -> np.ndarray:
    """Stage I -> Stage II targets (N×40) of aligned crops under the default policy."""
    from policy.loader import load_policy
    from policy.settings import plan_selection
    from stages.selection.ppas import stage_two_targets

    return stage_two_targets(crops, plan_selection(load_policy().policy))


def render_as_released(crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Aligned crops as a release with the default policy publishes them before Stage IV:
    Stage I -> Stage II targets -> Stage III's first rendering."""
    from stages.synthesis.render import cached_synthesizer

    return cached_synthesizer().render(crops, default_release_targets(crops), batch_size)


def attribute_profiler(net: AttributeNet, attributes: list[str]):
    """Logits of ``attributes`` from an attribute CNN, as a differentiable function of N×3×S×S
    aligned crops in [0, 1] (Stage I's own pooling to 64 px and normalisation)."""
    columns = [ATTRIBUTES.index(name) for name in attributes]
    net = net.eval()

    def logits(images: torch.Tensor) -> torch.Tensor:
        return net(normalise_unit_images(images))[:, columns]

    return logits


def to_unit_images(crops: np.ndarray) -> torch.Tensor:
    """N×S×S×3 uint8 -> N×3×S×S float in [0, 1]."""
    return torch.as_tensor(crops).permute(0, 3, 1, 2).float().div_(255.0)


def to_crops(images: torch.Tensor) -> np.ndarray:
    """The inverse of :func:`to_unit_images`, rounded to uint8 as a released file would be."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def stage_one_forest_fooling(crops: np.ndarray, perturbed: np.ndarray, attributes: list[str]) -> dict:
    """Transfer to Stage I as a release runs it (CNN features -> random forests): how often
    its 0.5-thresholded verdict on ``attributes`` changes."""
    model = default_model()
    columns = [ATTRIBUTES.index(name) for name in attributes]
    before = model.predict(crops)[:, columns] >= 0.5
    after = model.predict(perturbed)[:, columns] >= 0.5
    flips = before != after
    return {"fooling_rate": float(flips.any(axis=1).mean()), "per_attribute": flips.mean(axis=0).tolist(),
            "images": int(len(crops))}


def default_keep() -> tuple[str, ...]:
    """The attributes the default policy preserves (what a release must not change)."""
    from policy.loader import load_policy

    return tuple(load_policy().policy.attributes.preserve)


def check_attribute_lists(attributes: tuple[str, ...], keep: tuple[str, ...]) -> None:
    """Refuse attribute names CelebA does not have, and an attribute both attacked and kept."""
    unknown = [name for name in (*attributes, *keep) if name not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; use CelebA names such as Male, Young")
    if set(keep) & set(attributes):
        raise ValueError(f"{sorted(set(keep) & set(attributes))} both attacked and kept; remove them from one list")


@flow(name="train-perturbation")
def train_perturbation(images: str, labels: str, run_dir: str = ".data/train-perturbation/default",
                       attributes: tuple[str, ...] = ("Male", "Young"), xi: float = 8 / 255, norm: str = "inf",
                       delta: float = 0.2, max_passes: int = 10, train_faces: int = 2000, batch_size: int = 64,
                       seed: int = 0, limit: int | None = None, unseen_epochs: int = 8, synthesized: bool = False,
                       inside_mask: bool = False, keep: tuple[str, ...] | None = None, install: bool = False,
                       workers: int = 2, progress: bool = True, jnd_percentile: float | None = None) -> dict:
    """``jnd_percentile``: bound each pixel by that percentile of the training faces' JND
    there (and by ``xi``), so that the pattern stays below the threshold of visibility
    (``stages.perturbation.visibility``); None: ``xi`` everywhere."""
    logger = get_run_logger()
    keep = default_keep() if keep is None else tuple(keep)
    check_attribute_lists(attributes, keep)
    started = time.perf_counter()
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    aligned = align_task(images, labels, str(stage_one_cache(run_dir)), limit, workers, progress)
    data = split_rows(labels, aligned, 0, limit)          # Stage I's split (seed 0): test people are unseen
    with np.load(aligned) as stored:
        crops = stored["crops"]
    rng = np.random.default_rng(seed)
    train_split = data["splits"]["train"]
    chosen = np.sort(rng.choice(train_split, min(train_faces, len(train_split)), replace=False))
    test = data["splits"]["test"]
    if synthesized:
        # What the release perturbs: each face as Stage III renders it with its Stage II targets.
        logger.info("rendering %d training and %d test faces with the shipped generator", len(chosen), len(test))
        crops = crops.copy()
        for indices in (chosen, test):
            crops[indices] = render_as_released(crops[indices])
    support = template_mask(crops.shape[1])[0] if inside_mask else None
    profiler = attribute_profiler(default_model().net, list(attributes))
    kept = attribute_profiler(default_model().net, list(keep)) if keep else None
    logger.info("universal perturbation against Stage I's CNN (%s; keeping %s) on %d training faces, xi %.4f (l%s)",
                ", ".join(attributes), ", ".join(keep) or "nothing", len(chosen), xi, norm)
    radius = xi if jnd_percentile is None else jnd_radius(crops[chosen], jnd_percentile, xi)
    compute_started = time.perf_counter()
    result = universal_perturbation(profiler, to_unit_images(crops[chosen]), radius=radius, norm=norm, delta=delta,
                                    max_passes=max_passes, batch_size=batch_size, support=support, seed=seed,
                                    keep=kept, progress=progress)
    compute_seconds = time.perf_counter() - compute_started
    test_images = to_unit_images(crops[test])
    metrics, as_released = _test_metrics(profiler, kept, crops[test], result.perturbation, attributes, keep)
    if unseen_epochs:
        unseen = unseen_profiler_net(crops, data, run / "unseen-profiler", unseen_epochs, seed + 1, progress)
        metrics["unseen_profiler"] = fooling_rate(attribute_profiler(unseen, list(attributes)), test_images,
                                                  as_released)
    perturbation = result.perturbation.numpy().astype(np.float32)
    np.savez(run / PERTURBATION_FILE, perturbation=perturbation)
    summary = {
        "code_version": code_version(), "seed": seed, "attributes": list(attributes), "keep": list(keep),
        "xi": xi, "norm": norm, "jnd_percentile": jnd_percentile,
        "faces": "synthesized by Stage III" if synthesized else "original", "inside_mask": inside_mask,
        "delta": delta, "passes": result.passes, "history": result.history, "train_faces": int(len(chosen)),
        "train_fooling_rate": result.fooling_rate, "test_faces": int(len(test)), "test": metrics,
        "compute_seconds": round(compute_seconds, 1), "torch_threads": torch.get_num_threads(),
        "white_box_model_sha256": sha256_of_file(verified_path("attributes_cnn")),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (run / CONFIG_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    logger.info("fooling rate on %d unseen test faces: %.3f white-box, %.3f Stage I forests; PSNR %.1f dB; "
                "visible share (median) %.3f; kept attributes changed (Stage I forests): %s", len(test),
                metrics["white_box"]["fooling_rate"], metrics["stage_one_forests"]["fooling_rate"],
                metrics["psnr_db"], metrics["visible_share_median"],
                metrics.get("kept_stage_one_forests", {}).get("per_attribute"))
    if install:
        summary["installed"] = {
            name: install_repo_model(name, run / file, what)
            for name, file, what in (("perturbation", PERTURBATION_FILE, "Stage IV universal perturbation (npz)"),
                                     ("perturbation_config", CONFIG_FILE, "its settings and measured fooling rates"))}
    return summary


def jnd_radius(crops: np.ndarray, percentile: float, xi: float) -> torch.Tensor:
    """1×S×S per-pixel ℓ∞ bound in [0, 1] units: the training faces' ``percentile``-th JND
    at each pixel, at most ``xi``."""
    from stages.perturbation.visibility import jnd_bound

    return torch.as_tensor(np.minimum(jnd_bound(crops, percentile) / 255.0, xi), dtype=torch.float32)[None]


def _test_metrics(profiler, kept, crops: np.ndarray, perturbation: torch.Tensor, attributes: tuple[str, ...],
                  keep: tuple[str, ...]) -> tuple[dict, torch.Tensor]:
    """Fooling rates, PSNR and visibility on the unseen test faces, measured on what a
    released file holds (the perturbed crop rounded to uint8); with that rounded perturbation."""
    from stages.perturbation.visibility import visible_share
    from stages.synthesis.render import template_mask

    test_images = to_unit_images(crops)
    perturbed = to_crops(test_images + perturbation)
    as_released = to_unit_images(perturbed) - test_images
    support = template_mask(crops.shape[1])[0, 0].numpy()
    shares = [visible_share(a, b, support) for a, b in zip(crops, perturbed)]
    metrics = {
        "white_box": fooling_rate(profiler, test_images, as_released),
        "stage_one_forests": stage_one_forest_fooling(crops, perturbed, list(attributes)),
        "psnr_db": float(np.median([psnr(a, b) for a, b in zip(crops, perturbed)])),
        "visible_share_median": float(np.median(shares)), "visible_share_p90": float(np.percentile(shares, 90)),
    }
    if keep:
        # How often what must be kept changes: the white-box CNN head and Stage I's forests.
        metrics["kept_white_box"] = fooling_rate(kept, test_images, as_released)
        metrics["kept_stage_one_forests"] = stage_one_forest_fooling(crops, perturbed, list(keep))
    return metrics, as_released


# The unseen profiler: another architecture (wider early, narrower late, a smaller feature
# layer) and another seed than Stage I's CNN, trained on the same training people only.
UNSEEN_SETTINGS = dict(channels=(32, 64, 96, 128), convs=(2, 1, 2, 1), feature_size=128)


def unseen_profiler_net(crops: np.ndarray, data: dict, folder: Path, epochs: int, seed: int,
                        progress: bool) -> AttributeNet:
    """An attribute CNN the perturbation never saw, trained once and kept in ``folder``."""
    weights, config_file = folder / "attributes_cnn.pt", folder / "attributes.json"
    if weights.is_file() and config_file.is_file():
        net = AttributeNet(**json.loads(config_file.read_text())["net"])
        net.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
        return net.eval()
    folder.mkdir(parents=True, exist_ok=True)
    settings = CnnSettings(epochs=epochs, **UNSEEN_SETTINGS)
    net, history = train_cnn(downscale(crops), data["labels"], data["splits"]["train"], data["splits"]["validation"],
                             settings, folder / "cnn_checkpoint.pt", seed=seed, device=device_for_training(),
                             progress=progress)
    torch.save({key: value.detach().cpu() for key, value in net.state_dict().items()}, weights)
    config_file.write_text(json.dumps({"net": net.config, "seed": seed, "epochs": epochs,
                                       "validation": history[-1] if history else None}, indent=1) + "\n")
    return net.eval()
