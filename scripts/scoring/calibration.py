"""What is normal, measured on the normal slices of the validation patients and written next to the weights.

Two calibrations, fitted in one pass over those slices (no anomaly label is used):

- **per-pixel statistics of each anomaly map** (``normal_stats.pt``): squared error is large wherever normal
  anatomy or texture is hard to reconstruct (sulci, ventricle borders, hair and skin texture); dividing each pixel's
  error by its spread on normal data turns it into a z-map of how unusual that error is there;
- **the residual given the in-painted value** (``residual_calibration.pt``): the mean and spread of ``image -
  recon`` in bins of ``recon``'s value, per channel, which ``scripts.scoring.maps.residuals`` uses to turn the
  residual into a z-score for what was drawn (the in-painting regresses to the mean), and the geometry of the
  in-painting it was fitted on (``PatchRankingInferer.geometry``: holes of another size leave other residuals).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from scripts.data import io
from scripts.data.rules import foreground
from scripts.model.checkpoints import critic_ensemble, has_critic_snapshots
from scripts.scoring.inferer import CRITIC_MAPS, SCORE_MAPS, PatchRankingInferer
from scripts.scoring.maps import residuals

RESIDUAL_BINS = 24  # quantile bins of the in-painted value; 8 to 48 gave the same TCGA-LGG validation AUROC
PIXELS_PER_SLICE = 4096  # foreground pixels sampled per slice and channel for the residual calibration


def reconstructions(
    inferer: PatchRankingInferer, network: torch.nn.Module, batches: Iterable[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, in-painting)`` of each batch of normal slices, as the inferer reconstructs them at test time (call
    it under ``torch.no_grad``, as the ``fit_*`` and ``save_*`` functions do)."""
    network.eval()
    for images in tqdm(batches, desc="normal statistics", unit="batch"):
        images = images.float()
        yield images, inferer.reconstruct(images, network)


