"""Tiles already cut: ImageFolder trees and tile CSVs → TileTable → TileFileDataset."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from calciscope.data.tile_folders import TileFileDataset, read_tile_image, read_tile_table
from calciscope.errors import CalciscopeError


def write_image(path: Path, rgb, size=(40, 40)) -> Path:
    """A solid-colour image file (RGB given; written through OpenCV, so stored as BGR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.empty((size[1], size[0], 3), np.uint8)
    image[:] = rgb
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "tiles"
    write_image(root / "tumor" / "a1.png", (200, 0, 0))
    write_image(root / "tumor" / "nested" / "a2.jpg", (200, 0, 0))
    write_image(root / "stroma" / "b1.tif", (0, 0, 200))
    write_image(root / "adipose" / "c1.bmp", (0, 200, 0), size=(60, 30))
    (root / "tumor" / "notes.txt").write_text("not a tile")
    return root


def test_folder_classes_are_sorted_one_hot_and_found_recursively(folder):
    table = read_tile_table(folder)
    assert table.label_names == ["adipose", "stroma", "tumor"]
    assert table.multiclass and table.fixed_split is None
    assert len(table) == 4 and table.labels.dtype == np.float32
    names = [p.name for p in table.paths]
    assert names == ["c1.bmp", "b1.tif", "a1.png", "a2.jpg"]
    np.testing.assert_array_equal(table.labels.argmax(1), [0, 1, 2, 2])
    np.testing.assert_array_equal(table.labels.sum(1), 1)


def test_folder_groups_default_to_file_stem_and_come_from_patients_csv(folder):
    assert read_tile_table(folder).groups == ["c1", "b1", "a1", "a2"]
    (folder / "patients.csv").write_text(
        "file,patient_id\ntumor/a1.png,P1\ntumor/nested/a2.jpg,P4\nstroma/b1.tif,P2\nadipose/c1.bmp,P3\n")
    assert read_tile_table(folder).groups == ["P3", "P2", "P1", "P4"]


def test_patients_csv_must_list_every_tile(folder):
    (folder / "patients.csv").write_text("file,patient_id\ntumor/a1.png,P1\n")
    with pytest.raises(CalciscopeError, match="no patient_id"):
        read_tile_table(folder)


def test_config_labels_select_and_order_outputs(folder):
    table = read_tile_table(folder, ["tumor", "adipose"])
    assert table.label_names == ["tumor", "adipose"]
    np.testing.assert_array_equal(table.labels, [[0, 1], [0, 0], [1, 0], [1, 0]])
    assert not table.multiclass  # the stroma tile has no selected label


def test_a_label_the_data_lacks_is_named_with_the_available_ones(folder):
    with pytest.raises(CalciscopeError, match=r"\['thrombosis'\].*'adipose', 'stroma', 'tumor'"):
        read_tile_table(folder, ["tumor", "thrombosis"])


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalciscopeError, match="no class folders"):
        read_tile_table(tmp_path / "empty")
    (tmp_path / "empty" / "tumor").mkdir()
    with pytest.raises(CalciscopeError, match="tumor: class folder has no images"):
        read_tile_table(tmp_path / "empty")


def test_csv_with_label_columns_is_multilabel_with_patients_and_splits(tmp_path):
    write_image(tmp_path / "img" / "t1.png", (10, 10, 10))
    write_image(tmp_path / "img" / "t2.png", (10, 10, 10))
    absolute = write_image(tmp_path / "elsewhere" / "t3.png", (10, 10, 10))
    csv_path = tmp_path / "tiles.csv"
    csv_path.write_text(
        "path,patient_id,split,thrombosis,vasculitis,stain\n"
        "img/t1.png,P1,train,1,0,HE\n"
        "img/t2.png,P1,,1,1,HE\n"
        f"{absolute},P2,test,0,0,HE\n")
    table = read_tile_table(csv_path, ["vasculitis", "thrombosis"])
    assert table.paths == [tmp_path / "img" / "t1.png", tmp_path / "img" / "t2.png", absolute]
    np.testing.assert_array_equal(table.labels, [[0, 1], [1, 1], [0, 0]])
    assert table.groups == ["P1", "P1", "P2"]
    assert table.fixed_split == ["train", None, "test"]
    assert not table.multiclass
    with pytest.raises(CalciscopeError, match="'stain' must be 0 or 1"):
        read_tile_table(csv_path)  # without labels every other column is a label


