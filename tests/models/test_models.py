"""Model files are verified against the manifest; a tampered file is refused."""
import json
import shutil

import pytest

from models import registry


def test_shipped_and_packaged_models_verify():
    for name in ("dlib_landmarks_68", "dlib_face_descriptor", "face_template_68"):
        assert registry.verified_path(name).is_file()


def test_tampered_model_is_refused(tmp_path, monkeypatch):
    original = registry.model_path("face_template_68")
    tampered = tmp_path / "face_template_68.json"
    shutil.copy(original, tampered)
    data = json.loads(tampered.read_text())
    data["points"][30][0] += 0.01
    tampered.write_text(json.dumps(data))
    monkeypatch.setattr(registry, "model_path", lambda name: tampered)
    with pytest.raises(registry.ModelFileError, match="fails its integrity check"):
        registry.verified_path("face_template_68")


def test_missing_model_file_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "model_path", lambda name: tmp_path / "gone.dat")
    with pytest.raises(registry.ModelFileError, match="make install"):
        registry.verified_path("dlib_landmarks_68")
