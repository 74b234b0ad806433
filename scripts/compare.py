"""One command for the paper's comparison: train every method on the same normal data, infer, evaluate, compare.

::

    python -m scripts.compare --dataset DIR --output OUT [--methods ae,ocsvm,...] [--image-size 64] [--max-epochs 10]
    python -m scripts.compare --train DIR --test DIR --output OUT [...]

``--dataset``: k patient folds inside one labelled folder (k = min(4, cases), stratified by case label, seeded).
In fold i, part i is the test set, part i+1 the validation set (its normal slices select the checkpoint and set
the operating threshold) and the other parts the training set (normal slices only). ``--train/--test``: one
fold; the training folder's cases are split into training and validation by case, every case of the test folder
is tested. No hyper-parameter is chosen on test labels.

Methods (keys of ``comparison.json``), each a config of the bundle, all reading the same slice cache:

- ``patchgan_ranking`` / ``patchgan_no_ranking``: ``configs/train.json`` once, inference with ``ranking`` true/false;
- ``ae``: ``+ configs/ae.json``; ``alocc``: ``+ configs/alocc.json``; ``ocsvm_guided``: ``+ configs/ocsvm_guided.json``;
- ``ocsvm``: ``scripts.baselines.ocsvm.fit_from_config`` then inference with ``INFERENCE_OVERRIDES``;
- ``trivial_intensity``, ``trivial_position``: the model-free references of the core's ``slice_scores.csv``.

Layout: ``OUT/<fold>/datalist.json``; ``OUT/<fold>/<method>/`` holds the test inference output (``scores.csv``,
``slice_scores.csv``, ``heatmaps/``), ``validation/`` (the same on the validation cases) and, for the method that
trained a model, ``models/`` and ``train/``; ``OUT/<fold>/evaluation/`` is ``scripts.evaluation.evaluate`` of the
fold; ``OUT/comparison.{md,json}``, ``OUT/roc.png`` and ``OUT/score_distribution.png`` gather the folds (mean +/-
sample standard deviation; the plots pool the folds after z-scoring each fold's scores against its own normal
validation scores, so that no test label enters the scale).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from scripts.datalist import (
    build_datalist,
    detect_layout,
    fold_cases,
    load_datalist,
    load_datalist_dict,
    write_json_atomic,
)
from scripts.evaluation import evaluate, json_safe, plot_roc, plot_score_distribution, read_scores, write_text

logger = logging.getLogger("scripts.compare")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# method -> (the trained model it uses, inference overrides of its own)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "patchgan_ranking": ("patchgan", {"ranking": True}),
    "patchgan_no_ranking": ("patchgan", {"ranking": False}),
    "ae": ("ae", {}),
    "ocsvm": ("ocsvm", {}),
    "alocc": ("alocc", {}),
    "ocsvm_guided": ("ocsvm_guided", {}),
}
# model -> override config files merged onto train.json and inference.json
MODEL_CONFIGS: dict[str, list[str]] = {
    "patchgan": [],
    "ae": ["ae.json"],
    "ocsvm": [],
    "alocc": ["alocc.json"],
    "ocsvm_guided": ["ocsvm_guided.json"],
}
TRIVIAL = ("trivial_intensity", "trivial_position")
TABLE_ORDER = ("ae", "ocsvm", "alocc", "ocsvm_guided", "patchgan_no_ranking", "patchgan_ranking")
DISPLAY = {
    "ae": "AE (convolutional autoencoder, MSE)",
    "ocsvm": "OCSVM (pixels, PCA 95%)",
    "alocc": "ALOCC",
    "ocsvm_guided": "OCSVM-guided AE",
    "patchgan_no_ranking": "Patch-GAN without ranking",
    "patchgan_ranking": "Patch-GAN with targeted patch ranking",
    "trivial_intensity": "trivial: brightest foreground intensity",
    "trivial_position": "trivial: axial position",
    "trivial_darkness": "trivial: darkness",
    "trivial_texture": "trivial: texture (intensity std, patch level)",
}
METRICS = ("auc", "ap", "sensitivity", "specificity")
FULL_SIZE = 256  # the paper's image size (configs/train.json)


@dataclass
class Settings:
    """What scales a run; None keeps the configs' value."""

    image_size: int | None = None
    patch_size: int | None = None
    max_epochs: int | None = None
    val_interval: int | None = None
    batch_size: int | None = None
    channels: list[int] | None = None
    num_res_units: int | None = None
    learning_rate: float | None = None
    num_workers: int = 0
    seed: int = 0
    fpr: float = 0.05
    normal_stats: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    extra_configs: list[str] = field(default_factory=list)
    train_configs: list[str] = field(default_factory=list)

    def common(self, model: str) -> dict[str, Any]:
        """Overrides shared by the training and inference runs of ``model``."""
        out: dict[str, Any] = {"bundle_root": str(ROOT), "num_workers": self.num_workers}
        if self.image_size:
            out["image_size"] = self.image_size
            out["patch_size"] = self.patch_size or max(1, self.image_size // 8)  # 32 at 256, as the paper
        elif self.patch_size:
            out["patch_size"] = self.patch_size
        if self.channels:
            out["network_def#channels"] = list(self.channels)
            out["network_def#strides"] = [2] * (len(self.channels) - 1)
            if self.num_res_units is not None:
                out["network_def#num_res_units"] = self.num_res_units
            if model == "patchgan":
                out["discriminator_def#channels"] = int(self.channels[0])
            if model == "alocc":
                out["discriminator_def#channels"] = list(self.channels)
        return {**out, **self.overrides}

    def training(self, model: str) -> dict[str, Any]:
        """Overrides of a training run of ``model``."""
        out: dict[str, Any] = {"seed": self.seed}
        if self.max_epochs:
            out["max_epochs"] = self.max_epochs
            out["val_interval"] = self.val_interval or max(1, self.max_epochs // 5)
        elif self.val_interval:
            out["val_interval"] = self.val_interval
        if self.batch_size:
            out["batch_size"] = self.batch_size
        if self.learning_rate:
            out["learning_rate"] = self.learning_rate
        return {**self.common(model), **out, **self.overrides}


@dataclass
class Fold:
    name: str
    folder: Path
    datalist: Path


# ----------------------------------------------------------------------------------------------- folds


def _find_beside(folder: Path, names: Sequence[str], want_dir: bool) -> Path | None:
    for name in names:
        for candidate in (folder.parent / f"{folder.name}_{name}", folder / name, folder.parent / name):
            if (candidate.is_dir() if want_dir else candidate.is_file()):
                return candidate
    return None


def _datalist(folder: Path, labels_csv: str | None, masks_dir: str | None, val_fraction: float, seed: int) -> dict:
    """``build_datalist`` of a folder; a 2D image folder's ``<name>_labels.csv`` / ``<name>_masks`` are found
    beside it when not given (the ISIC layout)."""
    folder = Path(folder).resolve()
    kwargs: dict[str, Any] = {"val_fraction": val_fraction, "test_fraction": 0.0, "seed": seed}
    if detect_layout(folder) == "images":
        labels = Path(labels_csv) if labels_csv else _find_beside(folder, ["labels.csv"], want_dir=False)
        masks = Path(masks_dir) if masks_dir else _find_beside(folder, ["masks"], want_dir=True)
        kwargs.update(labels_csv=labels, masks_dir=masks)
        logger.info("%s: 2D images, labels %s, masks %s", folder, labels, masks)
    return build_datalist(folder, **kwargs)


def _absolute_items(datalist: dict, split: str | None) -> list[dict[str, Any]]:
    return load_datalist_dict(datalist, split, datalist["dataset_dir"])


def make_folds(args: argparse.Namespace, out: Path) -> tuple[list[Fold], dict[str, Any]]:
    """Write each fold's datalist (absolute paths) and return the folds and a description of the data."""
    folds: list[Fold] = []
    if args.dataset:
        datalist = _datalist(Path(args.dataset), args.labels_csv, args.masks_dir, 0.0, args.seed)
        items = _absolute_items(datalist, None)
        by_id = {item["case_id"]: item for item in items}
        labels = {item["case_id"]: int(item["label"]) for item in items if "label" in item}
        k = args.folds or min(4, len(items))
        if k < 3 or len(items) < k:
            raise SystemExit(f"{args.dataset}: {len(items)} cases; need at least 3 folds (test, validation, training)")
        for i in range(k):
            split = fold_cases(list(by_id), labels, k, i, args.seed)
            folds.append(_write_fold(out, f"fold_{i}", datalist, {s: [by_id[c] for c in ids] for s, ids in split.items()}))
        described = {"mode": "folds", "dataset": str(Path(args.dataset).resolve()), "layout": datalist["layout"],
                     "n_cases": len(items), "n_folds": k}
    else:
        train = _datalist(Path(args.train), args.labels_csv, args.masks_dir, args.val_fraction, args.seed)
        test = _datalist(Path(args.test), args.test_labels_csv, args.test_masks_dir, 0.0, args.seed)
        if train["layout"] != test["layout"] and "images" in (train["layout"], test["layout"]):
            raise SystemExit(f"--train is {train['layout']} but --test is {test['layout']}: use data of one kind")
        split = {"training": _absolute_items(train, "training"), "validation": _absolute_items(train, "validation"),
                 "testing": _absolute_items(test, None)}
        folds.append(_write_fold(out, "fold_0", train, split))
        described = {"mode": "train/test", "train": str(Path(args.train).resolve()), "test": str(Path(args.test).resolve()),
                     "layout": train["layout"], "n_cases": sum(len(v) for v in split.values()), "n_folds": 1}
    return folds, described


def _write_fold(out: Path, name: str, source: dict, split: dict[str, list[dict]]) -> Fold:
    folder = out / name
    data = {"name": f"{source['name']} {name}", "layout": source["layout"], "dataset_dir": "", **split}
    write_json_atomic(data, folder / "datalist.json")
    logger.info("%s: %s", name, ", ".join(f"{s} {len(v)} cases" for s, v in split.items()))
    return Fold(name, folder, folder / "datalist.json")


# ----------------------------------------------------------------------------------------------- bundle runs


def run_bundle(run_id: str, configs: Sequence[str], overrides: Mapping[str, Any]) -> None:
    """``python -m monai.bundle run RUN_ID --config_file [...] --ID VALUE ...``, in this process."""
    from monai.bundle import run

    files = [str(CONFIGS / name) if not Path(name).is_absolute() else name for name in configs]
    run(run_id=run_id, config_file=files, logging_file=str(CONFIGS / "logging.conf"), **dict(overrides))


def train_model(model: str, fold: Fold, folder: Path, settings: Settings) -> Path:
    """Train ``model`` on the fold's normal training slices; returns its ``models`` folder."""
    ckpt = folder / "models"
    overrides = {**settings.training(model), "datalist": str(fold.datalist), "dataset_dir": "",
                 "output_dir": str(folder / "train"), "ckpt_dir": str(ckpt), "cache_dir": str(fold.folder.parent / "slice_cache")}
    configs = ["train.json", *settings.extra_configs, *MODEL_CONFIGS[model], *settings.train_configs]
    if model == "ocsvm":
        from scripts.baselines.ocsvm import fit_from_config

        fit_from_config([str(CONFIGS / c) for c in configs], overrides, ckpt / "model.pt")
    else:
        run_bundle("training", configs, overrides)
    if not (ckpt / "model.pt").is_file():
        raise RuntimeError(f"training of {model} wrote no {ckpt / 'model.pt'} (was there a validation epoch?)")
    return ckpt


def infer(method: str, fold: Fold, split: str, output: Path, ckpt: Path, settings: Settings, heatmaps: bool) -> None:
    """Score the fold's ``split`` cases with a trained method into ``output`` (the core's CSV format)."""
    model, own = METHODS[method]
    overrides: dict[str, Any] = {
        **settings.common(model), "datalist": str(fold.datalist), "dataset_dir": "", "datalist_split": split,
        "output_dir": str(output), "ckpt_path": str(ckpt / "model.pt"), "write_heatmaps": heatmaps,
        "overlay_slices": 0, **own,
    }
    if model == "alocc":
        overrides["alocc_critic_path"] = str(ckpt / "checkpoint_best.pt")
    if settings.normal_stats and model == "patchgan":  # the statistics the fold's own training fitted
        overrides["normal_stats"] = str(ckpt / "normal_stats.pt")
    if model == "ocsvm":
        from scripts.baselines.ocsvm import INFERENCE_OVERRIDES

        overrides.update(INFERENCE_OVERRIDES)
    overrides.update(settings.overrides)
    run_bundle("run", ["inference.json", *settings.extra_configs, *MODEL_CONFIGS[model]], overrides)


# ----------------------------------------------------------------------------------------------- patch level


@dataclass
class PatchProtocol:
    """The paper's patch level: ``grid x grid`` patches of each scored slice (32 px at 256: the scoring patches).

    Normal: at least ``brain_fraction`` of the patch in the foreground and no lesion pixel; abnormal: the same
    foreground rule and at least ``lesion_fraction`` of lesion pixels; the rest is left out. A patch's score is
    its value in the method's heatmap (its patch error); methods without a heatmap (the OCSVM) have no patch
    score. Test sets are balanced by a seeded subsample of the larger class, the same patches for every method.
    """

    grid: int
    brain_fraction: float = 0.9
    lesion_fraction: float = 0.1
    normalize: bool = True
    foreground: str = "nonzero"
    seed: int = 0

    def cells(self, size: int) -> np.ndarray:
        """Start of each patch band along an axis of ``size`` pixels, as the heatmap's nearest upsampling."""
        index = np.minimum(np.floor(np.arange(size, dtype=np.float32) * np.float32(self.grid / size)), self.grid - 1)
        return np.flatnonzero(np.diff(index, prepend=-1) > 0)

    def case_patches(self, item: Mapping[str, Any], heatmap: Path, slices: Sequence[int]) -> dict[str, np.ndarray]:
        """Per patch of the given slices: ``slice``, ``cell``, ``score``, ``brain`` and ``lesion`` fractions and three
        model-free references: the brightest foreground intensity, the darkness (1 - mean intensity) and the
        texture (intensity standard deviation), read on the case's own grid (RAS, as the inferer sliced it)."""
        import nibabel as nib
        from PIL import Image

        from scripts.transforms import BrainPercentileNormalized, LoadCased

        case = LoadCased()(dict(item))
        image = BrainPercentileNormalized("image").normalise(case["image"]) if self.normalize else case["image"]
        if heatmap.name.endswith(".nii.gz"):
            heat = np.asarray(nib.as_closest_canonical(nib.load(heatmap)).dataobj, dtype=np.float32)
            image, lesion, heat = image[..., slices], case["seg"][0][..., slices] > 0, heat[..., slices]
        else:
            with Image.open(heatmap) as picture:
                heat = (np.asarray(picture, dtype=np.float32) / float(picture.text.get("scale", 1.0)))[..., None]
            image, lesion = image[..., None], case["seg"][0][..., None] > 0
        brain = image.max(0) > 0 if self.foreground == "nonzero" else np.ones(image.shape[1:], dtype=bool)
        rows, cols = self.cells(heat.shape[0]), self.cells(heat.shape[1])

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
        slices = read_scores(method_dir)[1]
        by_case = {item["case_id"]: item for item in items if item.get("seg")}
        header = ["case_id", "slice_index", "score", "trivial_intensity", "trivial_position", "trivial_darkness",
                  "trivial_texture", "label"]
        rows: list[list[Any]] = []
        for case_id in dict.fromkeys(slices["case_id"].tolist()):
            heat = [p for p in (method_dir / "heatmaps").glob(f"{case_id}_heatmap.*") if p.suffix in (".gz", ".png")]
            if case_id not in by_case or not heat:
                continue
            picked = slices["case_id"] == case_id
            patches = self.case_patches(by_case[case_id], heat[0], slices["slice_index"][picked].tolist())
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
        from scripts.handlers import write_csv_atomic

        write_csv_atomic(target / "slice_scores.csv", header, rows)
        return True

    def balanced(self, rows: list[list[Any]]) -> list[list[Any]]:
        """Equal numbers of normal and abnormal rows: a seeded subsample of the larger class (the choice depends
        on the patches' identities only, so every method gets the same test set)."""
        rows = sorted(rows, key=lambda row: row[0])
        labels = np.array([row[-1] for row in rows])
        n = min(int(np.sum(labels == 0)), int(np.sum(labels == 1)))
        rng = np.random.default_rng(self.seed)
        keep = np.concatenate([np.sort(rng.permutation(np.flatnonzero(labels == c))[:n]) for c in (0, 1)])
        return [rows[i] for i in np.sort(keep)]


# ----------------------------------------------------------------------------------------------- aggregation


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan, 0
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan, int(finite.size)


def aggregate(per_fold: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{fold: {method: metrics}}`` -> ``{method: {"auc", "auc_std", "ap", ..., "n_folds", "folds", ...}}``."""
    methods: list[str] = []
    for results in per_fold.values():
        methods += [m for m in results if m not in methods]
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        rows = {fold: results[method] for fold, results in per_fold.items() if method in results}
        entry: dict[str, Any] = {}
        for metric in METRICS:
            mean, std, n = _mean_std([r.get(metric, math.nan) for r in rows.values()])
            entry[metric], entry[f"{metric}_std"] = mean, std
        entry["n_folds"] = _mean_std([r.get("auc", math.nan) for r in rows.values()])[2]
        for level, keys in (("case", ("auc", "ap")), ("pixel", ("pixel_auc", "pixel_ap", "dice_best_upper_bound"))):
            found = [r[level] for r in rows.values() if level in r]
            if found:
                entry[level] = {}
                for key in keys:
                    mean, std, n = _mean_std([f.get(key, math.nan) for f in found])
                    entry[level].update({key: mean, f"{key}_std": std, "n_folds": n})
        entry["folds"] = {fold: {k: r.get(k) for k in ("auc", "ap", "sensitivity", "specificity", "threshold",
                                                        "n_normal", "n_abnormal")} for fold, r in rows.items()}
        out[method] = entry
    return out


def _ordered(names: Sequence[str]) -> list[str]:
    known = [m for m in TABLE_ORDER if m in names]
    trivial = sorted(m for m in names if m.startswith("trivial_"))
    return known + [m for m in names if m not in known and m not in trivial] + trivial


def _cell(mean: float, std: float) -> str:
    if mean is None or not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if std is not None and np.isfinite(std) else f"{mean:.3f}"


def comparison_markdown(summary: Mapping[str, Mapping[str, Any]], described: Mapping[str, Any], settings: Settings,
                        folds: Sequence[str], failures: Sequence[str], seconds: float, level: str = "slice",
                        patches: PatchProtocol | None = None) -> str:
    """``comparison.md``: the paper's table layout (methods by row, AUC and AP), per-fold AUCs, other levels."""
    brain = described.get("layout") != "images"
    table = f"Table 1: brain FLAIR, {level} level" if brain else f"Table 2: dermoscopy, {level} level"
    source = described.get("dataset") or f"train {described.get('train')} / test {described.get('test')}"
    spread = "mean ± sample standard deviation over folds" if len(folds) > 1 else "one train/test split (no spread)"
    lines = [
        "# Method comparison",
        "",
        f"Data: `{source}` ({described.get('n_cases')} cases, layout {described.get('layout')}); "
        f"{len(folds)} fold(s) split by case; {spread}.",
        "In each fold the methods train on the same normal training slices; the validation cases' normal slices "
        "select the checkpoint and set the threshold (the "
        f"{100 * (1 - settings.fpr):g}th percentile of their scores, target false positive rate {settings.fpr:g}); "
        "no setting was chosen on test labels.",
        *(["", f"Patch level: a {patches.grid}x{patches.grid} grid of patches per slice (the scoring patches); normal "
            f"= at least {patches.brain_fraction:g} foreground and no lesion pixel, abnormal = at least "
            f"{patches.brain_fraction:g} foreground and {patches.lesion_fraction:g} lesion; test sets balanced by a "
            "seeded subsample, the same patches for every method. A patch's score is its heatmap value (its patch "
            "error), so both Patch-GAN rows coincide (ranking only aggregates patches), ALOCC is scored by its "
            "reconstruction error and the OCSVM, which has no heatmap, is absent."] if patches else []),
        "",
        f"## {table}",
        "",
        "| Method | AUC | AP | Sensitivity @thr | Specificity @thr |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in _ordered(list(summary)):
        r = summary[name]
        lines.append(f"| {DISPLAY.get(name, name)} (`{name}`) | " + " | ".join(_cell(r[m], r[f"{m}_std"]) for m in METRICS) + " |")
    if len(folds) > 1:
        lines += ["", "## AUC per fold", "", "| Method | " + " | ".join(folds) + " |", "| --- |" + " ---: |" * len(folds)]
        for name in _ordered(list(summary)):
            values = [summary[name]["folds"].get(f, {}).get("auc") for f in folds]
            lines.append(f"| `{name}` | " + " | ".join(_cell(v, math.nan) if v is not None else "n/a" for v in values) + " |")
    for level, title, keys in (("case", "Case level (one score per volume or image)", ("auc", "ap")),
                               ("pixel", "Pixel level (heatmaps inside the foreground)", ("pixel_auc", "pixel_ap"))):
        rows = [name for name in _ordered(list(summary)) if level in summary[name]]
        if rows:
            lines += ["", f"## {title}", "", "| Method | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
            for name in rows:
                r = summary[name][level]
                lines.append(f"| `{name}` | " + " | ".join(_cell(r[k], r[f"{k}_std"]) for k in keys) + " |")
    lines += ["", "## Settings", "", "```", json.dumps(json_safe(_settings_dict(settings)), indent=1), "```", "",
              f"Wall time: {seconds / 60:.1f} min. Plots: `roc.png`, `score_distribution.png` (test scores pooled over "
              "folds after z-scoring each fold against its own normal validation scores). Per fold: "
              "`<fold>/evaluation/metrics.md`."]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {failure}" for failure in failures]
    return "\n".join(lines) + "\n"


def _settings_dict(settings: Settings) -> dict[str, Any]:
    return {k: v for k, v in vars(settings).items()}


def _series(folder: Path, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        slices = read_scores(folder)[1]
    except FileNotFoundError:
        return None
    if column not in slices or "label" not in slices:
        return None
    keep = (slices["label"] >= 0) & np.isfinite(slices[column])
    return slices["label"][keep], slices[column][keep]


def pooled_series(fold_dirs: Mapping[str, Path], methods: Sequence[str], first: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Test scores of every method (and the trivial references) pooled over folds, each fold z-scored against
    its own normal validation scores (raw scores when the fold has no validation output)."""
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    wanted = [(m, m, "score") for m in methods] + [(t, first, t) for t in (*TRIVIAL, "trivial_darkness", "trivial_texture")]
    for fold_dir in fold_dirs.values():
        for name, method, column in wanted:
            test = _series(fold_dir / method, column)
            if test is None or len(test[0]) == 0:
                continue
            validation = _series(fold_dir / method / "validation", column)
            normal = validation[1][validation[0] == 0] if validation is not None else np.empty(0)
            if normal.size > 1 and np.std(normal) > 0:
                test = (test[0], (test[1] - normal.mean()) / normal.std())
            pooled.setdefault(name, []).append(test)
    out = {}
    for name, parts in pooled.items():
        labels, scores = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if name.startswith("trivial_") and np.ptp(scores) == 0:
            continue
        if len(np.unique(labels)) == 2:
            out[name] = (labels, scores)
    return out


# ----------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (either --dataset, or --train and --test)")
    data.add_argument("--dataset", help="one labelled folder: patient folds inside it")
    data.add_argument("--train", help="train on this folder's normal cases (part of them validate)")
    data.add_argument("--test", help="test on every case of this folder")
    data.add_argument("--labels-csv", help="2D images: image_id,label CSV of --dataset/--train (default: found beside)")
    data.add_argument("--masks-dir", help="2D images: lesion masks of --dataset/--train (default: found beside)")
    data.add_argument("--test-labels-csv", help="2D images: labels CSV of --test")
    data.add_argument("--test-masks-dir", help="2D images: masks of --test")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--folds", type=int, help="number of patient folds with --dataset (default: min(4, cases))")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="--train cases kept for validation")
    parser.add_argument("--image-size", type=int, help="network input size (default: the configs', 256)")
    parser.add_argument("--patch-size", type=int, help="scoring patch size (default: image size / 8)")
    parser.add_argument("--max-epochs", type=int, help="training epochs (default: the configs', 100)")
    parser.add_argument("--val-interval", type=int, help="epochs between validations (default: max epochs / 5)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: the configs')")
    parser.add_argument("--channels", help="encoder widths of every network, e.g. 16,32,64,128 (default: the configs'; "
                        "below --image-size 256, configs/demo.json's network, learning rate and batch size)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers (default 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fpr", type=float, default=0.05, help="target false positive rate of the threshold")
    parser.add_argument("--normal-stats", action="store_true",
                        help="Patch-GAN methods score z-maps against the normal statistics their training fitted")
    parser.add_argument("--override", action="append", default=[], metavar="ID=VALUE",
                        help="config override for every run (VALUE as JSON when it parses), repeatable")
    parser.add_argument("--train-config", action="append", default=[], metavar="FILE",
                        help="override config merged last onto every training run, e.g. configs/lesion_free.json "
                        "(which replaces the training transforms: use it with the patchgan methods)")
    parser.add_argument("--protocol", choices=("slice", "patch"), default="slice",
                        help="slice/image level (default), or the paper's patch level (needs lesion masks)")
    parser.add_argument("--patch-brain-fraction", type=float, default=0.9,
                        help="patch level: least foreground fraction of a patch (both classes)")
    parser.add_argument("--patch-lesion-fraction", type=float, default=0.1,
                        help="patch level: least lesion fraction of an abnormal patch (normal: no lesion pixel)")
    parser.add_argument("--resume", action="store_true", help="reuse the models and scores already in --output")
    return parser


def small_preset() -> dict[str, Any]:
    """The small-run recipe of ``configs/demo.json`` (64 px): its network widths, residual units, learning rate and
    batch size; used when ``--image-size`` is below the paper's 256 and ``--channels`` is not given."""
    demo = json.loads((CONFIGS / "demo.json").read_text())
    return {"channels": demo["network_def#channels"], "num_res_units": demo["network_def#num_res_units"],
            "learning_rate": demo["learning_rate"], "batch_size": demo["batch_size"]}


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected ID=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = _parser().parse_args(argv)
    if bool(args.dataset) == bool(args.train or args.test) or (not args.dataset and not (args.train and args.test)):
        raise SystemExit("give either --dataset DIR, or --train DIR and --test DIR")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise SystemExit(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folds, described = make_folds(args, out)
    small = small_preset() if args.image_size and args.image_size < FULL_SIZE and not args.channels else {}
    settings = Settings(
        image_size=args.image_size, patch_size=args.patch_size, max_epochs=args.max_epochs,
        val_interval=args.val_interval, batch_size=args.batch_size or small.get("batch_size"),
        channels=[int(c) for c in args.channels.split(",")] if args.channels else small.get("channels"),
        num_res_units=small.get("num_res_units"), learning_rate=small.get("learning_rate"),
        num_workers=args.num_workers, seed=args.seed, fpr=args.fpr, normal_stats=args.normal_stats,
        overrides=dict(map(_override, args.override)),
        extra_configs=["dermoscopy.json"] if described["layout"] == "images" else [],
        train_configs=[str(Path(c).resolve()) for c in args.train_config],
    )
    patches = None
    if args.protocol == "patch":
        from scripts.baselines.ocsvm import bundle_parser

        config = bundle_parser([str(CONFIGS / c) for c in ("inference.json", *settings.extra_configs)],
                               settings.common("patchgan"))
        patches = PatchProtocol(
            grid=int(config.get_parsed_content("image_size")) // int(config.get_parsed_content("patch_size")),
            brain_fraction=args.patch_brain_fraction, lesion_fraction=args.patch_lesion_fraction,
            normalize=bool(config.get_parsed_content("normalize")),
            foreground=str(config.get_parsed_content("foreground")), seed=args.seed)
    per_fold, failures = run_folds(folds, methods, settings, args.resume, patches)
    summary = aggregate(per_fold)
    fold_names = [fold.name for fold in folds]
    level = "patch" if patches else ("slice" if described.get("layout") != "images" else "image")
    write_json_atomic(json_safe(summary), out / "comparison.json")
    write_text(out / "comparison.md", comparison_markdown(summary, described, settings, fold_names, failures,
                                                           time.time() - start, level, patches))
    done = [m for m in methods if m in summary]
    base = {fold.name: fold.folder / "patch" if patches else fold.folder for fold in folds}
    series = pooled_series(base, done, done[0]) if done else {}
    if series:
        plot_roc(series, out / "roc.png", f"ROC, {level} level, {len(folds)} fold(s) pooled (validation z-scores)")
        plot_score_distribution(series, out / "score_distribution.png",
                                f"Anomaly scores, {level} level, {len(folds)} fold(s) pooled: normal vs abnormal")
    print(f"\ncomparison of {len(done)} method(s) over {len(folds)} fold(s) in {(time.time() - start) / 60:.1f} min:")
    for name in ("comparison.md", "comparison.json", "roc.png", "score_distribution.png"):
        print(f"  {out / name}")
    print(f"  per fold: {out}/<fold>/<method>/slice_scores.csv, {out}/<fold>/evaluation/metrics.md")
    if failures:
        print("failures:\n  " + "\n  ".join(failures), file=sys.stderr)
        raise SystemExit(1)
    return summary


def run_folds(folds: Sequence[Fold], methods: Sequence[str], settings: Settings, resume: bool,
              patches: PatchProtocol | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Train, infer and evaluate every method in every fold; a failing method is reported, the others go on.

    Returns ``{fold: evaluate(...) results}`` at slice level, or at patch level with ``patches``, and the failures.
    """
    models = {method: METHODS[method][0] for method in methods}
    owner = {model: next(m for m in methods if models[m] == model) for model in models.values()}
    steps = len(folds) * (len(owner) + 2 * len(methods) + 1)
    per_fold: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    with tqdm(total=steps, desc="compare", unit="step", file=sys.stdout) as bar:
        for fold in folds:
            ckpts: dict[str, Path] = {}
            for model, method in owner.items():
                bar.set_postfix_str(f"{fold.name}: training {model}")
                folder = fold.folder / method
                try:
                    if resume and (folder / "models" / "model.pt").is_file():
                        ckpts[model] = folder / "models"
                    else:
                        with _Timed(f"{fold.name}: training {model}"):
                            ckpts[model] = train_model(model, fold, folder, settings)
                except Exception as error:  # one method's failure must not lose the others
                    failures.append(_failure(fold, model, "training", error))
                bar.update(1)
            done = {}
            for method in methods:
                ok = True
                for split in ("testing", "validation"):
                    bar.set_postfix_str(f"{fold.name}: scoring {method} ({split})")
                    target = fold.folder / method / ("validation" if split == "validation" else "")
                    heatmaps = split == "testing" or patches is not None
                    try:
                        if models[method] not in ckpts:
                            raise RuntimeError(f"no trained {models[method]} model")
                        if not (resume and (target / "slice_scores.csv").is_file()
                                and (not heatmaps or method == "ocsvm" or any((target / "heatmaps").glob("*")))):
                            with _Timed(f"{fold.name}: scoring {method} ({split})"):
                                infer(method, fold, split, target, ckpts[models[method]], settings, heatmaps)
                    except Exception as error:
                        ok = False
                        failures.append(_failure(fold, method, f"inference ({split})", error))
                    bar.update(1)
                if ok:
                    done[method] = fold.folder / method
            bar.set_postfix_str(f"{fold.name}: evaluating")
            try:
                with _Timed(f"{fold.name}: evaluation"):
                    results = evaluate_fold(fold, done, settings.fpr, patches) if done else None
                if results:
                    per_fold[fold.name] = results
            except Exception as error:
                failures.append(_failure(fold, "all", "evaluation", error))
            bar.update(1)
    return per_fold, failures


def evaluate_fold(fold: Fold, done: Mapping[str, Path], fpr: float, patches: PatchProtocol | None) -> dict[str, Any]:
    """``scripts.evaluation.evaluate`` of the fold's methods (thresholds from their validation outputs) into
    ``<fold>/evaluation``; with ``patches`` also the patch level into ``<fold>/patch`` and
    ``<fold>/evaluation_patch``, whose results are returned."""
    results = evaluate(next(iter(done.values())), eval_dir=fold.folder / "evaluation", methods=dict(done),
                       validation_output_dir={m: d / "validation" for m, d in done.items()},
                       datalist=load_datalist(fold.datalist, "testing"), fpr=fpr)
    if patches is None:
        return results
    tested, validated = load_datalist(fold.datalist, "testing"), load_datalist(fold.datalist, "validation")
    patch_dirs = {}
    for method, folder in done.items():
        target = fold.folder / "patch" / method
        if patches.write(folder, target, tested, balance=True):
            patches.write(folder / "validation", target / "validation", validated, balance=False)
            patch_dirs[method] = target
        else:
            logger.info("%s: %s wrote no heatmaps, so it has no patch-level score", fold.name, method)
    if not patch_dirs:
        raise RuntimeError("no method wrote heatmaps for the patch level (do the cases have lesion masks?)")
    return evaluate(next(iter(patch_dirs.values())), eval_dir=fold.folder / "evaluation_patch", methods=patch_dirs,
                    validation_output_dir={m: d / "validation" for m, d in patch_dirs.items()
                                           if (d / "validation" / "slice_scores.csv").is_file()}, fpr=fpr)


class _Timed:
    """Logs how long a step took (``with _Timed("fold_0 training ae"):``)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> _Timed:
        self.start = time.time()
        return self

    def __exit__(self, *exc: Any) -> None:
        logger.info("%s: %.1f s", self.what, time.time() - self.start)


def _failure(fold: Fold, method: str, step: str, error: BaseException) -> str:
    logger.error("%s: %s %s failed:\n%s", fold.name, method, step, "".join(traceback.format_exception(error)))
    return f"{fold.name}: {method} {step} failed: {type(error).__name__}: {error}"


if __name__ == "__main__":
    main()
