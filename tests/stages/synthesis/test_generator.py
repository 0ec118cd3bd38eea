"""Stage III groundwork: the conditioned generator, the critic with its gradient penalty,
the differentiable SSIM, the identity model distilled from dlib, and resumable training."""
import json

import numpy as np
import pytest
import torch

from models.generator import (
    GAN_SIZE,
    Discriminator,
    Generator,
    gradient_penalty,
    to_gan_input,
)
from models.identity_embedding import IdentityNet
from stages.common import quality
from stages.common.faces import align_face, detect_faces, face_descriptor
from stages.synthesis.identity_distill import (
    StudentSettings,
    embed,
    pair_metrics,
    teacher_descriptors,
    train_student,
)
from stages.synthesis.training import (
    GAN_ATTRIBUTES,
    GanSettings,
    ssim,
    train_gan,
    verification_loss,
)


def test_generator_is_conditioned_on_its_targets():
    torch.manual_seed(0)
    generator = Generator(len(GAN_ATTRIBUTES), width=8, blocks=1)
    x = torch.rand(2, 3, GAN_SIZE, GAN_SIZE) * 2 - 1
    c = torch.zeros(2, len(GAN_ATTRIBUTES))
    out = generator(x, c)
    assert out.shape == x.shape and out.abs().max() <= 1
    assert not torch.allclose(out, generator(x, 1 - c))
    score, classes = Discriminator(len(GAN_ATTRIBUTES), width=8)(out)
    assert score.shape[0] == 2 and classes.shape == (2, len(GAN_ATTRIBUTES))


def test_gradient_penalty_is_zero_for_a_unit_gradient_critic():
    class UnitSlope(torch.nn.Module):  # D(x) = <w, x> with |w| = 1: gradient norm exactly 1
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3 * 8 * 8))
            with torch.no_grad():
                self.w /= self.w.norm()

        def forward(self, x):
            return (x.flatten(1) @ self.w)[:, None], None

    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    assert gradient_penalty(UnitSlope(), real, fake).item() == pytest.approx(0, abs=1e-6)
    critic = UnitSlope()
    with torch.no_grad():
        critic.w *= 3
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(4, rel=1e-4)   # (3 − 1)²


def test_differentiable_ssim_agrees_with_the_evaluation_ssim(astronaut):
    gray = astronaut.mean(axis=2).astype(np.uint8)[100:228, 150:278]
    noisy = np.clip(gray + np.random.default_rng(0).normal(0, 20, gray.shape), 0, 255).astype(np.uint8)
    expected = quality.ssim(np.stack([gray] * 3, -1), np.stack([noisy] * 3, -1))
    as_tensor = [torch.as_tensor(v, dtype=torch.float32)[None, None].repeat(1, 3, 1, 1) / 127.5 - 1
                 for v in (gray, noisy)]
    assert ssim(*as_tensor).item() == pytest.approx(expected, abs=0.02)
    assert ssim(as_tensor[0], as_tensor[0]).item() == pytest.approx(1.0, abs=1e-5)


def test_verification_loss_is_zero_beyond_the_margin():
    identity = torch.nn.Flatten()
    real = torch.zeros(2, 1, 2, 2)
    assert verification_loss(identity, real + 1.0, real, margin=0.9).item() == 0        # distance 2
    assert verification_loss(identity, real + 0.2, real, margin=0.9).item() == pytest.approx(0.25, abs=1e-6)


def test_teacher_descriptor_of_the_aligned_crop_tracks_the_photo(astronaut):
    """The distillation target (dlib on the aligned crop with the template's landmarks) is
    close to what the release gate computes on the photo."""
    face = min(detect_faces(astronaut), key=lambda f: f.box[1])
    crop = align_face(astronaut, face.landmarks).crop
    on_crop = teacher_descriptors(crop[None], workers=1, progress=False)[0]
    assert np.linalg.norm(on_crop - face_descriptor(astronaut, face.landmarks)) < 0.35


def test_student_learns_its_teacher_and_pair_metrics(tmp_path):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (48, 128, 128, 3), dtype=np.uint8)
    targets = rng.normal(0, 0.1, (48, 128)).astype(np.float32)
    settings = StudentSettings(epochs=2, batch_size=16, channels=(4, 8, 8, 8))
    net, history = train_student(crops, targets, np.arange(40), np.arange(40, 48), settings,
                                 tmp_path / "ckpt.pt", progress=False)
    assert [h["epoch"] for h in history] == [1, 2] and (tmp_path / "ckpt.pt").exists()
    # Interrupted after epoch 1: the next run trains epoch 2 only.
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["epoch"], state["history"] = 1, state["history"][:1]
    state["schedule"]["last_epoch"] = state["schedule"]["_step_count"] = 3    # 3 batches per epoch
    torch.save(state, tmp_path / "ckpt.pt")
    again, resumed = train_student(crops, targets, np.arange(40), np.arange(40, 48), settings,
                                   tmp_path / "ckpt.pt", progress=False)
    assert [h["epoch"] for h in resumed] == [1, 2] and resumed[0] == history[0]
    with pytest.raises(ValueError, match="belongs to a 2-epoch run"):
        train_student(crops, targets, np.arange(40), np.arange(40, 48),
                      StudentSettings(epochs=5, batch_size=16, channels=(4, 8, 8, 8)), tmp_path / "ckpt.pt",
                      progress=False)
    student = embed(again, to_gan_input(crops))
    identities = np.repeat(np.arange(24), 2)
    metrics = pair_metrics(targets, targets, identities)     # a perfect student
    assert metrics["same_person"]["agreement"] == 1.0 and metrics["same_person"]["pairs"] == 24
    assert metrics["distance_to_teacher_median"] == 0.0 and student.shape == (48, 128)


