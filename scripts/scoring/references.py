"""Reference scores that need no model, computed on the very slices the model scored.

A detector is only worth its AUROC above these: on FLAIR a tumour is often the brightest tissue and sits in the
middle slices, on dermoscopy a lesion is darker than skin (see docs/results.md).
"""

from __future__ import annotations

import numpy as np
import torch

REFERENCES = ("trivial_intensity", "trivial_position", "trivial_darkness")


def trivial_scores(slices: torch.Tensor, region: torch.Tensor, valid: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-slice reference scores of slices ``(N, C, H, W)`` with foreground ``region`` ``(N, 1, H, W)``.

    ``trivial_intensity``: 99.5th percentile of the slice's foreground intensity (tumours are bright in FLAIR);
    ``trivial_position``: closeness to the centre of the scored slices' axial extent (1 centre, 0 end slices);
    ``trivial_darkness``: one minus the mean intensity (skin lesions are dark). NaN intensity where not ``valid``.
    """
    n = len(slices)
    intensity = np.full(n, np.nan)
    for i in torch.nonzero(valid).flatten().tolist():
        values = slices[i][region[i].expand_as(slices[i])]
        intensity[i] = float(torch.quantile(values.float(), 0.995)) if values.numel() else np.nan
    index = torch.nonzero(valid).flatten().float()
    centre = (index.min() + index.max()) / 2 if len(index) else torch.tensor(0.0)
    half = max(float((index.max() - index.min()) / 2), 1.0) if len(index) else 1.0
    position = 1 - (torch.arange(n).float() - centre).abs() / half
    darkness = 1 - slices.float().flatten(1).mean(1)
    return {"trivial_intensity": intensity, "trivial_position": position.numpy(), "trivial_darkness": darkness.numpy()}
