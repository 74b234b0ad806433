"""Network factories: plain MONAI ``nn.Module``s, kept apart from training and scoring code.

The reconstructor is an encoder-decoder; with ``skip_connections`` it is a MONAI ``UNet`` (sharp
reconstructions, but skips can copy an anomaly straight through, which is why the bundle scores with masked
in-painting passes), without it a MONAI ``AutoEncoder`` with the same channels and strides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import AutoEncoder, PatchDiscriminator, UNet
from torch import nn

from scripts.config import require_bool


def reconstructor(
    in_channels: int = 1,
    channels: Sequence[int] = (32, 64, 128, 256, 512),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    skip_connections: bool = True,
    norm: str = "INSTANCE",
) -> nn.Module:
    """The mask reconstructor R: image (masked or not) -> reconstruction with the same shape."""
    if len(strides) != len(channels) - 1:
        raise ValueError(f"need one stride per down-sampling step: {len(channels)} channels, {len(strides)} strides")
    if require_bool("skip_connections", skip_connections):
        return UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            norm=norm,
        )
    return AutoEncoder(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(channels),
        strides=(*strides, 1),
        num_res_units=num_res_units,
        norm=norm,
    )


class PatchCritic(PatchDiscriminator):
    """MONAI ``PatchDiscriminator`` that returns only its final logit grid ``(N, 1, h, w)``.

    MONAI's version returns every intermediate feature map (for feature-matching losses); the adversarial
    losses and the patch scores here need just the last one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[-1]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The intermediate feature maps (every layer but the logits): what D has learned to look at."""
        return super().forward(x)[:-1]


def critic(in_channels: int = 1, channels: int = 64, num_layers: int = 3) -> nn.Module:
    """The PatchGAN critic D: image -> grid of real/fake logits, one per receptive-field patch.

    Instance normalisation (the paper's choice; batch statistics would mix reals and fakes) and a final
    single-channel logit map without activation, so the adversarial loss works on logits.
    """
    return PatchCritic(
        spatial_dims=2,
        channels=channels,
        in_channels=in_channels,
        out_channels=1,
        num_layers_d=num_layers,
        norm="INSTANCE",
    )


class CriticEnsemble(nn.Module):
    """Several critics judging as one: the mean of their ``1 - D`` (probability that a patch is fake), returned as the
    logit of that mean so that it drops in wherever one critic's logits are used.

    The members are the critic at several epochs of one training (``checkpoints.CriticSnapshots``): a PatchGAN critic
    never converges, and its judgement of a given patch swings from one epoch to the next while the reconstruction
    error stays flat; the mean over epochs keeps what they agree on. ``features`` stacks the members' feature maps
    along the channels, so a feature distance is taken in their joint feature space.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a critic ensemble needs at least one critic")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fake = torch.stack([torch.sigmoid(-member(x).float()) for member in self.members]).mean(0)
        return -torch.logit(fake, eps=1e-6)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        per_member = [member.features(x) for member in self.members]
        return [torch.cat(layer, dim=1) for layer in zip(*per_member)]
