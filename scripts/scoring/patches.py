"""The patch grid and targeted patch ranking: patch errors, ranking, slice and volume aggregation.

Pure tensor functions, vectorised over slices and patches. Conventions: slices are ``(N, C, H, W)``; a patch
grid is ``(N, H // p, W // p)``. ``grid_to_image`` (the heatmap's upsampling) and ``grid_cells`` (where each
patch's band starts in that heatmap) are the one mapping between patches and pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PAPER_RANKING_WEIGHTS = (1.1, 1.0)


def patch_grid(error_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean of a per-pixel map over non-overlapping ``patch_size`` squares: ``(N, 1, H, W) -> (N, H/p, W/p)``."""
    height, width = error_map.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size {patch_size}")
    return F.avg_pool2d(error_map, kernel_size=patch_size, stride=patch_size).squeeze(1)


def ranking_score(
    patch_errors: torch.Tensor,
    weights: Sequence[float] | None = PAPER_RANKING_WEIGHTS,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Targeted patch ranking: ``sum_i w_i * e_(i)`` over the patch errors sorted from high to low.

    ``weights`` gives one weight per top-ranked patch (the paper: 1.1 for the first, 1.0 for the next); patches
    beyond ``len(weights)`` do not count. ``weights=None`` is the paper's no-ranking ablation: the mean error
    of all patches. ``valid`` (same shape, boolean) keeps only some patches, e.g. those that touch the brain:
    background patches then neither dilute the mean nor, for signed maps such as z-maps, outrank the tissue.
    Works on any ``(N, ...)`` grid; returns ``(N,)``; a slice without a valid patch scores 0.
    """
    flat = patch_errors.flatten(1).float()
    keep = torch.ones_like(flat, dtype=torch.bool) if valid is None else valid.flatten(1).bool()
    if weights is None:
        return (flat * keep).sum(1) / keep.sum(1).clamp_min(1)
    k = min(len(weights), flat.shape[1])
    top = torch.topk(flat.masked_fill(~keep, float("-inf")), k, dim=1).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # fewer valid patches than weights
    w = torch.as_tensor(list(weights)[:k], dtype=top.dtype, device=top.device)
    return top @ w


def aggregate_slices(slice_scores: torch.Tensor, method: str = "topk_mean", k: int = 3) -> torch.Tensor:
    """One volume score from its slice scores: ``max``, ``mean`` or ``topk_mean`` (mean of the k highest)."""
    if slice_scores.numel() == 0:
        return torch.tensor(float("nan"))
    if method == "max":
        return slice_scores.max()
    if method == "mean":
        return slice_scores.mean()
    if method == "topk_mean":
        return torch.topk(slice_scores, min(k, slice_scores.numel())).values.mean()
    raise ValueError(f"unknown volume aggregation {method!r}: use 'max', 'mean' or 'topk_mean'")


def checkerboard_masks(image_size: int, patch_size: int, stride: int = 2) -> torch.Tensor:
    """In-painting masks ``(stride**2, 1, S, S)`` that together cover every patch of the grid exactly once.

    Pass ``(a, b)`` blacks out the patches whose grid row is ``a`` mod ``stride`` and column is ``b`` mod
    ``stride``, so each patch is reconstructed from its unmasked neighbours: its normal context.
    """
    cells = image_size // patch_size
    rows = torch.arange(cells).view(-1, 1) % stride
    cols = torch.arange(cells).view(1, -1) % stride
    grids = torch.stack([((rows == a) & (cols == b)).float() for a in range(stride) for b in range(stride)])
    return grid_to_image(grids, (image_size, image_size))


def grid_to_image(patch_errors: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A patch grid ``(N, h, w)`` at image size ``(N, 1, H, W)``, each patch's value filling its band (nearest)."""
    return F.interpolate(patch_errors.unsqueeze(1).float(), size=tuple(size), mode="nearest")


def grid_cells(size: int, cells: int) -> np.ndarray:
    """Where each of ``cells`` patch bands starts along an axis of ``size`` pixels of a ``grid_to_image`` heatmap.

    Nearest upsampling maps pixel ``i`` to cell ``floor(i * cells / size)`` (in float32, as torch computes it), so
    the bands are equal when ``size`` is a multiple of ``cells`` and differ by one pixel otherwise.
    """
    index = np.minimum(np.floor(np.arange(size, dtype=np.float32) * np.float32(cells / size)), cells - 1)
    return np.flatnonzero(np.diff(index, prepend=-1) > 0)
