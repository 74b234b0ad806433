"""OCSVM baseline on downsampled pixels, and the two pieces the other baselines share with it.

The method (the paper's OCSVM row): every normal training slice is resized to ``size x size`` (32 by default),
its pixels standardised (``StandardScaler``), projected on the principal components that keep 95% of the
variance (``PCA``) and a ``OneClassSVM(kernel='rbf', nu=0.1, gamma='scale')`` is fitted on them; a slice's
anomaly score is ``-decision_function``. Nothing is tuned on test labels: the hyper-parameters are fixed.

Shared pieces:

- ``KernelOCSVM``: a fitted scikit-learn pipeline ``[StandardScaler] -> [PCA] -> OneClassSVM(rbf)`` held as
  float64 torch buffers. Its decision values equal scikit-learn's, it moves with ``.to(device)`` and it is
  saved in an ordinary state dict, so the bundle's ``CheckpointLoader`` (``weights_only=True``) loads it like
  any weights: no pickled scikit-learn object in a checkpoint.
- ``ImageScoreInferer``: a ``PatchRankingInferer`` whose slice scores come from an image-level scorer (an OCSVM,
  a critic) while the slicing, the heatmap and the output format stay the core's, so ``AnomalyEvaluator`` and
  ``AnomalyScoreWriter`` write every baseline's ``slice_scores.csv`` exactly as the Patch-GAN's.

Training (``fit_from_config``) reads the normal training slices through the same config and slice cache as the
bundle's training (``slices`` and ``train#items`` of ``configs/train.json``) and writes ``model.pt``; inference is
``configs/inference.json`` with ``INFERENCE_OVERRIDES``::

    python -m scripts.baselines.ocsvm --config_file configs/train.json --datalist D.json --ckpt_dir DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scripts import io
from scripts.inferer import AnomalyScores, PatchRankingInferer
from scripts.scoring import aggregate_slices
from scripts.transforms import resize_slices

logger = logging.getLogger(__name__)

# configs/inference.json overrides that turn the bundle's inference into the OCSVM's (model.pt from fit_from_config)
INFERENCE_OVERRIDES: dict[str, Any] = {
    "network_def": {"_target_": "scripts.baselines.ocsvm.PixelOCSVM", "size": 32},
    "inferer#_target_": "scripts.baselines.ocsvm.OCSVMInferer",
    "write_heatmaps": False,  # the OCSVM does not localise: no heatmap rather than an empty one
}


class KernelOCSVM(nn.Module):
    """A fitted ``[StandardScaler] -> [PCA] -> OneClassSVM(kernel='rbf')`` pipeline as torch buffers.

    ``forward(x)`` takes ``(N, d)`` features (or anything that flattens to it) and returns the anomaly score
    ``-decision_function`` ``(N,)`` in float64, equal to scikit-learn's. Unfitted, it holds empty buffers; loading
    a state dict resizes them, so an unfitted module accepts a fitted one's weights.
    """

    BUFFERS = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "support", "dual_coef", "intercept", "gamma")

    def __init__(self) -> None:
        super().__init__()
        for name in self.BUFFERS:
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return self.support.numel() > 0

    def load_pipeline(self, pipeline: Any) -> KernelOCSVM:
        """Copy a fitted pipeline (or a bare ``OneClassSVM``) into the buffers; returns ``self``."""
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import OneClassSVM

        steps = [step for _, step in pipeline.steps] if hasattr(pipeline, "steps") else [pipeline]
        if not isinstance(steps[-1], OneClassSVM) or steps[-1].kernel != "rbf":
            raise ValueError("the pipeline must end with an rbf-kernel OneClassSVM")
        values: dict[str, Any] = {name: np.zeros(0) for name in self.BUFFERS}
        for step in steps[:-1]:
            if isinstance(step, StandardScaler) and not values["scaler_scale"].size:
                n = step.n_features_in_
                values["scaler_mean"] = step.mean_ if step.mean_ is not None else np.zeros(n)
                values["scaler_scale"] = step.scale_ if step.scale_ is not None else np.ones(n)
            elif isinstance(step, PCA) and not values["pca_components"].size and not step.whiten:
                values["pca_mean"], values["pca_components"] = step.mean_, step.components_
            else:
                raise ValueError(f"unsupported pipeline step {step!r}: StandardScaler, PCA (no whitening), OneClassSVM")
        svm = steps[-1]
        values.update(support=svm.support_vectors_, dual_coef=svm.dual_coef_.ravel(), intercept=svm.intercept_,
                      gamma=np.asarray([svm._gamma]))  # the fitted value of gamma='scale'
        for name, value in values.items():
            setattr(self, name, torch.as_tensor(np.asarray(value, dtype=np.float64), device=self.support.device))
        return self

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        """scikit-learn's ``decision_function`` (positive inside the normal region), ``(N,)`` float64."""
        if not self.fitted:
            raise RuntimeError("KernelOCSVM is not fitted: load a fitted pipeline or a fitted state dict first")
        x = x.reshape(len(x), -1).to(self.support)
        if self.scaler_scale.numel():
            x = (x - self.scaler_mean) / self.scaler_scale
        if self.pca_components.numel():
            x = (x - self.pca_mean) @ self.pca_components.T
        sq_dist = torch.cdist(x, self.support).pow(2)
        return torch.exp(-self.gamma * sq_dist) @ self.dual_coef + self.intercept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.decision_function(x)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self.BUFFERS:
            if prefix + name in state_dict:  # fitted sizes differ from the empty placeholders
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PixelOCSVM(nn.Module):
    """The OCSVM baseline as a "network": images ``(N, C, H, W)`` -> anomaly scores ``(N,)``.

    Images are resized to ``size x size`` (antialiased, the bundle's ``resize_slices``) and flattened; the scorer
    is a ``KernelOCSVM`` fitted by ``fit``.
    """

    def __init__(self, size: int = 32, **unused: Any) -> None:
        super().__init__()
        self.size = int(size)
        self.scorer = KernelOCSVM()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return resize_slices(torch.as_tensor(images).float(), self.size).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scorer(self.features(images))

    def fit(
        self,
        images: torch.Tensor | np.ndarray,
        nu: float = 0.1,
        gamma: str | float = "scale",
        variance: float = 0.95,
        max_samples: int = 20000,
        seed: int = 0,
    ) -> PixelOCSVM:
        """Fit ``StandardScaler -> PCA(variance) -> OneClassSVM(rbf, nu, gamma)`` on normal images.

        Above ``max_samples`` images a seeded uniform subsample is used (the kernel SVM is quadratic in samples).
        """
        from sklearn.decomposition import PCA
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import OneClassSVM

        features = self.features(torch.as_tensor(np.asarray(images))).double().numpy()
        if len(features) < 2:
            raise ValueError(f"need at least 2 normal training images to fit the OCSVM, got {len(features)}")
        if len(features) > max_samples:
            features = features[np.sort(np.random.default_rng(seed).choice(len(features), max_samples, replace=False))]
        pipeline = Pipeline([
            ("scaler", StandardScaler()),
            ("pca", PCA(n_components=variance, svd_solver="full", random_state=seed)),
            ("ocsvm", OneClassSVM(kernel="rbf", nu=nu, gamma=gamma)),
        ]).fit(features)
        logger.info("OCSVM fitted on %d normal images: %d features -> %d components, %d support vectors",
                    len(features), features.shape[1], pipeline["pca"].n_components_, len(pipeline["ocsvm"].support_))
        self.scorer.load_pipeline(pipeline)
        return self


