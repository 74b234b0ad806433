"""The scoring engine: runs a ``PatchRankingInferer`` over a loader of cases (an ignite evaluator).

It is MONAI's ``SupervisedEvaluator`` with an iteration of its own: a case whose loading failed, or that cannot be
scored, passes through as an error item instead of stopping the run, so one bad file never loses the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from scripts.scoring.inferer import PatchRankingInferer

PASSTHROUGH = ("case_id", "label", "seg", "slice_index", "image_meta_dict", "error")


class AnomalyScorer(SupervisedEvaluator):
    """Scores each batch with a ``PatchRankingInferer``; cases whose loading failed pass through as errors.

    Output: ``image``, ``pred`` (the heatmap, after ``postprocessing``: on the input file's own grid), ``recon``
    (reconstruction at network size, for the validation metric), ``scores`` (the full ``AnomalyScores``, on the
    RAS grid of ``image``), and the batch's ``case_id``, ``label``, ``slice_index`` and ``image_meta_dict`` when
    present; an item whose loading or scoring failed gives ``{"error": ..., "case_id": ...}``.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: torch.nn.Module,
        inferer: PatchRankingInferer,
        val_handlers: Sequence | None = None,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable[[float, float], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        extra = {"metric_cmp_fn": metric_cmp_fn} if metric_cmp_fn is not None else {}
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            val_handlers=val_handlers,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            decollate=False,
            **extra,
            **kwargs,
        )

    def _iteration(self, engine: AnomalyScorer, batchdata: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        passthrough = {k: batchdata[k] for k in PASSTHROUGH if k in batchdata}
        if "error" in batchdata:
            return passthrough
        image = batchdata["image"].to(engine.state.device, non_blocking=engine.non_blocking)
        engine.network.eval()
        try:
            scores = engine.inferer.score(image, engine.network)
        except (ValueError, RuntimeError) as error:  # one case that cannot be scored must not lose the others
            return {**passthrough, "error": [f"{type(error).__name__}: {error}"] * len(image)}
        engine.state.output = {**passthrough, Keys.IMAGE: image, Keys.PRED: scores.heatmap,
                               "recon": scores.reconstruction, "resized": scores.resized, "scores": scores}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # runs ``postprocessing``, as MONAI's own iteration does
        return engine.state.output
