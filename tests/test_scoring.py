"""The ranking arithmetic and patch-grid helpers on hand-made inputs."""

import math

import numpy as np
import pytest
import torch

from scripts.scoring.maps import one_sided_errors, pixel_errors, residuals
from scripts.scoring.patches import aggregate_slices, checkerboard_masks, grid_to_image, patch_grid, ranking_score


def test_ranking_weights_the_sorted_top_patches():
    errors = torch.tensor([[[0.1, 0.9], [0.5, 0.2]], [[1.0, 1.0], [0.0, 0.0]]])
    scores = ranking_score(errors, (1.1, 1.0))
    assert scores.tolist() == pytest.approx([1.1 * 0.9 + 1.0 * 0.5, 1.1 * 1.0 + 1.0 * 1.0])


def test_no_ranking_is_the_mean_patch_error():
    errors = torch.tensor([[[0.1, 0.9], [0.5, 0.2]]])
    assert ranking_score(errors, None).item() == pytest.approx(0.425)


def test_ranking_separates_a_focal_lesion_that_the_mean_hides():
    focal = torch.zeros(1, 8, 8)
    focal[0, 3, 4] = 1.0  # one very abnormal patch
    diffuse = torch.full((1, 8, 8), 1.2 / 64)  # same total error spread everywhere
    assert ranking_score(focal, None) < ranking_score(diffuse, None)
    assert ranking_score(focal) > ranking_score(diffuse)


def test_more_weights_than_patches_uses_all_patches():
    errors = torch.tensor([[[2.0]]])
    assert ranking_score(errors, (1.1, 1.0, 1.0)).item() == pytest.approx(2.2)


def test_patch_grid_averages_each_square():
    error_map = torch.zeros(1, 1, 4, 4)
    error_map[0, 0, :2, :2] = 4.0
    error_map[0, 0, 3, 3] = 8.0
    grid = patch_grid(error_map, 2)
    assert grid.shape == (1, 2, 2)
    assert grid[0].tolist() == [[4.0, 0.0], [0.0, 2.0]]


def test_patch_grid_rejects_a_size_that_is_not_a_multiple():
    with pytest.raises(ValueError, match="multiple"):
        patch_grid(torch.zeros(1, 1, 10, 10), 4)


def test_pixel_errors_average_channels_and_respect_the_region():
    image = torch.ones(1, 3, 2, 2)
    recon = torch.zeros(1, 3, 2, 2)
    recon[:, 0] = 1.0
    region = torch.tensor([[[[1, 0], [1, 1]]]])
    err = pixel_errors(image, recon, region)
    torch.testing.assert_close(err[0, 0], torch.tensor([[2 / 3, 0.0], [2 / 3, 2 / 3]]))


