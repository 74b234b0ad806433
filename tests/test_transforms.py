"""Normalisation, slicing with labels, box masking, the slice cache, and slice labels on the real BraTS cases."""

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.data.cache import build_slice_records
from scripts.data.transforms import BrainPercentileNormalized, LoadCased, RandBoxMaskd, VolumeToSlicesd


def write_case(folder, shape=(24, 20, 10), lesion_slices=(4, 5), lesion_voxels=(30, 5), affine=None, background=-2.5):
    """A z-scored-looking volume (negative values, constant background) and its lesion mask."""
    rng = np.random.default_rng(0)
    image = np.full(shape, background, dtype=np.float32)
    image[2:-2, 2:-2, 1:-1] = rng.normal(0, 1, (shape[0] - 4, shape[1] - 4, shape[2] - 2))
    seg = np.zeros(shape, dtype=np.uint8)
    for z, n in zip(lesion_slices, lesion_voxels):
        seg[5:5 + n // 5, 5:10, z] = 2
        image[5:5 + n // 5, 5:10, z] = 6.0
    affine = np.eye(4) if affine is None else affine
    nib.save(nib.Nifti1Image(image, affine), folder / "case_flair.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), folder / "case_seg.nii.gz")
    return {"case_id": "case", "image": str(folder / "case_flair.nii.gz"), "seg": str(folder / "case_seg.nii.gz")}


def test_normalisation_handles_negative_z_scores_and_keeps_the_brain_positive(tmp_path):
    item = write_case(tmp_path)
    data = BrainPercentileNormalized("image")(LoadCased()(item))
    image = data["image"]
    assert image[0, 0, 0, 0] == 0.0  # background
    brain = image[:, 2:-2, 2:-2, 1:-1]
    assert brain.min() > 0  # the brain stays recoverable as image > 0
    assert np.percentile(brain, 99.5) == pytest.approx(1.0, abs=1e-3)
    assert np.percentile(brain, 0.5) == pytest.approx(0.0, abs=2e-3)


def test_slices_are_labelled_from_the_segmentation(tmp_path):
    item = write_case(tmp_path, lesion_slices=(4, 6), lesion_voxels=(30, 5))
    data = VolumeToSlicesd(image_size=16, min_brain_fraction=0.1, min_lesion_voxels=20)(
        BrainPercentileNormalized("image")(LoadCased()(item))
    )
    index = data["slice_index"].tolist()
    labels = dict(zip(index, data["label"].tolist()))
    assert 0 not in index and 9 not in index  # empty end slices are dropped
    assert labels[4] == 1  # 30 lesion voxels
    assert 6 not in labels  # 5 voxels: ambiguous, dropped
    assert all(labels[z] == 0 for z in index if z not in (4, 6))
    assert data["image"].shape == (len(index), 1, 16, 16)
    assert data["seg"].shape == (len(index), 1, 16, 16)


def test_volumes_are_reoriented_to_ras_and_keep_their_original_affine(tmp_path):
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    item = write_case(tmp_path, affine=lps)
    data = LoadCased()(item)
    np.testing.assert_allclose(data["image_meta_dict"]["original_affine"], lps)
    assert nib.aff2axcodes(data["image_meta_dict"]["affine"]) == ("R", "A", "S")
    raw = nib.load(item["image"]).get_fdata()
    np.testing.assert_allclose(data["image"][0], raw[::-1, ::-1, :])
    np.testing.assert_array_equal(data["seg"][0], nib.load(item["seg"]).get_fdata()[::-1, ::-1, :])


def test_box_masking_blacks_out_boxes_and_returns_the_mask():
    transform = RandBoxMaskd(num_boxes=(2, 2), box_size=(4, 6))
    transform.set_random_state(seed=0)
    image = torch.rand(1, 32, 32) + 0.5
    out = transform({"image": image})
    mask = out["box_mask"].bool()
    assert mask.any() and not mask.all()
    assert torch.all(out["masked"][mask.expand_as(image)] == 0)
    assert torch.equal(out["masked"][~mask.expand_as(image)], image[~mask.expand_as(image)])
    assert torch.equal(out["image"], image)


def test_box_masking_is_reproducible_with_a_seed():
    image = torch.rand(1, 32, 32)
    a, b = RandBoxMaskd(), RandBoxMaskd()
    a.set_random_state(seed=7)
    b.set_random_state(seed=7)
    assert torch.equal(a({"image": image})["box_mask"], b({"image": image})["box_mask"])


def test_slice_cache_writes_and_reuses_npz(tmp_path):
    item = write_case(tmp_path)
    cache = tmp_path / "cache"
    first = build_slice_records([item], image_size=16, cache_dir=cache, labels=[0])
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and first
    assert all(r["label"] == 0 for r in first)
    again = build_slice_records([item], image_size=16, cache_dir=cache, labels=[0])
    assert [r["slice_index"] for r in again] == [r["slice_index"] for r in first]
    np.testing.assert_allclose(again[0]["image"], first[0]["image"])


def test_slice_cache_skips_a_bad_case_and_keeps_the_others(tmp_path, caplog):
    good = write_case(tmp_path)
    bad = {"case_id": "bad", "image": str(tmp_path / "missing_flair.nii.gz")}
    records = build_slice_records([bad, good], image_size=16)
    assert {r["case_id"] for r in records} == {"case"}
    assert "missing_flair.nii.gz" in caplog.text


def test_abnormal_pictures_join_lesion_free_training_only_with_a_lesion_in_their_mask(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    items = []
    for name, label, lesion in [("benign", 0, None), ("malignant", 1, mask), ("unmasked", 1, None),
                                ("emptymask", 1, np.zeros_like(mask))]:
        Image.fromarray((rng.uniform(0.2, 0.9, (32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
        item = {"case_id": name, "image": str(tmp_path / f"{name}.png"), "label": label}
        if lesion is not None:
            Image.fromarray(lesion).save(tmp_path / f"{name}_mask.png")
            item["seg"] = str(tmp_path / f"{name}_mask.png")
        items.append(item)
    records = build_slice_records(items, image_size=16, labels=[0, 1], preprocessing=[], channels=3)
    # nothing says which pixels of an unmasked (or empty-masked) malignant picture are normal: left out
    assert {r["case_id"] for r in records} == {"benign", "malignant"}


def test_real_brats_slice_labels_match_the_segmentation(shared_data):
    case = shared_data / "brats2013" / "BraTS13_pat0003"
    item = {"case_id": case.name, "image": str(case / f"{case.name}_flair.nii.gz"),
            "seg": str(case / f"{case.name}_seg.nii.gz")}
    data = VolumeToSlicesd(image_size=64, min_lesion_voxels=20)(BrainPercentileNormalized("image")(LoadCased()(item)))
    seg = nib.as_closest_canonical(nib.load(item["seg"])).get_fdata() > 0
    lesion = seg.reshape(-1, seg.shape[2]).sum(0)
    for z, label in zip(data["slice_index"].tolist(), data["label"].tolist()):
        assert label == (1 if lesion[z] >= 20 else 0) and not 0 < lesion[z] < 20
    labels = data["label"].tolist()
    assert labels.count(1) > 50 and labels.count(0) > 30


def test_a_benign_picture_with_a_lesion_mask_stays_normal(tmp_path):
    from PIL import Image

    skin = np.random.default_rng(0).integers(150, 200, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(skin).save(tmp_path / "nevus.png")
    mask = np.zeros((20, 24), dtype=np.uint8)
    mask[5:15, 5:15] = 255
    Image.fromarray(mask).save(tmp_path / "nevus_segmentation.png")
    item = {"case_id": "nevus", "image": str(tmp_path / "nevus.png"), "seg": str(tmp_path / "nevus_segmentation.png"),
            "label": 0}
    data = VolumeToSlicesd(image_size=16)(LoadCased()(item))
    assert data["label"].tolist() == [0]
    assert data["image"].shape == (1, 3, 16, 16) and data["seg"].sum() > 0


def test_to_original_grid_undoes_the_ras_reorientation_of_an_lps_volume(tmp_path):
    from scripts.data.transforms import ToOriginalGridd

    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    item = write_case(tmp_path, affine=lps)
    loaded = LoadCased()(item)
    assert not np.array_equal(loaded["image"][0], np.asarray(nib.load(item["image"]).dataobj))  # it was flipped
    pred = torch.as_tensor(np.ascontiguousarray(loaded["image"]))  # a heatmap on the RAS grid
    restored = ToOriginalGridd("pred")({"pred": pred, "image_meta_dict": loaded["image_meta_dict"]})
    np.testing.assert_array_equal(restored["pred"][0].numpy(), np.asarray(nib.load(item["image"]).dataobj))
    flat = {"pred": torch.zeros(1, 8, 8), "image_meta_dict": {}}  # a 2D picture passes through
    assert ToOriginalGridd("pred")(flat)["pred"] is flat["pred"]


def test_monai_label_items_become_bundle_cases():
    from scripts.data.datalist import case_items

    label_study = {"image": "/studies/BRATS_007.nii.gz", "label": "/studies/labels/final/BRATS_007.nii.gz"}
    picture = {"case_id": "ISIC_1", "image": "/isic/ISIC_1.jpg", "label": 1}
    assert case_items([label_study, picture]) == [
        {"image": "/studies/BRATS_007.nii.gz", "seg": "/studies/labels/final/BRATS_007.nii.gz", "case_id": "BRATS_007"},
        picture,
    ]


def test_lesion_free_weights_zero_the_grown_lesion_and_default_to_ones():
    from scripts.data.transforms import LesionFreeWeightd

    seg = np.zeros((1, 8, 8), dtype=np.uint8)
    seg[0, 3, 3] = 1
    image = torch.rand(1, 8, 8)
    exact = LesionFreeWeightd()({"image": image, "seg": seg})
    assert "seg" not in exact and exact["weight"].shape == (1, 8, 8)
    assert exact["weight"].sum() == 63 and exact["weight"][0, 3, 3] == 0
    grown = LesionFreeWeightd(margin=1)({"image": image, "seg": seg})["weight"]
    assert grown.sum() == 64 - 9 and torch.all(grown[0, 2:5, 2:5] == 0)
    assert torch.all(LesionFreeWeightd()({"image": image})["weight"] == 1)
    with pytest.raises(ValueError):
        LesionFreeWeightd(margin=-1)
