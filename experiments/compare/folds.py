"""Patient-level folds of the comparison: one datalist per fold, written into the output folder."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.data.datalist import build_datalist, fold_cases, load_datalist_dict
from scripts.data.io import InputError, write_json
from scripts.data.layouts import detect_layout

logger = logging.getLogger("experiments.compare")


@dataclass
class Fold:
    name: str
    folder: Path
    datalist: Path


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
        try:  # the datalist's own rule: a case id in two splits is one patient trained on and tested
            load_datalist_dict(split, None, source="--train/--test")
        except InputError as error:
            raise SystemExit(f"{error}; rename one site's cases") from error
        folds.append(_write_fold(out, "fold_0", train, split))
        described = {"mode": "train/test", "train": str(Path(args.train).resolve()), "test": str(Path(args.test).resolve()),
                     "layout": train["layout"], "n_cases": sum(len(v) for v in split.values()), "n_folds": 1}
    return folds, described


def _write_fold(out: Path, name: str, source: dict, split: dict[str, list[dict]]) -> Fold:
    folder = out / name
    data = {"name": f"{source['name']} {name}", "layout": source["layout"], "dataset_dir": "", **split}
    write_json(data, folder / "datalist.json")
    logger.info("%s: %s", name, ", ".join(f"{s} {len(v)} cases" for s, v in split.items()))
    return Fold(name, folder, folder / "datalist.json")