def test_one_sided_errors_count_only_the_lesion_sign():
    image = torch.tensor([[[[3.0, 1.0], [2.0, 2.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    recon = torch.tensor([[[[1.0, 4.0], [2.0, 0.5]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    region = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    bright = one_sided_errors(image, recon, region)
    # brighter by 2 -> 4; darker by 3 -> 0 (squared error would give 9); equal -> 0; brighter but outside -> 0
    assert bright[0, 0].tolist() == [[4.0, 0.0], [0.0, 0.0]]
    assert torch.all(bright[1] == 0)  # an input darker everywhere has no hyperintense error
    dark = one_sided_errors(image, recon, region, brighter=False)
    assert dark[0, 0].tolist() == [[0.0, 9.0], [0.0, 0.0]] and torch.all(dark[1] == 1.0)
    two_channels = one_sided_errors(torch.tensor([[[[2.0]], [[0.0]]]]), torch.tensor([[[[0.0]], [[1.0]]]]))
    assert two_channels.item() == 2.0  # (2**2 + 0) / 2 channels
    assert torch.equal(one_sided_errors(image, recon) + one_sided_errors(image, recon, brighter=False),
                       pixel_errors(image, recon))


def test_calibrated_residuals_are_z_scores_for_what_the_in_painting_drew():
    # one channel, two bins split at 0.5: where the in-painting drew dark (<= 0.5) normal tissue is 0.4 brighter
    # (spread 0.2), where it drew bright it is 0.1 darker (spread 0.1)
    calibration = {"edges": torch.tensor([[0.5]]), "mean": torch.tensor([[0.4, -0.1]]), "std": torch.tensor([[0.2, 0.1]])}
    recon = torch.tensor([[[[0.2, 0.2], [0.8, 0.8]]]])
    image = torch.tensor([[[[0.6, 1.0], [0.7, 1.0]]]])
    z = residuals(image, recon, calibration)
    torch.testing.assert_close(z, torch.tensor([[[[0.0, 2.0], [0.0, 3.0]]]]))
    torch.testing.assert_close(residuals(image, recon), image - recon)  # no calibration: the plain residual
    # the same +0.4 residual is normal where the in-painting drew dark and hyperintense where it drew bright
    bright = one_sided_errors(image, recon, calibration=calibration)
    torch.testing.assert_close(bright, torch.tensor([[[[0.0, 4.0], [0.0, 9.0]]]]))
    torch.testing.assert_close(pixel_errors(image, recon, calibration=calibration), bright)
    with pytest.raises(ValueError, match="1 channel"):
        residuals(image.repeat(1, 3, 1, 1), recon.repeat(1, 3, 1, 1), calibration)


def test_residual_calibration_recovers_the_bias_of_each_in_painted_value():
    from scripts.scoring.calibration import ResidualSample

    torch.manual_seed(0)
    recon = torch.rand(64, 1, 16, 16) * 0.9 + 0.1  # all foreground ("nonzero")
    bias = torch.where(recon < 0.5, torch.tensor(0.3), torch.tensor(-0.2))
    image = recon + bias + 0.05 * torch.randn_like(recon)
    sample = ResidualSample("nonzero", pixels_per_slice=64)
    sample.add(image.clamp_min(1e-3), recon)
    calibration = sample.result(bins=4)
    assert calibration["edges"].shape == (1, 3) and calibration["mean"].shape == (1, 4)
    torch.testing.assert_close(calibration["edges"][0], torch.tensor([0.325, 0.55, 0.775]), atol=0.02, rtol=0)
    # bin 0 lies below 0.5, bins 2 and 3 above it; bin 1 straddles it
    torch.testing.assert_close(calibration["mean"][0, [0, 2, 3]], torch.tensor([0.3, -0.2, -0.2]), atol=0.01, rtol=0)
    torch.testing.assert_close(calibration["std"][0, [0, 3]], torch.tensor([0.05, 0.05]), atol=0.01, rtol=0)
    assert sum(len(v) for v in sample.values[0]) == 64 * 64  # at most pixels_per_slice per slice were kept
    with pytest.raises(ValueError, match="at least 40 normal foreground pixels"):
        tiny = ResidualSample("nonzero")
        tiny.add(image[:1, :, :2, :2], recon[:1, :, :2, :2])
        tiny.result(bins=4)


def test_heatmap_repeats_each_patch_error_over_its_square():
    grid = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    heat = grid_to_image(grid, (6, 6))
    assert heat.shape == (1, 1, 6, 6)
    assert heat[0, 0, 4, 1].item() == 3.0 and heat[0, 0, 0, 5].item() == 2.0


@pytest.mark.parametrize("size", [16, 17, 240, 250])
def test_grid_cells_are_where_the_heatmap_bands_start(size):
    from scripts.scoring.patches import grid_cells

    grid = torch.arange(8.0).view(1, 1, 8).expand(1, 8, 8)
    row = grid_to_image(grid, (size, size))[0, 0, 0].numpy()
    starts = grid_cells(size, 8)
    assert len(starts) == 8
    assert (row[starts] == np.arange(8)).all() and (np.diff(row)[np.setdiff1d(np.arange(size - 1), starts - 1)] == 0).all()


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_checkerboard_passes_cover_every_pixel_exactly_once(stride):
    masks = checkerboard_masks(image_size=24, patch_size=4, stride=stride)
    assert masks.shape == (stride**2, 1, 24, 24)
    assert torch.equal(masks.sum(0), torch.ones(1, 24, 24))


def test_checkerboard_masks_whole_patches_with_unmasked_neighbours():
    masks = checkerboard_masks(image_size=8, patch_size=2, stride=2)
    first = masks[0, 0]
    assert first[:2, :2].eq(1).all() and first[:2, 2:4].eq(0).all() and first[2:4, :2].eq(0).all()


@pytest.mark.parametrize(
    ("method", "expected"), [("max", 5.0), ("mean", 2.5), ("topk_mean", 4.0)]
)
def test_volume_aggregation(method, expected):
    scores = torch.tensor([1.0, 5.0, 3.0, 1.0])
    assert aggregate_slices(scores, method, k=2).item() == pytest.approx(expected)


def test_volume_aggregation_rejects_unknown_methods():
    with pytest.raises(ValueError, match="median"):
        aggregate_slices(torch.ones(3), "median")


def test_ssim_error_is_zero_for_a_perfect_reconstruction_and_grows_with_structure_loss():
    from scripts.scoring.maps import ssim_error_map

    image = torch.rand(2, 1, 24, 24)
    assert ssim_error_map(image, image).abs().max().item() < 1e-4
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1)
    err = ssim_error_map(image, blurred)
    assert err.shape == image.shape and err.mean().item() > 0.1


def test_critic_map_is_the_probability_of_fake_at_image_size():
    from scripts.scoring.maps import critic_map

    logits = torch.tensor([[[[2.0, -1.0], [0.0, 0.0]]]])
    out = critic_map(logits, (4, 4))
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(2.0)))  # confidently real: low
    assert out[0, 0, 0, 3].item() == pytest.approx(1 / (1 + math.exp(-1.0)))  # judged fake: high
    assert out[0, 0, 3, 0].item() == pytest.approx(0.5)


def test_ranking_and_mean_use_only_the_valid_patches():
    z = torch.tensor([[[-1.0, -2.0], [-0.5, 0.0]]])  # a signed (z-)map; the last patch is background
    valid = torch.tensor([[[True, True], [True, False]]])
    assert ranking_score(z, (1.1, 1.0), valid).item() == pytest.approx(1.1 * -0.5 + 1.0 * -1.0)
    assert ranking_score(z, None, valid).item() == pytest.approx(-3.5 / 3)
    one = torch.tensor([[[True, False], [False, False]]])
    assert ranking_score(z, (1.1, 1.0), one).item() == pytest.approx(1.1 * -1.0)  # fewer patches than weights
    assert ranking_score(z, None, torch.zeros_like(valid)).item() == 0.0


def test_standardise_gives_z_scores():
    from scripts.scoring.maps import standardise

    z = standardise(torch.tensor([[[[3.0, 1.0]]]]), torch.tensor([[[[1.0, 1.0]]]]), torch.tensor([[[[2.0, 0.5]]]]), eps=0)
    assert z.flatten().tolist() == pytest.approx([1.0, 0.0])


def test_feature_distance_is_scale_free_per_location_and_averaged_over_layers():
    from scripts.scoring.maps import feature_distance_map

    a = torch.zeros(1, 2, 2, 2)
    a[:, 0] = 1.0  # every location points along channel 0
    b = a.clone() * 5.0  # same direction, another scale: no distance
    b[0, :, 0, 0] = torch.tensor([0.0, 3.0])  # one location turned by 90 degrees: squared distance 2
    one_layer = feature_distance_map([a], [b], (2, 2))
    assert one_layer.flatten().tolist() == pytest.approx([2.0, 0.0, 0.0, 0.0])
    two_layers = feature_distance_map([a, a], [b, a], (2, 2))  # the second layer agrees everywhere
    assert two_layers.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    region = torch.tensor([[[[False, True], [True, True]]]])
    assert feature_distance_map([a], [b], (2, 2), region).abs().sum() == 0
    assert feature_distance_map([a], [b], (4, 4)).shape == (1, 1, 4, 4)
    with pytest.raises(ValueError):
        feature_distance_map([a, a], [b], (2, 2))
