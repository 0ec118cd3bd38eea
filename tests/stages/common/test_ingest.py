"""Input discovery: folders, manifests, paths outside the root, duplicates."""
import pandas as pd
import pytest

from stages.common.ingest import InputError, discover_inputs


@pytest.fixture
def photo_tree(tmp_path):
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / "x.jpg").write_bytes(b"1")
    (root / "a" / "b" / "y.png").write_bytes(b"2")
    (root / ".hidden").write_bytes(b"3")
    (tmp_path / "outside.jpg").write_bytes(b"4")
    return root


def test_folder_is_searched_recursively_and_sorted(photo_tree):
    root, photos = discover_inputs(photo_tree)
    assert root == photo_tree.resolve()
    assert [p.image_id for p in photos] == ["a/b/y.png", "x.jpg"]
    assert all(p.refusal is None for p in photos)


def test_symlink_out_of_the_root_is_refused(photo_tree):
    (photo_tree / "link.jpg").symlink_to(photo_tree.parent / "outside.jpg")
    _, photos = discover_inputs(photo_tree)
    refused = {p.image_id: p.refusal for p in photos if p.refusal}
    assert any("outside the input root" in r for r in refused.values())


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_paths_outside_the_root_are_refused(photo_tree, suffix):
    table = pd.DataFrame({"path": ["x.jpg", "a/b/y.png", "../outside.jpg", str(photo_tree.parent / "outside.jpg"),
                                   "missing.jpg", "x.jpg"]})
    manifest = photo_tree / f"manifest{suffix}"
    table.to_csv(manifest, index=False) if suffix == ".csv" else table.to_parquet(manifest)
    _, photos = discover_inputs(manifest)
    outcome = [(p.image_id, p.refusal) for p in photos]
    assert outcome[0] == ("x.jpg", None) and outcome[1] == ("a/b/y.png", None)
    assert "outside the input root" in outcome[2][1] and "outside the input root" in outcome[3][1]
    assert outcome[4][1] == "file not found"
    assert "duplicate" in outcome[5][1]
    assert len(photos) == len(table)   # every manifest row is accounted for


def test_manifest_without_path_column_is_a_clear_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file\nx.jpg\n")
    with pytest.raises(InputError, match="no 'path' column"):
        discover_inputs(manifest)


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover_inputs(tmp_path / "nope")


def test_reserved_names_are_refused(tmp_path):
    (tmp_path / "_lineage").mkdir()
    (tmp_path / "_lineage" / "p.jpg").write_bytes(b"1")
    _, photos = discover_inputs(tmp_path)
    assert "reserved" in photos[0].refusal
