"""``PatchRankingInferer``: turns a reconstructor into patch scores, ranked image scores and heatmaps.

The ranking logic lives in the inferer (not in a post-processing step) so that every consumer of the bundle
— the bundle's own evaluator, MONAI Label's ``BundleInferTask``, the exported models' tests — gets the same
scores from ``inferer(inputs, network)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from monai.inferers import Inferer

from scripts.config import require_bool, uses_bf16
from scripts.data.io import InputError
from scripts.data.rules import FOREGROUND_MODES, axial_slices, foreground, select_slices, stack_to_volume
from scripts.data.transforms import resize_slices
from scripts.scoring.maps import (
    critic_map,
    feature_distance_map,
    one_sided_errors,
    pixel_errors,
    ssim_error_map,
    standardise,
)
from scripts.scoring.patches import aggregate_slices, checkerboard_masks, grid_to_image, patch_grid, ranking_score

logger = logging.getLogger(__name__)

TEST_INPUTS = ("inpaint", "image")
SLICE_STANDARDISATIONS = ("none", "volume", "volume_lower_half")
SCORE_MAPS = ("squared", "hyperintense", "hypointense", "ssim", "critic", "feature")
CRITIC_MAPS = ("critic", "feature")  # the maps that need the trained critic


@dataclass
class AnomalyScores:
    """Everything the inferer measured on one input batch (a volume or a batch of 2D images).

    ``heatmap`` has the input's layout (``(B, 1, H, W)`` or ``(1, 1, H, W, D)``); per-slice tensors are indexed
    by slice (axial index for a volume, batch index for images); ``slice_scores`` is NaN where a slice was not
    scored (too little foreground); ``region`` ``(N, 1, H, W)`` is each slice's foreground at input resolution.
    ``reconstruction`` and ``patch_errors`` cover the scored slices only, at the network's resolution.
    """

    heatmap: torch.Tensor
    region: torch.Tensor
    slice_scores: torch.Tensor
    slice_valid: torch.Tensor
    patch_errors: torch.Tensor
    reconstruction: torch.Tensor
    resized: torch.Tensor
    case_scores: torch.Tensor


class PatchRankingInferer(Inferer):
    """Score images by targeted patch ranking of their reconstruction errors.

    Args:
        image_size: side of the square the network sees; slices are resized to it and heatmaps back.
        patch_size: side of a scoring patch (the paper: 32 pixels at 256).
        ranking_weights: weights of the top-ranked patch errors (paper: 1.1, 1.0); see ``ranking_score``.
        ranking: False gives the paper's no-ranking ablation (mean patch error).
        test_input: ``"inpaint"`` reconstructs every patch from its context in ``inpaint_stride**2`` masked
            passes (a checkerboard of the patch grid); ``"image"`` feeds the unmasked image once.
        inpaint_stride: checkerboard period in patches.
        min_brain_fraction: volume slices with less foreground than this fraction of the largest are not scored.
        foreground: ``"nonzero"`` (brain: normalised voxels above zero) or ``"all"`` (every pixel, e.g. skin).
        volume_aggregation, top_k_slices: how slice scores become a volume score (``aggregate_slices``).
        slice_batch_size: slices per network call; None: 32 on CUDA, 4 on a CPU (where larger batches are slower).
        amp: bf16 autocast of the network calls on CUDA and on CPUs with native bf16 (scores within bf16
            tolerance of fp32: relative differences of a few 1e-3; on 2 Zen 4 cores a volume takes half the time).
        score_maps: which per-pixel anomaly maps make the patch errors: ``squared`` reconstruction error (the
            paper), ``hyperintense`` / ``hypointense`` (the same only where the input is brighter / darker than its
            in-painting: FLAIR lesions are hyperintense, skin lesions dark), ``ssim`` (1 - SSIM), ``critic`` (the
            PatchGAN critic's ``1 - D`` on the input), ``feature`` (distance between the critic's feature maps of
            the input and of the reconstruction); the last two need ``critic``. Several maps are standardised with
            ``normal_stats`` and averaged.
        critic: the trained PatchGAN critic, for the ``critic`` and ``feature`` maps.
        normal_stats: per-pixel mean and std of each map on normal validation slices (a dict, or the path of the
            ``.pt`` file written by ``scripts.scoring.calibration``); when given, every map becomes a z-map: how unusual the
            error is for that place on normal data.
        slice_standardisation: ``"none"``, ``"volume"`` or ``"volume_lower_half"``: each slice score of a volume
            becomes a robust z-score against the volume's own scored slices (median, 1.4826 x MAD; with
            ``"volume_lower_half"`` those of its lower-scoring half, ``within_volume_z``), so that what a patient's
            scanner, head size or shading adds to every slice cancels out and one threshold holds across patients. The
            volume score is aggregated from the raw slice scores (a z-score against itself says nothing about
            the whole volume).
        residual_calibration: the residual's normal mean and spread per in-painted value (a dict, or the path of
            the ``residual_calibration.pt`` that ``scripts.scoring.calibration`` writes next to the weights, read
            when first needed and again whenever the file changes, as the weights are: a bundle initialises
            without it, and a server that retrains picks up the new one); when given, the squared and
            one-sided maps are made of the calibrated residual (``maps.residuals``). Not with ``normal_stats``,
            which describe the uncalibrated maps.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int = 32,
        ranking_weights: Sequence[float] = (1.1, 1.0),
        ranking: bool = True,
        test_input: str = "inpaint",
        inpaint_stride: int = 2,
        min_brain_fraction: float = 0.1,
        foreground: str = "nonzero",
        volume_aggregation: str = "topk_mean",
        top_k_slices: int = 3,
        slice_batch_size: int | None = None,
        amp: bool = False,
        score_maps: Sequence[str] = ("squared",),
        critic: torch.nn.Module | None = None,
        normal_stats: str | dict | None = None,
        slice_standardisation: str = "none",
        residual_calibration: str | dict | None = None,
    ) -> None:
        super().__init__()
        if slice_standardisation not in SLICE_STANDARDISATIONS:
            raise ValueError(f"unknown slice_standardisation {slice_standardisation!r}: use one of {SLICE_STANDARDISATIONS}")
        unknown = set(score_maps) - set(SCORE_MAPS)
        if unknown or not score_maps:
            raise ValueError(f"unknown score_maps {sorted(unknown)}: choose from {SCORE_MAPS}")
        if set(CRITIC_MAPS) & set(score_maps) and critic is None:
            raise ValueError(f"score_maps {sorted(set(CRITIC_MAPS) & set(score_maps))} need the trained critic as `critic`")
        if len(score_maps) > 1 and not normal_stats:
            raise ValueError("combining several score_maps needs normal_stats to put them on one scale")
        if normal_stats and residual_calibration:
            raise ValueError("normal_stats describe the uncalibrated maps: use normal_stats or residual_calibration, not both")
        if test_input not in TEST_INPUTS:
            raise ValueError(f"unknown test_input {test_input!r}: use one of {TEST_INPUTS}")
        if foreground not in FOREGROUND_MODES:
            raise ValueError(f"unknown foreground {foreground!r}: use one of {FOREGROUND_MODES}")
        if slice_batch_size is not None and int(slice_batch_size) < 1:
            raise ValueError(f"slice_batch_size must be a positive number of slices, got {slice_batch_size}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.weights = tuple(ranking_weights) if require_bool("ranking", ranking) else None
        self.test_input, self.inpaint_stride = test_input, inpaint_stride
        self.min_brain_fraction, self.foreground = min_brain_fraction, foreground
        self.volume_aggregation, self.top_k_slices = volume_aggregation, top_k_slices
        self.slice_batch_size, self.amp = slice_batch_size, amp
        self.score_maps, self.critic = tuple(score_maps), critic
        self.normal_stats = load_calibration(normal_stats) if isinstance(normal_stats, str) else normal_stats
        self.residual_calibration = residual_calibration
        self._residual_file: tuple[str, int, int] | None = None  # (path, mtime_ns, size) of the table read
        self._residual_table: dict[str, torch.Tensor] | None = None
        self.slice_standardisation = slice_standardisation

    def geometry(self) -> torch.Tensor:
        """How this inferer reconstructs: ``[image_size, patch_size, inpaint_stride, in-painting (1) or not (0)]``.
        The residual of an in-painting depends on the size of its holes, so a residual calibration records the
        geometry it was fitted with (``scripts.scoring.calibration``)."""
        return torch.tensor([self.image_size, self.patch_size, self.inpaint_stride, int(self.test_input == "inpaint")])

    def residual_table(self) -> dict[str, torch.Tensor] | None:
        """The residual calibration; a path is read on first use and again when the file has changed (a server
        that retrains writes a new one beside the new weights). Warns when the table was fitted on reconstructions
        made another way than this inferer's (``geometry``)."""
        source = self.residual_calibration
        if not isinstance(source, (str, os.PathLike)):
            return source
        try:
            status = os.stat(source)
            stamp = (str(source), status.st_mtime_ns, status.st_size)
        except FileNotFoundError:
            stamp = None  # load_calibration names the missing file
        if stamp is None or stamp != self._residual_file:
            self._residual_table = load_calibration(
                str(source), "residual calibration", "; or score the plain residual: calibrated_residuals false")
            self._residual_file = stamp
            self._check_calibration_geometry(str(source))
        return self._residual_table

    def _check_calibration_geometry(self, where: str) -> None:
        fitted = self._residual_table.get("geometry")
        if fitted is not None and not torch.equal(fitted.long(), self.geometry()):
            logger.warning(
                "%s was fitted with [image_size, patch_size, inpaint_stride, inpaint] = %s, this inferer uses %s: the "
                "residual's normal size depends on the in-painting, so refit it (run id calibrate of configs/train.json "
                "with the inference settings)", where, fitted.long().tolist(), self.geometry().tolist())

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The anomaly heatmap of ``inputs``, same layout and spatial size (what MONAI Label shows as ``pred``)."""
        return self.score(inputs, network).heatmap

    @torch.no_grad()
    def score(self, inputs: torch.Tensor, network: torch.nn.Module) -> AnomalyScores:
        """Scores, heatmap and reconstruction of a volume ``(1, C, H, W, D)`` or images ``(B, C, H, W)``."""
        is_volume = inputs.ndim == 5
        if is_volume and inputs.shape[0] != 1:
            raise ValueError(f"volumes are scored one at a time, got a batch of {inputs.shape[0]}")
        slices = axial_slices(inputs[0]) if is_volume else inputs
        slices = torch.as_tensor(slices).float()
        region = self._region(slices)
        valid = select_slices(region.flatten(1).sum(1), self.min_brain_fraction if is_volume else 0.0)
        resized = resize_slices(slices[valid], self.image_size)
        recon = self.reconstruct(resized, network)
        grid = patch_grid(self.anomaly_map(resized, recon), self.patch_size)
        tissue = patch_grid(self._region(resized).float(), self.patch_size) > 0  # patches that touch the foreground
        scores = torch.full((len(slices),), float("nan"), device=slices.device)
        raw = ranking_score(grid, self.weights, tissue).to(scores.dtype)
        standardise_slices = is_volume and self.slice_standardisation != "none"
        lower_half = self.slice_standardisation == "volume_lower_half"
        scores[valid] = within_volume_z(raw, lower_half) if standardise_slices else raw
        heat = torch.zeros((len(slices), 1, *slices.shape[-2:]), device=slices.device)
        heat[valid] = grid_to_image(grid, slices.shape[-2:])
        heat = heat * region
        heatmap = stack_to_volume(heat).unsqueeze(0) if is_volume else heat
        case = aggregate_slices(raw, self.volume_aggregation, self.top_k_slices).view(1) if is_volume else scores
        return AnomalyScores(heatmap, region, scores, valid, grid, recon, resized, case)

    def raw_maps(
        self, images: torch.Tensor, recon: torch.Tensor, names: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-pixel maps ``(N, 1, S, S)`` of resized slices and their reconstruction (default: ``score_maps``)."""
        region = self._region(images)
        maps = {}
        for name in names or self.score_maps:
            if name == "squared":
                maps[name] = pixel_errors(images, recon, region, self.residual_table())
            elif name in ("hyperintense", "hypointense"):
                brighter = name == "hyperintense"
                maps[name] = one_sided_errors(images, recon, region, brighter, self.residual_table())
            elif name == "ssim":
                maps[name] = ssim_error_map(images, recon, region)
            elif name == "critic":
                logits = self._run(images, self.critic.to(images.device).eval())
                maps[name] = critic_map(logits, tuple(images.shape[-2:]), region)
            else:
                size = tuple(images.shape[-2:])
                maps[name] = feature_distance_map(self._critic_features(images), self._critic_features(recon), size, region)
        return maps

    def anomaly_map(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """The per-pixel anomaly map: the raw map, or the mean of the z-maps when ``normal_stats`` is set."""
        maps = self.raw_maps(images, recon)
        if not self.normal_stats:
            return next(iter(maps.values()))
        region = self._region(images).float()
        z = [standardise(m, self.normal_stats[k]["mean"], self.normal_stats[k]["std"]) for k, m in maps.items()]
        return torch.stack(z).mean(0) * region

    def reconstruct(self, images: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        """Reconstruction of each image: one unmasked pass, or the composite of the in-painting passes."""
        if self.test_input == "image":
            return self._run(images, network)
        masks = checkerboard_masks(self.image_size, self.patch_size, self.inpaint_stride).to(images.device)
        passes = (images.unsqueeze(0) * (1 - masks.unsqueeze(1))).flatten(0, 1)
        recon = self._run(passes, network).view(len(masks), *images.shape)
        return (recon * masks.unsqueeze(1)).sum(0)

    def _autocast(self, images: torch.Tensor) -> Any:
        """bf16 autocast for network calls when ``amp`` is set, on CUDA and on a CPU with native bf16
        (``scripts.config.uses_bf16``); otherwise nothing. Maps, patch errors and ranking stay in fp32."""
        if uses_bf16(self.amp, images.device):
            return torch.autocast(images.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def batch_size(self, images: torch.Tensor) -> int:
        """Slices per network call on the device of ``images``."""
        if self.slice_batch_size is not None:
            return int(self.slice_batch_size)
        return 32 if images.device.type == "cuda" else 4

    def _run(self, images: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        outputs = []
        with self._autocast(images):
            for chunk in torch.split(images, self.batch_size(images)):
                outputs.append(network(chunk).float())
        return torch.cat(outputs) if outputs else images.clone()

    def _critic_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The critic's intermediate feature maps of ``images``, computed in ``slice_batch_size`` chunks."""
        critic = self.critic.to(images.device).eval()
        with self._autocast(images):
            chunks = [critic.features(chunk) for chunk in torch.split(images, self.batch_size(images))]
        return [torch.cat([chunk[layer].float() for chunk in chunks]) for layer in range(len(chunks[0]))]

    def _region(self, slices: torch.Tensor) -> torch.Tensor:
        return foreground(slices, self.foreground)


def within_volume_z(scores: torch.Tensor, lower_half: bool = False) -> torch.Tensor:
    """Robust z-scores of a volume's slice scores: ``(s - median) / (1.4826 * MAD)``, the MAD floored at 1e-6 of
    the median's size so that a volume of identical slices gives zeros, not infinities.

    ``lower_half``: the median and MAD come from the slices scoring at or below the volume's median only, the half
    most likely to be normal. With all slices, a volume with many lesion slices has a high median and a wide MAD,
    so its normal slices get low z-scores, while in a volume with a small lesion they spread around 0: the scale
    depends on the lesion burden, and one threshold does not fit both (TCGA-LGG, docs/results.md).
    """
    if scores.numel() == 0:
        return scores
    reference = scores[scores <= scores.median()] if lower_half else scores
    median = reference.median()
    mad = (reference - median).abs().median() * 1.4826
    return (scores - median) / mad.clamp_min(1e-6 * float(median.abs()) + 1e-12)


def load_calibration(path: str, what: str = "normal statistics", hint: str = "") -> dict[str, Any]:
    """A calibration file written by ``scripts.scoring.calibration`` (``normal_stats.pt`` or
    ``residual_calibration.pt``; tensors only: no pickled code), with a clear error naming the file (and ``hint``,
    another way out, when it is missing)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise InputError(f"{path}: {what} file not found (written at the end of training; python -m monai.bundle run "
                         f"calibrate --config_file configs/train.json ... writes it again{hint})") from error
    except Exception as error:  # unpickling errors of many kinds: a text file, a pickle with code, a truncated file
        raise InputError(f"{path}: not a {what} file ({type(error).__name__}: {error})") from error