class ImageScoreInferer(PatchRankingInferer):
    """A ``PatchRankingInferer`` whose slice and case scores come from ``image_scores`` instead of the ranking.

    The core's ``score`` runs unchanged first (slice selection, resizing, reconstruction, the patch-error heatmap);
    then the scores of the scored slices are replaced by ``image_scores(resized, reconstruction, network)`` and a
    volume's score is re-aggregated with the same rule. ``image_scores`` returning None keeps the core's scores.
    """

    def image_scores(self, images: torch.Tensor, recon: torch.Tensor, network: torch.nn.Module) -> torch.Tensor | None:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, inputs: torch.Tensor, network: torch.nn.Module) -> AnomalyScores:
        out = super().score(inputs, network)
        valid = out.slice_valid
        if not bool(valid.any()):
            return out
        values = self.image_scores(out.resized, out.reconstruction, network)
        if values is None:
            return out
        slice_scores = out.slice_scores.double().clone()
        slice_scores[valid] = values.double().to(slice_scores.device).flatten()
        if out.heatmap.ndim == 5:
            case = aggregate_slices(slice_scores[valid], self.volume_aggregation, self.top_k_slices).view(1)
        else:
            case = slice_scores
        return dataclasses.replace(out, slice_scores=slice_scores, case_scores=case)


