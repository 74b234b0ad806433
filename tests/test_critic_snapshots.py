"""Critic snapshots: kept at validation epochs, travelling in checkpoints, scored as one averaged critic."""

from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Events
from torch import nn

from scripts.data.io import InputError
from scripts.model.checkpoints import CriticSnapshots, critic_ensemble
from scripts.model.networks import CriticEnsemble, critic


class Constant(nn.Module):
    """A critic whose logit is the same everywhere; features: the input scaled by that logit."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(float(logit)))

    def forward(self, x):
        return torch.full((len(x), 1, 2, 2), 1.0) * self.logit

    def features(self, x):
        return [x * self.logit, x[:, :1] * self.logit]


def test_the_ensemble_averages_the_members_fake_probabilities():
    x = torch.zeros(3, 1, 8, 8)
    logits = CriticEnsemble([Constant(0.0), Constant(2.0)])(x)
    expected = (0.5 + torch.sigmoid(torch.tensor(-2.0))) / 2  # 1 - D of each member, averaged
    torch.testing.assert_close(torch.sigmoid(-logits), torch.full((3, 1, 2, 2), float(expected)))
    single = CriticEnsemble([Constant(1.5)])(x)
    torch.testing.assert_close(single, torch.full((3, 1, 2, 2), 1.5), atol=1e-5, rtol=0)


def test_the_ensemble_stacks_the_members_features_along_channels():
    x = torch.ones(2, 3, 4, 4)
    layers = CriticEnsemble([Constant(1.0), Constant(2.0)]).features(x)
    assert [layer.shape[1] for layer in layers] == [6, 2]
    torch.testing.assert_close(layers[0][:, 3:], 2 * x)


def _engine(epoch):
    return SimpleNamespace(state=SimpleNamespace(epoch=epoch))


def test_snapshots_keep_the_last_count_and_load_back_as_an_ensemble(tmp_path):
    net = critic(in_channels=1, channels=4, num_layers=2)
    path = tmp_path / "critic_snapshots.pt"
    snapshots = CriticSnapshots(net, path, count=2, interval=5)
    for epoch in (5, 10, 15):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(epoch / 100)
        snapshots.take(_engine(epoch))
    snapshots.save()
    saved = torch.load(path, weights_only=True)
    assert saved["epochs"] == [10, 15]
    restored = CriticSnapshots(net, tmp_path / "other.pt", count=2, interval=5)
    restored.load_state_dict(snapshots.state_dict())  # what a resumed run gets from its checkpoint
    assert restored.state_dict()["epochs"] == [10, 15]

    ensemble = critic_ensemble(critic(in_channels=1, channels=4, num_layers=2), path)
    assert isinstance(ensemble, CriticEnsemble) and len(ensemble.members) == 2
    member_weights = [next(m.parameters()).flatten()[0].item() for m in ensemble.members]
    assert member_weights == pytest.approx([0.10, 0.15])


def test_without_a_snapshots_file_the_critic_is_used_as_it_is(tmp_path):
    net = critic(in_channels=1, channels=4, num_layers=2)
    assert critic_ensemble(net, tmp_path / "critic_snapshots.pt") is net
    assert critic_ensemble(net, "") is net
    CriticSnapshots(net, tmp_path / "none.pt", count=0, interval=1).save()  # count 0 keeps and writes nothing
    assert not (tmp_path / "none.pt").exists()


def test_a_bad_snapshots_file_is_refused_naming_it(tmp_path):
    text = tmp_path / "critic_snapshots.pt"
    text.write_text("not weights")
    with pytest.raises(InputError, match="critic_snapshots.pt: not a critic snapshots file"):
        critic_ensemble(critic(in_channels=1, channels=4, num_layers=2), text)
    no_snapshots = tmp_path / "weights.pt"
    torch.save({"critic": {}}, no_snapshots)
    with pytest.raises(InputError, match="weights.pt: not a critic snapshots file"):
        critic_ensemble(critic(in_channels=1, channels=4, num_layers=2), no_snapshots)
    other = tmp_path / "other" / "critic_snapshots.pt"
    snapshots = CriticSnapshots(critic(in_channels=1, channels=8, num_layers=2), other, count=1, interval=1)
    snapshots.take(_engine(1))
    snapshots.save()
    with pytest.raises(InputError, match="critic_snapshots.pt: its weights do not fit the configured network"):
        critic_ensemble(critic(in_channels=1, channels=4, num_layers=2), other)


def test_a_new_training_removes_the_snapshots_an_earlier_run_left(tmp_path):
    from ignite.engine import Engine

    stale = tmp_path / "critic_snapshots.pt"
    stale.write_bytes(b"an earlier training's critics")
    net = critic(in_channels=1, channels=4, num_layers=2)
    engine = Engine(lambda engine, batch: None)
    CriticSnapshots(net, stale, count=0, interval=1).attach(engine)
    engine.run([0], max_epochs=1)
    assert not stale.exists()
    engine = Engine(lambda engine, batch: None)
    CriticSnapshots(net, stale, count=2, interval=1).attach(engine)
    engine.run([0], max_epochs=3)
    assert torch.load(stale, weights_only=True)["epochs"] == [2, 3]


def test_a_checkpoint_saved_before_the_snapshot_handler_still_holds_that_epochs_critic(tmp_path):
    from ignite.engine import Engine

    snapshots = CriticSnapshots(critic(in_channels=1, channels=4, num_layers=2), tmp_path / "s.pt", count=3, interval=2)
    engine = Engine(lambda engine, batch: None)
    saved = []
    engine.add_event_handler(Events.EPOCH_COMPLETED(every=2), lambda e: saved.append(snapshots.state_dict()["epochs"]))
    snapshots.attach(engine)  # after the "checkpoint saver", as in configs/train.json
    engine.run([0], max_epochs=4)
    assert saved == [[2], [2, 4]] and snapshots.state_dict()["epochs"] == [2, 4]
