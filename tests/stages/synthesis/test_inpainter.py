"""Stage III v2: the full-resolution inpainting generator, its identity codes, its training
terms, and the draws a release makes with it."""
import json
import pickle

import numpy as np
import pytest
import torch

from models.generator import (
    InpaintingGenerator,
    PatchCritic,
    StyledNorm,
    load_generator,
    r1_penalty,
)
from models.identity_embedding import IdentityNet
from stages.attributes.names import ATTRIBUTES
from stages.synthesis.inpainter import (
    InpainterSettings,
    _chroma_excess,
    _spread,
    bar_measures,
    dlib_descriptors,
    generator_terms,
    train_inpainter,
    verifier_same_shares,
)
from stages.synthesis.render import (
    MAX_CODE_DRAWS,
    RENDER_VIEWS,
    Synthesizer,
    identity_codes,
    render_draws,
    synthesize_face,
    template_mask,
)
from stages.synthesis.training import GAN_ATTRIBUTES


def _tiny(seed: int = 0) -> InpaintingGenerator:
    torch.manual_seed(seed)
    generator = InpaintingGenerator(len(GAN_ATTRIBUTES), code_size=8, width=4, blocks=1)
    with torch.no_grad():   # untrained StyledNorm starts with the code switched off; switch it on
        for module in generator.modules():
            if isinstance(module, StyledNorm):
                module.affine.weight.normal_(0, 0.5)
    return generator


def test_the_code_changes_the_face_inside_the_mask_only():
    generator = _tiny()
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    targets = torch.zeros(2, len(GAN_ATTRIBUTES))
    first = synthesize_face(generator, images, targets, torch.randn(2, 8))
    second = synthesize_face(generator, images, targets, torch.randn(2, 8))
    assert first.shape == images.shape and first.abs().max() <= 1
    mask = template_mask(128)[0, 0]
    outside, inside = mask < 1e-3, mask > 0.99
    assert torch.allclose(first[..., outside], images[..., outside], atol=2e-3)
    assert (first - second)[..., inside].abs().mean() > 1e-3          # another code: another face
    same = synthesize_face(generator, images, targets, torch.zeros(2, 8))
    assert torch.allclose(same, synthesize_face(generator, images, targets))   # None: the mean code


def test_a_generator_that_paints_the_forehead_paints_there_and_says_so(tmp_path):
    torch.manual_seed(0)
    generator = InpaintingGenerator(len(GAN_ATTRIBUTES), code_size=8, width=4, blocks=1, forehead=0.25)
    assert generator.config["forehead"] == 0.25 and "forehead" not in _tiny().config   # old configs unchanged
    rebuilt = load_generator(json.loads(json.dumps(generator.config)))
    assert rebuilt.forehead == 0.25
    images = torch.rand(1, 3, 128, 128) * 2 - 1
    painted = synthesize_face(generator, images, torch.zeros(1, len(GAN_ATTRIBUTES)), torch.randn(1, 8))
    hull, region = template_mask(128)[0, 0], template_mask(128, 0.25)[0, 0]
    forehead = (region > 0.99) & (hull < 1e-3)
    assert forehead.sum() > 200                                   # the region reaches well above the hull
    assert (painted - images)[..., forehead].abs().mean() > 1e-2  # and is painted there
    assert torch.allclose(painted[..., region < 1e-3], images[..., region < 1e-3], atol=2e-3)
    # The release composes what the generator paints: its renders carry the region, also to a worker.
    synthesizer = Synthesizer(generator, GAN_ATTRIBUTES, device="cpu")
    crops = np.random.default_rng(0).integers(0, 255, (1, 128, 128, 3), dtype=np.uint8)
    renders = synthesizer.renders(crops, np.zeros((1, len(ATTRIBUTES))), seeds=[3])
    assert synthesizer.forehead == 0.25 and pickle.loads(pickle.dumps(renders[0])).forehead == 0.25


