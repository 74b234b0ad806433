"""Pictures people look at instead of reading numbers: heatmap overlays on the most anomalous slices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scripts.data import io  # noqa: E402


def save_figure(fig: plt.Figure, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG (atomically), then close it."""
    try:
        io.write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _display(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) slice as an image matplotlib shows: RGB in [0, 1] or a single grey channel."""
    if image.shape[0] == 3:
        return np.clip(np.moveaxis(image, 0, -1), 0, 1)
    return image[0]


def overlay_figure(
    images: Sequence[np.ndarray],
    heatmaps: Sequence[np.ndarray],
    titles: Sequence[str],
    path: Path,
    masks: Sequence[np.ndarray | None] | None = None,
    heat_max: float | None = None,
    transpose: bool = True,
) -> None:
    """One column per slice: the image on top, the image with the anomaly heatmap overlaid below.

    ``images`` are ``(C, H, W)``, ``heatmaps`` and ``masks`` ``(H, W)``; the lesion mask, when known, is drawn as
    a contour so a reader sees at once whether the hot patches sit on the lesion. ``transpose`` shows RAS volume
    slices with anterior up (neurological view); 2D pictures are shown as stored.
    """
    n = len(images)
    vmax = heat_max if heat_max is not None else max(float(np.max(h)) for h in heatmaps) or 1.0
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.6), squeeze=False)
    for col in range(n):
        image = _display(images[col])
        heat = heatmaps[col]
        mask = masks[col] if masks is not None else None
        if transpose:
            image = np.swapaxes(image, 0, 1)
            heat, mask = heat.T, (mask.T if mask is not None else None)
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", origin="lower" if transpose else "upper")
            if row == 1:
                shown = ax.imshow(np.ma.masked_less_equal(heat, 0), cmap="inferno", alpha=0.55, vmin=0, vmax=vmax,
                                  origin="lower" if transpose else "upper")
            if mask is not None and mask.any():
                ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.8,
                           origin="lower" if transpose else "upper")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(titles[col], fontsize=9)
    fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label="patch anomaly score (mean of the score map)")
    fig.suptitle("top: input (cyan: lesion mask when known) - bottom: anomaly heatmap", fontsize=10)
    save_figure(fig, path)
