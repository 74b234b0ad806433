"""MONAI transforms of the bundle: case loading, robust brain normalisation, slicing, box masking.

Volumes are handled channel-first in RAS orientation, ``(C, H, W, D)`` with axial slices along the last axis;
2D images are ``(C, H, W)``. The metadata needed to write results back on the input's own grid travels in
``<key>_meta_dict``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from scripts.data import io
from scripts.data.rules import (
    AMBIGUOUS,
    UNKNOWN,
    axial_slices,
    background_foreground,
    check_scorable,
    foreground,
    is_2d_image,
    select_slices,
    slice_labels,
)


def resize_slices(slices: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize a stack of slices ``(N, C, H, W)`` to ``size x size``; ``nearest`` for masks.

    One function for the training cache and the inferer, so that both see exactly the same pixels.
    """
    if tuple(slices.shape[-2:]) == (size, size):
        return slices
    if mode == "nearest":
        return F.interpolate(slices.float(), size=(size, size), mode="nearest")
    return F.interpolate(slices.float(), size=(size, size), mode=mode, align_corners=False, antialias=True)


class LoadCased(MapTransform):
    """Read a case (FLAIR volume or 2D image, with its optional lesion mask) with errors that name the file.

    Volumes are reoriented to RAS; ``image_meta_dict`` keeps the original affine and the orientation change so
    that heatmaps can be written back on the input grid. A 4D volume needs the item's ``channel`` entry.
    ``channels`` (the model's ``in_channels``, when given) and ``rules.check_scorable`` refuse, naming the file, a
    picture of another channel count and an image too small to score. A volume's ``brainmask`` file (when the
    item names one) is read onto the same RAS grid, like its lesion mask.
    """

    def __init__(
        self, image_key: str = "image", seg_key: str = "seg", allow_missing_keys: bool = True, channels: int | None = None,
        brain_key: str = "brainmask",
    ) -> None:
        super().__init__([image_key, seg_key, brain_key], allow_missing_keys)
        self.image_key, self.seg_key, self.brain_key, self.channels = image_key, seg_key, brain_key, channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        path = str(d[self.image_key])
        if is_2d_image(path):
            image = io.read_image_2d(path)
            meta = {"filename": path, "spatial_shape": np.array(image.shape[1:]), "ndim": 2}
            if d.get(self.seg_key):
                d[self.seg_key] = io.read_mask_2d(str(d[self.seg_key]), image.shape[1:])
        else:
            volume = io.read_volume(path, channel=d.get("channel"))
            image, meta = self._canonical(volume), self._volume_meta(path, volume)
            for key in (self.seg_key, self.brain_key):
                if d.get(key):
                    mask = io.read_mask(str(d[key]), volume)
                    d[key] = self._canonical(nib.Nifti1Image(mask, volume.affine)).astype(np.uint8)
        check_scorable(path, image, self.channels)
        d[self.image_key] = image
        d[f"{self.image_key}_meta_dict"] = meta
        return d

    @staticmethod
    def _canonical(volume: nib.Nifti1Image) -> np.ndarray:
        """The volume's voxels in RAS orientation, channel-first ``(1, H, W, D)``."""
        return np.asarray(nib.as_closest_canonical(volume).dataobj, dtype=np.float32)[None]

    @staticmethod
    def _volume_meta(path: str, volume: nib.Nifti1Image) -> dict[str, Any]:
        return {
            "filename": path,
            "ndim": 3,
            "affine": nib.as_closest_canonical(volume).affine,
            "original_affine": volume.affine,
            "spatial_shape": np.array(volume.shape[:3]),
        }


