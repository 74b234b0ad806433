"""OCSVM-guided autoencoder (Pinon and Lartizien, 2025) on the bundle's training machinery.

An autoencoder with a dense latent code ``z`` is trained on normal slices with ``MSE(x, R(x)) +
OCSVMGuidedLoss(z)`` (the differentiable one-class SVM of ``scripts.baselines.ocsvm_layer``: in each batch an
OCSVM is solved on half of the codes and the other half is penalised for lying outside it). After training a
scikit-learn OCSVM is fitted on the codes of the normal training slices (``fit_latent_ocsvm``) and stored inside
the network (a ``KernelOCSVM`` of torch buffers, so ``model.pt`` stays a plain state dict); a slice's anomaly
score is ``-decision_function`` of its code, its heatmap the reconstruction error.

It is ``configs/train.json`` + ``configs/ocsvm_guided.json``: the core's ``PatchGANTrainer`` with ``lambda_adv 0``
(no critic) and no boxes, this module's ``GuidedReconstructionLoss`` as ``g_loss``, and a last step of the
``training`` run that fits the latent OCSVM (``fit_latent_scorer``)::

    python -m monai.bundle run training --config_file "['configs/train.json','configs/ocsvm_guided.json']" ...
    python -m monai.bundle run run --config_file "['configs/inference.json','configs/ocsvm_guided.json']" ...
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import AutoEncoder
from torch import nn
from tqdm import tqdm

from scripts.baselines.common import ImageScoreInferer, KernelOCSVM
from scripts.baselines.ocsvm_layer import OCSVMGuidedLoss, fit_latent_ocsvm
from scripts.data import io
from scripts.model.losses import ReconstructorLoss

logger = logging.getLogger(__name__)


class LatentAutoEncoder(nn.Module):
    """Convolutional autoencoder (MONAI ``AutoEncoder`` encoder and decoder) with a dense latent code.

    ``encode(x) -> z (N, latent_dim)``, ``decode(z) -> x``; ``forward(x)`` returns the reconstruction and keeps
    the batch's code in ``self.latent`` for the guided loss. ``scorer`` is the latent OCSVM once fitted.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 256,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 2,
        latent_dim: int = 128,
        norm: str = "INSTANCE",
        skip_connections: bool = False,
    ) -> None:
        super().__init__()
        if skip_connections:
            raise ValueError("the OCSVM-guided autoencoder has no skip connections (network_def#skip_connections)")
        if len(strides) != len(channels) - 1:
            raise ValueError(f"need one stride per down-sampling step: {len(channels)} channels, {len(strides)} strides")
        net = AutoEncoder(spatial_dims=2, in_channels=in_channels, out_channels=in_channels, channels=tuple(channels),
                          strides=(*strides, 1), num_res_units=num_res_units, norm=norm)
        self.encoder, self.decoder = net.encode, net.decode
        with torch.no_grad():
            self.feature_shape = tuple(self.encoder(torch.zeros(1, in_channels, image_size, image_size)).shape[1:])
        features = int(np.prod(self.feature_shape))
        self.to_latent, self.from_latent = nn.Linear(features, latent_dim), nn.Linear(latent_dim, features)
        self.scorer = KernelOCSVM()
        self.latent: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.encoder(x).flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.from_latent(z).view(len(z), *self.feature_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.latent = self.encode(x)
        return self.decode(self.latent)

    @torch.no_grad()
    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        """``-decision_function`` of the latent OCSVM at the images' codes, ``(N,)``."""
        return self.scorer(self.encode(x))


class GuidedReconstructionLoss(ReconstructorLoss):
    """``lambda_rec * MSE + lambda_adv * adversarial + OCSVMGuidedLoss(z)``, ``z`` read from ``network.latent``.

    Same call and return as ``ReconstructorLoss`` (``(total, reconstruction, adversarial)``), so the core's
    ``PatchGANTrainer`` trains with it unchanged. Batches of fewer than 4 codes carry no guided term (the layer
    needs two halves of at least 2). The last guided value is kept in ``last_guided`` for logging.
    """

    def __init__(
        self,
        network: LatentAutoEncoder,
        lambda_rec: float = 1.0,
        nu: float = 0.03,
        weight: float = 0.1,
        lambda_adv: float = 0.0,
        criterion: str = "bce",
    ) -> None:
        super().__init__(lambda_rec=lambda_rec, lambda_adv=lambda_adv, criterion=criterion)
        self._network = [network]  # a reference, not a submodule: the loss owns no weights
        self.guided = OCSVMGuidedLoss(nu=nu, weight=weight)
        self.last_guided = torch.zeros(())

    def forward(
        self,
        recon: torch.Tensor,
        target: torch.Tensor,
        fake_logits: torch.Tensor | None,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total, rec, adv = super().forward(recon, target, fake_logits, weight)
        z = self._network[0].latent
        if z is not None and z.shape[0] >= 4:
            guided = self.guided(z.float())
            self.last_guided = guided.detach()
            total = total + guided
        return total, rec, adv


@torch.no_grad()
def latent_codes(network: LatentAutoEncoder, images: Iterable[torch.Tensor]) -> np.ndarray:
    """Codes ``(N, latent_dim)`` of batches of images, in eval mode."""
    network.eval()
    device = next(network.parameters()).device
    return np.concatenate([network.encode(batch.to(device).float()).double().cpu().numpy() for batch in images])


def fit_latent_scorer(
    network: LatentAutoEncoder,
    dataset: Any,
    weights: str | os.PathLike | None = None,
    nu: float = 0.03,
    batch_size: int = 64,
) -> LatentAutoEncoder:
    """Fit the latent OCSVM on the codes of a dataset of normal slices and store it in ``network.scorer``.

    ``weights`` (the best checkpoint, ``model.pt``) is loaded first and rewritten afterwards with the scorer
    inside, so inference finds the weights and the OCSVM of one model in one plain state dict.
    """
    if weights:
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    batches = (batch["image"] for batch in tqdm(loader, desc="latent codes", unit="batch"))
    codes = latent_codes(network, batches)
    if len(codes) < 2:
        raise ValueError(f"need at least 2 normal training slices to fit the latent OCSVM, got {len(codes)}")
    network.scorer.load_pipeline(fit_latent_ocsvm(codes, nu))
    logger.info("latent OCSVM fitted on %d codes of dimension %d", len(codes), codes.shape[1])
    if weights:
        io.write_atomic(Path(weights), lambda handle: torch.save(network.state_dict(), handle))
    return network


class LatentOCSVMInferer(ImageScoreInferer):
    """Slice score: ``-decision_function`` of the latent OCSVM; heatmap: the reconstruction error.

    Before the OCSVM is fitted (the validation passes during training) the core's reconstruction-error scores are
    kept.
    """

    def image_scores(self, images: torch.Tensor, recon: torch.Tensor, network: torch.nn.Module) -> torch.Tensor | None:
        if not network.scorer.fitted:
            return None
        return torch.cat([network.anomaly_score(chunk) for chunk in torch.split(images, self.batch_size(images))])
