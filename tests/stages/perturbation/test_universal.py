"""Stage IV: DeepFool and the universal perturbation against the math they rest on."""
import pytest
import torch

from stages.perturbation.universal import (
    deepfool,
    fooling_rate,
    project,
    universal_perturbation,
    verdict,
)


def linear(weights: torch.Tensor, bias: torch.Tensor):
    """A K-attribute linear profiler on N×3×4×4 images: logits = x·Wᵀ + b."""
    return lambda images: images.flatten(1) @ weights.T + bias


def _midpoint(images: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Halfway between the two middle scores: half the images on each side, none on the
    boundary (torch's median of an even count is one image's own score, which puts that
    image exactly at 0 on CPUs whose matmul rounds it so, and DeepFool then has nothing to flip)."""
    scores = (images.flatten(1) @ w.T).flatten().sort().values
    middle = len(scores) // 2
    return (scores[middle - 1] + scores[middle]) / 2


@pytest.fixture
def images():
    return torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_deepfool_on_a_linear_profiler_finds_the_minimal_flip(images, norm):
    """For one linear boundary DeepFool's first step is exact: the smallest perturbation that
    reaches w·x + b = 0 has ℓ2 length |f|/‖w‖₂ and ℓ∞ size |f|/‖w‖₁."""
    torch.manual_seed(1)
    w = torch.randn(1, 48)
    b = -_midpoint(images, w)                           # half the images on each side
    classifier = linear(w, b.reshape(1))
    perturbation, flipped = deepfool(classifier, images, norm=norm, overshoot=0.02)
    assert flipped.all()
    assert (verdict(classifier, images + perturbation) != verdict(classifier, images)).all()
    margin = (classifier(images)[:, 0]).abs()
    if norm == "2":
        expected, size = margin / w.norm(), perturbation.flatten(1).norm(dim=1)
    else:
        expected, size = margin / w.abs().sum(), perturbation.flatten(1).abs().max(dim=1).values
    assert torch.allclose(size, 1.02 * (expected + 1e-4), rtol=1e-3, atol=1e-6)


def test_deepfool_crosses_the_nearest_of_several_boundaries(images):
    # Attribute 0 is far from every image, attribute 1 close: DeepFool must flip attribute 1 only.
    w = torch.zeros(2, 48)
    w[0, 0], w[1, 1] = 1.0, 1.0
    classifier = linear(w, torch.tensor([-5.0, -0.5]))
    perturbation, flipped = deepfool(classifier, images, norm="2")
    before, after = verdict(classifier, images), verdict(classifier, images + perturbation)
    assert flipped.all() and (before[:, 0] == after[:, 0]).all() and (before[:, 1] != after[:, 1]).all()


def test_projection_stays_in_the_ball():
    v = torch.randn(3, 8, 8) * 5
    assert project(v, 0.1, "inf").abs().max() <= 0.1 + 1e-7
    assert project(v, 2.0, "2").norm() == pytest.approx(2.0, rel=1e-5)
    small = torch.full((3, 8, 8), 1e-3)
    assert torch.equal(project(small, 2.0, "2"), small)
    with pytest.raises(ValueError, match="norm"):
        deepfool(lambda x: x.flatten(1)[:, :1], torch.rand(2, 3, 4, 4), norm="1")


def test_universal_perturbation_fools_a_profiler_where_one_direction_suffices(images):
    """Every image is on the same side of a linear boundary, the farthest at 80% of what
    ξ can reach (ξ·‖w‖₁): one universal v (towards the other side) fools them all, and
    stays inside the ℓ∞ ball."""
    torch.manual_seed(2)
    w = torch.randn(1, 48)
    scores = (images.flatten(1) @ w.T)[:, 0]
    b = -(scores.min() - 1e-3).reshape(1)
    classifier = linear(w, b)
    assert (classifier(images) > 0).all()
    radius = float((scores + b).max() / (0.8 * w.abs().sum()))
    result = universal_perturbation(classifier, images, radius=radius, norm="inf", delta=0.05, max_passes=5,
                                    batch_size=16)
    assert result.fooling_rate >= 0.95 and result.perturbation.abs().max() <= radius + 1e-6
    assert fooling_rate(classifier, images, result.perturbation)["fooling_rate"] == result.fooling_rate
    assert result.history[-1]["pass"] == result.passes and result.passes <= 5
    # A quarter of the room: the far images are out of reach, and the rate says so.
    weaker = universal_perturbation(classifier, images, radius=radius / 4, norm="inf", delta=0.05, max_passes=3,
                                    batch_size=16)
    assert weaker.fooling_rate < result.fooling_rate and weaker.passes == 3


def test_a_universal_perturbation_on_a_small_cnn_generalises_to_unseen_images():
    """A small CNN profiler with two attributes: v computed on one half of the images fools
    a several times larger share of the other half than random noise of the same size does."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 2)).eval()
    data = torch.rand(256, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():     # centre the logits so both verdicts occur
        net[-1].bias -= net(data).median(dim=0).values
    train, held_out = data[:128], data[128:]
    radius = 0.03
    result = universal_perturbation(net, train, radius=radius, norm="inf", delta=0.2, max_passes=4, batch_size=32)
    unseen = fooling_rate(net, held_out, result.perturbation)
    noise = fooling_rate(net, held_out, radius * torch.randn(3, 16, 16).sign())
    # Two attributes, each split half and half: one direction cannot fool every face (0.43
    # measured), but it fools several times more faces than noise of the same size (0.05).
    assert unseen["fooling_rate"] > 0.3 and unseen["fooling_rate"] > 4 * noise["fooling_rate"]
    assert result.fooling_rate == max(h["fooling_rate"] for h in result.history)     # the best pass is kept
    assert len(unseen["per_attribute"]) == 2 and unseen["images"] == 128


def test_comparable_to_the_adversarial_robustness_toolbox():
    """Cross-check against ART's UniversalPerturbation (DeepFool attacker) on the same small
    CNN, data and ξ: a one-attribute profiler f is the two-class classifier [-f/2, f/2].
    90% of the images start on one side, so one direction can fool most of them. ART's
    result varies from run to run (held-out fooling rates from 0.05 to 0.72 in five runs of
    this setting); ours is deterministic and must be at least as good as ART's, less 0.1."""
    pytest.importorskip("art")
    import numpy as np
    from art.attacks.evasion import UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    torch.manual_seed(5)
    profiler = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                                   torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 1)).eval()
    data = torch.rand(320, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        profiler[-1].bias -= profiler(data).quantile(0.1)
    train, held_out = data[:192], data[192:]
    radius = 0.04

    class TwoClass(torch.nn.Module):
        def forward(self, images):
            f = profiler(images)
            return torch.cat([-f / 2, f / 2], dim=1)

    art_classifier = PyTorchClassifier(TwoClass().eval(), loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 16, 16),
                                       nb_classes=2, clip_values=(0.0, 1.0))
    attack = UniversalPerturbation(art_classifier, attacker="deepfool", delta=0.2, max_iter=4, eps=radius,
                                   norm=np.inf, batch_size=32, verbose=False)
    np.random.seed(0)
    attack.generate(train.numpy())
    art_v = torch.as_tensor(attack.noise[0], dtype=torch.float32)
    ours = universal_perturbation(profiler, train, radius=radius, norm="inf", delta=0.2, max_passes=4, batch_size=32)
    art_rate = fooling_rate(profiler, held_out, art_v)["fooling_rate"]
    our_rate = fooling_rate(profiler, held_out, ours.perturbation)["fooling_rate"]
    assert art_v.abs().max() <= radius + 1e-6 and ours.perturbation.abs().max() <= radius + 1e-6
    assert our_rate > 0.6
    print(f"fooling rate on held-out images: ours {our_rate:.3f}, ART {art_rate:.3f}")
    assert our_rate >= art_rate - 0.1, (our_rate, art_rate)