class BrainPercentileNormalized(MapTransform):
    """Map the ``lower``..``upper`` intensity percentiles inside the brain to 0..1, background to 0.

    Robust to scanner scale and to already z-scored data (negative values are normal). The brain is
    ``rules.background_foreground``: every voxel that differs from the background constant. Brain voxels are kept
    at or above ``floor`` so that the brain stays recoverable as ``image > 0`` after normalisation; bright
    lesions stay above 1 (no upper clip), so hyperintensities are not flattened.
    """

    def __init__(self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5, floor: float = 1e-3) -> None:
        super().__init__(keys)
        self.lower, self.upper, self.floor = lower, upper, floor

    @property
    def settings(self) -> dict[str, float]:
        """What decides the output (part of the slice cache's key)."""
        return {"lower": self.lower, "upper": self.upper, "floor": self.floor}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalise(np.asarray(d[key], dtype=np.float32))
        return d

    def normalise(self, image: np.ndarray) -> np.ndarray:
        """Normalise one channel-first volume (all channels share the brain region)."""
        brain = background_foreground(image)
        if not brain.any():
            raise ValueError("image has no foreground: every voxel equals the background value")
        low, high = np.percentile(image[:, brain], [self.lower, self.upper])
        scaled = (image - low) / max(float(high - low), 1e-6)
        return np.where(brain[None], np.maximum(scaled, self.floor), 0.0).astype(np.float32)


class VolumeToSlicesd(MapTransform):
    """Cut a case into labelled, resized axial slices (a 2D image is one slice).

    Keeps slices whose brain area is at least ``min_brain_fraction`` of the case's largest, labels each from
    the lesion mask (0: no lesion voxel, 1: at least ``min_lesion_voxels``, in-between dropped as ambiguous;
    -1 without a mask unless the item carries a case-level ``label``; a 2D image always takes its item's
    ``label``, its mask only localising), and resizes to ``image_size``.
    Output keys hold stacks: ``image (N, C, S, S)``, ``brain``/``seg (N, 1, S, S)``, ``slice_index``, ``label``.
    """

    def __init__(
        self,
        image_size: int,
        min_brain_fraction: float = 0.1,
        min_lesion_voxels: int = 20,
        image_key: str = "image",
        seg_key: str = "seg",
    ) -> None:
        super().__init__([image_key])
        self.image_size, self.min_brain_fraction, self.min_lesion_voxels = image_size, min_brain_fraction, min_lesion_voxels
        self.image_key, self.seg_key = image_key, seg_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = torch.as_tensor(np.asarray(d[self.image_key]))
        seg = d.get(self.seg_key)
        slices = axial_slices(image)
        segs = None if seg is None else axial_slices(torch.as_tensor(np.asarray(seg)))
        keep = select_slices(foreground(slices).flatten(1).sum(1), self.min_brain_fraction)
        # a 2D picture's class (benign/malignant) is its label; its lesion mask only localises (a benign nevus is
        # a lesion too). A volume's slices are labelled from its segmentation.
        labels = self._labels(None if image.ndim == 3 else segs, d.get("label"), len(slices))
        keep &= labels != AMBIGUOUS
        index = torch.nonzero(keep).flatten()
        d[self.image_key] = resize_slices(slices[index], self.image_size)
        d["brain"] = foreground(d[self.image_key]).to(torch.uint8)
        if segs is not None:
            d[self.seg_key] = (resize_slices(segs[index], self.image_size, "nearest") > 0).to(torch.uint8)
        d["slice_index"] = index
        d["label"] = labels[index]
        return d

    def _labels(self, segs: torch.Tensor | None, case_label: Any, n: int) -> torch.Tensor:
        """Per-slice labels (``rules.slice_labels``), or the case label (``UNKNOWN`` without one) for every slice."""
        if segs is None:
            value = UNKNOWN if case_label is None else int(case_label)
            return torch.full((n,), value, dtype=torch.long)
        return slice_labels(segs, self.min_lesion_voxels)


