"""Training and scoring runs of every method through the bundle's own configs, fold by fold."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from experiments.compare.folds import Fold
from scripts.data.datalist import load_datalist
from scripts.evaluation.evaluate import evaluate
from scripts.evaluation.patch_protocol import PatchProtocol
from scripts.scoring.references import VOLUME_Z_INTENSITIES

logger = logging.getLogger("experiments.compare")

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

# method -> (the trained model it uses, inference overrides of its own). patchgan_ranking / patchgan_no_ranking score
# with the configs' own map (configs/inference.json: hyperintense; an overlay's, e.g. dermoscopy's critic); the
# *_squared pair is the paper's squared error whatever the overlay says
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "patchgan_ranking": ("patchgan", {"ranking": True}),
    "patchgan_no_ranking": ("patchgan", {"ranking": False}),
    "patchgan_squared": ("patchgan", {"ranking": True, "score_maps": ["squared"]}),
    "patchgan_no_ranking_squared": ("patchgan", {"ranking": False, "score_maps": ["squared"]}),
    "ae": ("ae", {}),
    "ocsvm": ("ocsvm", {}),
    "alocc": ("alocc", {}),
    "ocsvm_guided": ("ocsvm_guided", {}),
}
# scoring variants of the Patch-GAN (one training, another inference): asked for by name, not in the default list
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "patchgan_ssim": ("patchgan", {"score_maps": ["ssim"]}),
    "patchgan_critic": ("patchgan", {"score_maps": ["critic"]}),
    "patchgan_single_critic": ("patchgan", {"critic_snapshots_path": ""}),
    "patchgan_feature": ("patchgan", {"score_maps": ["feature"]}),
    "patchgan_volume_z": ("patchgan", {"score_maps": ["squared"], "slice_standardisation": "volume"}),
    "patchgan_no_ranking_volume_z": (
        "patchgan", {"ranking": False, "score_maps": ["squared"], "slice_standardisation": "volume"},
    ),
    "patchgan_hyperintense": ("patchgan", {"score_maps": ["hyperintense"]}),
    "patchgan_hyperintense_volume_z": ("patchgan", {"score_maps": ["hyperintense"], "slice_standardisation": "volume"}),
    "patchgan_no_ranking_hyperintense_volume_z": (
        "patchgan", {"ranking": False, "score_maps": ["hyperintense"], "slice_standardisation": "volume"},
    ),
    "patchgan_hypointense": ("patchgan", {"score_maps": ["hypointense"]}),
    "patchgan_hyperintense_volume_lower_half": (
        "patchgan", {"score_maps": ["hyperintense"], "slice_standardisation": "volume_lower_half"},
    ),
    "patchgan_calibrated": ("patchgan", {"calibrated_residuals": True}),
    "patchgan_uncalibrated": ("patchgan", {"calibrated_residuals": False}),
}
RUNNABLE = {**METHODS, **VARIANTS}
# model -> override config files merged onto train.json and inference.json
MODEL_CONFIGS: dict[str, list[str]] = {
    "patchgan": [],
    "ae": ["ae.json"],
    "ocsvm": [],
    "alocc": ["alocc.json"],
    "ocsvm_guided": ["ocsvm_guided.json"],
}
TRIVIAL = ("trivial_intensity", *VOLUME_Z_INTENSITIES, "trivial_position")
TABLE_ORDER = ("ae", "ocsvm", "alocc", "ocsvm_guided", "patchgan_no_ranking_squared", "patchgan_squared",
               "patchgan_no_ranking", "patchgan_ranking", *VARIANTS)
DISPLAY = {
    "ae": "AE (convolutional autoencoder, MSE)",
    "ocsvm": "OCSVM (pixels, PCA 95%)",
    "alocc": "ALOCC",
    "ocsvm_guided": "OCSVM-guided AE",
    "patchgan_no_ranking": "Patch-GAN without ranking",
    "patchgan_ranking": "Patch-GAN with targeted patch ranking",
    "patchgan_no_ranking_squared": "Patch-GAN without ranking, squared error map (the paper)",
    "patchgan_squared": "Patch-GAN with targeted patch ranking, squared error map (the paper)",
    "patchgan_ssim": "Patch-GAN, ranking, SSIM map",
    "patchgan_critic": "Patch-GAN, ranking, critic map (1 - D)",
    "patchgan_single_critic": "Patch-GAN, ranking, the critic of the best checkpoint only (no snapshot ensemble)",
    "patchgan_feature": "Patch-GAN, ranking, critic-feature map",
    "patchgan_volume_z": "Patch-GAN, ranking, squared error map, volume z",
    "patchgan_no_ranking_volume_z": "Patch-GAN, no ranking, squared error map, volume z",
    "patchgan_hyperintense": "Patch-GAN, ranking, hyperintense error map",
    "patchgan_hyperintense_volume_z": "Patch-GAN, ranking, hyperintense error map, volume z",
    "patchgan_no_ranking_hyperintense_volume_z": "Patch-GAN, no ranking, hyperintense error map, volume z",
    "patchgan_hypointense": "Patch-GAN, ranking, hypointense error map",
    "patchgan_hyperintense_volume_lower_half": "Patch-GAN, ranking, hyperintense error map, volume z (lower half)",
    "patchgan_calibrated": "Patch-GAN, ranking, the configs' map of the calibrated residual",
    "patchgan_uncalibrated": "Patch-GAN, ranking, the configs' map of the plain residual",
    "trivial_intensity": "trivial: brightest foreground intensity",
    "trivial_intensity_volume_z": "trivial: brightest foreground intensity, volume z",
    "trivial_intensity_volume_lower_half": "trivial: brightest foreground intensity, volume z (lower half)",
    "trivial_position": "trivial: axial position",
    "trivial_darkness": "trivial: darkness",
    "trivial_texture": "trivial: texture (intensity std, patch level)",
    "trivial_area": "trivial: lesion area (mask)",
    "trivial_asymmetry": "trivial: lesion asymmetry (mask)",
    "trivial_border": "trivial: border irregularity (mask)",
    "trivial_variegation": "trivial: colour variegation in the lesion (mask)",
}
METRICS = ("auc", "ap", "sensitivity", "specificity", "level_r2", "level_adjusted_auc", "validation_auc")
FULL_SIZE = 256  # the paper's image size (configs/train.json)


@dataclass
class Settings:
    """What scales a run; None keeps the configs' value."""

    image_size: int | None = None
    patch_size: int | None = None
    grid: int = 8  # patches per side when only image_size is given (configured_grid)
    max_epochs: int | None = None
    val_interval: int | None = None
    batch_size: int | None = None
    channels: list[int] | None = None
    num_res_units: int | None = None
    learning_rate: float | None = None
    num_workers: int = 0
    seed: int = 0
    fpr: float = 0.05
    threshold_rule: str = "cross_fitted"
    normal_stats: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    extra_configs: list[str] = field(default_factory=list)
    overlay_configs: list[str] = field(default_factory=list)  # --config: merged onto every training and inference run
    train_configs: list[str] = field(default_factory=list)

    def common(self, model: str) -> dict[str, Any]:
        """Overrides shared by the training and inference runs of ``model``."""
        out: dict[str, Any] = {"bundle_root": str(ROOT), "num_workers": self.num_workers}
        if self.image_size:
            out["image_size"] = self.image_size
            out["patch_size"] = self.patch_size or max(1, self.image_size // self.grid)
        elif self.patch_size:
            out["patch_size"] = self.patch_size
        if self.channels:
            out["network_def#channels"] = list(self.channels)
            out["network_def#strides"] = [2] * (len(self.channels) - 1)
            if self.num_res_units is not None:
                out["network_def#num_res_units"] = self.num_res_units
            if model == "patchgan":
                out["critic_def#channels"] = int(self.channels[0])
            if model == "alocc":
                out["critic_def#channels"] = list(self.channels)
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


def configured_grid(configs: Sequence[str]) -> int:
    """Patches per side that the merged inference ``configs`` score on: ``image_size // patch_size`` (8 in
    configs/inference.json, the paper's 32-px patches at 256; 16 with configs/clinical_flair.json), which a
    comparison at another ``--image-size`` keeps."""
    from scripts.config import bundle_parser

    config = bundle_parser(list(configs), {"bundle_root": str(ROOT)})
    return int(config.get_parsed_content("image_size")) // int(config.get_parsed_content("patch_size"))


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
    configs = ["train.json", *settings.extra_configs, *MODEL_CONFIGS[model], *settings.overlay_configs,
               *settings.train_configs]
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
    model, own = RUNNABLE[method]
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
    run_bundle("run", ["inference.json", *settings.extra_configs, *MODEL_CONFIGS[model], *settings.overlay_configs],
               overrides)


def small_preset() -> dict[str, Any]:
    """The small-run recipe of ``configs/demo.json`` (64 px): its network widths, residual units, learning rate and
    batch size; used when ``--image-size`` is below the paper's 256 and ``--channels`` is not given."""
    demo = json.loads((CONFIGS / "demo.json").read_text())
    return {"channels": demo["network_def#channels"], "num_res_units": demo["network_def#num_res_units"],
            "learning_rate": demo["learning_rate"], "batch_size": demo["batch_size"]}


def run_folds(folds: Sequence[Fold], methods: Sequence[str], settings: Settings, resume: bool,
              patches: PatchProtocol | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Train, infer and evaluate every method in every fold; a failing method is reported, the others go on.

    Returns ``{fold: evaluate(...) results}`` at slice level, or at patch level with ``patches``, and the failures.
    """
    models = {method: RUNNABLE[method][0] for method in methods}
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
                    results = evaluate_fold(fold, done, settings, patches) if done else None
                if results:
                    per_fold[fold.name] = results
            except Exception as error:
                failures.append(_failure(fold, "all", "evaluation", error))
            bar.update(1)
    return per_fold, failures


def evaluate_fold(
    fold: Fold, done: Mapping[str, Path], settings: Settings, patches: PatchProtocol | None
) -> dict[str, Any]:
    """``scripts.evaluation.evaluate`` of the fold's methods (thresholds from their validation outputs) into
    ``<fold>/evaluation``; with ``patches`` also the patch level into ``<fold>/patch`` and
    ``<fold>/evaluation_patch``, whose results are returned."""
    results = evaluate(next(iter(done.values())), eval_dir=fold.folder / "evaluation", methods=dict(done),
                       validation_output_dir={m: d / "validation" for m, d in done.items()},
                       datalist=load_datalist(fold.datalist, "testing"), fpr=settings.fpr,
                       threshold_rule=settings.threshold_rule)
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
                                           if (d / "validation" / "slice_scores.csv").is_file()},
                    fpr=settings.fpr, threshold_rule=settings.threshold_rule)


class _Timed:
    """Logs how long a step took (``with _Timed("fold_0 training ae"):``)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> _Timed:
        self.start = time.time()
        return self

    def __exit__(self, *exc: object) -> None:
        logger.info("%s: %.1f s", self.what, time.time() - self.start)


def _failure(fold: Fold, method: str, step: str, error: BaseException) -> str:
    logger.error("%s: %s %s failed:\n%s", fold.name, method, step, "".join(traceback.format_exception(error)))
    return f"{fold.name}: {method} {step} failed: {type(error).__name__}: {error}"