@pytest.mark.shared_data
def test_perturbation_flow_on_a_tiny_subset(shared_data, tmp_path, prefect_harness):
    """`anonymousnet train perturbation` end to end on 300 CelebA images, on the faces as
    Stage III renders them and inside the face mask: a perturbation in the ℓ∞ ball and the
    mask, measured on the test people's faces against the white-box CNN, Stage I's forests
    and a freshly trained unseen profiler; a bad attribute name is refused."""
    import json

    import numpy as np

    from flows.training.perturbation import PERTURBATION_FILE, train_perturbation
    from stages.synthesis.render import template_mask

    celeba = shared_data / "celeba"
    images, labels = str(celeba / "img_align_celeba_89x109"), str(celeba / "labels.csv")
    run = tmp_path / "uap"
    summary = train_perturbation(images=images, labels=labels, run_dir=str(run), xi=8 / 255, max_passes=2,
                                 train_faces=60, unseen_epochs=1, limit=300, synthesized=True, inside_mask=True,
                                 progress=False)
    with np.load(run / PERTURBATION_FILE, allow_pickle=False) as stored:
        v = stored["perturbation"]
    assert v.shape == (3, 128, 128) and np.abs(v).max() <= 8 / 255 + 1e-6 and np.abs(v).max() > 0
    outside = template_mask(128)[0, 0].numpy() == 0
    assert np.abs(v[:, outside]).max() == 0 and summary["inside_mask"]
    assert summary["faces"] == "synthesized by Stage III"
    test = summary["test"]
    assert {"white_box", "stage_one_forests", "unseen_profiler", "psnr_db", "kept_white_box",
            "kept_stage_one_forests", "visible_share_median", "visible_share_p90"} <= set(test)
    assert 0 <= test["visible_share_median"] <= test["visible_share_p90"] <= 1
    assert summary["keep"] == ["Smiling", "Mouth_Slightly_Open", "Eyeglasses", "Wearing_Hat"]   # the default policy's
    assert 0 <= test["white_box"]["fooling_rate"] <= 1 and test["white_box"]["images"] == summary["test_faces"] > 0
    assert 30 < test["psnr_db"] < 80 and summary["passes"] <= 2
    assert json.loads((run / "perturbation.json").read_text())["attributes"] == ["Male", "Young"]
    with pytest.raises(ValueError, match="unknown attribute"):
        train_perturbation(images=images, labels=labels, run_dir=str(run), attributes=("Gender",), limit=300,
                           progress=False)