def test_gan_training_runs_logs_and_resumes(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(12, 3, GAN_SIZE, GAN_SIZE) * 2 - 1
    labels = (torch.rand(12, len(GAN_ATTRIBUTES)) > 0.5).float()
    identity = IdentityNet(channels=(4, 8, 8, 8), hidden=16)
    settings = GanSettings(steps=10, batch_size=4, width=8, blocks=1, checkpoint_every=5, log_every=2)
    train_gan(images, labels, identity, settings, tmp_path, progress=False, preview=(images[:2], labels[:2]))
    records = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 10 and {"g_ver", "g_ssim", "g_rec", "g_cls", "d_loss"} <= set(records[-1])
    assert all(np.isfinite(v) for r in records for v in r.values())
    assert (tmp_path / "samples.png").stat().st_size > 0
    state = torch.load(tmp_path / "gan_checkpoint.pt", weights_only=True)
    assert state["step"] == 10
    more = GanSettings(steps=12, batch_size=4, width=8, blocks=1, checkpoint_every=5)
    train_gan(images, labels, identity, more, tmp_path, progress=False)
    assert torch.load(tmp_path / "gan_checkpoint.pt", weights_only=True)["step"] == 12


@pytest.mark.shared_data
def test_identity_and_generator_flows_on_a_tiny_subset(shared_data, tmp_path, prefect_harness):
    """Both training flows run end to end on 60 CelebA images (aligned by our aligner) and
    leave loadable models; the generator trains against the identity model just distilled."""
    from flows.training.generator import (
        MODEL_FILE,
        load_identity_model,
        train_generator,
    )
    from flows.training.identity import train_identity
    from models.registry import sha256_of_file

    celeba = shared_data / "celeba"
    images, labels = str(celeba / "img_align_celeba_89x109"), str(celeba / "labels.csv")
    summary = train_identity(images=images, labels=labels, run_dir=str(tmp_path / "train-identity" / "tiny"),
                             epochs=2, limit=60, progress=False)
    assert sum(summary["split_sizes"].values()) > 50 and "distance_to_teacher_median" in summary["test"]
    identity_dir = tmp_path / "train-identity" / "tiny" / "model"
    assert load_identity_model(str(identity_dir))(torch.zeros(1, 3, GAN_SIZE, GAN_SIZE)).shape == (1, 128)
    settings = GanSettings(steps=10, batch_size=4, width=8, blocks=1, checkpoint_every=5, log_every=2)
    result = train_generator(images=images, labels=labels, run_dir=str(tmp_path / "train-generator" / "tiny"),
                             settings=settings, limit=60, identity=str(identity_dir), progress=False)
    weights = torch.load(tmp_path / "train-generator" / "tiny" / "model" / MODEL_FILE, weights_only=True)
    generator = Generator(len(GAN_ATTRIBUTES), width=8, blocks=1)
    generator.load_state_dict(weights)
    assert result["attributes"] == list(GAN_ATTRIBUTES)
    assert result["identity_model_sha256"] == sha256_of_file(identity_dir / "identity_embedding.pt")
    assert (tmp_path / "train-generator" / "tiny" / "samples.png").exists()
    # v2 through the same flow: the inpainting generator at the crop's resolution, loadable
    # by the release's synthesizer from the run's model/ folder.
    from stages.synthesis.inpainter import InpainterSettings
    from stages.synthesis.render import load_synthesizer

    v2 = InpainterSettings(steps=2, batch_size=2, width=4, blocks=1, critic_width=4, code_size=8, checkpoint_every=2)
    run = tmp_path / "train-generator" / "tiny-v2"
    train_generator(images=images, labels=labels, run_dir=str(run), settings=v2, limit=60,
                    identity=str(identity_dir), progress=False)
    synthesizer = load_synthesizer(str(run / "model"))
    assert synthesizer.code_size == 8 and synthesizer.generator.size == 128
    crops = np.zeros((1, 128, 128, 3), np.uint8)
    renders = synthesizer.renders(crops, np.zeros((1, 40)))[0]
    assert renders.seed is not None and renders.folder == str(run / "model")   # a worker's further draws: v2 too
