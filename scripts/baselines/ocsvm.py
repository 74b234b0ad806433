"""OCSVM baseline on downsampled pixels (the paper's OCSVM row).

The method (the paper's OCSVM row): every normal training slice is resized to ``size x size`` (32 by default),
its pixels standardised (``StandardScaler``), projected on the principal components that keep 95% of the
variance (``PCA``) and a ``OneClassSVM(kernel='rbf', nu=0.1, gamma='scale')`` is fitted on them; a slice's
anomaly score is ``-decision_function``. Nothing is tuned on test labels: the hyper-parameters are fixed.

Training (``fit_from_config``) reads the normal training slices through the same config and slice cache as the
bundle's training (``slices`` and ``train#items`` of ``configs/train.json``) and writes ``model.pt``; inference is
``configs/inference.json`` with ``INFERENCE_OVERRIDES``::

    python -m scripts.baselines.ocsvm --config_file configs/train.json --datalist D.json --ckpt_dir DIR
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scripts.baselines.common import ImageScoreInferer, KernelOCSVM
from scripts.config import bundle_parser, parse_override_pairs
from scripts.data import io
from scripts.data.transforms import resize_slices

logger = logging.getLogger(__name__)

# configs/inference.json overrides that turn the bundle's inference into the OCSVM's (model.pt from fit_from_config)
INFERENCE_OVERRIDES: dict[str, Any] = {
    "network_def": {"_target_": "scripts.baselines.ocsvm.PixelOCSVM", "size": 32},
    "inferer#_target_": "scripts.baselines.ocsvm.OCSVMInferer",
    "write_heatmaps": False,  # the OCSVM does not localise: no heatmap rather than an empty one
    "calibrated_residuals": False,  # nor does it reconstruct: no residual to calibrate
}


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


class OCSVMInferer(ImageScoreInferer):
    """Scores slices with a ``PixelOCSVM`` network; there is no reconstruction, so the heatmap is zero."""

    def reconstruct(self, images: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        return images.clone()

    def image_scores(self, images: torch.Tensor, recon: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
        return torch.cat([network(chunk) for chunk in torch.split(images, self.batch_size(images))])


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


def main(argv: Sequence[str] | None = None) -> int:
    """``--config_file F [--config_file F2] [--output PATH] [--size 32] [--nu 0.1] [--ID VALUE ...]``."""
    parser = argparse.ArgumentParser(prog="python -m scripts.baselines.ocsvm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_file", action="append", default=None, help="training config(s), merged in order")
    parser.add_argument("--output", help="where model.pt goes (default: <ckpt_dir>/model.pt)")
    parser.add_argument("--size", type=int, default=32, help="side of the downsampled image (default 32)")
    parser.add_argument("--nu", type=float, default=0.1)
    parser.add_argument("--variance", type=float, default=0.95, help="PCA: fraction of variance kept")
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_override_pairs(rest)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fit_from_config(args.config_file or ["configs/train.json"], overrides, args.output, args.size, args.nu,
                    variance=args.variance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
