"""What is normal at each place: per-pixel statistics of the anomaly maps on normal validation slices.

Squared error is large wherever normal anatomy or texture is hard to reconstruct (sulci, ventricle borders,
hair and skin texture) and small on smooth lesions. Dividing each pixel's error by its spread on normal data
turns it into a z-map of how unusual that error is there. The statistics come from the normal slices of the
validation patients only (no anomaly label is used) and are written next to the weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from scripts.data import io
from scripts.model.checkpoints import critic_ensemble, has_critic_snapshots
from scripts.scoring.inferer import CRITIC_MAPS, SCORE_MAPS, PatchRankingInferer


@torch.no_grad()
def fit_normal_statistics(
    inferer: PatchRankingInferer,
    network: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    names: Sequence[str] | None = None,
    min_std_fraction: float = 0.1,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-pixel mean and std ``(1, 1, S, S)`` of each map over normal slices given in ``(B, C, S, S)`` batches.

    Each pixel's std is floored at ``min_std_fraction`` of the map's overall std, so that a pixel that is always
    background (std 0) cannot blow up the z-map.
    """
    names = list(names or [n for n in SCORE_MAPS if n not in CRITIC_MAPS or inferer.critic is not None])
    total: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    count = 0
    network.eval()
    for images in tqdm(batches, desc="normal statistics", unit="batch"):
        images = images.float()
        maps = inferer.raw_maps(images, inferer.reconstruct(images, network), names)
        for name, value in maps.items():
            total[name] = total.get(name, 0) + value.sum(0, keepdim=True).double()
            squares[name] = squares.get(name, 0) + value.pow(2).sum(0, keepdim=True).double()
        count += len(images)
    if count < 2:
        raise ValueError(f"need at least 2 normal slices to fit normal statistics, got {count}")
    stats = {}
    for name in names:
        mean = total[name] / count
        std = (squares[name] / count - mean.pow(2)).clamp_min(0).sqrt()
        floor = min_std_fraction * float(std.mean())
        stats[name] = {"mean": mean.float(), "std": std.clamp_min(max(floor, 1e-8)).float()}
    return stats


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
) -> dict[str, dict[str, torch.Tensor]]:
    """Fit the statistics of the maps ``names`` (default: every map the inferer can make) on a dataset of normal
    slice dicts (``image`` key) and save them atomically.

    ``weights`` (e.g. the best checkpoint ``model.pt``) is loaded into a copy of ``network``, and the ``critic`` of
    ``critic_weights`` (``checkpoint_best.pt``) into a copy of the inferer's critic, or the ensemble of
    ``critic_snapshots`` when that file exists (as inference does), so the statistics belong to the models that
    inference will use. The models and inferer passed in (the training's own) are left as they are.
    """
    if weights:
        network = copy.deepcopy(network)
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    inferer = copy.copy(inferer)
    if inferer.critic is not None and has_critic_snapshots(critic_snapshots):
        inferer.critic = critic_ensemble(inferer.critic, critic_snapshots)
    elif inferer.critic is not None and critic_weights:
        checkpoint = torch.load(critic_weights, map_location="cpu", weights_only=True)
        inferer.critic = copy.deepcopy(inferer.critic)
        inferer.critic.load_state_dict(checkpoint["critic"])
    device = next(network.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    stats = fit_normal_statistics(inferer, network, (batch["image"].to(device) for batch in loader), names)
    io.write_atomic(path, lambda handle: torch.save(stats, handle))
    return stats
