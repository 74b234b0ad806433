"""The ignite handler that writes what the scoring engine measured: scores, slice scores, heatmaps and errors.

It collects rows and delegates the files to ``scripts.outputs.formats`` (as MONAI's ``ClassificationSaver`` does
with ``CSVSaver``) and the pictures to ``scripts.outputs.overlays``. A case that failed to load is listed in
``errors.csv`` and the others' results are written all the same.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.config import require_bool
from scripts.data.io import make_folder
from scripts.data.rules import axial_slices, slice_labels
from scripts.outputs import formats
from scripts.outputs.overlays import overlay_figure
from scripts.scoring.inferer import AnomalyScores
from scripts.scoring.references import LESION_REFERENCES, lesion_references, trivial_scores

logger = logging.getLogger(__name__)


class AnomalyScoreWriter:
    """Collects the ``AnomalyEvaluator`` outputs and writes ``scores.csv``, ``slice_scores.csv``, ``errors.csv``
    and per-case heatmaps into ``output_dir`` (see docs/architecture.md for the formats).

    Args:
        output_dir: where results go (created).
        min_lesion_voxels: slice label rule for volumes with a lesion mask (as in training).
        write_heatmaps: False skips heatmap files (scores only).
        overlay_slices: for each volume, a picture of its this-many highest-scoring slices with the heatmap
            overlaid (``overlays/<case_id>_top_slices.png``); for 2D images one overlay each. 0 disables.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        min_lesion_voxels: int = 20,
        write_heatmaps: bool = True,
        overlay_slices: int = 3,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.min_lesion_voxels = min_lesion_voxels
        self.write_heatmaps = require_bool("write_heatmaps", write_heatmaps)
        self.overlay_slices = overlay_slices
        self.case_rows: list[list[Any]] = []
        self.slice_rows: list[list[Any]] = []
        self.error_rows: list[list[Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.case_rows, self.slice_rows, self.error_rows, self.warning_rows = [], [], [], []
        self.slice_columns, self.pictures_with_masks = formats.SLICE_COLUMNS, False
        make_folder(self.output_dir)
        removed = formats.clear_results(self.output_dir)
        if removed:
            logger.info("removed %d result files of a previous run from %s", removed, self.output_dir)

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        if "error" in out:
            for case_id, error in zip(out["case_id"], out["error"]):
                logger.error("case %s skipped: %s", case_id, error)
                self.error_rows.append([case_id, error])
            return
        scores: AnomalyScores = out["scores"]
        if scores.heatmap.ndim == 5:
            self._collect_volume(out, scores)
        else:
            self._collect_images(out, scores)

    def _collect_volume(self, out: dict[str, Any], scores: AnomalyScores) -> None:
        case_id = out["case_id"][0]
        slices = axial_slices(out["image"][0]).cpu()
        seg = out.get("seg")
        labels = slice_labels(axial_slices(seg[0]), self.min_lesion_voxels).tolist() if seg is not None else None
        self.case_rows.append([case_id, float(scores.case_scores[0]), formats.label_cell(_first(out.get("label")))])
        trivial = trivial_scores(slices, scores.region.cpu(), scores.slice_valid.cpu())
        for i in torch.nonzero(scores.slice_valid).flatten().tolist():
            label = formats.label_cell(labels[i] if labels is not None else None)
            self.slice_rows.append([case_id, i, float(scores.slice_scores[i]), *(float(v[i]) for v in trivial.values()), label])
        if self.write_heatmaps:  # ``pred`` is the heatmap on the input's own grid (the ``postprocessing``)
            affine = np.asarray(out["image_meta_dict"]["original_affine"][0], dtype=np.float64)
            formats.write_volume_heatmap(out["pred"][0, 0].float().cpu().numpy(), affine,
                                         formats.heatmap_path(self.output_dir, case_id, volume=True))
        if self.overlay_slices:
            self._overlay_volume(case_id, slices, scores, seg)

    def _collect_images(self, out: dict[str, Any], scores: AnomalyScores) -> None:
        self.slice_columns = formats.PICTURE_SLICE_COLUMNS
        images = out["image"].cpu()
        trivial = trivial_scores(images, torch.ones_like(images[:, :1], dtype=torch.bool), scores.slice_valid.cpu())
        labels, seg = out.get("label"), out.get("seg")
        for i, case_id in enumerate(out["case_id"]):
            label = formats.label_cell(None if labels is None else labels[i])
            score = float(scores.slice_scores[i])
            self.case_rows.append([case_id, score, label])
            mask = None if seg is None else seg[i, 0].cpu().numpy()
            values = [float(trivial["trivial_intensity"][i]), 0.0, float(trivial["trivial_darkness"][i])]
            self.slice_rows.append([case_id, 0, score, *values, *self._lesion_values(case_id, images[i], mask), label])
            heat = scores.heatmap[i, 0].float().cpu().numpy()
            if self.write_heatmaps:
                formats.write_picture_heatmap(heat, formats.heatmap_path(self.output_dir, case_id, volume=False))
            if self.overlay_slices:
                overlay_figure([images[i].numpy()], [heat], [f"{case_id}  score {score:.4g}"],
                               formats.overlay_path(self.output_dir, case_id, volume=False), [mask], transpose=False)

    def _lesion_values(self, case_id: str, image: torch.Tensor, mask: np.ndarray | None) -> list[float]:
        """The mask-derived references of a picture (``references.lesion_references``); NaN without a usable mask,
        and the picture is named in ``warnings.csv`` (it is still scored)."""
        if mask is not None:
            self.pictures_with_masks = True
        if mask is None or not mask.any():
            problem = "no lesion mask" if mask is None else "empty lesion mask"
            self.warning_rows.append([case_id, f"{problem}: scored, without the mask-derived references"])
            return [float("nan")] * len(LESION_REFERENCES)
        return list(lesion_references(image.numpy(), mask).values())

    def _overlay_volume(self, case_id: str, slices: torch.Tensor, scores: AnomalyScores, seg: Any) -> None:
        """Picture of the volume's highest-scoring slices, heatmap overlaid, lesion contour when known."""
        ranked = torch.argsort(torch.nan_to_num(scores.slice_scores.cpu(), nan=-float("inf")), descending=True)
        top = ranked[: min(self.overlay_slices, int(scores.slice_valid.sum()))].tolist()
        heat = scores.heatmap[0, 0].float().cpu()
        masks = [None if seg is None else seg[0, 0, ..., i].cpu().numpy() for i in top]
        titles = [f"slice {i}  score {float(scores.slice_scores[i]):.4g}" for i in top]
        overlay_figure([slices[i].numpy() for i in top], [heat[..., i].numpy() for i in top], titles,
                       formats.overlay_path(self.output_dir, case_id, volume=True), masks,
                       heat_max=float(heat.max()) or None)

    def _write(self, engine: Engine) -> None:
        """The tables (errors first); a run that scored nothing raises, so the command exits non-zero."""
        formats.write_table(self.output_dir / formats.ERRORS, formats.ERROR_COLUMNS, self.error_rows)
        if not self.case_rows:
            raise RuntimeError(f"nothing was scored: {len(self.error_rows)} case(s) failed, listed with their errors "
                               f"in {self.output_dir / formats.ERRORS}")
        if self.pictures_with_masks:
            formats.write_table(self.output_dir / formats.WARNINGS, formats.WARNING_COLUMNS, self.warning_rows)
            if self.warning_rows:
                logger.warning("%d picture(s) without a usable lesion mask, listed in %s", len(self.warning_rows),
                               self.output_dir / formats.WARNINGS)
        formats.write_table(self.output_dir / formats.SLICE_SCORES, self.slice_columns, self.slice_rows)
        formats.write_table(self.output_dir / formats.SCORES, formats.SCORE_COLUMNS, self.case_rows)
        failed = f", {len(self.error_rows)} FAILED (see {self.output_dir / formats.ERRORS})" if self.error_rows else ""
        logger.info("scored %d cases (%d slices%s): scores in %s, heatmaps in %s, overlays in %s",
                    len(self.case_rows), len(self.slice_rows), failed, self.output_dir / formats.SCORES,
                    self.output_dir / formats.HEATMAPS, self.output_dir / formats.OVERLAYS)


def _first(values: Any) -> Any:
    """The first element of a collated batch entry as a plain value, or '' when absent."""
    if values is None:
        return ""
    value = values[0]
    return int(value) if isinstance(value, (torch.Tensor, np.ndarray, int, np.integer)) else value
