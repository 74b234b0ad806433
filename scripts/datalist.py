"""Datalist builder: a dataset folder -> MONAI-style datalist JSON with a patient-level, seeded split.

Three layouts are understood (``auto`` picks one):

- ``brats``: ``<case>/<case>_flair.<ext>`` with an optional ``<case>_seg.<ext>`` (BraTS 2013-2021 naming);
- ``msd``: Medical Segmentation Decathlon Task01 (``dataset.json``, 4D ``imagesTr/``, ``labelsTr/``);
- ``images``: a folder of JPEG/PNG images with an optional ``image_id,label`` CSV and a masks folder.

Splitting is by ``case_id`` so that slices of one patient never leak between training and evaluation, and is
stratified by label so that every split sees both classes when the data allow it. Paths are stored relative to
``dataset_dir`` so a datalist survives moving the dataset; ``load_datalist`` makes them absolute again.

CLI::

    python -m scripts.datalist --dataset-dir DIR --output datalist.json [--layout auto|brats|msd|images]
        [--labels-csv F] [--masks-dir D] [--val-fraction 0.2] [--test-fraction 0.2] [--seed 0] [--channel 0]
        [--folds K --fold I]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.io import InputError, read_mask

SPLITS = ("training", "validation", "testing")
LAYOUTS = ("auto", "brats", "msd", "images")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_NAME_PATTERNS = ("{}_segmentation.png", "{}.png")
NORMAL_LABELS = {"benign", "normal", "0", "0.0", "false"}
ABNORMAL_LABELS = {"malignant", "abnormal", "1", "1.0", "true"}


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
    """Like ``load_datalist`` for an in-memory datalist; ``split=None`` returns the items of every split."""
    base = Path(base_dir if base_dir is not None else datalist.get("dataset_dir") or ".")
    names = [name for name in SPLITS if isinstance(datalist.get(name), list)] if split is None else [split]
    items: list[dict[str, Any]] = []
    for name in names:
        if not isinstance(datalist.get(name), list):
            present = sorted(key for key, value in datalist.items() if isinstance(value, list))
            raise InputError(f"{source}: no split {name!r} (splits present: {present})")
        items.extend(_absolute(item, base, source) for item in datalist[name])
    return items


def detect_layout(dataset_dir: str | os.PathLike) -> str:
    """``msd`` when ``dataset.json`` and ``imagesTr/`` exist, ``brats`` when ``*_flair`` volumes exist, else ``images``."""
    root = Path(dataset_dir)
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "msd"
    if any(_strip_suffix(p.name, VOLUME_SUFFIXES) for p in root.rglob("*_flair.*") if _visible(p)):
        return "brats"
    if any(_is_image(p) for p in root.rglob("*")):
        return "images"
    raise InputError(f"{root}: no FLAIR volumes (<case>_flair.nii.gz), MSD dataset.json or JPEG/PNG images found")


# ------------------------------------------------------------------------------------------------ layouts


def find_brats_cases(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One item per ``<case>/<case>_flair.<ext>`` found below ``dataset_dir``; labelled when a seg exists."""
    root = Path(dataset_dir)
    flairs: dict[str, Path] = {}
    for path in sorted(root.rglob("*_flair.*"), key=_volume_priority):
        stem = _strip_suffix(path.name, VOLUME_SUFFIXES)
        if stem is None or not _visible(path) or not path.is_file():
            continue
        case_id = path.parent.name
        if case_id in flairs and flairs[case_id].parent != path.parent:
            raise InputError(f"{path}: case {case_id!r} also found at {flairs[case_id]} (case folders must be unique)")
        flairs.setdefault(case_id, path)
    if not flairs:
        raise InputError(f"{root}: no <case>/<case>_flair.<ext> volumes found (ext: {', '.join(VOLUME_SUFFIXES)})")
    items = []
    for case_id, flair in sorted(flairs.items()):
        item: dict[str, Any] = {"case_id": case_id, "image": str(flair)}
        seg = _find_seg(flair)
        if seg is not None:
            item.update(seg=str(seg), label=_has_lesion(seg))
        items.append(item)
    return items


def find_msd_cases(dataset_dir: str | os.PathLike, channel: int = 0) -> list[dict[str, Any]]:
    """One item per ``imagesTr/*.nii.gz`` of an MSD task (macOS ``._*`` files skipped), FLAIR ``channel`` set."""
    root = Path(dataset_dir)
    nifti = (".nii.gz", ".nii")
    images = sorted(p for p in (root / "imagesTr").glob("*.nii*") if _visible(p) and _strip_suffix(p.name, nifti))
    if not images:
        raise InputError(f"{root / 'imagesTr'}: no .nii.gz images found (MSD layout)")
    items = []
    for image in images:
        case_id = _strip_suffix(image.name, nifti)
        item: dict[str, Any] = {"case_id": case_id, "image": str(image), "channel": int(channel)}
        seg = root / "labelsTr" / image.name
        if seg.is_file():
            item.update(seg=str(seg), label=_has_lesion(seg))
        items.append(item)
    return items