class MapMoments:
    """Per-pixel mean and std of anomaly maps over the slices added (``add``), as ``normal_stats.pt`` holds them."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, maps: dict[str, torch.Tensor]) -> None:
        for name, value in maps.items():
            self.total[name] = self.total.get(name, 0) + value.sum(0, keepdim=True).double()
            self.squares[name] = self.squares.get(name, 0) + value.pow(2).sum(0, keepdim=True).double()
        self.count += len(next(iter(maps.values())))

    def result(self, min_std_fraction: float = 0.1) -> dict[str, dict[str, torch.Tensor]]:
        """``{map: {"mean", "std"}}`` ``(1, 1, S, S)``; each pixel's std floored at ``min_std_fraction`` of the map's
        overall std, so that a pixel that is always background (std 0) cannot blow up the z-map."""
        if self.count < 2:
            raise ValueError(f"need at least 2 normal slices to fit normal statistics, got {self.count}")
        stats = {}
        for name, total in self.total.items():
            mean = total / self.count
            std = (self.squares[name] / self.count - mean.pow(2)).clamp_min(0).sqrt()
            floor = min_std_fraction * float(std.mean())
            stats[name] = {"mean": mean.float(), "std": std.clamp_min(max(floor, 1e-8)).float()}
        return stats


class ResidualSample:
    """A sample of (in-painted value, residual) pairs of foreground pixels, per channel, for the residual calibration.

    At most ``pixels_per_slice`` pixels of each slice and channel are kept (a seeded random choice), so that memory
    stays bounded at 256 px and the fit does not depend on the order of the slices beyond the seed.
    """

    def __init__(self, foreground_mode: str = "nonzero", pixels_per_slice: int = PIXELS_PER_SLICE, seed: int = 0) -> None:
        self.foreground_mode, self.pixels_per_slice = foreground_mode, pixels_per_slice
        self.generator = torch.Generator().manual_seed(seed)
        self.values: list[list[torch.Tensor]] = []
        self.residuals: list[list[torch.Tensor]] = []

    def add(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        images, recon = images.float().cpu(), recon.float().cpu()
        region = foreground(images, self.foreground_mode).bool().expand_as(images)
        if not self.values:
            self.values, self.residuals = [[] for _ in range(images.shape[1])], [[] for _ in range(images.shape[1])]
        limit = self.pixels_per_slice * len(images)
        difference = residuals(images, recon)
        for channel in range(images.shape[1]):
            keep = region[:, channel]
            value, residual = recon[:, channel][keep], difference[:, channel][keep]
            if value.numel() > limit:
                chosen = torch.randperm(value.numel(), generator=self.generator)[:limit]
                value, residual = value[chosen], residual[chosen]
            self.values[channel].append(value)
            self.residuals[channel].append(residual)

    def result(self, bins: int = RESIDUAL_BINS, min_std_fraction: float = 0.1) -> dict[str, torch.Tensor]:
        """``{"edges": (C, bins - 1), "mean": (C, bins), "std": (C, bins)}``: quantile bins of the in-painted value
        and the residual's mean and std in each; an empty bin (tied edges) takes the channel's overall mean and std,
        and every std is floored at ``min_std_fraction`` of the channel's mean std."""
        if bins < 2:
            raise ValueError(f"the residual calibration needs at least 2 bins, got {bins}")
        edges, means, stds = [], [], []
        for channel_values, channel_residuals in zip(self.values, self.residuals):
            value, residual = torch.cat(channel_values).double(), torch.cat(channel_residuals).double()
            if value.numel() < 10 * bins:
                raise ValueError(f"need at least {10 * bins} normal foreground pixels for {bins} residual bins, "
                                 f"got {value.numel()}")
            ordered = value.sort().values
            edge = ordered[(torch.arange(1, bins) * len(ordered)) // bins]
            index = torch.bucketize(value, edge)
            count = torch.bincount(index, minlength=bins).double()
            mean = torch.bincount(index, residual, minlength=bins) / count.clamp_min(1)
            var = torch.bincount(index, residual.pow(2), minlength=bins) / count.clamp_min(1) - mean.pow(2)
            std = var.clamp_min(0).sqrt()
            empty = count == 0
            mean[empty], std[empty] = residual.mean(), residual.std()
            edges.append(edge)
            means.append(mean)
            stds.append(std.clamp_min(max(min_std_fraction * float(std.mean()), 1e-8)))
        if not edges:
            raise ValueError("no normal slices to fit the residual calibration on")
        return {"edges": torch.stack(edges).float(), "mean": torch.stack(means).float(), "std": torch.stack(stds).float()}


def neutral_residual_calibration(channels: int = 1, bins: int = 1) -> dict[str, torch.Tensor]:
    """A residual calibration that changes nothing (mean 0, std 1 in every bin): what an untrained model has, so that
    a bundle seeded with random weights (e.g. a new MONAI Label app) scores with the plain residual. ``bins`` (evenly
    spaced over 0-1) only sets the size of the table, e.g. ``RESIDUAL_BINS`` to time the lookup as trained."""
    edges = torch.linspace(0, 1, bins + 1)[1:-1].repeat(channels, 1)
    return {"edges": edges, "mean": torch.zeros(channels, bins), "std": torch.ones(channels, bins)}


@torch.no_grad()
def fit_normal_statistics(
    inferer: PatchRankingInferer,
    network: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    names: Sequence[str] | None = None,
    min_std_fraction: float = 0.1,
    residual_sample: ResidualSample | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-pixel mean and std ``(1, 1, S, S)`` of each map (``names``, default every map the inferer can make) over
    normal slices given in ``(B, C, S, S)`` batches (``MapMoments``); the same reconstructions also go into
    ``residual_sample`` when one is given (one pass for both calibrations)."""
    names = map_names(inferer, names)
    moments = MapMoments()
    for images, recon in reconstructions(inferer, network, batches):
        moments.add(inferer.raw_maps(images, recon, names))
        if residual_sample is not None:
            residual_sample.add(images, recon)
    return moments.result(min_std_fraction)


def map_names(inferer: PatchRankingInferer, names: Sequence[str] | None) -> list[str]:
    """``names``, or every map the inferer can make (the critic's two only when it has a critic)."""
    return list(names or [n for n in SCORE_MAPS if n not in CRITIC_MAPS or inferer.critic is not None])


@torch.no_grad()
def save_normal_statistics(
    path: str | Path,
    inferer: PatchRankingInferer,
    network: torch.nn.Module,
    dataset: Iterable[dict[str, Any]],
    weights: str | Path | None = None,
    batch_size: int = 32,
    critic_weights: str | Path | None = None,
    names: Sequence[str] | None = None,
    critic_snapshots: str | Path | None = None,
    residual_path: str | Path | None = None,
    residual_bins: int = RESIDUAL_BINS,
) -> dict[str, dict[str, torch.Tensor]]:
    """Fit the statistics of the maps ``names`` (default: every map the inferer can make) on a dataset of normal
    slice dicts (``image`` key) and save them atomically to ``path``; with ``residual_path``, the residual
    calibration too, from the same reconstructions.

    ``weights`` (e.g. the best checkpoint ``model.pt``) is loaded into a copy of ``network``, and the ``critic`` of
    ``critic_weights`` (``checkpoint_best.pt``) into a copy of the inferer's critic, or the ensemble of
    ``critic_snapshots`` when that file exists (as inference does), so the statistics belong to the models that
    inference will use. The map statistics describe the uncalibrated maps. The models and inferer passed in (the
    training's own) are left as they are.
    """
    if weights:
        network = copy.deepcopy(network)
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    inferer = copy.copy(inferer)
    inferer.residual_calibration = None
    if inferer.critic is not None and has_critic_snapshots(critic_snapshots):
        inferer.critic = critic_ensemble(inferer.critic, critic_snapshots)
    elif inferer.critic is not None and critic_weights:
        checkpoint = torch.load(critic_weights, map_location="cpu", weights_only=True)
        inferer.critic = copy.deepcopy(inferer.critic)
        inferer.critic.load_state_dict(checkpoint["critic"])
    device = next(network.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    sample = ResidualSample(inferer.foreground) if residual_path else None
    stats = fit_normal_statistics(inferer, network, (batch["image"].to(device) for batch in loader), names,
                                  residual_sample=sample)
    io.write_atomic(path, lambda handle: torch.save(stats, handle))
    if sample is not None:
        calibration = {**sample.result(residual_bins), "geometry": inferer.geometry()}
        io.write_atomic(residual_path, lambda handle: torch.save(calibration, handle))
    return stats
