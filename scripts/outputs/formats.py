"""The output formats of an inference run, written *and* read here: score tables and heatmap files.

An output folder holds (see docs/architecture.md):

- ``scores.csv``: ``case_id,score,label``, one row per volume or image;
- ``slice_scores.csv``: ``case_id,slice_index,score,trivial_intensity,trivial_position,trivial_darkness,label``;
- ``errors.csv``: ``case_id,error`` for the cases that could not be scored;
- ``heatmaps/<case_id>_heatmap.nii.gz`` (on the input's own grid and affine) or ``<case_id>_heatmap.png`` (16-bit,
  ``round(error * scale)`` with the scale in the PNG's text).

A label cell is empty when unknown or ambiguous; reading gives -1 for it.
"""

from __future__ import annotations

import csv
import io as _io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, PngImagePlugin

from scripts.data import io
from scripts.scoring.references import LESION_REFERENCES

Columns = dict[str, np.ndarray]

SCORES = "scores.csv"
SLICE_SCORES = "slice_scores.csv"
ERRORS = "errors.csv"
WARNINGS = "warnings.csv"
HEATMAPS = "heatmaps"
OVERLAYS = "overlays"
SCORE_COLUMNS = ["case_id", "score", "label"]
CORE_SLICE_COLUMNS = ["case_id", "slice_index", "score", "trivial_intensity", "trivial_position", "trivial_darkness"]
SLICE_COLUMNS = [*CORE_SLICE_COLUMNS, "label"]
PICTURE_SLICE_COLUMNS = [*CORE_SLICE_COLUMNS, *LESION_REFERENCES, "label"]  # pictures add the mask-derived references
ERROR_COLUMNS = ["case_id", "error"]
WARNING_COLUMNS = ["case_id", "warning"]
PNG_SCALE = 10000.0  # 2D heatmaps are 16-bit PNGs holding round(error * PNG_SCALE)
VOLUME_HEATMAP, PICTURE_HEATMAP = "_heatmap.nii.gz", "_heatmap.png"
VOLUME_OVERLAY, PICTURE_OVERLAY = "_top_slices.png", "_overlay.png"


# ----------------------------------------------------------------------------------------------- tables


def label_cell(label: Any) -> Any:
    """A label as written in a table: 0 or 1, empty when unknown (negative, None or empty)."""
    if hasattr(label, "item"):
        label = label.item()
    if label is None or label == "":
        return ""
    return int(label) if int(label) >= 0 else ""


def write_table(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV in one atomic step."""
    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    io.write_text(path, buffer.getvalue())


def read_table(path: str | os.PathLike) -> Columns:
    """One CSV as typed columns, ``{}`` when the file is missing: ``case_id`` as strings, ``label`` as int (-1 for
    empty), ``slice_index`` as int, the others as float (empty = NaN) unless they hold text."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        names = reader.fieldnames or []
    return {name: _column(name, [(row.get(name) or "").strip() for row in rows]) for name in names}


def read_scores(output_dir: str | os.PathLike) -> tuple[Columns, Columns]:
    """``scores.csv`` and ``slice_scores.csv`` of an output folder as columns; FileNotFoundError when both are missing."""
    folder = Path(output_dir)
    cases, slices = read_table(folder / SCORES), read_table(folder / SLICE_SCORES)
    if not cases and not slices:
        raise FileNotFoundError(f"neither {SCORES} nor {SLICE_SCORES} in {folder}")
    return cases, slices


def _column(name: str, values: list[str]) -> np.ndarray:
    if name == "case_id":
        return np.array(values, dtype=str)
    if name == "label":
        return np.array([int(float(v)) if v else -1 for v in values], dtype=np.int64)
    if name == "slice_index":
        return np.array([int(float(v)) for v in values], dtype=np.int64)
    try:
        return np.array([float(v) if v else math.nan for v in values], dtype=np.float64)
    except ValueError:
        return np.array(values, dtype=str)


# ----------------------------------------------------------------------------------------------- heatmaps


def heatmap_path(output_dir: str | os.PathLike, case_id: str, volume: bool) -> Path:
    """Where a case's heatmap goes in an output folder."""
    return Path(output_dir) / HEATMAPS / f"{case_id}{VOLUME_HEATMAP if volume else PICTURE_HEATMAP}"


def overlay_path(output_dir: str | os.PathLike, case_id: str, volume: bool) -> Path:
    """Where a case's overlay picture goes in an output folder."""
    return Path(output_dir) / OVERLAYS / f"{case_id}{VOLUME_OVERLAY if volume else PICTURE_OVERLAY}"


def clear_results(output_dir: str | os.PathLike) -> int:
    """Remove a previous run's results from an output folder (the tables first), so that a re-run, or a re-run that
    is killed, never leaves old scores beside new heatmaps. Only files of these formats' names are touched."""
    folder = Path(output_dir)
    removed = 0
    patterns = [(folder, name) for name in (SCORES, SLICE_SCORES, ERRORS, WARNINGS)]
    patterns += [(folder / HEATMAPS, f"*{VOLUME_HEATMAP}"), (folder / HEATMAPS, f"*{PICTURE_HEATMAP}"),
                 (folder / OVERLAYS, f"*{VOLUME_OVERLAY}"), (folder / OVERLAYS, f"*{PICTURE_OVERLAY}")]
    for parent, pattern in patterns:
        for path in parent.glob(pattern) if parent.is_dir() else []:
            if path.is_file():
                path.unlink()
                removed += 1
    return removed


def find_heatmap(output_dir: str | os.PathLike, case_id: str) -> Path | None:
    """A case's heatmap file in an output folder (volume or picture), or None."""
    for volume in (True, False):
        path = heatmap_path(output_dir, case_id, volume)
        if path.is_file():
            return path
    return None


def write_volume_heatmap(heatmap: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """A heatmap already on the input's own grid, written with the input's affine."""
    io.save_nifti_atomic(np.asarray(heatmap, dtype=np.float32), affine, path)


def write_picture_heatmap(heatmap: np.ndarray, path: str | os.PathLike) -> None:
    """A 2D heatmap as a 16-bit PNG of ``round(error * PNG_SCALE)`` (the scale is in the PNG's text)."""
    values = np.clip(np.rint(heatmap * PNG_SCALE), 0, 65535).astype(np.uint16)
    info = PngImagePlugin.PngInfo()
    info.add_text("scale", str(PNG_SCALE))
    io.write_atomic(path, lambda handle: Image.fromarray(values).save(handle, format="PNG", pnginfo=info))


def read_heatmap(path: str | os.PathLike, canonical: bool = False) -> np.ndarray:
    """A heatmap in error units: a NIfTI on its own grid (RAS with ``canonical``), or a PNG divided by its scale."""
    path = Path(path)
    if path.name.endswith(PICTURE_HEATMAP):
        with Image.open(path) as picture:
            return np.asarray(picture, dtype=np.float32) / float(getattr(picture, "text", {}).get("scale", 1.0))
    image = nib.load(path)
    if canonical:
        image = nib.as_closest_canonical(image)
    return np.asarray(image.dataobj, dtype=np.float32)
