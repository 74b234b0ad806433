"""Reading volumes, masks and 2D images into float32 arrays, and the bundle's one atomic write.

Every reader checks its input and raises ``InputError`` naming the file and the problem: a run over hundreds of
cases must say *which* file is broken, not fail deep inside a transform with a bare library error.
Volumes come back as ``nibabel.Nifti1Image`` (float32 voxels + RAS affine) whatever the file format, so the
rest of the bundle handles one kind of object; 2D images come back channel-first ``(C, H, W)`` in ``[0, 1]``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np
from PIL import Image

NIFTI_SUFFIXES = (".nii", ".nii.gz")
AFFINE_TOLERANCE = 1e-3
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class InputError(ValueError):
    """A bad input file; the message always names the file and says what is wrong with it."""


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (read with nibabel; everything else goes to SimpleITK)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_volume(path: str | os.PathLike, channel: int | None = None) -> nib.Nifti1Image:
    """Read a 3D volume (NIfTI, MHA/MHD, NRRD, ...) as a float32 ``Nifti1Image`` with its RAS affine.

    ``channel`` picks one channel of a 4D image (the last axis of a 4D NIfTI, as in MSD Task01). Raises
    ``InputError`` for a missing, unreadable or non-3D file, non-finite voxels or a constant (empty) volume.
    """
    data, affine = _load_array(path, channel)
    _check_finite(path, data)
    if data.min() == data.max():
        raise InputError(f"{path}: all voxels equal {float(data.min()):g} (empty volume)")
    return _as_nifti(data, affine)


def read_mask(path: str | os.PathLike, reference: nib.Nifti1Image | None = None, channel: int | None = None) -> np.ndarray:
    """Read a segmentation as uint8 labels on the grid of ``reference`` (the image it annotates).

    An all-zero mask is valid (a normal case). Raises ``InputError`` naming the mask when its shape or affine
    (beyond 1e-3) differs from the reference, or when its values are not integer labels in 0..255.
    Without ``reference`` only the file itself is checked (used to decide whether a case has a lesion).
    """
    data, affine = _load_array(path, channel)
    _check_finite(path, data)
    if reference is not None:
        _check_same_grid(path, data.shape, affine, reference)
    labels = np.rint(data)
    if labels.min() < 0 or labels.max() > 255:
        raise InputError(f"{path}: mask values {labels.min():g}..{labels.max():g} are outside 0..255")
    return labels.astype(np.uint8)


def read_image_2d(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image (JPEG, PNG, ...) as float32 ``(C, H, W)`` in ``[0, 1]``: 3 channels for colour, 1 for grey.

    Alpha is dropped and palettes are expanded. Raises ``InputError`` for a missing or unreadable file,
    non-finite pixels or a constant image.
    """
    pixels = _open_image(path)
    array = _image_to_unit(path, pixels)
    if array.min() == array.max():
        raise InputError(f"{path}: all pixels equal {float(array.min()):g} (empty image)")
    return array


def read_mask_2d(path: str | os.PathLike, shape: Sequence[int]) -> np.ndarray:
    """Read a 2D lesion mask as uint8 ``(1, H, W)`` (nonzero pixel = lesion) for an image of spatial ``shape``.

    ``shape`` is ``(H, W)`` or ``(C, H, W)``; a mask of another size raises ``InputError`` naming both sizes.
    """
    pixels = _open_image(path)
    if pixels.mode == "P":
        array = np.asarray(pixels)  # palette indices: 0 is background whatever its colour
    elif pixels.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA"):
        array = np.asarray(pixels.convert("RGB")).max(axis=-1)
    else:
        array = np.asarray(pixels)
    _check_finite(path, array)
    expected = tuple(int(s) for s in shape[-2:])
    if array.shape != expected:
        raise InputError(f"{path}: mask size {array.shape} differs from the image size {expected}")
    return (array != 0).astype(np.uint8)[None]


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``array`` as NIfTI (gzip when the name ends in ``.gz``) via a temp file and ``os.replace``.

    The header is fixed (qform/sform code 1, mm units) and the gzip stream carries no name or time, so the same
    array gives the same bytes on every run; a reader never sees a half-written file.
    """
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    payload = image.to_bytes()
    if str(path).lower().endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    write_atomic(Path(path), lambda handle: handle.write(payload))


def save_png_atomic(array_uint8: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 image ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` (C = 1, 3 or 4) as PNG, atomically."""
    array = np.asarray(array_uint8)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: PNG data must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"{path}: cannot write an array of shape {array.shape} as PNG")
    picture = Image.fromarray(np.ascontiguousarray(array))
    write_atomic(Path(path), lambda handle: picture.save(handle, format="PNG"))


