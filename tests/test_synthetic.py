"""scripts.data.synthetic: deterministic BraTS-layout phantoms with lesions only in abnormal cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data.datalist import build_datalist
from scripts.data.io import read_mask, read_volume
from scripts.data.synthetic import LESION_LABEL, generate_dataset

REPO = Path(__file__).resolve().parents[1]
SHAPE = (40, 40, 20)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, generate_dataset(root, n_cases=6, shape=SHAPE, seed=0, abnormal_fraction=0.5)


def _case(root: Path, case_id: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    flair = read_volume(root / case_id / f"{case_id}_flair.nii.gz")
    return flair, read_mask(root / case_id / f"{case_id}_seg.nii.gz", flair)


def test_layout_and_headers(dataset):
    root, case_ids = dataset
    assert case_ids == [f"SYN_{i:03d}" for i in range(6)]
    assert sorted(p.name for p in root.iterdir()) == case_ids
    for index, case_id in enumerate(case_ids):
        raw = nib.load(str(root / case_id / f"{case_id}_flair.nii.gz"))
        seg = nib.load(str(root / case_id / f"{case_id}_seg.nii.gz"))
        assert raw.shape == SHAPE and raw.get_data_dtype() == np.float32 and seg.get_data_dtype() == np.uint8
        assert np.allclose(np.abs(raw.affine[:3, :3]), np.eye(3))  # 1 mm voxels
        assert nib.aff2axcodes(raw.affine) == (("L", "P", "S") if index % 2 else ("R", "A", "S"))
        np.testing.assert_array_equal(seg.affine, raw.affine)


def test_brain_on_zero_background(dataset):
    root, case_ids = dataset
    for case_id in case_ids:
        flair, _ = _case(root, case_id)
        data = flair.get_fdata()
        brain = data > 0
        assert data.min() == 0.0 and 0.2 < brain.mean() < 0.7
        assert not brain[0].any() and not brain[-1].any()  # the brain does not touch the volume's sides
        inside = data[brain]
        assert inside.std() / inside.mean() > 0.05  # contrast and texture, not a flat blob


def test_lesions_only_in_abnormal_cases(dataset):
    root, case_ids = dataset
    labels = {}
    for case_id in case_ids:
        flair, seg = _case(root, case_id)
        labels[case_id] = int(seg.any())
        if not seg.any():
            continue
        data = nib.as_closest_canonical(flair).get_fdata()
        seg = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(seg, flair.affine)).dataobj)
        assert set(np.unique(seg)) == {0, LESION_LABEL}
        brain = data > 0
        assert brain[seg > 0].all()  # lesions lie inside the brain
        assert np.median(data[seg > 0]) > 1.02 * np.median(data[brain & (seg == 0)])  # iso- to hyperintense
        lesion_slices = seg.any(axis=(0, 1))
        brain_slices = brain.any(axis=(0, 1))
        assert (brain_slices & ~lesion_slices).sum() >= 4  # normal slices in an abnormal volume
    assert sum(labels.values()) == 3
    datalist = build_datalist(root, val_fraction=0, test_fraction=0)
    assert {item["case_id"]: item["label"] for item in datalist["training"]} == labels


def test_orientation_gives_same_anatomy(tmp_path):
    """An LPS case, reoriented to RAS, keeps its lesion where the seg says (flips applied to both)."""
    generate_dataset(tmp_path, n_cases=2, shape=SHAPE, seed=5, abnormal_fraction=1.0)
    flair, seg = _case(tmp_path, "SYN_001")
    canonical = nib.as_closest_canonical(flair)
    seg_ras = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(seg, flair.affine)).dataobj)
    assert nib.aff2axcodes(flair.affine) == ("L", "P", "S") and nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    data = canonical.get_fdata()
    assert data[seg_ras > 0].mean() > 1.3 * data[(data > 0) & (seg_ras == 0)].mean()


def test_deterministic(tmp_path, dataset):
    root, case_ids = dataset
    generate_dataset(tmp_path, n_cases=6, shape=SHAPE, seed=0, abnormal_fraction=0.5)
    for case_id in case_ids:
        for kind in ("flair", "seg"):
            name = f"{case_id}/{case_id}_{kind}.nii.gz"
            assert (tmp_path / name).read_bytes() == (root / name).read_bytes()
    other = tmp_path / "other"
    generate_dataset(other, n_cases=1, shape=SHAPE, seed=1)
    assert (other / "SYN_000/SYN_000_flair.nii.gz").read_bytes() != (root / "SYN_000/SYN_000_flair.nii.gz").read_bytes()


def test_abnormal_fraction_extremes(tmp_path):
    generate_dataset(tmp_path / "normal", n_cases=2, shape=SHAPE, seed=0, abnormal_fraction=0.0)
    for case_id in ("SYN_000", "SYN_001"):
        assert not _case(tmp_path / "normal", case_id)[1].any()
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "bad", n_cases=0, shape=SHAPE, seed=0)


def test_cli(tmp_path):
    command = [sys.executable, "-m", "scripts.data.synthetic", "--output", str(tmp_path), "--cases", "2", "--shape", "32", "32", "16"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "SYN_001" / "SYN_001_seg.nii.gz").is_file()


def test_lesions_vary_in_level_and_contrast_across_cases(tmp_path):
    """Neither the slice's position nor its brightest voxel gives the lesion away by construction."""
    from scripts.data.synthetic import make_phantom

    levels, contrasts = [], []
    for index in range(12):
        flair, seg = make_phantom((64, 64, 32), np.random.default_rng([7, index]), abnormal=True)
        brain = flair > 0
        z = np.flatnonzero(seg.any(axis=(0, 1)))
        extent = np.flatnonzero(brain.any(axis=(0, 1)))
        levels.append((z.mean() - extent[0]) / (extent[-1] - extent[0]))
        contrasts.append(np.median(flair[seg > 0]) / np.median(flair[brain & (seg == 0)]))
    assert min(levels) < 0.3 and max(levels) > 0.6, levels
    assert min(contrasts) < 1.3 and max(contrasts) > 1.6, contrasts
