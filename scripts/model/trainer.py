"""The adversarial trainer of the masked reconstructor R and its PatchGAN critic D (an ignite engine)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from monai.engines import AdversarialTrainer
from monai.utils.enums import AdversarialKeys
from monai.utils.enums import CommonKeys as Keys

from scripts.model.losses import CriticLoss, ReconstructorLoss


def _autocast(enabled: bool, device: torch.device) -> Any:
    """bf16 autocast on CUDA (no loss scaling needed), nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()


class PatchGANTrainer(AdversarialTrainer):
    """Trains the mask reconstructor R against a PatchGAN critic D on normal images.

    Each iteration takes a batch with the original ``image`` and its box-masked copy ``masked_key``,
    reconstructs ``R(masked)``, updates D with originals as real and reconstructions as fake, then updates R with
    ``g_loss`` (reconstruction + adversarial). With ``weight_key`` a pixel weight map (1 = normal tissue) keeps
    lesion pixels out of R's reconstruction loss and lesion patches out of D's "real" examples. With
    ``lambda_adv == 0`` D is not trained (the masked autoencoder ablation).

    MONAI's ``AdversarialTrainer`` feeds the generator's input to D as "real" and updates R first; here the reals
    are the unmasked originals, so the iteration is our own. Everything else (state, handlers, events, metrics) is
    MONAI's. Output keys follow ``AdversarialKeys`` so MONAI's handlers read them.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        g_network: torch.nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_network: torch.nn.Module,
        d_optimizer: torch.optim.Optimizer,
        g_loss: ReconstructorLoss,
        d_loss: CriticLoss,
        masked_key: str = "masked",
        weight_key: str | None = None,
        amp: bool = False,
        epoch_length: int | None = None,
        non_blocking: bool = True,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            g_network=g_network,
            g_optimizer=g_optimizer,
            g_loss_function=g_loss,
            recon_loss_function=g_loss,
            d_network=d_network,
            d_optimizer=d_optimizer,
            d_loss_function=d_loss,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            train_handlers=train_handlers,
            key_train_metric=key_train_metric,
            amp=False,
            **kwargs,
        )
        self.masked_key, self.weight_key, self.use_amp = masked_key, weight_key, amp
        # MONAI registers the networks, optimizers and losses as state-dict keys of the engine, which pickles whole
        # modules into every checkpoint; they are saved as state dicts by the CheckpointSaver instead.
        self._state_dict_user_keys.clear()

    def _iteration(self, engine: PatchGANTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:  # type: ignore[override]
        device, state = engine.state.device, engine.state
        image = batchdata["image"].to(device, non_blocking=engine.non_blocking).float()
        masked = batchdata[self.masked_key].to(device, non_blocking=engine.non_blocking).float()
        weight = batchdata[self.weight_key].to(device).float() if self.weight_key else None
        g_loss: ReconstructorLoss = state.g_loss_function
        adversarial = g_loss.lambda_adv > 0
        state.g_network.train()
        with _autocast(self.use_amp, device):
            recon = state.g_network(masked)
        d_loss, real_logits, fake_logits = torch.zeros((), device=device), None, None
        if adversarial:
            d_loss, real_logits, fake_logits = self._critic_step(state, image, recon.detach(), weight)
        state.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with _autocast(self.use_amp, device):
            g_fake_logits = state.d_network(recon) if adversarial else None
        total, rec, adv = g_loss(recon, image, g_fake_logits, weight)
        total.backward()
        state.g_optimizer.step()
        return {
            Keys.IMAGE: masked,
            Keys.LABEL: image,
            Keys.PRED: recon.detach(),
            Keys.LOSS: total.detach(),
            AdversarialKeys.REALS: image,
            AdversarialKeys.FAKES: recon.detach(),
            AdversarialKeys.REAL_LOGITS: real_logits,
            AdversarialKeys.FAKE_LOGITS: fake_logits,
            AdversarialKeys.RECONSTRUCTION_LOSS: rec.detach(),
            AdversarialKeys.GENERATOR_LOSS: adv.detach(),
            AdversarialKeys.DISCRIMINATOR_LOSS: d_loss.detach(),
        }

    def _critic_step(
        self, state: Any, image: torch.Tensor, fake: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One D update: originals are real, reconstructions fake; returns the loss and both logit grids."""
        state.d_network.train()
        state.d_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with _autocast(self.use_amp, state.device):
            real_logits = state.d_network(image)
            fake_logits = state.d_network(fake)
        loss = state.d_loss_function(real_logits, fake_logits, weight)
        loss.backward()
        state.d_optimizer.step()
        return loss.detach(), real_logits.detach(), fake_logits.detach()
