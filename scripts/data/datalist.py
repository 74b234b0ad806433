"""Datalists: a dataset folder -> MONAI-style datalist JSON with a patient-level, seeded split, and the one reader.

The layouts a folder may have are ``scripts.data.layouts``'s (``auto`` picks one). ``load_datalist`` (a JSON
file), ``load_datalist_dict`` (a dict), ``inference_items`` (whatever ``--input_path`` names) and ``case_items``
(MONAI Label's datastore items) are the only ways the bundle reads cases, so every reader gives absolute paths,
checked case ids and the same errors.

Splitting is by ``case_id`` so that slices of one patient never leak between training and evaluation, and is
stratified by label so that every split sees both classes when the data allow it. Paths are stored relative to
``dataset_dir`` so a datalist survives moving the dataset; ``load_datalist`` makes them absolute again.

CLI::

    python -m scripts.data.datalist --dataset-dir DIR --output datalist.json [--layout auto|brats|msd|images]
        [--labels-csv F] [--masks-dir D] [--val-fraction 0.2] [--test-fraction 0.2] [--seed 0] [--channel 0]
        [--folds K --fold I]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.data.io import InputError, write_json
from scripts.data.layouts import (
    LAYOUTS,
    detect_layout,
    find_brats_cases,
    find_image_cases,
    find_msd_cases,
    find_volume_cases,
)
from scripts.data.rules import check_case_id, check_unique_case_ids, file_case_id, item_case_id

SPLITS = ("training", "validation", "testing")
PATH_KEYS = ("image", "seg", "brainmask")  # item entries that are file paths (relative in a written datalist)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ public API


def build_datalist(
    dataset_dir: str | os.PathLike,
    layout: str = "auto",
    labels_csv: str | os.PathLike | None = None,
    masks_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    channel: int = 0,
    folds: int = 0,
    fold: int = 0,
) -> dict[str, Any]:
    """Find the cases of ``dataset_dir`` and split them; returns the datalist dict (paths relative to the folder).

    ``channel`` is the FLAIR channel of 4D MSD images; ``labels_csv`` and ``masks_dir`` apply to 2D images.
    With ``folds > 1`` the split is fold ``fold`` of a patient-level cross-validation (``fold_cases``) and the
    fractions are not used.
    """
    root = Path(dataset_dir).resolve()
    if not root.is_dir():
        raise InputError(f"{dataset_dir}: dataset folder not found")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "brats":
        items = find_brats_cases(root)
    elif layout == "msd":
        items = find_msd_cases(root, channel)
    elif layout == "volumes":
        items = find_volume_cases(root)
    else:
        items = find_image_cases(root, labels_csv, masks_dir)
    labels = {item["case_id"]: item["label"] for item in items if "label" in item}
    ids = [item["case_id"] for item in items]
    if folds > 1:
        splits = fold_cases(ids, labels, folds, fold, seed)
    else:
        splits = split_cases(ids, labels, val_fraction, test_fraction, seed)
    by_id = {item["case_id"]: _relative(item, root) for item in items}
    datalist: dict[str, Any] = {"name": root.name, "layout": layout, "dataset_dir": str(root)}
    datalist.update({split: [by_id[case] for case in splits[split]] for split in SPLITS})
    return datalist


def split_cases(
    case_ids: Sequence[str],
    labels: Mapping[str, int] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Split case ids into ``training``/``validation``/``testing`` with a seeded shuffle, stratified by label.

    Each label group (0, 1 and unlabelled) is shuffled with ``numpy.random.default_rng(seed)`` and cut by the
    fractions; a split with a positive fraction gets at least one case of every group large enough to give one.
    The result depends only on the set of ids, their labels, the fractions and the seed.
    """
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case ids must be unique: a case must never fall into two splits")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1 + 1e-9:
        raise ValueError(f"fractions must be >= 0 with a sum <= 1, got {val_fraction} and {test_fraction}")
    labels = labels or {}
    fractions = (max(0.0, 1.0 - val_fraction - test_fraction), val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    deficit = [0.0, 0.0, 0.0]  # carried rounding error, so that the totals follow the fractions too
    for group in sorted({labels.get(case, -1) for case in case_ids}):
        members = sorted(case for case in case_ids if labels.get(case, -1) == group)
        shuffled = [members[i] for i in rng.permutation(len(members))]
        counts = _allocate(len(members), fractions, deficit)
        start = 0
        for index, (split, count) in enumerate(zip(SPLITS, counts)):
            splits[split].extend(shuffled[start : start + count])
            deficit[index] += len(members) * fractions[index] - count
            start += count
    return {split: sorted(ids) for split, ids in splits.items()}


def fold_cases(
    case_ids: Sequence[str], labels: Mapping[str, int] | None, folds: int, fold: int, seed: int = 0
) -> dict[str, list[str]]:
    """Fold ``fold`` of a ``folds``-fold patient-level cross-validation, stratified by label.

    Cases are dealt round-robin into folds after a seeded shuffle within each label group; fold ``fold`` is the
    test set, fold ``fold + 1`` (mod ``folds``) the validation set (model selection and thresholds, normal cases
    only), the rest training. Over all folds every case is tested exactly once.
    """
    if not 2 <= folds <= len(case_ids):
        raise ValueError(f"folds must be between 2 and the number of cases ({len(case_ids)}), got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}, got {fold}")
    labels = labels or {}
    rng = np.random.default_rng(seed)
    assignment: dict[str, int] = {}
    dealt = 0
    for group in sorted({labels.get(case, -1) for case in case_ids}):
        members = sorted(case for case in case_ids if labels.get(case, -1) == group)
        for case in (members[i] for i in rng.permutation(len(members))):
            assignment[case] = dealt % folds
            dealt += 1
    validation = (fold + 1) % folds
    splits = {"training": [], "validation": [], "testing": []}
    for case, k in assignment.items():
        splits["testing" if k == fold else "validation" if k == validation else "training"].append(case)
    return {split: sorted(ids) for split, ids in splits.items()}


def load_datalist(path: str | os.PathLike, split: str, base_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The items of one split of a datalist JSON with absolute ``image``/``seg`` paths.

    Relative paths are resolved against ``base_dir`` when given, else the JSON's ``dataset_dir`` (or the JSON's
    own folder when that is missing or no longer exists). Raises ``InputError`` for a missing or invalid file or
    an absent split.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: datalist file not found")
    try:
        datalist = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a valid datalist JSON ({error})") from error
    if not isinstance(datalist, dict):
        raise InputError(f"{path}: not a valid datalist JSON (top level is not an object)")
    if base_dir is None:
        recorded = datalist.get("dataset_dir")
        base_dir = recorded if recorded and Path(recorded).is_dir() else path.resolve().parent
    return load_datalist_dict(datalist, split, base_dir, source=str(path))


def load_datalist_dict(
    datalist: Mapping[str, Any],
    split: str | None,
    base_dir: str | os.PathLike | None = None,
    source: str = "datalist",
) -> list[dict[str, Any]]:
    """Like ``load_datalist`` for an in-memory datalist; ``split=None`` returns the items of every split.

    Refuses (``InputError`` naming the ids) a case id that occurs twice in a split or in two splits: two score
    rows and one overwritten heatmap, or a patient trained on and tested.
    """
    base = Path(base_dir if base_dir is not None else datalist.get("dataset_dir") or ".")
    splits = {name: [_absolute(item, base, source) for item in datalist[name]]
              for name in SPLITS if isinstance(datalist.get(name), list)}
    _check_disjoint_splits(splits, source)
    if split is not None and split not in splits:
        present = sorted(key for key, value in datalist.items() if isinstance(value, list))
        raise InputError(f"{source}: no split {split!r} (splits present: {present})")
    items = [item for name in ([split] if split is not None else splits) for item in splits[name]]
    check_unique_case_ids([item["case_id"] for item in items], source)
    return items


# ------------------------------------------------------------------------------------------------ helpers


def _check_disjoint_splits(splits: Mapping[str, Sequence[Mapping[str, Any]]], source: str) -> None:
    """``InputError`` naming the case ids that stand in two splits."""
    seen: dict[str, str] = {}
    shared: set[str] = set()
    for name, items in splits.items():
        for item in items:
            if seen.setdefault(item["case_id"], name) != name:
                shared.add(f"{item['case_id']} ({seen[item['case_id']]}, {name})")
    if shared:
        raise InputError(f"{source}: cases in two splits (a patient must not be trained on and tested): "
                         f"{', '.join(sorted(shared))}")


def _allocate(n: int, fractions: Sequence[float], deficit: Sequence[float]) -> list[int]:
    """Split ``n`` into counts proportional to ``fractions``, at least 1 per positive fraction when possible.

    Largest remainder rounding; the leftover cases go first to the splits that earlier groups short-changed
    (``deficit``), which keeps the overall split sizes close to the fractions.
    """
    exact = [n * f for f in fractions]
    counts = [math.floor(x + 1e-9) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i] + deficit[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _relative(item: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """The item with its ``PATH_KEYS`` relative to ``root`` (POSIX separators)."""
    out = dict(item)
    for key in PATH_KEYS:
        if key in out:
            out[key] = Path(os.path.relpath(out[key], root)).as_posix()
    return out


def _absolute(item: Mapping[str, Any], base: Path, source: str) -> dict[str, Any]:
    if not isinstance(item, Mapping) or "image" not in item:
        raise InputError(f"{source}: datalist item without an 'image' path: {item!r}")
    out = dict(item)
    out["case_id"] = item_case_id(item, source)
    for key in PATH_KEYS:
        if out.get(key):
            out[key] = os.path.abspath(os.path.join(base, out[key]))  # normalised, symlinks kept
    return out


def inference_items(
    source: str | os.PathLike, split: str = "testing", base_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """The cases to score: a datalist JSON's ``split``, every case of a dataset folder, or one image file.

    Labels are optional: a folder of unlabelled volumes or a single file is scored all the same. ``base_dir``
    resolves a datalist's relative paths when its data has moved.
    """
    if not str(source).strip():
        raise InputError("nothing to score: give --input_path (a datalist JSON, a folder of cases or one file)")
    path = Path(source)
    if path.suffix == ".json":
        return load_datalist(path, split, base_dir)
    if path.is_dir():
        return load_datalist_dict(build_datalist(path, val_fraction=0.0, test_fraction=0.0), split=None)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder to score")
    return [{"case_id": check_case_id(file_case_id(path), str(path)), "image": str(path.resolve())}]


def training_datalist(
    datalist: str | os.PathLike, dataset_dir: str | os.PathLike, output_dir: str | os.PathLike, seed: int = 0
) -> str:
    """The datalist a training run reads: ``datalist`` when given, else one built from ``dataset_dir`` alone.

    Model-zoo bundles are trained with ``--dataset_dir DIR``: then the cases of ``DIR`` are split by patient with
    ``seed`` (60/20/20) and the split is written to ``<output_dir>/datalist.json``, so that the run's validation
    and the later test set are on record. Without either, ``InputError`` says which command builds one.
    """
    if datalist:
        if not Path(datalist).is_file():
            raise InputError(f"{datalist}: datalist file not found (python -m scripts.data.datalist --dataset-dir DIR "
                             "--output FILE builds one, or train with --dataset_dir DIR alone)")
        return str(datalist)
    if not dataset_dir:
        raise InputError("no training data: give --dataset_dir DIR (split by patient on the fly) or --datalist FILE "
                         "(python -m scripts.data.datalist --dataset-dir DIR --output FILE)")
    path = Path(output_dir) / "datalist.json"
    built = build_datalist(dataset_dir, seed=seed)
    write_json(built, path)
    logger.info("%s: %s (split of %s with seed %d)", path, _summary(built), dataset_dir, seed)
    return str(path)


def case_items(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Case items in the bundle's datalist form, from a bundle datalist or from a MONAI Label datastore.

    MONAI Label's ``BundleTrainTask`` hands over ``{"image": path, "label": path}`` for every study with a final
    label: there ``label`` is the study's lesion mask, which becomes ``seg`` (an all-zero mask marks a normal study;
    the lesion slices of a non-empty one are left out of training like any abnormal slice). ``case_id`` defaults
    to the image's file name without its extension. Bundle datalist items pass through unchanged.
    """
    out = []
    for item in items:
        case = dict(item)
        label = case.get("label")
        if isinstance(label, (str, os.PathLike)) and not str(label).strip().lstrip("-").isdigit():
            case["seg"] = str(case.pop("label"))
        case["case_id"] = item_case_id(case)
        out.append(case)
    check_unique_case_ids([case["case_id"] for case in out])
    return out


def _summary(datalist: Mapping[str, Any]) -> str:
    parts = []
    for split in SPLITS:
        items = datalist[split]
        abnormal = sum(1 for item in items if item.get("label") == 1)
        normal = sum(1 for item in items if item.get("label") == 0)
        parts.append(f"{split}: {len(items)} ({normal} normal, {abnormal} abnormal)")
    return f"{datalist['layout']} layout, " + "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build the datalist of a folder and write it as JSON."""
    parser = argparse.ArgumentParser(prog="python -m scripts.data.datalist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", required=True, help="dataset folder (BraTS, MSD Task01, volumes or 2D images)")
    parser.add_argument("--output", required=True, help="datalist JSON to write")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS)
    parser.add_argument("--labels-csv", help="2D images: CSV image_id,label (benign|malignant, normal|abnormal, 0|1)")
    parser.add_argument("--masks-dir", help="2D images: folder of <image_id>_segmentation.png or <image_id>.png masks")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channel", type=int, default=0, help="MSD: FLAIR channel of the 4D images (default 0)")
    parser.add_argument("--folds", type=int, default=0, help="patient-level cross-validation with this many folds")
    parser.add_argument("--fold", type=int, default=0, help="with --folds: which fold is the test set")
    args = parser.parse_args(argv)
    try:
        datalist = build_datalist(
            args.dataset_dir, args.layout, args.labels_csv, args.masks_dir,
            args.val_fraction, args.test_fraction, args.seed, args.channel, args.folds, args.fold,
        )
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_json(datalist, args.output)
    print(f"{args.output}: {_summary(datalist)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