def test_v1_and_v2_configs_load_their_own_network():
    generator = _tiny()
    rebuilt = load_generator(json.loads(json.dumps(generator.config)))
    assert isinstance(rebuilt, InpaintingGenerator) and rebuilt.code_size == 8 and rebuilt.size == 128
    rebuilt.load_state_dict(generator.state_dict())
    assert load_generator({"attributes": 7, "width": 8, "blocks": 1}).code_size == 0


def test_r1_is_zero_for_a_constant_critic_and_positive_otherwise():
    critic = PatchCritic(len(GAN_ATTRIBUTES), width=4)
    real = torch.rand(2, 3, 128, 128) * 2 - 1
    penalty, score, classes = r1_penalty(critic, real)
    assert penalty.item() > 0 and classes.shape == (2, len(GAN_ATTRIBUTES))
    for parameter in critic.parameters():
        torch.nn.init.zeros_(parameter)
    assert r1_penalty(critic, real)[0].item() == 0


def test_diversity_terms_see_whether_two_codes_give_two_faces():
    identity = IdentityNet(channels=(4, 8, 8, 8), hidden=16).eval()
    critic = PatchCritic(len(GAN_ATTRIBUTES), width=4)
    real = torch.rand(3, 3, 128, 128) * 2 - 1
    target = torch.zeros(3, len(GAN_ATTRIBUTES))
    settings = InpainterSettings(code_size=8)
    coded, _ = generator_terms(_tiny(), critic, identity, real, target, settings, torch.Generator().manual_seed(0))
    blind = InpaintingGenerator(len(GAN_ATTRIBUTES), code_size=8, width=4, blocks=1)   # ignores its code at init
    ignored, _ = generator_terms(blind, critic, identity, real, target, settings, torch.Generator().manual_seed(0))
    assert set(coded) == {"adv", "cls", "fm", "ver", "div", "ms", "spread", "away", "chroma", "ssim",
                          "layout"}
    # A generator that ignores its code pays the whole mode-seeking and diversity terms.
    assert ignored["ms"].item() == pytest.approx(settings.mode_seeking_ratio)
    assert ignored["div"].item() == pytest.approx(settings.margin ** 2)
    assert coded["ms"].item() < ignored["ms"].item()


class _HueShifter(torch.nn.Module):
    """Gives each code another hue of the same face: luminance unchanged."""

    code_size = 8

    def forward(self, context, targets, codes, mask):
        neutral = torch.tensor([0.587, -0.299, 0.0])   # 0.299·r + 0.587·g + 0.114·b = 0
        return context + 0.5 * codes[:, :1, None, None] * neutral[None, :, None, None]


def test_two_hues_of_one_face_are_not_two_people_to_the_diversity_terms():
    identity = IdentityNet(channels=(4, 8, 8, 8), hidden=16).eval()
    critic = PatchCritic(len(GAN_ATTRIBUTES), width=4)
    real = torch.rand(3, 3, 128, 128) - 0.5
    settings = InpainterSettings(code_size=8)
    terms, first = generator_terms(_HueShifter(), critic, identity, real, torch.zeros(3, len(GAN_ATTRIBUTES)),
                                   settings, torch.Generator().manual_seed(0))
    assert (first - real).abs().max() > 0.05                                   # the hue did change ...
    assert terms["ms"].item() == pytest.approx(settings.mode_seeking_ratio)    # ... and earns no diversity
    assert terms["div"].item() == pytest.approx(settings.margin ** 2, rel=1e-4)


def test_spread_asks_painted_people_to_be_as_far_apart_as_their_originals():
    torch.manual_seed(0)
    real = torch.randn(6, 16)
    assert _spread(real, real).item() == 0.0
    assert _spread(2 * real, real).item() == 0.0                       # further apart: nothing owed
    collapsed = (0.01 * torch.randn(6, 16)).requires_grad_()           # six painted look-alikes
    owed = _spread(collapsed, real)
    distances = torch.pdist(real)
    assert owed.item() == pytest.approx(distances.pow(2).mean().item(), rel=0.1)
    owed.backward()
    stepped = collapsed.detach() - 0.5 * collapsed.grad / collapsed.grad.norm()
    assert torch.pdist(stepped).mean() > torch.pdist(collapsed.detach()).mean()   # it pushes them apart
    # A fixed target asks the same of every pair, whoever the originals were.
    fixed = _spread(collapsed.detach(), real, margin=0.8)
    assert fixed.item() == pytest.approx(_spread(collapsed.detach(), 5 * real, margin=0.8).item())
    assert fixed.item() == pytest.approx((0.8 - torch.pdist(collapsed.detach())).pow(2).mean().item(), rel=1e-5)


