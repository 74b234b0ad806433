"""scripts.data.datalist: the three layouts, label reading, patient-level splits and loading back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from scripts.data.datalist import SPLITS, build_datalist, load_datalist, main, split_cases
from scripts.data.io import InputError

REPO = Path(__file__).resolve().parents[1]


def _nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _seg(lesion: bool) -> np.ndarray:
    seg = np.zeros((4, 4, 3), np.uint8)
    if lesion:
        seg[1, 1, 1] = 2
    return seg


def _all_items(datalist: dict) -> list[dict]:
    return [item for split in SPLITS for item in datalist[split]]


@pytest.fixture
def brats_dir(tmp_path) -> Path:
    """Four cases: lesion, no lesion, no seg at all, and an MHA case with BraTS 2020 naming."""
    root = tmp_path / "brats"
    flair = np.random.default_rng(0).random((4, 4, 3)).astype(np.float32)
    for case, lesion in (("CASE_A", True), ("CASE_B", False)):
        _nifti(root / case / f"{case}_flair.nii.gz", flair)
        _nifti(root / case / f"{case}_seg.nii.gz", _seg(lesion))
    _nifti(root / "CASE_C" / "CASE_C_flair.nii", flair)
    case = "BraTS20_Training_001"
    (root / case).mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(flair), str(root / case / f"{case}_flair.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(_seg(True)), str(root / case / f"{case}_seg.mha"))
    (root / "CASE_A" / "._CASE_A_flair.nii.gz").write_bytes(b"macOS resource fork")
    return root


def test_brats_layout(brats_dir):
    datalist = build_datalist(brats_dir, val_fraction=0.0, test_fraction=0.0)
    assert datalist["layout"] == "brats" and datalist["dataset_dir"] == str(brats_dir.resolve())
    items = {item["case_id"]: item for item in datalist["training"]}
    assert sorted(items) == ["BraTS20_Training_001", "CASE_A", "CASE_B", "CASE_C"]
    assert items["CASE_A"] == {"case_id": "CASE_A", "image": "CASE_A/CASE_A_flair.nii.gz", "seg": "CASE_A/CASE_A_seg.nii.gz", "label": 1}
    assert items["CASE_B"]["label"] == 0
    assert "seg" not in items["CASE_C"] and "label" not in items["CASE_C"]
    assert items["BraTS20_Training_001"]["seg"].endswith("_seg.mha") and items["BraTS20_Training_001"]["label"] == 1


def test_msd_layout(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    (root / "dataset.json").parent.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"name": "BRATS", "modality": {"0": "FLAIR"}}))
    image = np.random.default_rng(0).random((4, 4, 3, 4)).astype(np.float32)
    for index, lesion in ((1, True), (2, False), (3, True)):
        _nifti(root / "imagesTr" / f"BRATS_{index:03d}.nii.gz", image)
        _nifti(root / "labelsTr" / f"BRATS_{index:03d}.nii.gz", _seg(lesion))
    for folder in ("imagesTr", "labelsTr"):
        (root / folder / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS")
    items = {i["case_id"]: i for i in _all_items(build_datalist(root))}
    assert sorted(items) == ["BRATS_001", "BRATS_002", "BRATS_003"]
    assert items["BRATS_001"] == {
        "case_id": "BRATS_001", "image": "imagesTr/BRATS_001.nii.gz", "channel": 0,
        "seg": "labelsTr/BRATS_001.nii.gz", "label": 1,
    }
    assert items["BRATS_002"]["label"] == 0
    assert all(item["channel"] == 2 for item in _all_items(build_datalist(root, layout="msd", channel=2)))


@pytest.fixture
def images_dir(tmp_path) -> Path:
    """Six RGB images (one PNG in a subfolder), a labels CSV, and masks in both naming styles."""
    root = tmp_path / "isic" / "train"
    (root / "more").mkdir(parents=True)
    masks = tmp_path / "isic" / "masks"
    masks.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        folder = root / "more" if index == 5 else root
        suffix = ".png" if index == 5 else ".jpg"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"IMG_{index}{suffix}")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "IMG_0_segmentation.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "IMG_1.png")
    labels = "image_id,label\nIMG_0,benign\nIMG_1,malignant\nIMG_2,normal\nIMG_3,abnormal\nIMG_4,0\nIMG_5,1\n"
    (tmp_path / "isic" / "labels.csv").write_text(labels)
    return root


def test_images_layout(images_dir):
    isic = images_dir.parent
    datalist = build_datalist(images_dir, labels_csv=isic / "labels.csv", masks_dir=isic / "masks", val_fraction=0, test_fraction=0)
    assert datalist["layout"] == "images"
    items = {item["case_id"]: item for item in datalist["training"]}
    assert {k: v["label"] for k, v in items.items()} == {f"IMG_{i}": i % 2 for i in range(6)}
    assert items["IMG_0"]["seg"] == "../masks/IMG_0_segmentation.png"
    assert items["IMG_1"]["seg"] == "../masks/IMG_1.png"
    assert "seg" not in items["IMG_2"]
    assert items["IMG_5"]["image"] == "more/IMG_5.png"
    loaded = {item["case_id"]: item for item in load_datalist_from(datalist, isic / "dl.json", "training")}
    assert loaded["IMG_0"]["seg"] == str((isic / "masks" / "IMG_0_segmentation.png").resolve())


def test_images_without_labels_and_headerless_csv(images_dir, tmp_path):
    unlabelled = _all_items(build_datalist(images_dir))
    assert len(unlabelled) == 6 and all("label" not in item and "seg" not in item for item in unlabelled)
    csv = tmp_path / "official.csv"
    csv.write_text("".join(f"IMG_{i}.jpg,{float(i % 2)}\n" for i in range(6)))
    labelled = _all_items(build_datalist(images_dir, labels_csv=csv))
    assert sorted(item["label"] for item in labelled) == [0, 0, 0, 1, 1, 1]


def test_empty_image_folder(tmp_path):
    empty = tmp_path / "no_images_here"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing")
    for layout in ("images", "auto"):
        with pytest.raises(InputError) as error:
            build_datalist(empty, layout=layout)
        assert "no_images_here" in str(error.value)
    with pytest.raises(InputError, match="not found") as error:
        build_datalist(tmp_path / "absent_dataset")
    assert "absent_dataset" in str(error.value)


def test_bad_csv_label(images_dir, tmp_path):
    csv = tmp_path / "bad_labels.csv"
    csv.write_text("image_id,label\nIMG_0,benign\nIMG_1,suspicious\n")
    with pytest.raises(InputError) as error:
        build_datalist(images_dir, labels_csv=csv)
    message = str(error.value)
    assert "bad_labels.csv" in message and "row 3" in message and "suspicious" in message


# ------------------------------------------------------------------------------------------------ splits


def test_split_disjoint_complete_deterministic():
    ids = [f"case{i:02d}" for i in range(20)]
    labels = {case: int(i >= 12) for i, case in enumerate(ids)}
    first = split_cases(ids, labels, 0.2, 0.2, seed=3)
    assert split_cases(list(reversed(ids)), labels, 0.2, 0.2, seed=3) == first
    assert split_cases(ids, labels, 0.2, 0.2, seed=4) != first
    sets = [set(first[split]) for split in SPLITS]
    assert sum(len(s) for s in sets) == 20 and set().union(*sets) == set(ids)
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert [len(first[s]) for s in SPLITS] == [12, 4, 4]
    for split in SPLITS:  # stratified: each split has both classes
        assert {labels[case] for case in first[split]} == {0, 1}


def test_split_small_groups_and_edges():
    ids = ["a", "b", "c", "d", "e", "f"]
    labels = {case: int(case in "abc") for case in ids}
    splits = split_cases(ids, labels, 0.2, 0.2, seed=0)
    for split in SPLITS:
        assert {labels[case] for case in splits[split]} == {0, 1}
    assert split_cases(ids, None, 0.0, 0.0)["training"] == ids
    assert split_cases(ids, None, 0.0, 1.0)["testing"] == ids
    with pytest.raises(ValueError):
        split_cases(ids, None, 0.6, 0.6)
    with pytest.raises(ValueError):
        split_cases(["a", "a"])


def test_datalist_split_by_case(brats_dir):
    datalist = build_datalist(brats_dir, val_fraction=0.25, test_fraction=0.25, seed=1)
    ids = [item["case_id"] for item in _all_items(datalist)]
    assert len(ids) == len(set(ids)) == 4
    assert build_datalist(brats_dir, val_fraction=0.25, test_fraction=0.25, seed=1) == datalist


# ------------------------------------------------------------------------------------------------ loading


def load_datalist_from(datalist: dict, path: Path, split: str, **kwargs) -> list[dict]:
    path.write_text(json.dumps(datalist))
    return load_datalist(path, split, **kwargs)


def test_load_datalist(brats_dir, tmp_path):
    datalist = build_datalist(brats_dir, val_fraction=0.0, test_fraction=0.0)
    items = load_datalist_from(datalist, tmp_path / "dl.json", "training")
    assert all(Path(item["image"]).is_absolute() and Path(item["image"]).is_file() for item in items)
    assert all(Path(item["seg"]).is_file() for item in items if "seg" in item)
    assert load_datalist(tmp_path / "dl.json", "validation") == []
    moved = tmp_path / "elsewhere"
    overridden = load_datalist(tmp_path / "dl.json", "training", base_dir=moved)
    assert all(item["image"].startswith(str(moved)) for item in overridden)


def test_load_datalist_errors(tmp_path):
    with pytest.raises(InputError, match="not found") as error:
        load_datalist(tmp_path / "missing_datalist.json", "training")
    assert "missing_datalist.json" in str(error.value)
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"dataset_dir": str(tmp_path), "training": []}))
    with pytest.raises(InputError, match="testing") as error:
        load_datalist(path, "testing")
    assert "partial.json" in str(error.value)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError) as error:
        load_datalist(broken, "training")
    assert "broken.json" in str(error.value)


def test_cli(brats_dir, tmp_path, capsys):
    output = tmp_path / "out" / "datalist.json"
    assert main(["--dataset-dir", str(brats_dir), "--output", str(output), "--seed", "2"]) == 0
    written = json.loads(output.read_text())
    assert written == build_datalist(brats_dir, seed=2)
    assert main(["--dataset-dir", str(tmp_path / "absent"), "--output", str(tmp_path / "x.json")]) == 2
    assert "absent" in capsys.readouterr().err


def test_cli_module_entry_point(brats_dir, tmp_path):
    output = tmp_path / "datalist.json"
    command = [sys.executable, "-m", "scripts.data.datalist", "--dataset-dir", str(brats_dir), "--output", str(output), "--layout", "brats"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text())["layout"] == "brats"


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
def test_real_brats2013(shared_data):
    root = shared_data / "brats2013"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    items = _all_items(build_datalist(root))
    assert len(items) == 4 and all(item["label"] == 1 for item in items)
    assert all(item["image"].endswith("_flair.nii.gz") and item["seg"].endswith("_seg.nii.gz") for item in items)


@pytest.mark.slow
def test_real_isic2016(shared_data):
    root = shared_data / "isic2016"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    datalist = build_datalist(root / "train", labels_csv=root / "train_labels.csv", masks_dir=root / "train_masks")
    items = _all_items(datalist)
    assert datalist["layout"] == "images" and len(items) == 766
    assert sum(item["label"] for item in items) == 148
    assert sum("seg" in item for item in items) == 749
    for split in SPLITS:
        assert {item["label"] for item in datalist[split]} == {0, 1}


def test_folds_test_every_case_once_and_never_mix_splits():
    from scripts.data.datalist import fold_cases

    ids = [f"case{i}" for i in range(10)]
    labels = {case: i % 2 for i, case in enumerate(ids)}
    tested = []
    for fold in range(4):
        splits = fold_cases(ids, labels, folds=4, fold=fold, seed=1)
        sets = [set(splits[s]) for s in ("training", "validation", "testing")]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert set().union(*sets) == set(ids)
        tested += splits["testing"]
    assert sorted(tested) == sorted(ids)
    assert fold_cases(ids, labels, 4, 2, seed=1) == fold_cases(ids, labels, 4, 2, seed=1)
