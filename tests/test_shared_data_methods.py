"""Methods and models checked on the real photos in ../shared/data without the wild release
(skipped when it is absent). Kept apart from test_shared_data.py, whose release fixture and
checks of it take most of CI's time on one process: these run on the other one."""
import json

import numpy as np
import pytest

from flows.evaluation.detection import evaluate_detectors
from flows.evaluation.evaluate import attribute_preservation, evaluate
from flows.training.template import fit_alignment_template
from models.registry import model_path
from policy.loader import load_policy
from stages.common.faces import detect_faces
from stages.common.imageio import load_rgb

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


def test_evaluate_on_lfw_pairs(shared_data, tmp_path):
    results = evaluate(shared_data / "lfw_devtrain" / "pairs.csv", shared_data / "lfw_devtrain" / "images",
                       ["blur", "mask"], load_policy().policy, limit=24, workers=2)
    methods = results["methods"]
    assert set(methods) == {"original", "blur", "mask"}
    assert methods["original"]["verification_rate_before"] > 0.85
    assert methods["original"]["deid_rate"] < 0.15 and methods["original"]["ssim"] == pytest.approx(1.0)
    for name in ("blur", "mask"):
        assert methods[name]["deid_rate"] > 0.9 and methods[name]["self_deid_rate"] > 0.9
        assert 10 < methods[name]["psnr"] < 40 and 0.5 < methods[name]["ssim"] < 1.0
        assert 0 < methods[name]["seconds_per_face"] < 5
    json.dumps(results)   # serialisable as the command writes it


def test_alignment_template_refit_on_celeba(shared_data, tmp_path):
    target = tmp_path / "template.json"
    info = fit_alignment_template(shared_data / "celeba" / "img_align_celeba_89x109", limit=80,
                                  progress=False, target=target)
    assert info["faces_used"] >= 60
    points = np.asarray(json.loads(target.read_text())["points"])
    shipped = np.asarray(json.loads(model_path("face_template_68").read_text())["points"])
    assert np.abs(points - shipped).max() < 0.03   # 80 faces already give nearly the shipped mean shape


def test_union_detector_finds_faces_hog_misses(shared_data):
    """Profiles and faces looking down: HOG misses some in the group photos, hog+cnn must not."""
    hog = union = 0
    for path in sorted((shared_data / "wild" / "group_photos").glob("*.jpg")):
        rgb = load_rgb(path).rgb
        hog += len(detect_faces(rgb, detector="hog"))
        union += len(detect_faces(rgb, detector="hog+cnn"))
    assert union > hog


def test_default_detector_finds_95_percent_of_annotated_faces(shared_data):
    """tests/data/face_annotations.csv: hand-checked boxes of every face >= 16 px in the group
    and crowd photos and 30 CelebA in-the-wild photos."""
    detection = load_policy().policy.detection
    default = {"detector": detection.detector, "threshold": detection.threshold, "tile_side": detection.tile_side,
               "upsample": detection.upsample, "max_side": detection.max_side}
    results = evaluate_detectors(shared_data / "wild", {"default": default, "hog": {"detector": "hog"}},
                                 progress=False)
    assert results["faces_16px"] >= 100
    assert results["detectors"]["default"]["recall_16px"] >= 0.95
    assert results["detectors"]["default"]["recall_16px"] > results["detectors"]["hog"]["recall_16px"]


def test_gan_on_lfw_pairs_and_attribute_preservation_on_celeba(shared_data, tmp_path):
    policy = load_policy().policy
    results = evaluate(shared_data / "lfw_devtrain" / "pairs.csv", shared_data / "lfw_devtrain" / "images",
                       ["gan", "gan+perturbation"], policy, limit=8, workers=1)
    gan = results["methods"]["gan"]
    assert gan["evaluable_pairs"] == 8 and results["generator"] == "shipped"
    assert 0.5 < gan["ssim"] < 1.0 and 10 < gan["psnr"] < 50 and gan["seconds_per_face"] > 0
    # Re-rendering a lost face can only add detections, never remove them.
    assert gan["detection_rate_first_render"] <= gan["detection_rate_after"] and gan["faces_rerendered"] >= 0
    # Stage IV on the same renders: a little PSNR spent, withdrawals counted.
    perturbed = results["methods"]["gan+perturbation"]
    assert perturbed["psnr"] <= gan["psnr"] and 0 <= perturbed["faces_perturbation_withdrawn"] <= perturbed["faces_treated"]
    assert "faces_perturbation_withdrawn" not in gan and perturbed["median_distance_to_b"] > 0
    preservation = attribute_preservation(shared_data / "celeba", ["gan", "gan+perturbation", "mask"], policy,
                                          limit=240, cache_dir=tmp_path)
    assert preservation["faces"] >= 20 and preservation["preserved"] == list(policy.attributes.preserve)
    assert preservation["original"]["mean"] > 0.7
    for method in ("gan", "mask"):
        scores = preservation["methods"][method]
        assert set(scores["per_attribute"]) == set(policy.attributes.preserve)
        assert scores["ratio_to_original"] == pytest.approx(scores["mean"] / preservation["original"]["mean"])
    # A grey mask leaves no smile to see: Stage I must do worse on it than on the GAN's faces.
    assert preservation["methods"]["mask"]["mean"] < preservation["methods"]["gan"]["mean"]
    json.dumps(results | {"attribute_preservation": preservation})