class OCSVMInferer(ImageScoreInferer):
    """Scores slices with a ``PixelOCSVM`` network; there is no reconstruction, so the heatmap is zero."""

    def reconstruct(self, images: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        return images.clone()

    def image_scores(self, images: torch.Tensor, recon: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        return torch.cat([network(chunk) for chunk in torch.split(images, self.slice_batch_size)])


def bundle_parser(config_files: str | Sequence[str], overrides: dict[str, Any] | None = None) -> Any:
    """A MONAI ``ConfigParser`` of the merged config files with ``overrides`` applied (ids with ``#``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in ([config_files] if isinstance(config_files, (str, Path)) else config_files)])
    parser.update(overrides or {})
    return parser


def fit_from_config(
    config_files: str | Sequence[str],
    overrides: dict[str, Any] | None = None,
    output_path: str | os.PathLike | None = None,
    size: int = 32,
    nu: float = 0.1,
    gamma: str | float = "scale",
    variance: float = 0.95,
) -> PixelOCSVM:
    """Fit the pixel OCSVM on the normal training slices named by a training config and save ``model.pt``.

    The slices are the config's own (``slices`` applied to ``train#items``: same datalist, normalisation, image
    size and slice cache as the bundle's training, normal slices only). ``output_path`` defaults to
    ``<ckpt_dir>/model.pt``; the file is a plain state dict that ``configs/inference.json`` loads.
    """
    parser = bundle_parser(config_files, overrides)
    records = parser.get_parsed_content("slices")(parser.get_parsed_content("train#items"))
    images = np.stack([np.asarray(r["image"], dtype=np.float32) for r in records if int(r["label"]) == 0])
    model = PixelOCSVM(size).fit(images, nu=nu, gamma=gamma, variance=variance, seed=int(parser.get("seed", 0)))
    path = Path(output_path or os.path.join(parser.get_parsed_content("ckpt_dir"), "model.pt"))
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_atomic(path, lambda handle: torch.save(model.state_dict(), handle))
    logger.info("OCSVM written to %s", path)
    return model


def _value(text: str) -> Any:
    """A command-line override value: JSON when it parses (numbers, lists, booleans), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: Sequence[str] | None = None) -> int:
    """``--config_file F [--config_file F2] [--output PATH] [--size 32] [--nu 0.1] [--ID VALUE ...]``."""
    parser = argparse.ArgumentParser(prog="python -m scripts.baselines.ocsvm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_file", action="append", default=None, help="training config(s), merged in order")
    parser.add_argument("--output", help="where model.pt goes (default: <ckpt_dir>/model.pt)")
    parser.add_argument("--size", type=int, default=32, help="side of the downsampled image (default 32)")
    parser.add_argument("--nu", type=float, default=0.1)
    parser.add_argument("--variance", type=float, default=0.95, help="PCA: fraction of variance kept")
    args, rest = parser.parse_known_args(argv)
    if len(rest) % 2 or any(not key.startswith("--") for key in rest[::2]):
        parser.error(f"overrides must be --ID VALUE pairs, got {rest}")
    overrides = {key[2:]: _value(value) for key, value in zip(rest[::2], rest[1::2])}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fit_from_config(args.config_file or ["configs/train.json"], overrides, args.output, args.size, args.nu,
                    variance=args.variance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
