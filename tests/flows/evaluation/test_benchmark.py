"""The benchmark command measures every stage on real (public-domain) photos."""
import json

from click.testing import CliRunner

from flows.cli import main
from flows.evaluation.benchmark import METHODS, benchmark
from stages.common.samples import write_samples


def test_benchmark_reports_every_stage(tmp_path):
    write_samples(tmp_path / "photos")
    results = benchmark(tmp_path / "photos", repeats=2, progress=False)
    assert results["faces"] >= 4 and results["photos"] == 5
    assert all(value > 0 for value in results["faces_per_second"].values())
    assert set(results["end_to_end_faces_per_second"]) == set(METHODS)
    assert results["ratio_to_blur"]["blur"] == 1.0
    # End to end can never be faster than its slowest stage.
    assert results["end_to_end_faces_per_second"]["blur"] < results["faces_per_second"]["detect"]
    medians = results["median_seconds_per_face_over_photos"]
    assert all(medians[f"{m}:end_to_end"] > medians["detect"] for m in METHODS)
    assert results["faces_per_second"]["attributes"] > results["faces_per_second"]["detect"]


def test_benchmark_command_writes_json(tmp_path):
    write_samples(tmp_path / "photos")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["benchmark", "--images", str(tmp_path / "photos"), "--repeats", "1",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "ratio to blur" in result.output



def test_attribute_benchmark_times_stage_one(tmp_path):
    write_samples(tmp_path / "photos")
    out = tmp_path / "attributes.json"
    result = CliRunner().invoke(main, ["benchmark", "--images", str(tmp_path / "photos"), "--stage", "attributes",
                                       "--repeats", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert results["faces"] >= 4 and len(results["seconds_per_pass"]) == 2
    assert results["faces_per_second_min"] <= results["faces_per_second_median"] <= results["faces_per_second_max"]


def test_synthesis_benchmark_times_stage_three(tmp_path):
    write_samples(tmp_path / "photos")
    out = tmp_path / "synthesis.json"
    result = CliRunner().invoke(main, ["benchmark", "--images", str(tmp_path / "photos"), "--stage", "synthesis",
                                       "--repeats", "2", "--batch-size", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert results["faces"] >= 4 and results["batch_size"] == 4 and results["generator"] == "shipped"
    assert results["device"] == "cpu" or results["device"].startswith("cuda")
    assert results["faces_per_second_min"] <= results["faces_per_second_median"] <= results["faces_per_second_max"]
