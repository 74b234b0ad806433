"""Ignite handlers that write what the evaluator measured: scores, slice scores, heatmaps and errors.

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a crash never
leaves a half-written CSV that looks complete. A case that failed to load is listed in ``errors.csv`` and the
others' results are written all the same.
"""

from __future__ import annotations

import csv
import io as _io
import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image, PngImagePlugin

from scripts import io
from scripts.checks import require_bool
from scripts.inferer import AnomalyScores
from scripts.visualize import overlay_figure

logger = logging.getLogger(__name__)

PNG_SCALE = 10000.0  # 2D heatmaps are 16-bit PNGs holding round(error * PNG_SCALE)


def write_csv_atomic(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """Write a CSV in one atomic step (see ``scripts.io.write_atomic``)."""
    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    io.write_atomic(path, lambda handle: handle.write(buffer.getvalue().encode()))


def to_original_grid(volume: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Undo the reorientation to RAS: a canonical ``(H, W, D)`` array back on the input's voxel grid."""
    original = nib.orientations.io_orientation(original_affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), original)
    return nib.orientations.apply_orientation(volume, back)


def save_heatmap_png(heatmap: np.ndarray, path: Path) -> None:
    """Save a 2D heatmap as a 16-bit PNG of ``round(error * PNG_SCALE)`` (the scale is in the PNG's text)."""
    values = np.clip(np.rint(heatmap * PNG_SCALE), 0, 65535).astype(np.uint16)
    info = PngImagePlugin.PngInfo()
    info.add_text("scale", str(PNG_SCALE))
    io.write_atomic(path, lambda handle: Image.fromarray(values).save(handle, format="PNG", pnginfo=info))


def slice_labels(seg: torch.Tensor, min_lesion_voxels: int) -> list[int | str]:
    """Per-slice labels from a lesion mask stack ``(N, ...)``: 0, 1, or '' when too few voxels to call."""
    lesion = (seg > 0).flatten(1).sum(1).tolist()
    return [0 if n == 0 else (1 if n >= min_lesion_voxels else "") for n in lesion]


def trivial_scores(slices: torch.Tensor, region: torch.Tensor, valid: torch.Tensor) -> dict[str, np.ndarray]:
    """Reference scores that need no model, on the same slices (see docs/results.md for why they matter).

    ``trivial_intensity``: 99.5th percentile of the slice's foreground intensity (tumours are bright in FLAIR);
    ``trivial_position``: closeness to the centre of the foreground's axial extent (1 centre, 0 end slices);
    ``trivial_darkness``: one minus the mean intensity (skin lesions are dark).
    """
    n = len(slices)
    intensity = np.full(n, np.nan)
    for i in torch.nonzero(valid).flatten().tolist():
        values = slices[i][region[i].expand_as(slices[i])]
        intensity[i] = float(torch.quantile(values.float(), 0.995)) if values.numel() else np.nan
    index = torch.nonzero(valid).flatten().float()
    centre = (index.min() + index.max()) / 2 if len(index) else torch.tensor(0.0)
    half = max(float((index.max() - index.min()) / 2), 1.0) if len(index) else 1.0
    position = 1 - (torch.arange(n).float() - centre).abs() / half
    darkness = 1 - slices.float().flatten(1).mean(1)
    return {"trivial_intensity": intensity, "trivial_position": position.numpy(), "trivial_darkness": darkness.numpy()}


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
        self.case_rows, self.slice_rows, self.error_rows = [], [], []
        (self.output_dir / "heatmaps").mkdir(parents=True, exist_ok=True)

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
        slices = out["image"][0].permute(3, 0, 1, 2).cpu()
        seg = out.get("seg")
        labels = slice_labels(seg[0].permute(3, 0, 1, 2), self.min_lesion_voxels) if seg is not None else None
        case_label = _first(out.get("label"))
        self.case_rows.append([case_id, float(scores.case_scores[0]), case_label])
        trivial = trivial_scores(slices, slices.amax(1, keepdim=True) > 0, scores.slice_valid.cpu())
        for i in torch.nonzero(scores.slice_valid).flatten().tolist():
            label = labels[i] if labels is not None else ""
            self.slice_rows.append([case_id, i, float(scores.slice_scores[i]), *(float(v[i]) for v in trivial.values()), label])
        if self.write_heatmaps:
            meta = out["image_meta_dict"]
            affine = np.asarray(meta["original_affine"][0], dtype=np.float64)
            heatmap = scores.heatmap[0, 0].float().cpu().numpy()
            path = self.output_dir / "heatmaps" / f"{case_id}_heatmap.nii.gz"
            io.save_nifti_atomic(to_original_grid(heatmap, affine).astype(np.float32), affine, path)
        if self.overlay_slices:
            self._overlay_volume(case_id, slices, scores, seg)

    def _collect_images(self, out: dict[str, Any], scores: AnomalyScores) -> None:
        images = out["image"].cpu()
        trivial = trivial_scores(images, torch.ones_like(images[:, :1], dtype=torch.bool), scores.slice_valid.cpu())
        labels = out.get("label")
        for i, case_id in enumerate(out["case_id"]):
            label = "" if labels is None else int(labels[i])
            score = float(scores.slice_scores[i])
            self.case_rows.append([case_id, score, label])
            values = [float(trivial["trivial_intensity"][i]), 0.0, float(trivial["trivial_darkness"][i])]
            self.slice_rows.append([case_id, 0, score, *values, label])
            heat = scores.heatmap[i, 0].float().cpu().numpy()
            if self.write_heatmaps:
                save_heatmap_png(heat, self.output_dir / "heatmaps" / f"{case_id}_heatmap.png")
            if self.overlay_slices:
                seg = out.get("seg")
                mask = None if seg is None else seg[i, 0].cpu().numpy()
                overlay_figure([images[i].numpy()], [heat], [f"{case_id}  score {score:.4g}"],
                               self.output_dir / "overlays" / f"{case_id}_overlay.png", [mask], transpose=False)

    def _overlay_volume(self, case_id: str, slices: torch.Tensor, scores: AnomalyScores, seg: Any) -> None:
        """Picture of the volume's highest-scoring slices, heatmap overlaid, lesion contour when known."""
        ranked = torch.argsort(torch.nan_to_num(scores.slice_scores.cpu(), nan=-float("inf")), descending=True)
        top = ranked[: min(self.overlay_slices, int(scores.slice_valid.sum()))].tolist()
        heat = scores.heatmap[0, 0].float().cpu()
        masks = [None if seg is None else seg[0, 0, ..., i].cpu().numpy() for i in top]
        titles = [f"slice {i}  score {float(scores.slice_scores[i]):.4g}" for i in top]
        overlay_figure([slices[i].numpy() for i in top], [heat[..., i].numpy() for i in top], titles,
                       self.output_dir / "overlays" / f"{case_id}_top_slices.png", masks,
                       heat_max=float(heat.max()) or None)

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(self.output_dir / "scores.csv", ["case_id", "score", "label"], self.case_rows)
        header = ["case_id", "slice_index", "score", "trivial_intensity", "trivial_position", "trivial_darkness", "label"]
        write_csv_atomic(self.output_dir / "slice_scores.csv", header, self.slice_rows)
        write_csv_atomic(self.output_dir / "errors.csv", ["case_id", "error"], self.error_rows)
        logger.info(
            "scored %d cases (%d slices, %d failed): scores in %s, heatmaps in %s",
            len(self.case_rows), len(self.slice_rows), len(self.error_rows),
            self.output_dir / "scores.csv", self.output_dir / "heatmaps",
        )


def _first(values: Any) -> Any:
    """The first element of a collated batch entry as a plain value, or '' when absent."""
    if values is None:
        return ""
    value = values[0]
    return int(value) if isinstance(value, (torch.Tensor, np.ndarray, int, np.integer)) else value