def find_image_cases(
    dataset_dir: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    masks_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """One item per JPEG/PNG image below ``dataset_dir`` (masks excluded), with CSV labels and masks when given."""
    root = Path(dataset_dir)
    masks = Path(masks_dir).resolve() if masks_dir else None
    if masks is not None and not masks.is_dir():
        raise InputError(f"{masks_dir}: masks folder not found")
    images: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if not _is_image(path) or path.stem.endswith("_segmentation") or (masks and masks in path.resolve().parents):
            continue
        if path.stem in images:
            raise InputError(f"{path}: image id {path.stem!r} also found at {images[path.stem]}")
        images[path.stem] = path
    if not images:
        raise InputError(f"{root}: no images found (expected {', '.join(IMAGE_SUFFIXES)} files)")
    labels = read_labels_csv(labels_csv) if labels_csv else {}
    items = []
    for case_id, path in sorted(images.items()):
        item: dict[str, Any] = {"case_id": case_id, "image": str(path)}
        mask = _find_mask_2d(masks, case_id) if masks else None
        if mask is not None:
            item["seg"] = str(mask)
        if case_id in labels:
            item["label"] = labels[case_id]
        items.append(item)
    return items


def read_labels_csv(path: str | os.PathLike) -> dict[str, int]:
    """``image_id -> 0|1`` from a CSV with header ``image_id,label`` (or none, as the official ISIC files).

    benign/normal/0 -> 0 and malignant/abnormal/1 -> 1; any other value raises ``InputError`` naming the row.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: labels CSV not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if rows and [cell.strip().lower() for cell in rows[0][:2]] == ["image_id", "label"]:
        rows, first_line = rows[1:], 2
    else:
        first_line = 1
    labels: dict[str, int] = {}
    for line, row in enumerate(rows, start=first_line):
        if len(row) < 2:
            raise InputError(f"{path}: row {line}: expected 'image_id,label', got {','.join(row)!r}")
        image_id = _strip_suffix(row[0].strip(), IMAGE_SUFFIXES) or row[0].strip()
        labels[image_id] = _parse_label(path, line, row[1])
    return labels


# ------------------------------------------------------------------------------------------------ helpers


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


def _parse_label(path: Path, line: int, value: str) -> int:
    text = value.strip().lower()
    if text in NORMAL_LABELS:
        return 0
    if text in ABNORMAL_LABELS:
        return 1
    raise InputError(f"{path}: row {line}: unknown label {value!r} (expected benign/normal/0 or malignant/abnormal/1)")


def _has_lesion(seg: Path) -> int:
    """1 when the segmentation has any nonzero voxel, else 0 (the volume-level label)."""
    return int(read_mask(seg).any())


def _find_seg(flair: Path) -> Path | None:
    """``<case>_seg.<ext>`` beside a FLAIR volume, any of the volume extensions."""
    stem = _strip_suffix(flair.name, VOLUME_SUFFIXES)
    prefix = stem[: -len("_flair")]
    for suffix in VOLUME_SUFFIXES:
        candidate = flair.parent / f"{prefix}_seg{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _find_mask_2d(masks: Path, case_id: str) -> Path | None:
    for pattern in MASK_NAME_PATTERNS:
        candidate = masks / pattern.format(case_id)
        if candidate.is_file():
            return candidate
    return None


def _strip_suffix(name: str, suffixes: Sequence[str]) -> str | None:
    """``name`` without the first matching suffix (case-insensitive), or None when none matches."""
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _volume_priority(path: Path) -> tuple[str, int, str]:
    """Sort key: folder first, then the preferred extension (NIfTI before MHA/NRRD)."""
    rank = next((i for i, s in enumerate(VOLUME_SUFFIXES) if path.name.lower().endswith(s)), len(VOLUME_SUFFIXES))
    return (str(path.parent), rank, path.name)


def _visible(path: Path) -> bool:
    """False for hidden files and macOS resource forks (``._name``)."""
    return not path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and _visible(path) and path.is_file()


def _relative(item: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """The item with ``image``/``seg`` relative to ``root`` (POSIX separators)."""
    out = dict(item)
    for key in ("image", "seg"):
        if key in out:
            out[key] = Path(os.path.relpath(out[key], root)).as_posix()
    return out


def _absolute(item: Mapping[str, Any], base: Path, source: str) -> dict[str, Any]:
    if not isinstance(item, Mapping) or "image" not in item:
        raise InputError(f"{source}: datalist item without an 'image' path: {item!r}")
    out = dict(item)
    out.setdefault("case_id", Path(str(item["image"])).name.split(".")[0])
    for key in ("image", "seg"):
        if out.get(key):
            out[key] = os.path.abspath(os.path.join(base, out[key]))  # normalised, symlinks kept
    return out


def write_json_atomic(data: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON through a temp file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    parser = argparse.ArgumentParser(prog="python -m scripts.datalist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", required=True, help="dataset folder (BraTS, MSD Task01 or 2D images)")
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
    write_json_atomic(datalist, args.output)
    print(f"{args.output}: {_summary(datalist)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
