"""Mask-derived malignancy references of dermoscopy pictures, and pictures whose lesion mask is missing, empty or of
another size (named in the output; the other pictures are still scored)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run
from PIL import Image

from scripts.data.datalist import build_datalist
from scripts.data.io import write_json
from scripts.scoring.references import LESION_REFERENCES, lesion_references, volume_standardised_intensity

ROOT = Path(__file__).resolve().parents[1]


def _disc(size=101, radius=30, centre=(50, 50)):
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_the_references_of_a_uniform_disc():
    disc = _disc()
    refs = lesion_references(np.zeros((3, 101, 101)), disc)
    assert refs["trivial_area"] == pytest.approx(disc.sum() / disc.size)
    assert refs["trivial_asymmetry"] == pytest.approx(0.0, abs=0.01)
    assert refs["trivial_border"] == pytest.approx(1.0, abs=0.1)  # a disc is as compact as a shape gets
    assert refs["trivial_variegation"] == 0.0


def test_asymmetry_counts_the_lesion_its_mirror_does_not_cover():
    square = np.zeros((60, 60), dtype=bool)
    square[10:50, 10:50] = True
    assert lesion_references(np.zeros((1, 60, 60)), square)["trivial_asymmetry"] == pytest.approx(0.0, abs=0.01)
    # an L: a 40x40 square missing its 20x20 corner. Its principal axes are the diagonals; mirrored across the
    # diagonal through the missing corner it maps onto itself, across the other one its two 20x20 arms' ends
    # land on the missing corner and off the shape: asymmetric
    shape = square.copy()
    shape[30:50, 30:50] = False
    asymmetry = lesion_references(np.zeros((1, 60, 60)), shape)["trivial_asymmetry"]
    assert 0.1 < asymmetry < 0.5


def test_a_ragged_border_is_less_compact_than_a_smooth_one():
    smooth = _disc()
    yy, xx = np.mgrid[:101, :101]
    angle = np.arctan2(yy - 50, xx - 50)
    ragged = np.hypot(yy - 50, xx - 50) <= 30 + 6 * np.sin(12 * angle)
    image = np.zeros((3, 101, 101))
    assert lesion_references(image, ragged)["trivial_border"] > 1.3 * lesion_references(image, smooth)["trivial_border"]


def test_variegation_is_the_mean_channel_spread_inside_the_lesion_only():
    disc = _disc()
    image = np.zeros((3, 101, 101))
    image[0][disc] = np.where(np.arange(disc.sum()) % 2 == 0, 0.2, 0.6)  # two colours in channel 0: std 0.2
    image[:, ~disc] = np.random.default_rng(0).uniform(size=(3, int((~disc).sum())))  # skin does not count
    assert lesion_references(image, disc)["trivial_variegation"] == pytest.approx(0.2 / 3)


def test_the_volume_z_intensity_reference_standardises_each_case_on_its_own_slices():
    intensity = np.array([1.0, 2.0, 3.0, np.nan, 10.0, 20.0, 30.0, 5.0])
    cases = np.array(["a", "a", "a", "a", "b", "b", "b", "c"])
    z = volume_standardised_intensity(intensity, cases)
    # a: median 2, MAD 1 -> (x - 2) / 1.4826; b: ten times the spread, the same z; NaN stays out; c alone scores 0
    np.testing.assert_allclose(z[:3], np.array([-1.0, 0.0, 1.0]) / 1.4826)
    np.testing.assert_allclose(z[4:7], z[:3])
    assert np.isnan(z[3]) and z[7] == 0.0
    # against the lower half of a's slices (1, 2): median 1 (torch's lower median), MAD 0 -> floored, so a's
    # brighter slices stand far out; c alone still scores 0
    lower = volume_standardised_intensity(intensity, cases, lower_half=True)
    assert lower[0] == 0.0 and lower[1] > 1e3 and lower[7] == 0.0


def test_no_lesion_gives_no_reference():
    refs = lesion_references(np.zeros((3, 10, 10)), np.zeros((10, 10), dtype=bool))
    assert list(refs) == list(LESION_REFERENCES) and all(np.isnan(v) for v in refs.values())


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_pictures_with_a_missing_empty_or_wrong_size_mask_are_named_and_the_others_scored(tmp_path, untrained):
    images, masks = tmp_path / "train", tmp_path / "train_masks"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    names = ["ISIC_good", "ISIC_missing", "ISIC_empty", "ISIC_small"]
    for name in names:
        Image.fromarray((rng.uniform(0.3, 0.9, (32, 32, 3)) * 255).astype(np.uint8)).save(images / f"{name}.png")
    lesion = (_disc(32, 8, (16, 16)) * 255).astype(np.uint8)
    Image.fromarray(lesion).save(masks / "ISIC_good_segmentation.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "ISIC_empty_segmentation.png")
    Image.fromarray(lesion[:16, :16]).save(masks / "ISIC_small_segmentation.png")
    (tmp_path / "train_labels.csv").write_text("image_id,label\n" + "".join(f"{n},benign\n" for n in names))
    small = {"image_size": 32, "patch_size": 8, "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2],
             "network_def#num_res_units": 1, "critic_def#channels": 8, "score_maps": ["ssim"]}
    torch.manual_seed(0)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / c) for c in ("inference.json", "dermoscopy.json")])
    parser.update(small)
    untrained(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt", channels=3)
    datalist = tmp_path / "datalist.json"
    write_json(build_datalist(images, labels_csv=tmp_path / "train_labels.csv", masks_dir=masks, val_fraction=0.0,
                              test_fraction=1.0), datalist)
    out = tmp_path / "out"
    run(run_id="run", config_file=[str(ROOT / "configs" / c) for c in ("inference.json", "dermoscopy.json")],
        logging_file=str(ROOT / "configs" / "logging.conf"),
        **{**small, "bundle_root": str(ROOT), "output_dir": str(out), "num_workers": 0, "amp": False,
           "device": "$torch.device('cpu')", "ckpt_path": str(tmp_path / "model.pt"), "input_path": str(datalist)})
    scored = {row["case_id"]: row for row in _rows(out / "slice_scores.csv")}
    assert set(scored) == {"ISIC_good", "ISIC_missing", "ISIC_empty"}
    assert float(scored["ISIC_good"]["trivial_area"]) == pytest.approx((lesion > 0).mean())
    assert scored["ISIC_missing"]["trivial_area"] == "nan" or np.isnan(float(scored["ISIC_missing"]["trivial_area"]))
    warnings = {row["case_id"]: row["warning"] for row in _rows(out / "warnings.csv")}
    assert set(warnings) == {"ISIC_missing", "ISIC_empty"}
    assert "no lesion mask" in warnings["ISIC_missing"] and "empty lesion mask" in warnings["ISIC_empty"]
    errors = {row["case_id"]: row["error"] for row in _rows(out / "errors.csv")}
    assert set(errors) == {"ISIC_small"} and "ISIC_small_segmentation.png" in errors["ISIC_small"]
    assert "differs from the image size" in errors["ISIC_small"]
