"""What a user may hand the bundle: flat folders, plain volumes, unsafe or repeated case ids, unreadable masks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import run

from scripts.data.datalist import build_datalist, inference_items, load_datalist
from scripts.data.io import InputError
from scripts.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = {"image_size": 32, "patch_size": 8, "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2],
        "network_def#num_res_units": 1, "num_workers": 0, "overlay_slices": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs") / "brats"
    generate_dataset(folder, n_cases=3, shape=(32, 32, 16), seed=2, abnormal_fraction=0.67)
    return folder


def _flat(phantoms: Path, target: Path, rename=lambda name: name) -> Path:
    target.mkdir()
    for file in sorted(phantoms.glob("*/*.nii.gz")):
        shutil.copy(file, target / rename(file.name))
    return target


def test_a_flat_folder_of_flair_volumes_is_one_case_per_file(phantoms, tmp_path):
    flat = _flat(phantoms, tmp_path / "flat")
    items = inference_items(flat)
    assert [i["case_id"] for i in items] == ["SYN_000", "SYN_001", "SYN_002"]
    assert all(i["seg"].endswith(f"{i['case_id']}_seg.nii.gz") for i in items)


def test_a_folder_of_plain_volumes_is_scored_case_by_case(phantoms, tmp_path):
    plain = _flat(phantoms, tmp_path / "plain", lambda name: name.replace("_flair", ""))
    datalist = build_datalist(plain, val_fraction=0.0, test_fraction=0.0)
    assert datalist["layout"] == "volumes"
    assert [i["case_id"] for i in datalist["training"]] == ["SYN_000", "SYN_001", "SYN_002"]
    assert all(i["seg"] == f"{i['case_id']}_seg.nii.gz" and "label" in i for i in datalist["training"])


def _write(path: Path, items: dict) -> Path:
    path.write_text(json.dumps({"dataset_dir": str(path.parent), **items}))
    return path


@pytest.mark.parametrize("case_id", ["../../x", "/tmp/x", "a/b", ".hidden", ""])
def test_a_case_id_that_would_write_outside_the_output_folder_is_refused(tmp_path, case_id):
    path = _write(tmp_path / "d.json", {"testing": [{"case_id": case_id, "image": "x_flair.nii.gz"}]})
    if case_id == "":  # no id: the file name gives one
        assert load_datalist(path, "testing")[0]["case_id"] == "x_flair"
        return
    with pytest.raises(InputError, match="cannot name an output file"):
        load_datalist(path, "testing")


def test_repeated_case_ids_and_cases_in_two_splits_are_refused_by_name(tmp_path):
    twice = _write(tmp_path / "twice.json", {"testing": [{"case_id": "A", "image": "a.nii.gz"},
                                                         {"case_id": "A", "image": "b.nii.gz"}]})
    with pytest.raises(InputError, match="more than once: A"):
        load_datalist(twice, "testing")
    leak = _write(tmp_path / "leak.json", {"training": [{"case_id": "P1", "image": "a.nii.gz"}],
                                           "testing": [{"case_id": "P1", "image": "a.nii.gz"}]})
    with pytest.raises(InputError, match=r"two splits.*P1 \(training, testing\)"):
        load_datalist(leak, "training")


def test_an_unreadable_mask_loses_only_its_own_case(phantoms, tmp_path, caplog, untrained):
    folder = tmp_path / "data"
    shutil.copytree(phantoms, folder)
    broken = folder / "SYN_001" / "SYN_001_seg.nii.gz"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])  # truncated gzip
    datalist = build_datalist(folder, val_fraction=0.0, test_fraction=0.0)
    cases = {i["case_id"]: i for i in datalist["training"]}
    assert set(cases) == {"SYN_000", "SYN_001", "SYN_002"} and "label" not in cases["SYN_001"]
    assert "SYN_001_seg.nii.gz" in caplog.text

    pytest.importorskip("torch")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update(TINY)
    untrained(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    run(run_id="run", config_file=str(ROOT / "configs" / "inference.json"), logging_file=str(ROOT / "configs" / "logging.conf"),
        **{**TINY, "input_path": str(folder), "output_dir": str(tmp_path / "out"), "ckpt_path": str(tmp_path / "model.pt"),
           "bundle_root": str(ROOT)})
    with open(tmp_path / "out" / "scores.csv") as handle:
        assert [row["case_id"] for row in csv.DictReader(handle)] == ["SYN_000", "SYN_002"]
    with open(tmp_path / "out" / "errors.csv") as handle:
        errors = list(csv.DictReader(handle))
    assert [e["case_id"] for e in errors] == ["SYN_001"] and "SYN_001_seg.nii.gz" in errors[0]["error"]
    assert nib.load(tmp_path / "out" / "heatmaps" / "SYN_000_heatmap.nii.gz").shape == (32, 32, 16)
    assert np.isfinite(np.asarray(nib.load(tmp_path / "out" / "heatmaps" / "SYN_002_heatmap.nii.gz").dataobj)).all()
