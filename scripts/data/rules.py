"""The bundle's data rules, each written once: foreground, slice selection, slice labels and case ids.

Training, scoring, writing and evaluation all ask this module, so that (for instance) the brain that pixel
metrics count is the brain that scoring used, and a slice called ambiguous in training is ambiguous in the
score tables too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.data.io import InputError

FOREGROUND_MODES = ("nonzero", "all")
AMBIGUOUS = -2  # a slice with some lesion voxels, too few to call it abnormal: neither trained on nor scored as either
UNKNOWN = -1  # no mask and no case label
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
SAFE_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
MIN_SIDE = 16  # pixels per side of a slice or picture: below this there is no patch context to in-paint from


# ----------------------------------------------------------------------------------------------- foreground


def background_foreground(image: np.ndarray) -> np.ndarray:
    """Voxels of a raw channel-first image ``(C, ...)`` that differ from its background constant.

    The background constant is the median of the first channel's corners: skull-stripped FLAIR (BraTS) has an
    exact constant background, also when it was z-scored (then the constant is negative). This is the brain that
    ``BrainPercentileNormalized`` keeps strictly positive, so after normalisation ``foreground`` finds it again.
    """
    first = np.asarray(image)[0]
    corners = first[tuple(np.ix_(*[[0, n - 1] for n in first.shape]))]
    return np.abs(first - np.median(corners)) > 1e-6


def foreground(slices: torch.Tensor, mode: str = "nonzero") -> torch.Tensor:
    """The scored region ``(N, 1, H, W)`` of slices ``(N, C, H, W)``: normalised brain (any channel above zero)
    for ``nonzero``, every pixel for ``all`` (skin pictures)."""
    if mode == "all":
        return torch.ones((len(slices), 1, *slices.shape[-2:]), dtype=torch.bool, device=slices.device)
    if mode != "nonzero":
        raise ValueError(f"unknown foreground {mode!r}: use one of {FOREGROUND_MODES}")
    return torch.as_tensor(slices).amax(dim=1, keepdim=True) > 0


def select_slices(area: torch.Tensor, min_fraction: float) -> torch.Tensor:
    """Slices whose foreground area is at least ``min_fraction`` of the largest (and not empty)."""
    return (area > 0) & (area >= min_fraction * area.max())


def relative_levels(case_ids: Sequence[str] | np.ndarray, slice_index: Sequence[int] | np.ndarray) -> np.ndarray:
    """Each scored slice's axial level within its case: 0 at the case's lowest scored slice, 1 at its highest
    (0.5 for a case of one slice). The axis of the trivial position reference and of the level confound."""
    case_ids, index = np.asarray(case_ids), np.asarray(slice_index, dtype=np.float64)
    levels = np.full(index.shape, 0.5)
    for case in np.unique(case_ids):
        rows = case_ids == case
        low, high = index[rows].min(), index[rows].max()
        if high > low:
            levels[rows] = (index[rows] - low) / (high - low)
    return levels


def check_scorable(path: str | Path, image: np.ndarray, channels: int | None = None) -> None:
    """``InputError`` naming ``path`` for a channel-first image ``(C, H, W[, D])`` the model cannot score: fewer than
    ``MIN_SIDE`` pixels per in-plane side, or (with ``channels``) another channel count than the model's."""
    shape = tuple(np.shape(image))
    side = min(shape[1:3])
    if side < MIN_SIDE:
        raise InputError(f"{path}: too small to score ({shape[1]}x{shape[2]} pixels per slice; at least "
                         f"{MIN_SIDE}x{MIN_SIDE})")
    if channels is not None and shape[0] != int(channels):
        raise InputError(f"{path}: {shape[0]} channel(s), the model expects {channels} (in_channels): "
                         f"{'a grey picture in a colour run' if shape[0] < int(channels) else 'a colour picture in a grey run'}")


# ----------------------------------------------------------------------------------------------- slices


def axial_slices(volume: torch.Tensor) -> torch.Tensor:
    """A channel-first RAS volume ``(C, H, W, D)`` as its stack of axial slices ``(D, C, H, W)``; a 2D image
    ``(C, H, W)`` is a stack of one."""
    volume = torch.as_tensor(volume)
    return volume.unsqueeze(0) if volume.ndim == 3 else volume.permute(3, 0, 1, 2)


def stack_to_volume(slices: torch.Tensor) -> torch.Tensor:
    """The inverse of ``axial_slices`` for a volume: ``(D, C, H, W) -> (C, H, W, D)``."""
    return slices.permute(1, 2, 3, 0)


# ----------------------------------------------------------------------------------------------- slice labels


def slice_labels(segs: torch.Tensor, min_lesion_voxels: int) -> torch.Tensor:
    """Per-slice labels of a lesion-mask stack ``(N, ...)``: 0 without a lesion voxel, 1 with at least
    ``min_lesion_voxels``, ``AMBIGUOUS`` in between."""
    lesion = (torch.as_tensor(segs) > 0).flatten(1).sum(1)
    labels = torch.where(lesion >= min_lesion_voxels, 1, AMBIGUOUS)
    return torch.where(lesion == 0, 0, labels).long()


# ----------------------------------------------------------------------------------------------- case ids


def is_2d_image(path: str | Path) -> bool:
    """True for the 2D picture formats (dermoscopy), False for volumes."""
    return str(path).lower().endswith(IMAGE_2D_SUFFIXES)


def strip_suffix(name: str, suffixes: Iterable[str]) -> str | None:
    """``name`` without the first matching suffix (case-insensitive), or None when none matches."""
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def file_case_id(path: str | Path) -> str:
    """A case id for a lone file: its name without the extension (``.nii.gz`` counts as one)."""
    name = Path(path).name
    return strip_suffix(name, (*VOLUME_SUFFIXES, *IMAGE_2D_SUFFIXES)) or Path(name).stem


def check_case_id(case_id: object, source: str = "datalist", what: str = "case id") -> str:
    """``case_id`` if it is safe as a file-name stem, else ``InputError`` naming it (as ``what``).

    Case ids name output files (heatmaps, overlays, cache entries): an id such as ``../../x`` or ``/tmp/x`` would
    write outside the output folder, so only letters, digits and ``._+-`` are accepted (not leading with a dot).
    Other names that become file or folder names (a research tool's method folder) follow the same rule.
    """
    text = str(case_id)
    if not SAFE_CASE_ID.match(text) or text in (".", ".."):
        raise InputError(f"{source}: {what} {text!r} cannot name an output file: use letters, digits and ._+- only "
                         "(no path separators, no leading dot)")
    return text


def item_case_id(item: Mapping[str, Any], source: str = "datalist") -> str:
    """The checked case id of a datalist item: its ``case_id``, else its image's ``file_case_id``."""
    return check_case_id(item.get("case_id") or file_case_id(str(item["image"])), source)


def check_unique_case_ids(case_ids: Iterable[str], source: str = "datalist") -> None:
    """``InputError`` naming the ids that occur more than once (two rows, one overwritten heatmap)."""
    seen: set[str] = set()
    repeated = sorted({c for c in case_ids if c in seen or seen.add(c)})
    if repeated:
        raise InputError(f"{source}: case ids occur more than once: {', '.join(repeated)}")
