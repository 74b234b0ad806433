"""Losses of the masked-reconstructor / PatchGAN pair.

Reading of the paper's equations 1-4 (see docs/method.md): the reconstructor R minimises
``lambda_rec * ||x - R(z)||^2 + lambda_adv * adv(D(R(z)), real)``; the critic D minimises
``adv(D(x), real) + adv(D(R(z)), fake)`` only. The patch reconstruction term that the paper writes into its
"discriminator loss" has no gradient with respect to D's weights, so it belongs to R's objective.

Adversarial terms work on the logit grid of a PatchGAN critic, every patch judged on its own. ``weight`` maps
(e.g. normal-tissue masks pooled onto the logit grid) let lesion patches carry no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CRITERIA = ("bce", "least_squares")


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    weight = weight.to(values.dtype).expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def pool_to_grid(weight: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bring a pixel weight map ``(N, 1, H, W)`` onto a logit grid: a patch counts only if fully weighted."""
    return (F.adaptive_avg_pool2d(weight.float(), grid.shape[-2:]) > 0.999).to(grid.dtype)


class AdversarialLoss(nn.Module):
    """Patch-wise adversarial loss on logits: non-saturating BCE (default) or least squares (LSGAN)."""

    def __init__(self, criterion: str = "bce") -> None:
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f"unknown adversarial criterion {criterion!r}: use one of {CRITERIA}")
        self.criterion = criterion

    def forward(self, logits: torch.Tensor, target_is_real: bool, weight: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()
        target = torch.full_like(logits, 1.0 if target_is_real else 0.0)
        if self.criterion == "bce":
            values = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            values = (logits - target).pow(2)
        return _weighted_mean(values, weight)


class ReconstructorLoss(nn.Module):
    """``lambda_rec * MSE(x, R(z)) + lambda_adv * adv(D(R(z)), real)``; returns the total and its two parts."""

    def __init__(self, lambda_rec: float = 1.0, lambda_adv: float = 0.2, criterion: str = "bce") -> None:
        super().__init__()
        self.lambda_rec, self.lambda_adv = lambda_rec, lambda_adv
        self.adversarial = AdversarialLoss(criterion)

    def forward(
        self,
        recon: torch.Tensor,
        target: torch.Tensor,
        fake_logits: torch.Tensor | None,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rec = _weighted_mean((recon.float() - target.float()).pow(2), weight)
        adv = torch.zeros((), device=rec.device)
        if fake_logits is not None and self.lambda_adv > 0:
            grid_weight = None if weight is None else pool_to_grid(weight, fake_logits)
            adv = self.adversarial(fake_logits, True, grid_weight)
        return self.lambda_rec * rec + self.lambda_adv * adv, rec, adv


class CriticLoss(nn.Module):
    """``(adv(D(x), real) + adv(D(R(z)), fake)) / 2``; real patches touching a lesion can be left out."""

    def __init__(self, criterion: str = "bce") -> None:
        super().__init__()
        self.adversarial = AdversarialLoss(criterion)

    def forward(
        self, real_logits: torch.Tensor, fake_logits: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        grid_weight = None if weight is None else pool_to_grid(weight, real_logits)
        return 0.5 * (self.adversarial(real_logits, True, grid_weight) + self.adversarial(fake_logits, False))
