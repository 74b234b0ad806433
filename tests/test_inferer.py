"""PatchRankingInferer: shapes, in-painting passes, slice selection and scores on hand-made networks."""

import os

import pytest
import torch
from torch import nn

from scripts.scoring.inferer import PatchRankingInferer
from scripts.scoring.patches import ranking_score


class Identity(nn.Module):
    def forward(self, x):
        return x


class Constant(nn.Module):
    """Predicts a flat 0.5 image: the error is known in closed form."""

    def forward(self, x):
        return torch.full_like(x, 0.5)


def brain_volume(size=32, depth=10):
    """A (1, 1, H, W, D) volume: foreground 0.5 in the middle slices, empty end slices, one bright patch."""
    vol = torch.zeros(1, 1, size, size, depth)
    vol[..., 2:-2] = 0.5
    vol[0, 0, 8:16, 8:16, 5] = 1.5
    return vol


def test_image_mode_with_a_perfect_reconstructor_scores_zero():
    inferer = PatchRankingInferer(image_size=32, patch_size=8, test_input="image", foreground="all")
    images = torch.rand(3, 1, 32, 32)
    scores = inferer.score(images, Identity())
    assert scores.heatmap.shape == images.shape
    assert torch.all(scores.slice_scores == 0)


def test_inpainting_replaces_every_patch_by_its_masked_reconstruction():
    inferer = PatchRankingInferer(image_size=16, patch_size=4, test_input="inpaint", foreground="all")
    images = torch.rand(2, 1, 16, 16) + 1.0
    recon = inferer.reconstruct(images, Identity())
    # an identity network sees zeros where a patch is masked, and each patch is masked in exactly one pass
    assert torch.allclose(recon, torch.zeros_like(images))


def test_volume_scores_use_ranking_and_skip_empty_slices():
    inferer = PatchRankingInferer(image_size=32, patch_size=8, test_input="image", ranking_weights=(1.1, 1.0))
    scores = inferer.score(brain_volume(), Constant())
    assert scores.heatmap.shape == (1, 1, 32, 32, 10)
    assert scores.slice_valid.tolist() == [False, False] + [True] * 6 + [False, False]
    assert torch.isnan(scores.slice_scores[0]) and not torch.isnan(scores.slice_scores[5])
    # slice 5: the bright patch has error (1.5 - 0.5)^2 = 1, every other patch 0
    assert scores.slice_scores[5].item() == pytest.approx(1.1 * 1.0 + 1.0 * 0.0)
    assert scores.slice_scores[4].item() == pytest.approx(0.0)
    assert scores.case_scores.shape == (1,)
    assert scores.heatmap[0, 0, 10, 10, 5].item() == pytest.approx(1.0)
    assert scores.heatmap[0, 0, 0, 0, 0].item() == 0.0


def test_no_ranking_gives_the_mean_patch_error():
    inferer = PatchRankingInferer(image_size=32, patch_size=8, test_input="image", ranking=False)
    scores = inferer.score(brain_volume(), Constant())
    assert scores.slice_scores[5].item() == pytest.approx(ranking_score(scores.patch_errors, None)[3].item())
    assert scores.slice_scores[5].item() == pytest.approx(1.0 / 16)


def test_resizing_keeps_the_heatmap_on_the_input_grid():
    inferer = PatchRankingInferer(image_size=16, patch_size=4, test_input="image", foreground="all")
    images = torch.rand(2, 3, 40, 24)
    scores = inferer.score(images, Constant())
    assert scores.heatmap.shape == (2, 1, 40, 24)
    assert scores.reconstruction.shape == (2, 3, 16, 16)


def test_call_returns_the_heatmap_for_monai_label():
    inferer = PatchRankingInferer(image_size=32, patch_size=8)
    heat = inferer(brain_volume(), Constant())
    assert heat.shape == (1, 1, 32, 32, 10)


@pytest.mark.parametrize("kwargs", [{"test_input": "noise"}, {"foreground": "skin"}, {"image_size": 30}])
def test_bad_options_are_rejected(kwargs):
    with pytest.raises(ValueError):
        PatchRankingInferer(**{"image_size": 32, "patch_size": 8, **kwargs})


def test_combining_maps_needs_normal_statistics():
    with pytest.raises(ValueError, match="normal_stats"):
        PatchRankingInferer(image_size=32, patch_size=8, score_maps=("squared", "ssim"))
    with pytest.raises(ValueError, match="critic"):
        PatchRankingInferer(image_size=32, patch_size=8, score_maps=("critic",))


