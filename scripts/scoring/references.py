"""Reference scores that need no model, computed on the very slices the model scored.

A detector is only worth its AUROC above these: on FLAIR a tumour is often the brightest tissue and sits in the
middle slices, on dermoscopy a lesion is darker than skin (see docs/results.md).
"""

from __future__ import annotations

import numpy as np
import torch

from scripts.data.rules import relative_levels
from scripts.scoring.inferer import within_volume_z

REFERENCES = ("trivial_intensity", "trivial_position", "trivial_darkness")


def trivial_scores(slices: torch.Tensor, region: torch.Tensor, valid: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-slice reference scores of slices ``(N, C, H, W)`` with foreground ``region`` ``(N, 1, H, W)``.

    ``trivial_intensity``: 99.5th percentile of the slice's foreground intensity (tumours are bright in FLAIR);
    ``trivial_position``: closeness to the centre of the scored slices' axial extent (1 centre, 0 end slices; NaN
    where not ``valid``; ``rules.relative_levels``);
    ``trivial_darkness``: one minus the mean intensity (skin lesions are dark). NaN intensity where not ``valid``.
    """
    n = len(slices)
    intensity = np.full(n, np.nan)
    for i in torch.nonzero(valid).flatten().tolist():
        values = slices[i][region[i].expand_as(slices[i])]
        intensity[i] = float(torch.quantile(values.float(), 0.995)) if values.numel() else np.nan
    index = torch.nonzero(valid).flatten().numpy()
    position = np.full(n, np.nan)
    position[index] = 1 - np.abs(2 * relative_levels(np.zeros(len(index)), index) - 1)
    darkness = 1 - slices.float().flatten(1).mean(1)
    return {"trivial_intensity": intensity, "trivial_position": position, "trivial_darkness": darkness.numpy()}


# the brightest-intensity reference z-scored within each volume -> whether against the lower-scoring half only
VOLUME_Z_INTENSITIES = {"trivial_intensity_volume_z": False, "trivial_intensity_volume_lower_half": True}


def volume_standardised_intensity(intensity: np.ndarray, case_ids: np.ndarray, lower_half: bool = False) -> np.ndarray:
    """The brightest-intensity reference z-scored within each case, as ``slice_standardisation: "volume"`` (or
    ``"volume_lower_half"``) does to the model's slice scores (``inferer.within_volume_z``): the like-for-like
    floor of such a score.

    ``intensity`` and ``case_ids`` are a slice table's columns (one row per scored slice); NaN rows stay NaN and
    take no part in their case's median and MAD. A case of one slice (a 2D picture) scores 0.
    """
    out = np.full(len(intensity), np.nan)
    for case in np.unique(case_ids):
        rows = np.flatnonzero((case_ids == case) & np.isfinite(intensity))
        out[rows] = within_volume_z(torch.as_tensor(intensity[rows], dtype=torch.float64), lower_half).numpy()
    return out


LESION_REFERENCES = ("trivial_area", "trivial_asymmetry", "trivial_border", "trivial_variegation")


def lesion_references(image: np.ndarray, lesion: np.ndarray) -> dict[str, float]:
    """Label-free malignancy references of a dermoscopy picture ``(C, H, W)`` from its lesion mask ``(H, W)``,
    the A, B and C of the dermatologists' ABCD rule and the lesion's size (NaN for all of them without lesion):

    ``trivial_area``: lesion share of the picture. ``trivial_asymmetry``: share of the lesion that its mirror image
    across each principal axis (through the centroid) does not cover, the mean of the two axes (0 for an ellipse).
    ``trivial_border``: compactness ``perimeter^2 / (4 pi area)`` (about 1 for a disc, larger for ragged borders;
    the perimeter is the count of pixel edges between lesion and skin times pi/4, which undoes the staircase of a
    smooth outline). ``trivial_variegation``: the mean over
    channels of the intensity standard deviation inside the lesion (many colours: high).
    """
    lesion = np.asarray(lesion) > 0
    if not lesion.any():
        return dict.fromkeys(LESION_REFERENCES, float("nan"))
    area = float(lesion.sum())
    padded = np.pad(lesion, 1)
    perimeter = np.pi / 4 * float(np.sum(padded[1:] != padded[:-1]) + np.sum(padded[:, 1:] != padded[:, :-1]))
    values = np.asarray(image, dtype=np.float64)[:, lesion]
    return {
        "trivial_area": area / lesion.size,
        "trivial_asymmetry": _asymmetry(lesion),
        "trivial_border": perimeter**2 / (4 * np.pi * area),
        "trivial_variegation": float(values.std(axis=1).mean()),
    }


def _asymmetry(lesion: np.ndarray) -> float:
    """Mean over the two principal axes of the share of lesion pixels whose mirror pixel is not lesion."""
    rows, cols = np.nonzero(lesion)
    points = np.stack([rows, cols], 1).astype(np.float64)
    centre = points.mean(0)
    if len(points) < 3:
        return 0.0
    _, axes = np.linalg.eigh(np.cov((points - centre).T))
    shares = []
    for axis in axes.T:  # reflect across the line through the centre along ``axis``
        offset = points - centre
        mirrored = centre + 2 * (offset @ axis)[:, None] * axis - offset
        r, c = np.rint(mirrored).astype(int).T
        inside = (r >= 0) & (r < lesion.shape[0]) & (c >= 0) & (c < lesion.shape[1])
        covered = np.zeros(len(points), dtype=bool)
        covered[inside] = lesion[r[inside], c[inside]]
        shares.append(1.0 - covered.mean())
    return float(np.mean(shares))
