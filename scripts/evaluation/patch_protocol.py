"""The paper's patch-level protocol: patches of the scored slices labelled from the lesion masks, scored by the heatmap.

The paper's ISIC figures count 32x32 patches of 256x256 images (lesion-free training patches; balanced lesion /
skin test patches), not whole images; this module turns an inference output folder into that table, in the
core's ``slice_scores.csv`` format, so that ``scripts.evaluation.evaluate`` scores it like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.data.brain import case_preprocessing
from scripts.data.rules import foreground
from scripts.data.transforms import LoadCased
from scripts.outputs import formats
from scripts.scoring.patches import grid_cells


@dataclass
class PatchProtocol:
    """The paper's patch level: ``grid x grid`` patches of each scored slice (32 px at 256: the scoring patches).

    Normal: at least ``brain_fraction`` of the patch in the foreground and no lesion pixel; abnormal: the same
    foreground rule and at least ``lesion_fraction`` of lesion pixels; the rest is left out. A patch's score is
    its value in the method's heatmap (its patch error); methods without a heatmap (the OCSVM) have no patch
    score. Test sets are balanced by a seeded subsample of the larger class, the same patches for every method.
    ``preprocessing`` is the inference's ``case_preprocessing`` (default: normalisation only), so that patches are
    read from the pixels the model scored.
    """

    grid: int
    brain_fraction: float = 0.9
    lesion_fraction: float = 0.1
    preprocessing: Sequence[Callable] | None = None
    foreground: str = "nonzero"
    seed: int = 0
    per_class: int | None = None

    def case_patches(self, item: Mapping[str, Any], heatmap: Path, slices: Sequence[int]) -> dict[str, np.ndarray]:
        """Per patch of the given slices: ``slice``, ``cell``, ``score``, ``brain`` and ``lesion`` fractions and three
        model-free references: the brightest foreground intensity, the darkness (1 - mean intensity) and the
        texture (intensity standard deviation), read on the case's own grid (RAS, as the inferer sliced it)."""
        case = LoadCased()(dict(item))
        for step in case_preprocessing() if self.preprocessing is None else self.preprocessing:
            case = step(case)
        image = case["image"]
        heat = formats.read_heatmap(heatmap, canonical=True)
        if heat.ndim == 3:
            image, lesion, heat = image[..., slices], case["seg"][0][..., slices] > 0, heat[..., slices]
        else:
            image, lesion, heat = image[..., None], case["seg"][0][..., None] > 0, heat[..., None]
        stack = torch.from_numpy(np.ascontiguousarray(image)).permute(3, 0, 1, 2)  # (S, C, H, W), as scored
        brain = foreground(stack, self.foreground)[:, 0].permute(1, 2, 0).numpy()
        rows, cols = grid_cells(heat.shape[0], self.grid), grid_cells(heat.shape[1], self.grid)

        def pool(values: np.ndarray, reduce: np.ufunc) -> np.ndarray:  # (H, W, S) -> (S, grid * grid)
            pooled = reduce.reduceat(reduce.reduceat(values, rows, axis=0), cols, axis=1)
            return pooled.transpose(2, 0, 1).reshape(values.shape[-1], -1)

        area = pool(np.ones(heat.shape, dtype=np.float64), np.add)
        bright = np.where(brain[None], image, -np.inf).max(0)
        grey = image.mean(0).astype(np.float64)
        mean = pool(grey, np.add) / area
        spread = np.sqrt(np.clip(pool(grey**2, np.add) / area - mean**2, 0, None))
        return {"slice": np.repeat(np.asarray(slices).reshape(-1), len(rows) * len(cols)),
                "cell": np.tile(np.arange(len(rows) * len(cols)), len(slices)),
                "score": pool(heat, np.maximum).ravel(), "brain": (pool(brain.astype(np.float64), np.add) / area).ravel(),
                "lesion": (pool(lesion.astype(np.float64), np.add) / area).ravel(),
                "intensity": pool(bright, np.maximum).ravel(), "darkness": (1 - mean).ravel(),
                "texture": spread.ravel()}

    def labels(self, patches: Mapping[str, np.ndarray]) -> np.ndarray:
        """0 normal, 1 abnormal, -1 left out."""
        inside = patches["brain"] >= self.brain_fraction
        out = np.full(len(inside), -1)
        out[inside & (patches["lesion"] == 0)] = 0
        out[inside & (patches["lesion"] >= self.lesion_fraction)] = 1
        return out

    def write(self, method_dir: Path, target: Path, items: Sequence[Mapping[str, Any]], balance: bool) -> bool:
        """Patch rows of one inference output folder as ``slice_scores.csv`` (the core's columns) in ``target``;
        False when the method wrote no heatmaps."""
        slices = formats.read_scores(method_dir)[1]
        by_case = {item["case_id"]: item for item in items if item.get("seg")}
        header = [*formats.CORE_SLICE_COLUMNS, "trivial_texture", "label"]
        rows: list[list[Any]] = []
        for case_id in dict.fromkeys(slices["case_id"].tolist()):
            heat = formats.find_heatmap(method_dir, case_id)
            if case_id not in by_case or heat is None:
                continue
            picked = slices["case_id"] == case_id
            patches = self.case_patches(by_case[case_id], heat, slices["slice_index"][picked].tolist())
            position = dict(zip(slices["slice_index"][picked].tolist(), slices["trivial_position"][picked].tolist()))
            labels = self.labels(patches)
            for i in np.flatnonzero(labels >= 0):
                rows.append([f"{case_id}/{patches['slice'][i]}/{patches['cell'][i]}", int(patches["slice"][i]),
                             float(patches["score"][i]), float(patches["intensity"][i]),
                             float(position[int(patches["slice"][i])]), float(patches["darkness"][i]),
                             float(patches["texture"][i]), int(labels[i])])
        if not rows:
            return False
        if balance:
            rows = self.balanced(rows)
        formats.write_table(target / formats.SLICE_SCORES, header, rows)
        return True

    def balanced(self, rows: list[list[Any]]) -> list[list[Any]]:
        """Equal numbers of normal and abnormal rows: a seeded subsample of the larger class, and of both down to
        ``per_class`` when set (the paper's ISIC test set: 3,000 of each); the choice depends on the patches'
        identities only, so every method gets the same test set."""
        rows = sorted(rows, key=lambda row: row[0])
        labels = np.array([row[-1] for row in rows])
        n = min(int(np.sum(labels == 0)), int(np.sum(labels == 1)), self.per_class or len(labels))
        rng = np.random.default_rng(self.seed)
        keep = np.concatenate([np.sort(rng.permutation(np.flatnonzero(labels == c))[:n]) for c in (0, 1)])
        return [rows[i] for i in np.sort(keep)]
