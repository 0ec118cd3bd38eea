"""``anonymousnet train generator``: the Stage III training flow.

align CelebA with our own aligner (Stage I's cache) -> the same identity-disjoint split ->
StarGAN-style generator and critic on the training people's crops at 64 px, with PP-GAN's
verification (against the identity model distilled from dlib) and SSIM terms -> checkpoint
every ``checkpoint_every`` steps (resumable), ``losses.jsonl`` and ``samples.png`` (CelebA
faces: never committed) in the run folder -> ``generator.pt`` + ``generator.json``, and with
``--install`` into ``models/``. GPU when present, CPU otherwise.

``InpainterSettings`` train v2 instead (``stages/synthesis/inpainter.py``): the inpainting
U-Net at the crop's own 128 px with an identity code per face; its config says
``"kind": "inpainting"``, so the release loads whichever the folder holds.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from prefect import flow, get_run_logger

from flows.training.attributes import align_task, device_for_training, split_rows
from flows.training.identity import stage_one_cache
from flows.version import code_version
from models.generator import to_gan_input
from models.identity_embedding import IdentityNet
from models.registry import install_repo_model, sha256_of_file, verified_path
from stages.attributes.names import ATTRIBUTES
from stages.synthesis.inpainter import InpainterSettings, train_inpainter
from stages.synthesis.training import GAN_ATTRIBUTES, GanSettings, train_gan

MODEL_FILE = "generator.pt"
CONFIG_FILE = "generator.json"


def identity_model_files(path: str | None = None) -> tuple[Path, Path]:
    """(weights, config) of the distilled identity model: ``path`` (a run's ``model/``
    folder) or the shipped one (verified against the manifest)."""
    if path:
        folder = Path(path)
        return folder / "identity_embedding.pt", folder / "identity_embedding.json"
    return verified_path("identity_embedding"), verified_path("identity_embedding_config")


def load_identity_model(path: str | None = None) -> IdentityNet:
    """The distilled identity model the verification term trains against."""
    weights, config_file = identity_model_files(path)
    config = json.loads(config_file.read_text())["config"]
    net = IdentityNet(tuple(config["channels"]), config["hidden"])
    net.load_state_dict(torch.load(weights, weights_only=True))
    return net.eval()


@flow(name="train-generator")
def train_generator(images: str, labels: str, run_dir: str = ".data/train-generator/default",
                    settings: GanSettings | InpainterSettings | None = None, seed: int = 0, limit: int | None = None,
                    identity: str | None = None, install: bool = False, workers: int = 2,
                    progress: bool = True, start_from: str | None = None) -> dict:
    logger = get_run_logger()
    settings = settings or GanSettings()
    started = time.perf_counter()
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    aligned = align_task(images, labels, str(stage_one_cache(run_dir)), limit, workers, progress)
    data = split_rows(labels, aligned, seed, limit)
    with np.load(aligned) as stored:
        crops = stored["crops"]
    columns = [ATTRIBUTES.index(name) for name in GAN_ATTRIBUTES]
    train, validation = data["splits"]["train"], data["splits"]["validation"]
    labels_train = torch.as_tensor(data["labels"][train][:, columns], dtype=torch.float32)

    def preview_labels(rows):
        return torch.as_tensor(data["labels"][rows][:, columns], dtype=torch.float32)

    device = device_for_training()
    logger.info("training the generator (%s) on %d faces (%s), %d steps, batch %d", type(settings).__name__,
                len(train), device, settings.steps, settings.batch_size)
    if isinstance(settings, InpainterSettings):
        # v2 at the crop's own resolution; crops stay uint8 until a batch is drawn.
        # 48 faces: the first 6 make the sample grid, all of them the bar measures.
        preview = (to_gan_input(crops[validation[:48]], size=None), preview_labels(validation[:48]))
        # One face each of the first 150 validation people: the verifier-same share at each
        # checkpoint (the diversity measure, ~10 s).
        firsts = validation[np.unique(data["identities"][validation], return_index=True)[1]]
        people = np.sort(firsts)[:150]
        generator = train_inpainter(torch.as_tensor(crops[train]), labels_train, load_identity_model(identity),
                                    settings, run, seed=seed, device=device, progress=progress, preview=preview,
                                    start_from=Path(start_from) if start_from else None,
                                    people=(to_gan_input(crops[people], size=None), preview_labels(people)))
    else:
        preview = (to_gan_input(crops[validation[:6]]), preview_labels(validation[:6]))
        generator = train_gan(to_gan_input(crops[train]), labels_train, load_identity_model(identity), settings,
                              run, seed=seed, device=device, progress=progress, preview=preview)
    model_dir = run / "model"
    model_dir.mkdir(exist_ok=True)
    torch.save({k: v.cpu() for k, v in generator.state_dict().items()}, model_dir / MODEL_FILE)
    summary = {"code_version": code_version(), "seed": seed, "device": device, "settings": asdict(settings),
               "attributes": list(GAN_ATTRIBUTES), "train_faces": len(train),
               # Which identity model the verification term pushed away from (reproducibility).
               "identity_model_sha256": sha256_of_file(identity_model_files(identity)[0]),
               "seconds_this_run": round(time.perf_counter() - started, 1)}
    (model_dir / CONFIG_FILE).write_text(json.dumps({"config": generator.config} | summary, indent=1) + "\n")
    if install:
        summary["installed"] = {
            name: install_repo_model(name, model_dir / file, what)
            for name, file, what in (("generator", MODEL_FILE, "Stage III generator (torch state dict)"),
                                     ("generator_config", CONFIG_FILE, "its configuration and training run"))}
    return summary

