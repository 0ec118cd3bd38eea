"""The layout the README's Layout section describes, checked: one folder per stage plus the
shared one, plain Python in stages/ (no Prefect), short functions, and no training,
evaluation or benchmark module that imports the release flow."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_FOLDERS = {"common", "attributes", "selection", "synthesis", "perturbation"}
MAX_FUNCTION_LINES = 80


def _modules(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO / folder).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_stages_hold_one_folder_per_stage_and_the_shared_one():
    stages = REPO / "stages"
    folders = {path.name for path in stages.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert folders == STAGE_FOLDERS
    assert [path.name for path in stages.glob("*.py")] == ["__init__.py"]
    for folder in STAGE_FOLDERS:
        assert (stages / folder / "__init__.py").exists()


def test_no_function_in_stages_or_flows_is_longer_than_80_lines():
    long = []
    for path in _modules("stages", "flows"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_only_the_cli_and_the_release_import_the_release_flow():
    importers = [str(path.relative_to(REPO)) for path in _modules("stages", "flows", "policy", "models")
                 if "flows.release.flow" in _imported(path)]
    assert importers == ["flows/cli.py"], importers


def test_stages_are_plain_python_without_prefect():
    with_prefect = [str(path.relative_to(REPO)) for path in _modules("stages")
                    if any(name == "prefect" or name.startswith("prefect.") or name.startswith("flows")
                           for name in _imported(path))]
    assert not with_prefect, with_prefect
