"""ALOCC (Sabokrou et al., CVPR 2018): adversarially learned one-class classifier, on the bundle's machinery.

R is a denoising encoder-decoder fed ``x~ = x + N(0, 0.155^2)``; D is a CNN with one logit per image. R minimises
``lambda_rec * ||x - R(x~)||^2 + lambda_adv * BCE(D(R(x~)), real)`` against the clean ``x`` (the paper's
lambda is 0.4, its official code's 0.2: ``lambda_rec`` in the config), D separates ``x`` from ``R(x~)``. That is
the core's ``PatchGANTrainer`` with noise instead of boxes and a one-logit critic: ``configs/alocc.json``.

The novelty score of an image is ``1 - D(R(x))`` (``critic_input: reconstruction``, the paper's choice) or
``1 - D(x)`` (``critic_input: image``), computed as ``sigmoid(-logit)`` (the same number, without the rounding
of ``1 - sigmoid`` for confident critics); the heatmap is R's reconstruction error. At inference the trained
critic's weights come from ``critic_path`` (``checkpoint_best.pt``, key ``critic``)::

    python -m monai.bundle run run --config_file "['configs/inference.json','configs/alocc.json']" \\
        --ckpt_path models/model.pt --alocc_critic_path models/checkpoint_best.pt
"""

from __future__ import annotations

from typing import Any

import torch

from scripts.baselines.common import ImageScoreInferer

CRITIC_INPUTS = ("reconstruction", "image")


class ALOCCInferer(ImageScoreInferer):
    """``ImageScoreInferer`` with ALOCC's score: ``1 - sigmoid(D(R(x)))`` (or of ``D(x)``) per image.

    Args (besides ``PatchRankingInferer``'s):
        critic: the one-logit critic (required).
        critic_path: checkpoint to load the critic from (a dict with ``critic``, or a bare state dict);
            empty keeps the critic's current weights (the live critic while training).
        critic_input: ``reconstruction`` (``D(R(x))``) or ``image`` (``D(x)``).
    """

    def __init__(self, *args: Any, critic: torch.nn.Module | None = None, critic_path: str = "",
                 critic_input: str = "reconstruction", **kwargs: Any) -> None:
        if critic is None:
            raise ValueError("ALOCCInferer needs the trained one-logit critic as `critic`")
        if critic_input not in CRITIC_INPUTS:
            raise ValueError(f"unknown critic_input {critic_input!r}: use one of {CRITIC_INPUTS}")
        super().__init__(*args, critic=critic, **kwargs)
        self.critic_input = critic_input
        if critic_path:
            state = torch.load(critic_path, map_location="cpu", weights_only=True)
            critic.load_state_dict(state.get("critic", state))

    def image_scores(self, images: torch.Tensor, recon: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        critic = self.critic.to(images.device).eval()
        logits = self._run(recon if self.critic_input == "reconstruction" else images, critic)
        return torch.sigmoid(-logits.double().flatten(1).mean(1))
