"""scripts.data.io: readers return float32 data with the right geometry and name the file in every error."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from scripts.data.io import (
    InputError,
    read_image_2d,
    read_mask,
    read_mask_2d,
    read_volume,
    save_nifti_atomic,
    save_png_atomic,
)

OBLIQUE = np.array(
    [
        [-0.9, 0.1, 0.0, 12.0],
        [-0.1, -0.9, 0.0, 30.0],
        [0.0, 0.0, 2.5, -7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _volume(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _write_nifti(path: Path, data: np.ndarray, affine=OBLIQUE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _assert_names(error: pytest.ExceptionInfo, path: Path) -> None:
    assert path.name in str(error.value)


# ------------------------------------------------------------------------------------------------ volumes


def test_read_volume_nifti(tmp_path):
    data = _volume().astype(np.float64)
    image = read_volume(_write_nifti(tmp_path / "a.nii.gz", data))
    assert image.get_data_dtype() == np.float32 and image.shape == data.shape
    np.testing.assert_allclose(image.get_fdata(), data, rtol=1e-6)
    np.testing.assert_allclose(image.affine, OBLIQUE, atol=1e-6)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_file_matches_nifti(tmp_path, suffix):
    """The same image converted by SimpleITK itself reads back with the same RAS voxels and affine."""
    nifti = _write_nifti(tmp_path / "a.nii.gz", _volume())
    other = tmp_path / f"a{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(other))
    expected, got = read_volume(nifti), read_volume(other)
    np.testing.assert_allclose(got.get_fdata(), expected.get_fdata())
    np.testing.assert_allclose(got.affine, expected.affine, atol=1e-4)


def test_mha_written_by_hand_gives_ras_affine(tmp_path):
    """Geometry set in ITK's LPS convention comes back as the RAS affine with (x, y, z) voxel order."""
    data = _volume()
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0))  # ITK arrays are (z, y, x)
    image.SetSpacing((1.0, 2.0, 3.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    volume = read_volume(tmp_path / "a.mha")
    np.testing.assert_array_equal(volume.get_fdata(), data)
    expected = np.array([[-1, 0, 0, -10], [0, -2, 0, -20], [0, 0, 3, 30], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_allclose(volume.affine, expected)
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found") as error:
        read_volume(tmp_path / "absent_flair.nii.gz")
    _assert_names(error, tmp_path / "absent_flair.nii.gz")


@pytest.mark.parametrize("name", ["garbage.nii.gz", "garbage.nii", "garbage.mha"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image\x00\x01\x02" * 20)
    with pytest.raises(InputError, match="cannot read") as error:
        read_volume(path)
    _assert_names(error, path)
    assert error.value.__cause__ is not None


def test_truncated_nifti(tmp_path):
    path = _write_nifti(tmp_path / "cut.nii.gz", _volume((20, 20, 20)))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(InputError) as error:
        read_volume(path)
    _assert_names(error, path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_volume(tmp_path, bad):
    data = _volume()
    data[1, 2, 3] = bad
    path = _write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputError, match="NaN or Inf") as error:
        read_volume(path)
    _assert_names(error, path)


def test_constant_volume(tmp_path):
    path = _write_nifti(tmp_path / "flat.nii.gz", np.full((4, 4, 4), -3.16, np.float32))
    with pytest.raises(InputError, match="empty volume") as error:
        read_volume(path)
    _assert_names(error, path)


def test_4d_needs_channel(tmp_path):
    data = _volume((5, 4, 3, 4))
    path = _write_nifti(tmp_path / "multi.nii.gz", data)
    with pytest.raises(InputError, match="4D image with 4 channels: choose one with channel=") as error:
        read_volume(path)
    _assert_names(error, path)
    np.testing.assert_allclose(read_volume(path, channel=2).get_fdata(), data[..., 2])
    with pytest.raises(InputError, match="channel 7") as error:
        read_volume(path, channel=7)
    _assert_names(error, path)


def test_itk_vector_image_channel(tmp_path):
    data = _volume((5, 4, 3, 2))
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0, 3), isVector=True)
    sitk.WriteImage(image, str(tmp_path / "vec.mha"))
    np.testing.assert_allclose(read_volume(tmp_path / "vec.mha", channel=1).get_fdata(), data[..., 1])
    with pytest.raises(InputError, match="2 channels"):
        read_volume(tmp_path / "vec.mha")


def test_2d_volume_is_rejected(tmp_path):
    path = _write_nifti(tmp_path / "flat2d.nii.gz", _volume((5, 4)))
    with pytest.raises(InputError, match="3D") as error:
        read_volume(path)
    _assert_names(error, path)


# ------------------------------------------------------------------------------------------------ masks


def test_read_mask(tmp_path):
    image = read_volume(_write_nifti(tmp_path / "img.nii.gz", _volume()))
    labels = np.zeros((6, 5, 4), np.float32)
    labels[2, 2, 2] = 0.99999997  # masks stored as scaled floats (as in the real BraTS 2013 brain masks)
    labels[3, 3, 3] = 4
    mask = read_mask(_write_nifti(tmp_path / "seg.nii.gz", labels), image)
    assert mask.dtype == np.uint8 and mask[2, 2, 2] == 1 and mask[3, 3, 3] == 4 and mask.sum() == 5
    empty = read_mask(_write_nifti(tmp_path / "empty.nii.gz", np.zeros((6, 5, 4), np.uint8)), image)
    assert not empty.any()  # a normal case has an all-zero mask: valid


def test_mask_shape_mismatch(tmp_path):
    image = read_volume(_write_nifti(tmp_path / "img.nii.gz", _volume()))
    path = _write_nifti(tmp_path / "small_seg.nii.gz", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(InputError) as error:
        read_mask(path, image)
    _assert_names(error, path)
    assert "(6, 5, 3)" in str(error.value) and "(6, 5, 4)" in str(error.value)


def test_mask_affine_mismatch(tmp_path):
    image = read_volume(_write_nifti(tmp_path / "img.nii.gz", _volume()))
    shifted = OBLIQUE.copy()
    shifted[0, 3] += 0.5
    path = _write_nifti(tmp_path / "moved_seg.nii.gz", np.zeros((6, 5, 4), np.uint8), shifted)
    with pytest.raises(InputError, match="affine") as error:
        read_mask(path, image)
    _assert_names(error, path)
    close = OBLIQUE.copy()
    close[0, 3] += 1e-5
    read_mask(_write_nifti(tmp_path / "close_seg.nii.gz", np.zeros((6, 5, 4), np.uint8), close), image)


# ------------------------------------------------------------------------------------------------ 2D images


def _rgb(shape=(8, 10, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_read_image_2d_modes(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg")
    colour = read_image_2d(tmp_path / "rgb.png")
    assert colour.dtype == np.float32 and colour.shape == (3, 8, 10)
    np.testing.assert_allclose(colour, np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)
    assert read_image_2d(tmp_path / "grey.png").shape == (1, 8, 10)
    np.testing.assert_allclose(read_image_2d(tmp_path / "rgba.png"), colour, atol=1e-6)
    jpeg = read_image_2d(tmp_path / "rgb.jpg")
    assert jpeg.shape == (3, 8, 10) and 0.0 <= jpeg.min() and jpeg.max() <= 1.0


def test_image_2d_errors(tmp_path):
    with pytest.raises(InputError, match="not found") as error:
        read_image_2d(tmp_path / "ISIC_missing.jpg")
    _assert_names(error, tmp_path / "ISIC_missing.jpg")
    corrupt = tmp_path / "ISIC_corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg" * 10)
    with pytest.raises(InputError, match="cannot read") as error:
        read_image_2d(corrupt)
    _assert_names(error, corrupt)
    flat = tmp_path / "ISIC_flat.png"
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(flat)
    with pytest.raises(InputError, match="empty image") as error:
        read_image_2d(flat)
    _assert_names(error, flat)
    nan = tmp_path / "nan.tif"
    pixels = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    pixels[3, 3] = np.nan
    Image.fromarray(pixels, mode="F").save(nan)
    with pytest.raises(InputError, match="NaN") as error:
        read_image_2d(nan)
    _assert_names(error, nan)


def test_read_mask_2d(tmp_path):
    mask = np.zeros((8, 10), np.uint8)
    mask[2:4, 3:6] = 255
    Image.fromarray(mask).save(tmp_path / "m_segmentation.png")
    read = read_mask_2d(tmp_path / "m_segmentation.png", (3, 8, 10))
    assert read.dtype == np.uint8 and read.shape == (1, 8, 10) and read.sum() == 6 and read.max() == 1
    with pytest.raises(InputError) as error:
        read_mask_2d(tmp_path / "m_segmentation.png", (16, 16))
    _assert_names(error, tmp_path / "m_segmentation.png")
    assert "(8, 10)" in str(error.value) and "(16, 16)" in str(error.value)
    with pytest.raises(InputError, match="not found"):
        read_mask_2d(tmp_path / "absent.png", (8, 10))


# ------------------------------------------------------------------------------------------------ writers


def test_save_nifti_atomic(tmp_path):
    data = _volume()
    path = tmp_path / "out" / "heatmap.nii.gz"
    save_nifti_atomic(data, OBLIQUE, path)
    first = path.read_bytes()
    save_nifti_atomic(data, OBLIQUE, path)
    assert path.read_bytes() == first  # deterministic bytes
    assert sorted(p.name for p in path.parent.iterdir()) == ["heatmap.nii.gz"]  # no temp file left
    back = nib.load(str(path))
    np.testing.assert_array_equal(back.get_fdata(), data)
    np.testing.assert_allclose(back.affine, OBLIQUE, atol=1e-6)
    save_nifti_atomic(data, OBLIQUE, tmp_path / "plain.nii")
    np.testing.assert_array_equal(nib.load(str(tmp_path / "plain.nii")).get_fdata(), data)


def test_save_png_atomic(tmp_path):
    rgb = _rgb()
    save_png_atomic(np.moveaxis(rgb, -1, 0), tmp_path / "chw.png")
    save_png_atomic(rgb[..., 0], tmp_path / "hw.png")
    save_png_atomic(rgb[None, ..., 0], tmp_path / "1hw.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "chw.png")), rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "hw.png")), rgb[..., 0])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "1hw.png")), rgb[..., 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1hw.png", "chw.png", "hw.png"]
    with pytest.raises(ValueError):
        save_png_atomic(rgb.astype(np.float32), tmp_path / "bad.png")