def test_xi_is_read_as_a_number_or_a_fraction_of_255():
    import click

    from flows.cli import _fraction

    assert _fraction("8/255") == pytest.approx(8 / 255) and _fraction("0.03") == 0.03
    for bad in ("eight", "8/0", "300/255", "0"):
        with pytest.raises(click.BadParameter):
            _fraction(bad)


def test_a_support_mask_confines_the_perturbation(images):
    torch.manual_seed(7)
    w = torch.randn(1, 48)
    classifier = linear(w, -_midpoint(images, w).reshape(1))
    support = torch.zeros(1, 4, 4)
    support[:, 1:3, 1:3] = 1.0                       # only the centre may change
    result = universal_perturbation(classifier, images, radius=0.2, max_passes=2, batch_size=16, support=support)
    assert result.perturbation[:, support[0] == 0].abs().max() == 0
    assert result.perturbation[:, support[0] == 1].abs().max() > 0


def test_deepfool_keeping_decisions_moves_orthogonally_to_them(images):
    """With ``keep``, every step is orthogonal to the kept logits' gradients: on a linear
    profiler the kept logit does not move at all, while the target still flips (the target
    direction is not inside the kept span)."""
    torch.manual_seed(8)
    w = torch.randn(1, 48)
    target = linear(w, -_midpoint(images, w).reshape(1))
    u = w + torch.randn(1, 48)                       # a kept attribute correlated with the target
    kept = linear(u, torch.zeros(1))
    free, _ = deepfool(target, images, norm="2")
    held, flipped = deepfool(target, images, norm="2", keep=kept)
    assert flipped.all() and (verdict(target, images + held) != verdict(target, images)).all()
    drift_free = (kept(images + free) - kept(images)).abs().max()
    drift_held = (kept(images + held) - kept(images)).abs().max()
    assert drift_held < 1e-4 < drift_free
    with pytest.raises(ValueError, match="l2 steps"):
        deepfool(target, images, norm="inf", keep=kept)


def test_a_per_pixel_radius_bounds_each_pixel(images):
    """A bound per pixel (what a face's texture hides, ``--jnd-percentile``): the
    perturbation stays inside the box everywhere and uses the room it has."""
    torch.manual_seed(7)
    w = torch.randn(1, 48)
    classifier = linear(w, -_midpoint(images, w).reshape(1))
    radius = torch.full((1, 4, 4), 0.2)
    radius[:, :2] = 0.02                                # the top half: a smooth cheek
    radius[:, :, 0] = 0.0                               # the left column: no room at all
    result = universal_perturbation(classifier, images, radius=radius, max_passes=2, batch_size=16)
    assert (result.perturbation.abs() <= radius + 1e-7).all()
    assert result.perturbation[:, 2:, 1:].abs().max() > 0.02    # where there is room, it is used
    assert project(torch.randn(3, 4, 4), radius, "inf").abs().le(radius + 1e-7).all()
    with pytest.raises(ValueError, match="l-inf"):
        project(torch.randn(3, 4, 4), radius, "2")
    with pytest.raises(ValueError, match="positive"):
        universal_perturbation(classifier, images, radius=torch.zeros(1, 4, 4), max_passes=1)


def test_jnd_radius_follows_the_texture_of_the_faces(astronaut):
    """The bound is tighter on the smooth cheek than in the textured hair line, and never above xi."""
    import numpy as np

    from flows.training.perturbation import jnd_radius
    from stages.common.faces import align_face, detect_faces

    crop = align_face(astronaut, detect_faces(astronaut)[0].landmarks).crop
    radius = jnd_radius(np.stack([crop, crop[:, ::-1]]), 5, 8 / 255)
    assert radius.shape == (1, 128, 128) and float(radius.max()) <= 8 / 255 + 1e-7
    assert float(radius.min()) > 0 and float(radius.max()) > float(radius.min())