def test_normal_statistics_turn_errors_into_z_maps():
    from scripts.scoring.calibration import fit_normal_statistics

    inferer = PatchRankingInferer(image_size=16, patch_size=4, test_input="image", foreground="all")
    normal = [torch.full((4, 1, 16, 16), 0.5) + 0.1 * torch.randn(4, 1, 16, 16) for _ in range(3)]
    stats = fit_normal_statistics(inferer, Constant(), normal, names=["squared", "ssim"])
    assert stats["squared"]["mean"].shape == (1, 1, 16, 16)
    assert torch.all(stats["squared"]["std"] > 0)
    z_inferer = PatchRankingInferer(image_size=16, patch_size=4, test_input="image", foreground="all",
                                    score_maps=("squared", "ssim"), normal_stats=stats)
    bright = torch.full((1, 1, 16, 16), 0.5)
    bright[..., 4:8, 4:8] = 2.0
    scores = z_inferer.score(torch.cat([normal[0][:1], bright]), Constant())
    assert scores.slice_scores[1] > scores.slice_scores[0]
    assert scores.patch_errors[1].argmax().item() == 5  # the bright patch (row 1, column 1) tops the grid


def test_saving_normal_statistics_leaves_the_training_models_and_inferer_as_they_were(tmp_path):
    from scripts.model.networks import critic as make_critic
    from scripts.scoring.calibration import save_normal_statistics

    torch.manual_seed(0)
    network, critic = torch.nn.Conv2d(1, 1, 3, padding=1), make_critic(channels=4, num_layers=2)
    torch.save(torch.nn.Conv2d(1, 1, 3, padding=1).state_dict(), tmp_path / "model.pt")
    torch.save({"critic": make_critic(channels=4, num_layers=2).state_dict()}, tmp_path / "checkpoint_best.pt")
    inferer = PatchRankingInferer(image_size=16, patch_size=4, test_input="image", foreground="all",
                                  score_maps=("critic",), critic=critic)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (network, critic)]
    dataset = [{"image": torch.rand(1, 16, 16)} for _ in range(4)]
    stats = save_normal_statistics(tmp_path / "stats.pt", inferer, network, dataset, tmp_path / "model.pt",
                                   critic_weights=tmp_path / "checkpoint_best.pt", names=["squared", "critic"])
    assert set(stats) == {"squared", "critic"} and (tmp_path / "stats.pt").is_file()
    assert inferer.critic is critic
    for module, weights in zip((network, critic), before):
        assert all(torch.equal(module.state_dict()[k], v) for k, v in weights.items())


def test_calibration_writes_the_residual_calibration_that_inference_reads(tmp_path, caplog):
    from scripts.scoring.calibration import save_normal_statistics

    network = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        network.weight.fill_(0.5)
        network.bias.zero_()  # draws every pixel at half its brightness: residual = image / 2
    inferer = PatchRankingInferer(image_size=16, patch_size=4, test_input="image")
    dataset = [{"image": torch.rand(1, 16, 16) + 0.1} for _ in range(8)]
    save_normal_statistics(tmp_path / "stats.pt", inferer, network, dataset, names=["squared"],
                           residual_path=tmp_path / "residual.pt", residual_bins=8)
    assert inferer.residual_calibration is None  # the training's inferer is left as it was
    calibrated = PatchRankingInferer(image_size=16, patch_size=4, test_input="image",
                                     score_maps=("hyperintense",), residual_calibration=str(tmp_path / "residual.pt"))
    table = calibrated.residual_table()
    assert table["edges"].shape == (1, 7) and table["mean"].shape == table["std"].shape == (1, 8)
    # residual = recon here, so each bin's mean residual is about the middle of its bin of in-painted values
    assert torch.all(table["mean"][0].diff() > 0)
    images = torch.stack([d["image"] for d in dataset])
    # within a bin the residual spreads evenly around the bin's mean, so its z-score squared, counted where
    # positive, averages about 1/2 over the normal slices it was fitted on
    z = calibrated.raw_maps(images, network(images))["hyperintense"]
    assert 0.35 < z.mean().item() < 0.65
    assert table["geometry"].tolist() == [16, 4, 2, 0]  # image size, patch size, stride, no in-painting
    other = PatchRankingInferer(image_size=16, patch_size=8, residual_calibration=str(tmp_path / "residual.pt"))
    with caplog.at_level("WARNING"):
        other.residual_table()
    assert "refit it" in caplog.text and "[16, 4, 2, 0]" in caplog.text and "[16, 8, 2, 1]" in caplog.text
    # a retraining writes a new table beside the new weights: the same inferer reads it (MONAI Label keeps inferers)
    torch.save({**table, "mean": table["mean"] + 1.0}, tmp_path / "residual.pt")
    os.utime(tmp_path / "residual.pt", ns=(1, 10**18))  # a different modification time, whatever the clock's grain
    torch.testing.assert_close(calibrated.residual_table()["mean"], table["mean"] + 1.0)
    with pytest.raises(ValueError, match="not both"):
        PatchRankingInferer(image_size=16, patch_size=4, normal_stats=str(tmp_path / "stats.pt"),
                            residual_calibration=str(tmp_path / "residual.pt"))