def test_csv_label_column_holds_class_names_or_several(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png", (0, 0, 0))
    (tmp_path / "classes.csv").write_text("path,label\na.png,tumor\nb.png,stroma\nc.png,tumor\n")
    table = read_tile_table(tmp_path / "classes.csv")
    assert table.label_names == ["stroma", "tumor"] and table.multiclass
    assert table.groups == ["a", "b", "c"] and table.fixed_split is None
    np.testing.assert_array_equal(table.labels, [[0, 1], [1, 0], [0, 1]])
    (tmp_path / "multi.csv").write_text("path,label\na.png,tumor;necrosis\nb.png,\nc.png,tumor\n")
    table = read_tile_table(tmp_path / "multi.csv")
    assert table.label_names == ["necrosis", "tumor"] and not table.multiclass
    np.testing.assert_array_equal(table.labels, [[1, 1], [0, 0], [0, 1]])


@pytest.mark.parametrize("body, message", [
    ("path,label\n", "no rows"),
    ("path,label\nmissing.png,tumor\n", "tile file not found: .*missing.png"),
    ("file,label\na.png,tumor\n", r"missing column\(s\) \['path'\]"),
    ("path,label,split\na.png,tumor,holdout\n", "split must be one of"),
])
def test_bad_csvs_are_refused_at_read_time(tmp_path, body, message):
    write_image(tmp_path / "a.png", (0, 0, 0))
    (tmp_path / "t.csv").write_text(body)
    with pytest.raises(CalciscopeError, match=message):
        read_tile_table(tmp_path / "t.csv")


def test_images_are_rgb_resized_and_centre_cropped(tmp_path):
    red = write_image(tmp_path / "red.png", (255, 0, 0), size=(100, 100))
    assert read_tile_image(red, 32)[..., 0].min() == 255 and read_tile_image(red, 32)[..., 2].max() == 0
    small = write_image(tmp_path / "small.png", (0, 255, 0), size=(16, 16))
    assert read_tile_image(small, 32).shape == (32, 32, 3)
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # the centre third is white: cropping keeps it, stretching would squash it
    cv2.imwrite(str(tmp_path / "wide.png"), wide)
    tile = read_tile_image(tmp_path / "wide.png", 20)
    assert tile.shape == (20, 20, 3) and tile.min() == 255


def test_dataset_items_labels_and_seeded_transform(folder):
    table = read_tile_table(folder)
    seen = []

    def transform(rgb, seed):
        seen.append(seed)
        return rgb[::-1].copy()

    ds = TileFileDataset(table, [3, 0], tile_px=24, transform=transform, seed=7)
    image, labels, i = ds[1]
    assert len(ds) == 2 and i == 1
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 24, 24)
    np.testing.assert_array_equal(labels.numpy(), table.labels[0])
    ds[1]
    ds.set_epoch(1)
    ds[1]
    assert seen[0] == seen[1] == hash((7, 0, 1)) % 2**32 and seen[2] == hash((7, 1, 1)) % 2**32 != seen[0]


def test_an_unreadable_image_is_named_when_it_is_read(folder):
    (folder / "tumor" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    table = read_tile_table(folder)  # listing does not decode
    ds = TileFileDataset(table, tile_px=16)
    bad = [p.name for p in table.paths].index("broken.png")
    with pytest.raises(CalciscopeError, match="broken.png: not a readable image"):
        ds[bad]