def test_the_spread_terms_verifier_sees_what_the_release_verifier_sees():
    """dlib_descriptors cuts dlib's chip from an aligned crop with grid_sample (so it can
    train); its descriptors must be the release's own, and carry a gradient."""
    from skimage.data import astronaut

    from stages.common.faces import align_face, detect_faces, face_descriptor, template

    rgb = astronaut()
    face = detect_faces(rgb)[0]
    crops = [align_face(rgb, face.landmarks).crop, align_face(rgb[:, ::-1].copy(), face.landmarks * [-1, 1]
                                                               + [rgb.shape[1] - 1, 0]).crop]
    images = (torch.as_tensor(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1).requires_grad_()
    ours = dlib_descriptors(images)
    release = np.stack([face_descriptor(crop, template(128)) for crop in crops])
    assert np.linalg.norm(ours.detach().numpy() - release, axis=1).max() < 0.03   # different people: > 0.6
    ours.sum().backward()
    assert images.grad.abs().sum() > 0


def test_the_dlib_judged_terms_reach_the_generator():
    """spread and away go through dlib's verifier on random views back to the generator's
    weights; a painter that keeps the original pays ``away`` in full."""
    from skimage.data import astronaut

    from stages.common.faces import align_face, detect_faces

    rgb = astronaut()
    crop = align_face(rgb, detect_faces(rgb)[0].landmarks).crop
    real = (torch.as_tensor(np.stack([crop, crop[:, ::-1].copy()])).permute(0, 3, 1, 2).float() / 127.5 - 1)
    settings = InpainterSettings(code_size=8, lambda_spread=1.0, lambda_away=1.0, spread_margin=0.85)
    identity = IdentityNet(channels=(4, 8, 8, 8), hidden=16).eval()
    generator = _tiny()
    terms, _ = generator_terms(generator, PatchCritic(len(GAN_ATTRIBUTES), width=4), identity, real,
                               torch.zeros(2, len(GAN_ATTRIBUTES)), settings, torch.Generator().manual_seed(0))
    (terms["spread"] + terms["away"]).backward()
    assert terms["away"].item() > 0 and all(torch.isfinite(t) for t in terms.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    _Keeper.original = real
    kept, _ = generator_terms(_Keeper(), PatchCritic(len(GAN_ATTRIBUTES), width=4), identity, real,
                              torch.zeros(2, len(GAN_ATTRIBUTES)), settings, torch.Generator().manual_seed(0))
    assert kept["away"].item() > 0.5 * settings.margin ** 2   # views differ a little: not quite the full margin


class _Keeper(torch.nn.Module):
    """Paints the original back (it sees only the blurred context, so it cheats: a test double
    for "the generator copied the person")."""

    code_size = 8
    original: torch.Tensor | None = None

    def forward(self, context, targets, codes, mask):
        return _Keeper.original.repeat(len(context) // len(_Keeper.original), 1, 1, 1)


def test_chroma_cap_fines_a_coloured_stroke_not_the_faces_own_colour():
    torch.manual_seed(0)
    skin = torch.tensor([0.5, 0.1, -0.1])[None, :, None, None]              # a warm, smooth skin tone
    real = (skin + 0.05 * torch.randn(2, 1, 128, 128)).clamp(-1, 1)          # grey texture: no chroma added
    mask = template_mask(128)
    shaded = (real + 0.2 * torch.randn(2, 1, 128, 128)).clamp(-1, 1)        # new light and shade
    stroke = real.clone()
    stroke[:, 0, 50:54, 30:100] += 0.5                                       # magenta along the eyes
    stroke[:, 2, 50:54, 30:100] += 0.5
    outside = real.clone()
    outside[:, 0, 2:6, :] += 0.5                                             # the same, above the mask
    outside[:, 2, 2:6, :] += 0.5
    assert _chroma_excess(shaded, real, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert _chroma_excess(outside, real, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert _chroma_excess(stroke, real, mask).item() > 5e-3


class _Painter(torch.nn.Module):
    """Paints the blurred context plus light and shade of its own per face and code
    (grey noise), and/or a saturated blue band across the rows of the eyes (the bars of
    the first v2 runs)."""

    code_size = 8

    def __init__(self, band: float, noise: float):
        super().__init__()
        self.band, self.noise = band, noise

    def forward(self, context, targets, codes, mask):
        painted = context + self.noise * torch.randn_like(context[:, :1])
        painted[:, 2, 50:56, :] += self.band
        return painted.clamp(-1, 1)


def test_bar_measures_see_saturated_bands_not_a_faces_own_changes():
    torch.manual_seed(0)
    # Smooth grey inputs (the blurred context is then close to the original).
    images = (torch.rand(24, 1, 1, 1) * 1.2 - 0.8 + 0.02 * torch.randn(24, 1, 128, 128)).expand(-1, 3, -1, -1)
    labels = torch.zeros(24, len(GAN_ATTRIBUTES))
    own_changes = bar_measures(_Painter(band=0.0, noise=0.3), images, labels)
    bands = bar_measures(_Painter(band=0.5, noise=0.0), images, labels)
    # Light and shade change rows and columns alike and add no colour ...
    assert 0.9 < own_changes["stripes"] < 1.1 and own_changes["chroma_excess"] < 5
    # ... a blue band changes from row to row only, and is saturated (0.5 of [-1, 1]: ~64 levels).
    assert bands["stripes"] > 1.5 and bands["chroma_excess"] > 40


class _NothingPainted(torch.nn.Module):
    """Leaves the blurred context as it is: every face a blur."""

    code_size = 8

    def forward(self, context, targets, codes, mask):
        return context


@pytest.mark.shared_data
def test_verifier_same_share_sees_faces_collapse_to_one_blur(shared_data):
    """The training's diversity measure: dlib's verifier on different people's faces, real
    and painted. LFW photos of 12 people, aligned as the release aligns them."""
    from stages.common.faces import align_face, detect_faces
    from stages.common.imageio import load_rgb

    people = sorted((shared_data / "lfw_devtrain" / "images").iterdir())[:12]
    crops = []
    for person in people:
        rgb = load_rgb(sorted(person.iterdir())[0]).rgb
        face = max(detect_faces(rgb), key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        crops.append(align_face(rgb, face.landmarks).crop)
    images = torch.as_tensor(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    shares = verifier_same_shares(_NothingPainted(), images, torch.zeros(12, len(GAN_ATTRIBUTES)))
    assert shares["real"] <= 2 / 66                  # twelve people: at most two of 66 pairs alike
    assert shares["painted"] >= 0.5                   # blurred faces: most pairs "the same person"


def test_inpainter_training_runs_logs_and_resumes(tmp_path):
    torch.manual_seed(0)
    crops = torch.randint(0, 256, (10, 128, 128, 3), dtype=torch.uint8)
    labels = (torch.rand(10, len(GAN_ATTRIBUTES)) > 0.5).float()
    identity = IdentityNet(channels=(4, 8, 8, 8), hidden=16)
    settings = InpainterSettings(steps=5, batch_size=2, width=4, blocks=1, critic_width=4, code_size=8,
                                 checkpoint_every=5, log_every=5)
    preview = (crops[:2].permute(0, 3, 1, 2).float() / 127.5 - 1, labels[:2])
    train_inpainter(crops, labels, identity, settings, tmp_path, progress=False, preview=preview, people=preview)
    records = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    losses = [r for r in records if "d_loss" in r]
    assert losses[-1]["step"] == 5 and {"g_div", "g_ms", "g_fm", "g_ver"} <= set(losses[-1])
    assert {"bars_stripes", "bars_chroma_excess"} <= set(records[-2])   # at the checkpoint
    assert {"same_share_painted", "same_share_real"} <= set(records[-1])
    assert all(np.isfinite(v) for r in records for v in r.values())
    assert (tmp_path / "samples.png").stat().st_size > 0
    more = InpainterSettings(steps=6, batch_size=2, width=4, blocks=1, critic_width=4, code_size=8,
                             checkpoint_every=5)
    train_inpainter(crops, labels, identity, more, tmp_path, progress=False)
    assert torch.load(tmp_path / "gan_checkpoint.pt", weights_only=True)["step"] == 6


def test_a_snapshot_carries_a_run_to_a_new_run_folder(tmp_path):
    """The run folder is scratch; a session on another machine goes on from snapshot.pt."""
    torch.manual_seed(0)
    crops = torch.randint(0, 256, (10, 128, 128, 3), dtype=torch.uint8)
    labels = (torch.rand(10, len(GAN_ATTRIBUTES)) > 0.5).float()
    identity = IdentityNet(channels=(4, 8, 8, 8), hidden=16)
    tiny = {"batch_size": 2, "width": 4, "blocks": 1, "critic_width": 4, "code_size": 8, "checkpoint_every": 5,
            "log_every": 1}
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir(), later.mkdir()
    trained = train_inpainter(crops, labels, identity, InpainterSettings(steps=5, **tiny), first, progress=False)
    snapshot = first / "snapshot.pt"
    assert snapshot.stat().st_size < (first / "gan_checkpoint.pt").stat().st_size / 2   # no Adam state, float16
    carried = train_inpainter(crops, labels, identity, InpainterSettings(steps=5, **tiny), later, progress=False,
                              start_from=snapshot)
    for name, value in trained.state_dict().items():   # 5 of 5 steps done: the snapshot's weights, as saved
        assert torch.allclose(carried.state_dict()[name], value, atol=2e-3 * (1 + value.abs().max()))
    train_inpainter(crops, labels, identity, InpainterSettings(steps=6, **tiny), later, progress=False,
                    start_from=snapshot)
    assert torch.load(later / "gan_checkpoint.pt", weights_only=True)["step"] == 6
    first_curve = (first / "losses.jsonl").read_text()
    assert first_curve and (later / "losses.jsonl").read_text().startswith(first_curve)   # the curve came along
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="other settings"):
        train_inpainter(crops, labels, identity, InpainterSettings(steps=6, **(tiny | {"width": 8})), other,
                        progress=False, start_from=snapshot)


def test_each_draw_is_a_new_code_reproducible_from_its_seed():
    synthesizer = Synthesizer(_tiny(), GAN_ATTRIBUTES, "cpu")
    crops = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    targets = np.zeros((2, len(ATTRIBUTES)))
    renders = synthesizer.renders(crops, targets, seeds=[11, 2 ** 63 - 1])
    draws = render_draws(8)
    assert [d.code for d in draws] == list(range(MAX_CODE_DRAWS)) and draws[0].view is draws[2].view is RENDER_VIEWS[0]
    assert [d.view for d in draws[3:5]] == list(RENDER_VIEWS[1:3]) and draws[5].view is RENDER_VIEWS[0]
    assert renders[1].code_seed(1) == 0 and renders[0].code_seed(3) == 14      # wraps within int64
    first, second = renders[0][0], renders[0][1]
    assert np.abs(first.astype(int) - second).mean() > 0.1                      # another person
    again = synthesizer.render(crops[:1], targets[:1], codes=identity_codes([renders[0].code_seed(1)], 8))[0]
    assert np.array_equal(again, second)                                        # the seed reproduces it
    shipped = pickle.loads(pickle.dumps(renders[0]))                            # to a photo worker
    assert shipped.code_seed(2) == 13 and len(shipped) == len(draws) and shipped.synthesizer is None
    assert shipped.folder is None            # a worker draws further with the same generator: here, the shipped one
    assert [d.view for d in render_draws(0)] == list(RENDER_VIEWS)               # v1: the views in turn
    assert Synthesizer.renders(synthesizer, crops, targets)[0].seed is not None  # fresh seeds by default
