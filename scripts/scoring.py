"""Patch-wise anomaly scoring: patch errors on a grid, targeted patch ranking, slice and volume aggregation.

Pure tensor functions, vectorised over slices and patches, shared by the inferer, the validation metric,
the handlers and the tests. Conventions: slices are ``(N, C, H, W)``; a patch grid is ``(N, H // p, W // p)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PAPER_RANKING_WEIGHTS = (1.1, 1.0)


def pixel_errors(image: torch.Tensor, recon: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Squared reconstruction error averaged over channels, ``(N, 1, H, W)``; zero outside ``region``."""
    err = (image.float() - recon.float()).pow(2).mean(dim=1, keepdim=True)
    return err if region is None else err * region.float()


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


def grid_to_heatmap(patch_errors: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Bring a patch grid back to image size (each patch's error fills its square): ``(N, 1, H, W)``."""
    return patch_errors.unsqueeze(1).repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def checkerboard_masks(image_size: int, patch_size: int, stride: int = 2) -> torch.Tensor:
    """In-painting masks ``(stride**2, 1, S, S)`` that together cover every patch of the grid exactly once.

    Pass ``(a, b)`` blacks out the patches whose grid row is ``a`` mod ``stride`` and column is ``b`` mod
    ``stride``, so each patch is reconstructed from its unmasked neighbours: its normal context.
    """
    cells = image_size // patch_size
    rows = torch.arange(cells).view(-1, 1) % stride
    cols = torch.arange(cells).view(1, -1) % stride
    grids = torch.stack([((rows == a) & (cols == b)).float() for a in range(stride) for b in range(stride)])
    return grid_to_heatmap(grids, patch_size)


def ssim_error_map(image: torch.Tensor, recon: torch.Tensor, region: torch.Tensor | None = None, kernel: int = 7) -> torch.Tensor:
    """Structural error ``1 - SSIM`` per pixel (MONAI's SSIM, Gaussian window), averaged over channels.

    Unlike squared error it does not grow with the local intensity variance alone, so textured normal tissue
    (skin, hair) is not ranked above a smooth lesion just for being busy. Padded back to full size.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    ssim, _ = compute_ssim_and_cs(
        recon.float(), image.float(), spatial_dims=2, kernel_size=(kernel, kernel), kernel_sigma=(1.5, 1.5),
        data_range=max(float(image.max() - image.min()), 1e-6),
    )
    pad = kernel // 2
    err = F.pad(1 - ssim.mean(dim=1, keepdim=True), (pad, pad, pad, pad), mode="replicate")
    return err if region is None else err * region.float()


def critic_map(logits: torch.Tensor, size: tuple[int, int], region: torch.Tensor | None = None) -> torch.Tensor:
    """The PatchGAN critic's judgement as a pixel map: ``1 - D = sigmoid(-logit)``, the probability that the patch
    is fake (as ALOCC's ``1 - D`` novelty score), in [0, 1] so that zero outside ``region`` means "surely real";
    brought to ``size`` bilinearly: ``(N, 1, h, w) -> (N, 1, H, W)``."""
    out = torch.sigmoid(F.interpolate(-logits.float(), size=size, mode="bilinear", align_corners=False))
    return out if region is None else out * region.float()


def feature_distance_map(
    features: Sequence[torch.Tensor],
    recon_features: Sequence[torch.Tensor],
    size: tuple[int, int],
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feature-space error: distance between a network's feature maps of the input and of its reconstruction.

    At each location of each layer the feature vectors are unit-normalised over channels (so that no layer
    dominates by its scale) and their squared distance (0 to 4) is taken; each layer's map is brought to ``size``
    bilinearly and the layers are averaged: ``(N, 1, H, W)``. A texture the reconstructor renders differently but
    that the critic finds equally normal costs little; a change of what is there costs a lot.
    """
    if len(features) != len(recon_features) or not features:
        raise ValueError(f"need the same non-zero number of layers, got {len(features)} and {len(recon_features)}")
    maps = []
    for a, b in zip(features, recon_features):
        distance = (F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)).pow(2).sum(1, keepdim=True)
        maps.append(F.interpolate(distance, size=size, mode="bilinear", align_corners=False))
    out = torch.stack(maps).mean(0)
    return out if region is None else out * region.float()


def standardise(error_map: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """How unusual each pixel's error is for that place on normal data: ``(e - mean) / std`` (a z-map)."""
    return (error_map - mean.to(error_map)) / (std.to(error_map) + eps)