class RandBoxMaskd(RandomizableTransform, MapTransform):
    """Black out random boxes of an image: writes ``masked`` (the input with boxes at ``fill``) and ``box_mask``.

    The number of boxes is drawn from ``num_boxes`` (inclusive range) and each side from ``box_size`` (pixels,
    inclusive range); boxes may overlap and are clipped at the border. With ``prob=1`` every sample is masked,
    as the mask reconstructor is trained.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        num_boxes: Sequence[int] = (1, 4),
        box_size: Sequence[int] = (16, 48),
        fill: float = 0.0,
        prob: float = 1.0,
        masked_key: str = "masked",
        mask_key: str = "box_mask",
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.num_boxes, self.box_size, self.fill = tuple(num_boxes), tuple(box_size), fill
        self.masked_key, self.mask_key = masked_key, mask_key
        self._boxes: list[tuple[int, int, int, int]] = []

    def randomize(self, spatial_shape: Sequence[int]) -> None:  # type: ignore[override]
        super().randomize(None)
        height, width = spatial_shape
        count = self.R.randint(self.num_boxes[0], self.num_boxes[1] + 1) if self._do_transform else 0
        sizes = self.R.randint(self.box_size[0], self.box_size[1] + 1, size=(count, 2))
        tops = self.R.randint(0, height, size=count)
        lefts = self.R.randint(0, width, size=count)
        self._boxes = [(int(top), int(left), int(h), int(w)) for top, left, (h, w) in zip(tops, lefts, sizes)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.first_key(d)
        image = torch.as_tensor(d[key])
        self.randomize(image.shape[-2:])
        mask = torch.zeros((1, *image.shape[-2:]), dtype=image.dtype)
        for top, left, h, w in self._boxes:
            mask[:, top : top + h, left : left + w] = 1
        d[self.masked_key] = torch.where(mask.bool(), torch.as_tensor(self.fill, dtype=image.dtype), image)
        d[self.mask_key] = mask
        return d


def to_original_grid(volume: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Undo ``LoadCased``'s reorientation to RAS: a canonical ``(H, W, D)`` array back on the input's voxel grid."""
    original = nib.orientations.io_orientation(np.asarray(original_affine, dtype=np.float64))
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), original)
    return nib.orientations.apply_orientation(volume, back)


class ToOriginalGridd(MapTransform):
    """Put channel-first volumes computed on ``LoadCased``'s RAS grid (the heatmap ``pred``) back on the input
    file's own voxel grid, so that they can be written with the input's affine (the bundle's writer and MONAI
    Label's both do).

    Reads ``original_affine`` from ``meta_key``: one ``(4, 4)`` affine for an item ``(C, H, W, D)``, or a collated
    ``(B, 4, 4)`` for a batch ``(B, C, H, W, D)``; 2D images and items without it pass through unchanged.
    """

    def __init__(self, keys: KeysCollection = "pred", meta_key: str = "image_meta_dict", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.meta_key = meta_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        affine = (d.get(self.meta_key) or {}).get("original_affine")
        if affine is None:  # a 2D image
            return d
        affine = np.asarray(affine, dtype=np.float64)
        for key in self.key_iterator(d):
            value = d[key]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if affine.shape == (4, 4) and array.ndim == 4:
                restored = self._restore(array, affine)
            elif affine.ndim == 3 and array.ndim == 5 and len(affine) == len(array):
                restored = np.stack([self._restore(item, a) for item, a in zip(array, affine)])
            else:
                continue
            d[key] = torch.as_tensor(restored) if isinstance(value, torch.Tensor) else restored
        return d

    @staticmethod
    def _restore(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.stack([to_original_grid(channel, affine) for channel in array]))


class LesionFreeWeightd(MapTransform):
    """Pixel weights for training on normal regions only: 0 on lesion pixels (grown by ``margin`` pixels), 1 elsewhere.

    With these weights (``weight_key`` of ``PatchGANTrainer``) lesion pixels carry no reconstruction loss and a
    critic patch that touches one is never shown to D as "real" (``scripts.model.losses.pool_to_grid``), so slices and
    pictures with lesions still teach the model what their healthy parts look like. A record without a mask gets
    all ones; the mask is dropped from the output.
    """

    def __init__(self, seg_key: str = "seg", weight_key: str = "weight", image_key: str = "image", margin: int = 0) -> None:
        super().__init__([seg_key], allow_missing_keys=True)
        if margin < 0:
            raise ValueError(f"margin must be >= 0 pixels, got {margin}")
        self.seg_key, self.weight_key, self.image_key, self.margin = seg_key, weight_key, image_key, margin

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = torch.as_tensor(d[self.image_key])
        seg = d.pop(self.seg_key, None)
        if seg is None:
            d[self.weight_key] = torch.ones((1, *image.shape[1:]), dtype=torch.float32)
            return d
        lesion = (torch.as_tensor(np.asarray(seg)) > 0).float().reshape(1, 1, *image.shape[1:])
        if self.margin:
            lesion = F.max_pool2d(lesion, 2 * self.margin + 1, stride=1, padding=self.margin)
        d[self.weight_key] = 1.0 - lesion[0]
        return d
