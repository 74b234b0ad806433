"""One command for the paper's comparison: train every method on the same normal data, infer, evaluate, compare.

::

    python -m experiments.compare --dataset DIR --output OUT [--methods ae,ocsvm,...] [--image-size 64] [--max-epochs 10]
    python -m experiments.compare --train DIR --test DIR --output OUT [...]

``--dataset``: k patient folds inside one labelled folder (k = min(4, cases), stratified by case label, seeded).
In fold i, part i is the test set, part i+1 the validation set (its normal slices select the checkpoint and set
the operating threshold) and the other parts the training set (normal slices only). ``--train/--test``: one
fold; the training folder's cases are split into training and validation by case, every case of the test folder
is tested. No hyper-parameter is chosen on test labels.

Methods (keys of ``comparison.json``), each a config of the bundle, all reading the same slice cache:

- ``patchgan_ranking`` / ``patchgan_no_ranking``: ``configs/train.json`` once, inference with ``ranking`` true/false
  and the configs' own score map; ``patchgan_squared`` / ``patchgan_no_ranking_squared``: the same training scored
  with the paper's squared error;
- ``ae``: ``+ configs/ae.json``; ``alocc``: ``+ configs/alocc.json``; ``ocsvm_guided``: ``+ configs/ocsvm_guided.json``;
- ``ocsvm``: ``scripts.baselines.ocsvm.fit_from_config`` then inference with ``INFERENCE_OVERRIDES``;
- ``trivial_intensity``, ``trivial_position``: the model-free references of the core's ``slice_scores.csv``, and
  ``trivial_intensity_volume_z`` / ``trivial_intensity_volume_lower_half``: the brightest intensity z-scored within
  each volume, the like-for-like floor of a score with ``slice_standardisation: "volume"`` / ``"volume_lower_half"``.

Layout: ``OUT/<fold>/datalist.json``; ``OUT/<fold>/<method>/`` holds the test inference output (``scores.csv``,
``slice_scores.csv``, ``heatmaps/``), ``validation/`` (the same on the validation cases) and, for the method that
trained a model, ``models/`` and ``train/``; ``OUT/<fold>/evaluation/`` is ``scripts.evaluation.evaluate`` of the
fold; ``OUT/comparison.{md,json}``, ``OUT/roc.png`` and ``OUT/score_distribution.png`` gather the folds (mean +/-
sample standard deviation; the plots pool the folds after z-scoring each fold's scores against its own normal
validation scores, so that no test label enters the scale); ``OUT/specificity.png`` shows each method's held-out
specificity per fold against its target.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.compare.folds import make_folds
from experiments.compare.report import aggregate, comparison_markdown, held_out_specificity, pooled_series
from experiments.compare.runs import (
    CONFIGS,
    FULL_SIZE,
    METHODS,
    RUNNABLE,
    VARIANTS,
    Settings,
    configured_grid,
    run_folds,
    small_preset,
)
from scripts.config import bundle_parser, parse_override
from scripts.data.io import write_json, write_text
from scripts.evaluation.metrics import THRESHOLD_RULES
from scripts.evaluation.patch_protocol import PatchProtocol
from scripts.evaluation.plots import plot_roc, plot_score_distribution, plot_specificity
from scripts.evaluation.report import json_safe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[0],
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
                        help=f"comma-separated subset of {', '.join(METHODS)} (default: all) and of the Patch-GAN "
                             f"scoring variants {', '.join(VARIANTS)} (trained once with patchgan)")
    parser.add_argument("--folds", type=int, help="number of patient folds with --dataset (default: min(4, cases))")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="--train cases kept for validation")
    parser.add_argument("--image-size", type=int, help="network input size (default: the configs', 256)")
    parser.add_argument("--patch-size", type=int,
                        help="scoring patch size (default: the image size over the configs' grid, e.g. 64 / 8 = 8; "
                             "configs/clinical_flair.json scores on a 16x16 grid)")
    parser.add_argument("--max-epochs", type=int, help="training epochs (default: the configs', 100)")
    parser.add_argument("--val-interval", type=int, help="epochs between validations (default: max epochs / 5)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: the configs')")
    parser.add_argument("--channels", help="encoder widths of every network, e.g. 16,32,64,128 (default: the configs'; "
                        "below --image-size 256, configs/demo.json's network, learning rate and batch size)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers (default 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fpr", type=float, default=0.05, help="target false positive rate of the threshold")
    parser.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="cross_fitted",
                        help="how the threshold's quantile level is set from the normal validation scores: "
                        "cross_fitted over the validation patients (default) or the plain 1 - fpr quantile")
    parser.add_argument("--normal-stats", action="store_true",
                        help="Patch-GAN methods score z-maps against the normal statistics their training fitted")
    parser.add_argument("--override", action="append", default=[], metavar="ID=VALUE",
                        help="config override for every run, VALUE a Python literal as for monai.bundle run (False, 3, [1, 2]), "
                        "else a string; repeatable")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="override config merged onto every training AND inference run of every method, after "
                        "the method's own (e.g. a preprocessing overlay); repeatable, in order")
    parser.add_argument("--train-config", action="append", default=[], metavar="FILE",
                        help="override config merged last onto every training run, e.g. configs/lesion_free.json "
                        "(which replaces the training transforms: use it with the patchgan methods)")
    parser.add_argument("--protocol", choices=("slice", "patch"), default="slice",
                        help="slice/image level (default), or the paper's patch level (needs lesion masks)")
    parser.add_argument("--patch-brain-fraction", type=float, default=0.9,
                        help="patch level: least foreground fraction of a patch (both classes)")
    parser.add_argument("--patch-lesion-fraction", type=float, default=0.1,
                        help="patch level: least lesion fraction of an abnormal patch (normal: no lesion pixel)")
    parser.add_argument("--patch-counts", type=int, default=None, metavar="N",
                        help="patch level: at most N test patches per class and fold (the paper's ISIC set: 3000)")
    parser.add_argument("--resume", action="store_true", help="reuse the models and scores already in --output")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = _parser().parse_args(argv)
    if bool(args.dataset) == bool(args.train or args.test) or (not args.dataset and not (args.train and args.test)):
        raise SystemExit("give either --dataset DIR, or --train DIR and --test DIR")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(RUNNABLE))
    if unknown or not methods:
        raise SystemExit(f"unknown methods {unknown}: choose from {', '.join(RUNNABLE)}")
    overrides = dict(map(parse_override, args.override))
    _check_inference_reach(args.config, overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folds, described = make_folds(args, out)
    small = small_preset() if args.image_size and args.image_size < FULL_SIZE and not args.channels else {}
    extra_configs = ["dermoscopy.json"] if described["layout"] == "images" else []
    overlay_configs = [str(Path(c).resolve()) for c in args.config]
    settings = Settings(
        image_size=args.image_size, patch_size=args.patch_size, max_epochs=args.max_epochs,
        val_interval=args.val_interval, batch_size=args.batch_size or small.get("batch_size"),
        channels=[int(c) for c in args.channels.split(",")] if args.channels else small.get("channels"),
        num_res_units=small.get("num_res_units"), learning_rate=small.get("learning_rate"),
        num_workers=args.num_workers, seed=args.seed, fpr=args.fpr, threshold_rule=args.threshold_rule,
        normal_stats=args.normal_stats,
        overrides=overrides,
        extra_configs=extra_configs,
        overlay_configs=overlay_configs,
        grid=configured_grid([str(CONFIGS / c) for c in ("inference.json", *extra_configs)] + overlay_configs),
        train_configs=[str(Path(c).resolve()) for c in args.train_config],
    )
    patches = None
    if args.protocol == "patch":
        config = bundle_parser([str(CONFIGS / c) for c in ("inference.json", *settings.extra_configs)]
                               + settings.overlay_configs,
                               settings.common("patchgan"))
        patches = PatchProtocol(
            grid=int(config.get_parsed_content("image_size")) // int(config.get_parsed_content("patch_size")),
            brain_fraction=args.patch_brain_fraction, lesion_fraction=args.patch_lesion_fraction,
            preprocessing=config.get_parsed_content("case_preprocessing"),
            foreground=str(config.get_parsed_content("foreground")), seed=args.seed, per_class=args.patch_counts)
    per_fold, failures = run_folds(folds, methods, settings, args.resume, patches)
    summary = aggregate(per_fold)
    fold_names = [fold.name for fold in folds]
    level = "patch" if patches else ("slice" if described.get("layout") != "images" else "image")
    write_json(json_safe(summary), out / "comparison.json")
    write_text(out / "comparison.md", comparison_markdown(summary, described, settings, fold_names, failures,
                                                           time.time() - start, level, patches))
    done = [m for m in methods if m in summary]
    base = {fold.name: fold.folder / "patch" if patches else fold.folder for fold in folds}
    series = pooled_series(base, done, done[0]) if done else {}
    pictures = []
    if series:
        plot_roc(series, out / "roc.png", f"ROC, {level} level, {len(folds)} fold(s) pooled (validation z-scores)")
        plot_score_distribution(series, out / "score_distribution.png",
                                f"Anomaly scores, {level} level, {len(folds)} fold(s) pooled: normal vs abnormal")
        pictures += ["roc.png", "score_distribution.png"]
    held_out = held_out_specificity(summary, done)
    if held_out:
        plot_specificity(held_out, out / "specificity.png", 1 - settings.fpr,
                         f"Specificity on held-out {level}s at the validation threshold ({settings.threshold_rule})")
        pictures.append("specificity.png")
    print(f"\ncomparison of {len(done)} method(s) over {len(folds)} fold(s) in {(time.time() - start) / 60:.1f} min:")
    for name in ("comparison.md", "comparison.json", *pictures):
        print(f"  {out / name}")
    print(f"  per fold: {out}/<fold>/<method>/slice_scores.csv, {out}/<fold>/evaluation/metrics.md")
    if failures:
        print("failures:\n  " + "\n  ".join(failures), file=sys.stderr)
        raise SystemExit(1)
    return summary


def _check_inference_reach(overlays: Sequence[str], overrides: dict[str, Any]) -> None:
    """Refuse, in words, a ``--config`` file or ``--override`` that reaches inside a section inference does not have
    (``train#...``): both are merged onto every inference run too, where MONAI would stop each one with "By 'train',
    did you mean 'run'?". Training-only settings belong in ``--train-config``."""
    inference = json.loads((CONFIGS / "inference.json").read_text())
    sources = []
    for path in overlays:
        try:
            sources.append((f"--config {path}", json.loads(Path(path).read_text())))
        except (OSError, ValueError) as error:
            raise SystemExit(f"--config {path}: not a readable JSON config ({type(error).__name__}: {error})") from error
    sources.append(("--override", overrides))
    for source, content in sources:
        foreign = sorted(key for key in content if "#" in key and key.split("#")[0] not in inference)
        if foreign:
            raise SystemExit(f"{source}: {', '.join(foreign)} would reach inference, which has no "
                             f"{', '.join(sorted({k.split('#')[0] for k in foreign}))} section; training-only "
                             f"settings go in --train-config FILE")


if __name__ == "__main__":
    main()
