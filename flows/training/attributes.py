"""``anonymousnet train attributes``: the Stage I training flow.

align CelebA with our own aligner (cached) -> identity-disjoint split -> CNN (sigmoid
cross-entropy, checkpoint every epoch) -> penultimate features -> 40 forests -> Platt
calibration on validation -> metrics on test (forests and the CNN's own head, beside the
majority baseline) -> checkpoint in the run folder, and with ``--install`` in ``models/``
with its sha256 in the manifest.

Everything lands in the run folder, so running the same command again resumes: the aligned
crops are cached and the CNN continues from its last finished epoch; the forests (minutes)
are refit.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.version import code_version
from models import attributes as attribute_files
from models.registry import install_repo_model, load_manifest
from stages.attributes.data import (
    ATTRIBUTES,
    SPLITS,
    build_aligned_dataset,
    population_statistics,
    read_labels,
    split_of_identity,
)
from stages.attributes.training import (
    CnnSettings,
    ForestSettings,
    assemble_model,
    attribute_metrics,
    downscale,
    fit_calibration,
    fit_forests,
    head_probabilities,
    penultimate_features,
    train_cnn,
)

POPULATION_FILE = "attribute_population.json"
COMBINATIONS_FILE = "attribute_combinations.npz"


def aligned_cache(run_dir: str | Path) -> Path:
    """Where the aligned CelebA crops are cached: ``<runs>/aligned-cache`` beside the run
    folders of this flow (``.data/train-attributes/aligned-cache`` by default)."""
    return Path(run_dir).parent / "aligned-cache"


def device_for_training() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@task(name="align-celeba", cache_policy=NO_CACHE)
def align_task(images: str, labels: str, cache_dir: str, limit: int | None, workers: int, progress: bool) -> str:
    rows = read_labels(Path(labels))[:limit]
    template_sha = load_manifest()["face_template_68"]["sha256"]
    return str(build_aligned_dataset(Path(images), rows, Path(cache_dir), template_sha,
                                     workers=workers, progress=progress))


def split_rows(labels: str, aligned: str, seed: int, limit: int | None) -> dict:
    """Index arrays of each split over the aligned images that have a face, plus the misses."""
    rows = read_labels(Path(labels))[:limit]
    with np.load(aligned) as stored:
        found_by = stored["found_by"].tolist()
    if [r.image_id for r in rows] != np.load(aligned)["image_ids"].tolist():
        raise ValueError(f"{aligned} does not match {labels}; delete it to re-align")
    assignments = np.array([split_of_identity(row.identity, seed) for row in rows])
    usable = np.array([how not in ("missed",) and not how.startswith("rejected") for how in found_by])
    return {
        "labels": np.stack([row.labels for row in rows]),
        "identities": np.array([row.identity for row in rows]),
        "image_ids": [row.image_id for row in rows],
        "splits": {name: np.flatnonzero((assignments == name) & usable) for name in SPLITS},
        "missed": [row.image_id for row, ok in zip(rows, usable) if not ok],
        "found_by": found_by,
    }


@task(name="train-cnn", cache_policy=NO_CACHE)
def train_cnn_task(aligned: str, data: dict, settings: CnnSettings, run_dir: str, seed: int, progress: bool):
    with np.load(aligned) as stored:
        images64 = downscale(stored["crops"])
    net, history = train_cnn(images64, data["labels"], data["splits"]["train"], data["splits"]["validation"],
                             settings, Path(run_dir) / "cnn_checkpoint.pt", seed=seed,
                             device=device_for_training(), progress=progress)
    features = {name: penultimate_features(net, images64[index]) for name, index in data["splits"].items()}
    heads = {name: head_probabilities(net, images64[index]) for name, index in data["splits"].items()}
    return net, history, features, heads


@task(name="fit-forests", cache_policy=NO_CACHE)
def forests_task(features: dict, data: dict, settings: ForestSettings, seed: int, progress: bool):
    train, validation = data["splits"]["train"], data["splits"]["validation"]
    forests = fit_forests(features["train"], data["labels"][train], settings, seed=seed, progress=progress)
    raw_validation = np.stack([f.predict_proba(features["validation"])[:, 1] for f in forests], axis=1)
    return forests, fit_calibration(raw_validation, data["labels"][validation])


@flow(name="train-attributes")
def train_attributes(images: str, labels: str, annotations: str, run_dir: str = ".data/train-attributes/default",
                     epochs: int = 30, seed: int = 0, limit: int | None = None, trees: int = 40,
                     max_leaf_nodes: int = 64,
                     channels: tuple[int, ...] = CnnSettings.channels, install: bool = False, workers: int = 2,
                     progress: bool = True) -> dict:
    """Train Stage I and write the checkpoint, ``metrics.json`` and ``attributes_table.md``
    into ``run_dir``; with ``install`` also into ``models/`` (updating the manifest)."""
    logger = get_run_logger()
    started = time.perf_counter()
    torch.manual_seed(seed)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    aligned = align_task(images, labels, str(aligned_cache(run_dir)), limit, workers, progress)
    data = split_rows(labels, aligned, seed, limit)
    sizes = {name: len(index) for name, index in data["splits"].items()}
    overlap = _identity_overlap(data)
    if overlap:
        raise RuntimeError(f"identity split leaks {len(overlap)} identities across splits")
    logger.info("split by identity: %s; %d images without a detected face", sizes, len(data["missed"]))
    cnn_settings = CnnSettings(epochs=epochs, channels=tuple(channels))
    forest_settings = ForestSettings(trees=trees, max_leaf_nodes=max_leaf_nodes)
    net, history, features, heads = train_cnn_task(aligned, data, cnn_settings, run_dir, seed, progress)
    forests, calibration = forests_task(features, data, forest_settings, seed, progress)
    train_prevalence = data["labels"][data["splits"]["train"]].mean(axis=0)
    test = data["splits"]["test"]
    model = assemble_model(net, forests, calibration, {"attributes": list(ATTRIBUTES)})
    forest_test = model.forest_probabilities(features["test"])
    metrics = {
        "forests": attribute_metrics(forest_test, data["labels"][test], train_prevalence, ATTRIBUTES),
        "cnn_head": attribute_metrics(heads["test"], data["labels"][test], train_prevalence, ATTRIBUTES),
    }
    summary = {
        "code_version": code_version(), "seed": seed, "device": device_for_training(),
        "split_sizes": sizes, "split_seed": seed, "identities_per_split": {
            name: len(np.unique(data["identities"][index])) for name, index in data["splits"].items()},
        "alignment": {"images": len(data["image_ids"]), "missed": len(data["missed"]),
                      "missed_images": data["missed"],
                      "found_by": {how: data["found_by"].count(how) for how in sorted(set(data["found_by"]))}},
        "cnn": asdict(cnn_settings), "forests": asdict(forest_settings), "history": history,
        "test": {"forests": _headline(metrics["forests"]), "cnn_head": _headline(metrics["cnn_head"])},
        "seconds": round(time.perf_counter() - started, 1),
    }
    model.config.update({"training": {k: summary[k] for k in ("code_version", "seed", "split_sizes", "test")}})
    model_dir = run / "model"
    attribute_files.save_model(model, model_dir)
    population = population_statistics(Path(annotations))
    _write_population(population, model_dir)
    (run / "metrics.json").write_text(json.dumps(summary | {"per_attribute": metrics}, indent=1) + "\n")
    (run / "attributes_table.md").write_text(attribute_table(metrics) + "\n")
    if install:
        summary["installed"] = install_model(model_dir)
    logger.info("test mean accuracy: forests %.4f, CNN head %.4f (majority baseline %.4f)",
                metrics["forests"]["mean_accuracy"], metrics["cnn_head"]["mean_accuracy"],
                metrics["forests"]["mean_majority_baseline"])
    return summary


def _identity_overlap(data: dict) -> set:
    people = {name: set(data["identities"][index].tolist()) for name, index in data["splits"].items()}
    return (people["train"] & people["validation"]) | (people["train"] & people["test"]) | \
        (people["validation"] & people["test"])


def _headline(metrics: dict) -> dict:
    return {k: round(v, 5) for k, v in metrics.items() if k.startswith("mean_")} | {"faces": metrics["faces"]}


def _write_population(population: dict, directory: Path) -> None:
    combinations = population.pop("combinations")
    (directory / POPULATION_FILE).write_text(json.dumps(population) + "\n")
    np.savez_compressed(directory / COMBINATIONS_FILE, codes=np.array(combinations["codes"], dtype=np.uint64),
                        counts=np.array(combinations["counts"], dtype=np.uint32))


# Manifest names of the installed files, with what each one is.
INSTALLED_FILES = {
    "attributes_cnn": (attribute_files.CNN_FILE, "Stage I CNN weights (torch state dict)"),
    "attributes_forests": (attribute_files.FORESTS_FILE, "Stage I: 40 random forests (plain arrays, no pickle)"),
    "attributes_config": (attribute_files.CONFIG_FILE, "Stage I configuration, calibration and test metrics"),
    "attribute_population": (POPULATION_FILE, "CelebA attribute prevalences and joint frequencies"),
    "attribute_combinations": (COMBINATIONS_FILE, "CelebA attribute combinations and their counts"),
}


def install_model(model_dir: Path) -> dict[str, str]:
    """Copy a trained checkpoint into ``models/`` and record each file's sha256."""
    return {name: install_repo_model(name, model_dir / file, description + "; retrain with `anonymousnet train "
                                                                           "attributes`")
            for name, (file, description) in INSTALLED_FILES.items()}


def attribute_table(metrics: dict) -> str:
    """Markdown table: per attribute, forests and CNN head accuracy, balanced accuracy, and
    the majority baseline, with the means in the last row."""
    forests, head = metrics["forests"], metrics["cnn_head"]
    header = ("| attribute | test prevalence | majority baseline | forests acc | forests bal. acc | "
              "CNN head acc | CNN head bal. acc |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for f, h in zip(forests["per_attribute"], head["per_attribute"]):
        lines.append(f"| {f['attribute']} | {f['test_prevalence']:.3f} | {f['majority_baseline']:.1%} | "
                     f"{f['accuracy']:.1%} | {f['balanced_accuracy']:.1%} | {h['accuracy']:.1%} | "
                     f"{h['balanced_accuracy']:.1%} |")
    lines.append(f"| **mean** ({forests['faces']} test faces) | | **{forests['mean_majority_baseline']:.1%}** | "
                 f"**{forests['mean_accuracy']:.1%}** | **{forests['mean_balanced_accuracy']:.1%}** | "
                 f"**{head['mean_accuracy']:.1%}** | **{head['mean_balanced_accuracy']:.1%}** |")
    return "\n".join(lines)