def test_the_critic_map_scores_what_the_critic_finds_unreal():
    class BrightIsFake(torch.nn.Module):
        def forward(self, x):
            return -torch.nn.functional.avg_pool2d(x, 4)  # logit: brighter patches look less real

    inferer = PatchRankingInferer(image_size=16, patch_size=4, test_input="image", foreground="all",
                                  score_maps=("critic",), critic=BrightIsFake())
    image = torch.full((1, 1, 16, 16), 0.1)
    image[..., 8:12, 0:4] = 1.0
    scores = inferer.score(image, Identity())
    assert scores.patch_errors[0].argmax().item() == 8


def test_the_feature_map_compares_critic_features_of_image_and_reconstruction():
    from scripts.model.networks import critic

    torch.manual_seed(0)
    critic = critic(channels=8, num_layers=2)
    inferer = PatchRankingInferer(image_size=16, patch_size=4, test_input="image", foreground="all",
                                  score_maps=("feature",), critic=critic)
    image = torch.rand(2, 1, 16, 16)
    assert inferer.score(image, Identity()).patch_errors.abs().max().item() < 1e-6  # a perfect reconstruction

    class DropsABlock(torch.nn.Module):
        def forward(self, x):
            out = x.clone()
            out[..., 8:12, 0:4] = 0.0
            return out

    scores = inferer.score(image, DropsABlock())
    assert scores.patch_errors[0].argmax().item() == 8 and scores.patch_errors[1].argmax().item() == 8
    with pytest.raises(ValueError, match="feature"):
        PatchRankingInferer(image_size=16, patch_size=4, score_maps=("feature",))


def test_background_patches_do_not_dilute_the_mean_patch_error():
    inferer = PatchRankingInferer(image_size=16, patch_size=4, test_input="image", ranking=False)
    image = torch.zeros(1, 1, 16, 16)
    image[..., :4, :4] = 1.0  # the only foreground patch; Constant predicts 0.5 -> error 0.25 there
    assert inferer.score(image, Constant()).slice_scores.item() == pytest.approx(0.25)  # not 0.25 / 16


def test_within_volume_standardisation_z_scores_slices_and_leaves_the_volume_score_raw():
    from scripts.scoring.inferer import within_volume_z

    z = within_volume_z(torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]))
    # median 3, MAD 1 -> 1.4826
    assert torch.allclose(z, torch.tensor([-2.0, -1.0, 0.0, 1.0, 7.0]) / 1.4826)
    assert torch.all(within_volume_z(torch.full((4,), 2.0)) == 0)
    # lower half: slices at or below the median 3 (1, 2, 3): median 2, MAD 1; the lesion burden moves nothing
    lower = within_volume_z(torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]), lower_half=True)
    assert torch.allclose(lower, torch.tensor([-1.0, 0.0, 1.0, 2.0, 8.0]) / 1.4826)
    more_lesion = within_volume_z(torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0]), lower_half=True)
    assert torch.allclose(more_lesion[:3], lower[:3])  # the same normal slices, the same z-scores

    volume = brain_volume()
    volume[0, 0, 20:28, 20:28, 3] = 1.0  # a second, weaker bright patch: slices differ
    raw = PatchRankingInferer(image_size=32, patch_size=8, test_input="image").score(volume, Constant())
    standardised = PatchRankingInferer(image_size=32, patch_size=8, test_input="image",
                                       slice_standardisation="volume").score(volume, Constant())
    valid = raw.slice_valid
    assert torch.allclose(standardised.slice_scores[valid], within_volume_z(raw.slice_scores[valid]))
    lower = PatchRankingInferer(image_size=32, patch_size=8, test_input="image",
                                slice_standardisation="volume_lower_half").score(volume, Constant())
    assert torch.allclose(lower.slice_scores[valid], within_volume_z(raw.slice_scores[valid], lower_half=True))
    assert torch.equal(standardised.case_scores, raw.case_scores)
    assert torch.equal(standardised.heatmap, raw.heatmap)
    with pytest.raises(ValueError, match="slice_standardisation"):
        PatchRankingInferer(image_size=32, slice_standardisation="patient")
