"""Per-pixel anomaly maps of an image and its reconstruction (pure tensor functions, ``(N, 1, H, W)``).

``squared`` error (the paper), ``hyperintense`` / ``hypointense`` (squared error only where the input is brighter /
darker than its reconstruction), ``ssim`` (1 - SSIM), the PatchGAN ``critic``'s own judgement, ``feature`` distance
between the critic's features of the input and of the reconstruction, and ``standardise`` (z-maps against
normal statistics). The three residual maps take an optional residual calibration (``residuals``). Each map is zero
outside ``region`` (the foreground of ``scripts.data.rules``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

ResidualCalibration = Mapping[str, torch.Tensor]  # "edges" (C, B - 1), "mean" and "std" (C, B): one row per channel


def residuals(image: torch.Tensor, recon: torch.Tensor, calibration: ResidualCalibration | None = None) -> torch.Tensor:
    """The residual ``image - recon`` per channel, ``(N, C, H, W)``; with ``calibration``, its z-score given the
    in-painted value: ``(r - mean[b]) / std[b]``, ``b`` the bin of ``recon``'s value among ``edges``.

    What a normal residual is depends on what the in-painting drew. It regresses to the mean: on TCGA-LGG FLAIR,
    where it draws dark tissue (CSF, sulci, the brain's rim) the true normal tissue is on average 0.3-0.5 brighter
    (in normalised intensity), where it draws bright tissue a little darker. A plain one-sided map counts the first
    as hyperintensity. The calibration, fitted on normal validation pixels
    (``scripts.scoring.calibration.ResidualSample``), subtracts the residual that normal tissue shows at
    that in-painted value and divides by its spread there, so the map measures how unusual a residual is for what
    was drawn.
    """
    residual = image.float() - recon.float()
    if calibration is None:
        return residual
    edges, mean, std = (calibration[key].to(residual.device) for key in ("edges", "mean", "std"))
    if edges.shape[0] != residual.shape[1]:
        raise ValueError(f"the residual calibration has {edges.shape[0]} channel(s), the images {residual.shape[1]}")
    out = torch.empty_like(residual)
    for channel in range(residual.shape[1]):
        bins = torch.bucketize(recon[:, channel].float().contiguous(), edges[channel].contiguous())
        out[:, channel] = (residual[:, channel] - mean[channel][bins]) / std[channel][bins]
    return out


def pixel_errors(
    image: torch.Tensor,
    recon: torch.Tensor,
    region: torch.Tensor | None = None,
    calibration: ResidualCalibration | None = None,
) -> torch.Tensor:
    """Squared reconstruction error (of the calibrated residual with ``calibration``) averaged over channels,
    ``(N, 1, H, W)``; zero outside ``region``."""
    err = residuals(image, recon, calibration).pow(2).mean(dim=1, keepdim=True)
    return _within(err, region)


def one_sided_errors(
    image: torch.Tensor,
    recon: torch.Tensor,
    region: torch.Tensor | None = None,
    brighter: bool = True,
    calibration: ResidualCalibration | None = None,
) -> torch.Tensor:
    """Squared error only where the input is brighter (``brighter``) or darker than its reconstruction (with
    ``calibration``: than normal tissue of that in-painted brightness is), ``(N, 1, H, W)``, averaged over
    channels; zero outside ``region``.

    An in-painting draws normal tissue. FLAIR lesions (tumour, oedema, white-matter lesions) are brighter than
    the tissue they replace, skin lesions darker than skin: the error of the other sign is normal anatomy drawn a
    little off (a dark sulcus or ventricle drawn wide, a bright hair missed) and counts nothing. The one-sided
    residual is the usual choice for FLAIR in unsupervised lesion detection.
    """
    residual = residuals(image, recon, calibration)
    err = (residual if brighter else -residual).clamp_min(0).pow(2).mean(dim=1, keepdim=True)
    return _within(err, region)


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
    return _within(err, region)


def critic_map(logits: torch.Tensor, size: tuple[int, int], region: torch.Tensor | None = None) -> torch.Tensor:
    """The PatchGAN critic's judgement as a pixel map: ``1 - D = sigmoid(-logit)``, the probability that the patch
    is fake (as ALOCC's ``1 - D`` novelty score), in [0, 1] so that zero outside ``region`` means "surely real";
    brought to ``size`` bilinearly: ``(N, 1, h, w) -> (N, 1, H, W)``."""
    out = torch.sigmoid(F.interpolate(-logits.float(), size=size, mode="bilinear", align_corners=False))
    return _within(out, region)


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
    return _within(out, region)


def _within(error_map: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """``error_map`` with zero outside ``region`` (every map's rule: outside the foreground nothing is anomalous)."""
    return error_map if region is None else error_map * region.float()


def standardise(error_map: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """How unusual each pixel's error is for that place on normal data: ``(e - mean) / std`` (a z-map)."""
    return (error_map - mean.to(error_map)) / (std.to(error_map) + eps)
