"""Pieces the baselines share: a fitted one-class SVM as torch buffers, and an inferer for image-level scores.

- ``KernelOCSVM``: a fitted scikit-learn pipeline ``[StandardScaler] -> [PCA] -> OneClassSVM(rbf)`` held as
  float64 torch buffers. Its decision values equal scikit-learn's, it moves with ``.to(device)`` and it is
  saved in an ordinary state dict, so the bundle's ``CheckpointLoader`` (``weights_only=True``) loads it like
  any weights: no pickled scikit-learn object in a checkpoint.
- ``ImageScoreInferer``: a ``PatchRankingInferer`` whose slice scores come from an image-level scorer (an OCSVM,
  a critic) while the slicing, the heatmap and the output format stay the core's, so the scoring engine and the
  writer produce every baseline's ``slice_scores.csv`` exactly as the Patch-GAN's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from scripts.scoring.inferer import AnomalyScores, PatchRankingInferer
from scripts.scoring.patches import aggregate_slices


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
