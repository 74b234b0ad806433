"""experiments.lesion_crops: the window around a lesion, the crops, and pictures that cannot be cropped."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.lesion_crops import crop_case, lesion_box, main
from scripts.data.datalist import build_datalist


def _lesion(rows: slice, cols: slice, shape: tuple[int, int] = (100, 120)) -> np.ndarray:
    mask = np.zeros((1, *shape), dtype=np.uint8)
    mask[0, rows, cols] = 1
    return mask


def test_the_window_is_the_square_around_the_lesion_widened_by_the_margin():
    # lesion rows 40-59, cols 30-39: centre (50, 35), longer side 20 -> half side 10 * (1 + 2 * 0.25) = 15
    rows, cols = lesion_box(_lesion(slice(40, 60), slice(30, 40)), margin=0.25)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (35, 65, 20, 50)
    rows, cols = lesion_box(_lesion(slice(40, 60), slice(30, 40)), margin=0.0)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (40, 60, 25, 45)


def test_the_window_is_clipped_at_the_edge_of_the_picture():
    rows, cols = lesion_box(_lesion(slice(0, 30), slice(100, 120)), margin=0.5)
    assert rows.start == 0 and cols.stop == 120
    assert rows.stop == 45 and cols.start == 80  # centre (15, 110), half side 30


def _write_case(folder: Path, name: str, lesion: np.ndarray | None) -> None:
    (folder / "pics").mkdir(exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    picture = np.zeros((64, 64, 3), dtype=np.uint8)
    picture[..., 1] = 200  # green skin
    if lesion is not None:
        picture[lesion.astype(bool)] = (90, 40, 20)  # a brown lesion
        Image.fromarray(lesion.astype(np.uint8) * 255).save(folder / "masks" / f"{name}_segmentation.png")
    Image.fromarray(picture).save(folder / "pics" / f"{name}.png")


def test_a_crop_keeps_the_lesion_in_the_middle_at_the_asked_size(tmp_path: Path):
    lesion = np.zeros((64, 64), dtype=np.uint8)
    lesion[10:20, 40:50] = 1
    _write_case(tmp_path, "a", lesion)
    picture, mask = crop_case(str(tmp_path / "pics" / "a.png"), str(tmp_path / "masks" / "a_segmentation.png"), 0.5, 40)
    assert picture.shape == (3, 40, 40) and mask.shape == (40, 40)
    # the window is 20 px wide (10 + 2 * 0.5 * 10), the lesion its middle half: rows and cols 10-29 of 40
    assert mask[10:30, 10:30].all() and mask.sum() == 20 * 20 * 255
    assert picture[0, 20, 20] == 90 and picture[1, 2, 2] == 200


def test_the_command_crops_every_masked_picture_and_names_the_others(tmp_path: Path, caplog):
    lesion = np.zeros((64, 64), dtype=np.uint8)
    lesion[20:40, 20:30] = 1
    _write_case(tmp_path, "good", lesion)
    _write_case(tmp_path, "nomask", None)
    _write_case(tmp_path, "empty", np.zeros((64, 64), dtype=np.uint8))
    (tmp_path / "labels.csv").write_text("image_id,label\ngood,malignant\nnomask,benign\nempty,benign\n")
    out = tmp_path / "crops"
    with caplog.at_level("WARNING"):
        assert main(["--dataset", str(tmp_path / "pics"), "--labels-csv", str(tmp_path / "labels.csv"),
                     "--masks-dir", str(tmp_path / "masks"), "--output", str(out), "--size", "32"]) == 0
    assert "nomask: no lesion mask" in caplog.text and "empty_segmentation.png: the lesion mask is empty" in caplog.text
    with (out / "train_labels.csv").open() as handle:
        assert list(csv.DictReader(handle)) == [{"image_id": "good", "label": "malignant"}]
    datalist = build_datalist(out / "train", labels_csv=out / "train_labels.csv", masks_dir=out / "train_masks",
                              val_fraction=0.0, test_fraction=0.0)
    assert [(i["case_id"], i["label"]) for i in datalist["training"]] == [("good", 1)]
    assert "seg" in datalist["training"][0]


def test_a_folder_without_a_croppable_picture_fails(tmp_path: Path):
    _write_case(tmp_path, "nomask", None)
    (tmp_path / "labels.csv").write_text("image_id,label\nnomask,benign\n")
    assert main(["--dataset", str(tmp_path / "pics"), "--labels-csv", str(tmp_path / "labels.csv"),
                 "--masks-dir", str(tmp_path / "masks"), "--output", str(tmp_path / "crops")]) == 1
