"""Losses and one adversarial iteration of PatchGANTrainer on hand-made networks."""

import pytest
import torch
from torch import nn

from scripts.model.losses import AdversarialLoss, CriticLoss, ReconstructorLoss, pool_to_grid
from scripts.model.networks import critic, reconstructor
from scripts.model.trainer import PatchGANTrainer


def test_reconstructor_loss_weights_its_two_terms():
    recon, target = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    logits = torch.zeros(2, 1, 3, 3)  # BCE(sigmoid(0), 1) = log 2
    total, rec, adv = ReconstructorLoss(lambda_rec=2.0, lambda_adv=0.5)(recon, target, logits)
    assert rec.item() == pytest.approx(1.0)
    assert adv.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert total.item() == pytest.approx(2.0 + 0.5 * adv.item())


def test_zero_adversarial_weight_ignores_the_critic():
    total, _, adv = ReconstructorLoss(lambda_adv=0.0)(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), None)
    assert adv.item() == 0.0 and total.item() == pytest.approx(1.0)


def test_critic_loss_is_low_for_a_confident_correct_critic():
    real, fake = torch.full((1, 1, 4, 4), 10.0), torch.full((1, 1, 4, 4), -10.0)
    assert CriticLoss()(real, fake).item() < 1e-3
    assert CriticLoss()(fake, real).item() > 5


def test_lesion_weights_remove_patches_from_the_losses():
    weight = torch.ones(1, 1, 8, 8)
    weight[..., :4, :4] = 0  # lesion in the top-left quarter
    grid = pool_to_grid(weight, torch.zeros(1, 1, 2, 2))
    assert grid[0, 0].tolist() == [[0.0, 1.0], [1.0, 1.0]]
    logits = torch.zeros(1, 1, 2, 2)
    logits[..., 0, 0] = -50.0  # a terrible "real" judgement on the lesion patch only
    assert AdversarialLoss()(logits, True, grid).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    recon, target = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    target[..., :4, :4] = 5.0  # error only on lesion pixels
    _, rec, _ = ReconstructorLoss(lambda_adv=0.0)(recon, target, None, weight)
    assert rec.item() == 0.0


def test_unknown_criterion_is_rejected():
    with pytest.raises(ValueError, match="hinge"):
        AdversarialLoss("hinge")


class RecordingCritic(nn.Module):
    """A tiny critic that remembers what it was shown."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.conv(x)


def make_trainer(d_net, lambda_adv=0.2, batch=None):
    torch.manual_seed(0)
    g_net = reconstructor(channels=(4, 8), strides=(2,), num_res_units=0)
    image = torch.rand(2, 1, 16, 16) + 0.5
    masked = image.clone()
    masked[..., 4:8, 4:8] = 0
    batch = batch or {"image": image, "masked": masked}
    trainer = PatchGANTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch], g_network=g_net,
        g_optimizer=torch.optim.Adam(g_net.parameters(), 1e-2), d_network=d_net,
        d_optimizer=torch.optim.Adam(d_net.parameters(), 1e-2), g_loss=ReconstructorLoss(lambda_adv=lambda_adv),
        d_loss=CriticLoss(),
    )
    return trainer, g_net, batch


def test_one_iteration_shows_the_critic_originals_as_real_and_updates_both_networks():
    critic = RecordingCritic()
    trainer, g_net, batch = make_trainer(critic)
    g_before = [p.clone() for p in g_net.parameters()]
    d_before = [p.clone() for p in critic.parameters()]
    trainer.run()
    assert torch.equal(critic.seen[0], batch["image"])  # real = unmasked originals
    assert not torch.equal(critic.seen[1], batch["masked"])  # fake = reconstructions
    assert any(not torch.equal(a, b) for a, b in zip(g_before, g_net.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, critic.parameters()))
    out = trainer.state.output
    assert torch.isfinite(out["loss"]) and out["discriminator_loss"] > 0


def test_without_adversarial_weight_the_critic_is_not_trained():
    critic = RecordingCritic()
    trainer, _, _ = make_trainer(critic, lambda_adv=0.0)
    d_before = [p.clone() for p in critic.parameters()]
    trainer.run()
    assert critic.seen == []
    assert all(torch.equal(a, b) for a, b in zip(d_before, critic.parameters()))


def test_checkpoints_hold_no_pickled_modules():
    trainer, _, _ = make_trainer(critic(channels=4, num_layers=2))
    trainer.run()
    assert set(trainer.state_dict()) <= {"iteration", "epoch", "epoch_length", "max_epochs"}


def test_a_command_line_false_string_is_refused_not_read_as_true():
    with pytest.raises(TypeError, match="write False"):
        reconstructor(channels=(4, 8), strides=(2,), skip_connections="false")
