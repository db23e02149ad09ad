"""The second renderer (data.tile_phantom) and the phantom's tile cutter (data.phantom_tiles): deterministic tiles
that the tile readers open, carrying the labels they say, drawn by code that shares nothing with data.phantom."""

import ast
import csv
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

import calciscope.data.tile_phantom as tile_phantom
from calciscope.data.phantom_tiles import cut_phantom_tiles
from calciscope.data.synthetic import generate_dataset
from calciscope.data.tile_folders import read_tile_image, read_tile_table
from calciscope.data.tile_phantom import FINDINGS, SCENARIOS, render_tile, write_tile_set
from calciscope.errors import CalciscopeError


@pytest.fixture(scope="module")
def tile_set(tmp_path_factory):
    return write_tile_set(tmp_path_factory.mktemp("second"), 160, seed=5)


def test_tiles_are_deterministic_per_seed_and_index():
    a, la, sa, ka = render_tile(3, 17)
    b, lb, sb, kb = render_tile(3, 17)
    c, *_ = render_tile(4, 17)
    assert np.array_equal(a, b) and (la, sa, ka) == (lb, sb, kb)
    assert a.shape == (112, 112, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, c)


def test_the_tile_folder_opens_with_the_tile_reader_and_carries_the_labels_it_says(tile_set):
    table = read_tile_table(tile_set, list(FINDINGS))
    assert len(table) == 160 and table.label_names == list(FINDINGS) and not table.multiclass
    info = {row["path"]: row for row in csv.DictReader(open(tile_set.parent / "appearance.csv"))}
    for path, labels in zip(table.paths, table.labels):
        row = info[path.relative_to(tile_set.parent).as_posix()]
        scenario = row["scenario"]
        expected = {k: int(k == scenario) for k in FINDINGS}
        if scenario.endswith("calcification") and "/" in row["appearance"]:  # a calcified vessel with a thrombus
            expected["thrombosis"] = 1
        assert dict(zip(FINDINGS, labels.astype(int).tolist())) == expected, row
    positives = table.labels.sum(axis=0)
    assert (positives >= 10).all() and (positives <= 60).all(), positives  # every finding, each a minority
    assert read_tile_image(table.paths[0], 112).shape == (112, 112, 3)
    assert {r["scenario"] for r in info.values()} == set(SCENARIOS)


def test_findings_have_pixels_behind_them(tile_set):
    """Calcified tiles hold the darkest pixels, thrombosed lumens the reddest: the labels are visible."""
    table = read_tile_table(tile_set, list(FINDINGS))
    images = np.stack([read_tile_image(p, 112) for p in table.paths]).astype(np.float32)
    dark = (images.sum(axis=3) < 200).mean(axis=(1, 2))
    calcified = table.labels[:, :2].max(axis=1) > 0
    assert np.median(dark[calcified]) > 3 * np.median(dark[~calcified]) + 0.002


def test_the_second_renderer_shares_no_code_with_the_phantom():
    """Its own code path: no module of data.tile_phantom imports data.phantom or data.synthetic."""
    for module in Path(tile_phantom.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not node.module.startswith(("calciscope.data.phantom", "calciscope.data.synthetic")), module


def test_a_bad_tile_count_is_refused(tmp_path):
    with pytest.raises(CalciscopeError, match="n_tiles"):
        write_tile_set(tmp_path, 0)


def test_phantom_tiles_are_cut_around_vessels_with_the_lesions_as_labels(tmp_path):
    manifest = generate_dataset(tmp_path / "slides", 2, size_px=1536, seed=41, artifacts=False,
                                prevalence=dict.fromkeys(FINDINGS, 1.0))
    tiles = cut_phantom_tiles(manifest, tmp_path / "tiles", seed=1)
    again = cut_phantom_tiles(manifest, tmp_path / "again", seed=1)
    assert tiles.read_text() == again.read_text()
    table = read_tile_table(tiles, list(FINDINGS))
    assert len(table) >= 30 and set(table.groups) == {"P0001"}
    assert (table.labels.sum(axis=0) >= 1).all() and (table.labels.sum(axis=1) == 0).sum() >= 10
    assert read_tile_image(table.paths[0], 112).shape == (112, 112, 3)


def test_phantom_tiles_cli_writes_one_table_over_several_sets_and_names_a_bad_seed_count(capsys, tmp_path):
    a = generate_dataset(tmp_path / "a", 2, size_px=1024, seed=42, artifacts=False, style="classic")
    b = generate_dataset(tmp_path / "b", 2, size_px=1024, seed=43, artifacts=False)
    code, _, err = run_cli(capsys, "phantom-tiles", "--data", a, "--data", b, "--out", tmp_path / "t",
                           "--seed", "5", "--seed", "6")
    assert code == 0, err
    table = read_tile_table(tmp_path / "t" / "tiles.csv", list(FINDINGS))
    alone = cut_phantom_tiles(b, tmp_path / "b_alone", seed=6).read_text().splitlines()[1:]
    assert {g.split("_")[0] for g in table.groups} == {"5", "6"}
    rows = (tmp_path / "t" / "tiles.csv").read_text().splitlines()[1:]
    assert rows[-len(alone):] == [f"b/{r.split(',', 1)[0]},6_{r.split(',', 1)[1]}" for r in alone]
    assert read_tile_image(table.paths[0], 112).shape == (112, 112, 3)
    code, _, err = run_cli(capsys, "phantom-tiles", "--data", a, "--data", b, "--out", tmp_path / "u",
                           "--seed", "1", "--seed", "2", "--seed", "3")
    assert code == 1 and "2 manifests and 3 seeds" in err