# ---------------------------------------------------------------------------------------------------- atomic writes


def cache_file(
    folder: str | os.PathLike, case_id: str, files: Sequence[str | os.PathLike], params: Any,
    arrays: Sequence[np.ndarray] = (),
) -> Path:
    """``<folder>/<case_id>_<digest>.npz``: the digest covers each file's content (its SHA-1; -1 for a missing one),
    each of ``arrays`` (an in-memory input: its bytes, shape and type) and ``params``, so an edited input or a changed
    setting makes a new entry, never a stale hit, while the same data copied, moved or provisioned anew (new paths,
    new file times) keeps hitting: an HD-BET mask costs 15-400 s."""
    stamp: list[Any] = [params, *(_content_digest(file) if os.path.exists(file) else -1 for file in files),
                        *(_array_digest(array) for array in arrays)]
    digest = hashlib.sha1(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(folder) / f"{case_id}_{digest}.npz"


def _content_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes (a compressed FLAIR volume takes a few ms)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha1").hexdigest()


def _array_digest(array: np.ndarray) -> str:
    """SHA-1 of an array's shape, type and bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha1(f"{array.shape}{array.dtype.str}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Run ``write(handle)`` on a temporary file beside ``path``, then move it into place in one step.

    The one atomic write of the bundle (results, checkpoints, caches, figures): a reader never sees a half-written
    file and a crash leaves the previous version. The file gets the usual ``rw-r--r--`` permissions (less what the
    umask removes), not ``mkstemp``'s private ``rw-------``, so colleagues on a shared server can read results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(data: Any, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def make_folder(path: str | os.PathLike) -> Path:
    """Create an output folder (and its parents); ``InputError`` in words when a file stands in its place."""
    path = Path(path)
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputError(f"{blocking}: is a file, so {path} cannot be created as an output folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------- helpers


def _check_exists(path: str | os.PathLike) -> None:
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected an image file")


def _check_finite(path: str | os.PathLike, data: np.ndarray) -> None:
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(f"{path}: {bad} voxels are NaN or Inf")


def _load_array(path: str | os.PathLike, channel: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The 3D float32 voxels ``(x, y, z)`` and RAS affine of a volume file, one channel picked if 4D."""
    _check_exists(path)
    data, affine = _load_nifti(path, channel) if is_nifti(path) else _load_itk(path)
    if data.ndim == 4:
        data = _pick_channel(path, data, channel)
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got {data.ndim}D data of shape {data.shape}")
    return data, affine


def _load_nifti(path: str | os.PathLike, channel: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine of a NIfTI file; a valid ``channel`` of a 4D file is read alone to save memory."""
    try:
        image = nib.load(str(path))
        shape = image.shape
        if len(shape) == 4 and channel is not None and -shape[3] <= int(channel) < shape[3]:
            data = np.asarray(image.dataobj[..., int(channel)], dtype=np.float32)
        else:
            data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as error:  # nibabel, gzip and zlib all raise their own types
        raise InputError(f"{path}: cannot read NIfTI file ({type(error).__name__}: {error})") from error
    while data.ndim > 4 and data.shape[3] == 1:  # (x, y, z, 1, c) as written by some tools
        data = data.reshape(data.shape[:3] + data.shape[4:])
    return data, np.asarray(image.affine, dtype=np.float64)


def _load_itk(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read with SimpleITK; voxels become ``(x, y, z[, c])`` and the LPS geometry a RAS affine."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
    except Exception as error:
        raise InputError(f"{path}: cannot read image file ({type(error).__name__}: {error})") from error
    dim = image.GetDimension()
    if dim < 3:
        raise InputError(f"{path}: expected a 3D volume, got a {dim}D image of size {image.GetSize()}")
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    if image.GetNumberOfComponentsPerPixel() > 1:  # vector pixels: array (z, y, x, c)
        return array.transpose(2, 1, 0, 3), affine
    if dim == 4:  # array (c, z, y, x)
        return array.transpose(3, 2, 1, 0), affine
    return array.transpose(2, 1, 0), affine


def _pick_channel(path: str | os.PathLike, data: np.ndarray, channel: int | None) -> np.ndarray:
    """One channel (last axis) of 4D voxels; ``channel`` may be omitted only when there is one."""
    count = data.shape[-1]
    if channel is None:
        if count == 1:
            return data[..., 0]
        raise InputError(f"{path}: 4D image with {count} channels: choose one with channel=")
    if not -count <= int(channel) < count:
        raise InputError(f"{path}: channel {channel} does not exist (4D image with {count} channels)")
    return data[..., int(channel)]


def _check_same_grid(
    path: str | os.PathLike, shape: tuple[int, ...], affine: np.ndarray, reference: nib.Nifti1Image
) -> None:
    """Raise ``InputError`` naming the mask when it is not on the reference image's voxel grid."""
    ref_shape = tuple(reference.shape[:3])
    if tuple(shape) != ref_shape:
        raise InputError(f"{path}: mask shape {tuple(shape)} differs from the image shape {ref_shape}")
    if not np.allclose(affine, reference.affine, rtol=0.0, atol=AFFINE_TOLERANCE):
        worst = float(np.abs(affine - reference.affine).max())
        raise InputError(f"{path}: mask affine differs from the image affine (max difference {worst:g})")


def _as_nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    return image


def _open_image(path: str | os.PathLike) -> Image.Image:
    _check_exists(path)
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise InputError(f"{path}: cannot read image file ({type(error).__name__}: {error})") from error


def _image_to_unit(path: str | os.PathLike, pixels: Image.Image) -> np.ndarray:
    """Pixels as float32 ``(C, H, W)`` in ``[0, 1]`` from any Pillow mode."""
    mode = pixels.mode
    if mode in ("RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        pixels, mode = pixels.convert("RGB"), "RGB"
    elif mode in ("1", "LA", "La"):
        pixels, mode = pixels.convert("L"), "L"
    array = np.asarray(pixels)
    _check_finite(path, array)
    if array.ndim != 2 and array.ndim != 3:
        raise InputError(f"{path}: unsupported image of shape {array.shape} (mode {mode})")
    if mode in ("RGB", "L"):
        scaled = array.astype(np.float32) / 255.0
    elif mode.startswith("I;16") or (mode == "I" and array.max() <= 65535 and array.min() >= 0):
        scaled = array.astype(np.float32) / 65535.0
    elif mode == "F" and array.min() >= 0.0 and array.max() <= 1.0:
        scaled = array.astype(np.float32)
    else:  # other integer or float pixels: stretch to [0, 1]
        low, high = float(array.min()), float(array.max())
        scaled = (array.astype(np.float32) - low) / (high - low) if high > low else np.zeros(array.shape, np.float32)
    scaled = scaled[None] if scaled.ndim == 2 else np.moveaxis(scaled, -1, 0)
    return np.ascontiguousarray(scaled, dtype=np.float32)
