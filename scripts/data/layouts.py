"""Dataset layouts: find the cases of a folder and their lesion masks and labels.

Layouts (``detect_layout`` picks one):

- ``brats``: ``<case>/<case>_flair.<ext>`` with an optional ``<case>_seg.<ext>`` (BraTS 2013-2021 naming), the case
  folders optional (a flat folder of ``<case>_flair.<ext>`` works the same), and an optional
  ``<case>_brainmask.<ext>`` (used with ``brain_mask: "file"``);
- ``volumes``: any volume files (``<case>.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``), flat or in sub-folders, each a
  case, with an optional ``<case>_seg.<ext>`` beside it (what a scanner export or a folder of unlabelled scans is);
- ``msd``: Medical Segmentation Decathlon Task01 (``dataset.json``, 4D ``imagesTr/``, ``labelsTr/``);
- ``images``: a folder of JPEG/PNG images with an optional ``image_id,label`` CSV and a masks folder.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from scripts.data.io import InputError, read_mask
from scripts.data.rules import file_case_id, strip_suffix

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "brats", "msd", "volumes", "images")
BRAIN_MASK_SUFFIX = "_brainmask"
MASK_SUFFIXES = ("_seg", BRAIN_MASK_SUFFIX, "_mask", "_label")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_NAME_PATTERNS = ("{}_segmentation.png", "{}.png")
NORMAL_LABELS = {"benign", "normal", "0", "0.0", "false"}
ABNORMAL_LABELS = {"malignant", "abnormal", "1", "1.0", "true"}


def detect_layout(dataset_dir: str | os.PathLike) -> str:
    """``msd`` when ``dataset.json`` and ``imagesTr/`` exist, ``brats`` when ``*_flair`` volumes exist, ``volumes``
    when other volume files exist, else ``images``."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found")
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "msd"
    if any(strip_suffix(p.name, VOLUME_SUFFIXES) for p in root.rglob("*_flair.*") if _visible(p)):
        return "brats"
    if _volume_files(root):
        return "volumes"
    if any(_is_image(p) for p in root.rglob("*")):
        return "images"
    raise InputError(f"{root}: no volumes (.nii.gz, .nii, .mha, .nrrd), MSD dataset.json or JPEG/PNG images found")


def find_brats_cases(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One item per ``<case>_flair.<ext>`` found below ``dataset_dir`` (case folders or flat); the case id is the
    file's ``<case>`` prefix; labelled when a ``<case>_seg.<ext>`` beside it is readable."""
    root = Path(dataset_dir)
    flairs: dict[str, Path] = {}
    for path in sorted(root.rglob("*_flair.*"), key=_volume_priority):
        stem = strip_suffix(path.name, VOLUME_SUFFIXES)
        if stem is None or not _visible(path) or not path.is_file():
            continue
        case_id = stem[: -len("_flair")]
        if case_id in flairs and flairs[case_id].parent != path.parent:
            raise InputError(f"{path}: case {case_id!r} also found at {flairs[case_id]} (case ids must be unique)")
        flairs.setdefault(case_id, path)
    if not flairs:
        raise InputError(f"{root}: no <case>_flair.<ext> volumes found (ext: {', '.join(VOLUME_SUFFIXES)})")
    return [_volume_item(case_id, flair, _find_seg(flair, "_flair"), _find_seg(flair, "_flair", BRAIN_MASK_SUFFIX))
            for case_id, flair in sorted(flairs.items())]


def find_volume_cases(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One item per volume file below ``dataset_dir`` (masks beside them excluded); the case id is the file name
    without its extension; labelled when a ``<case>_seg.<ext>`` beside it is readable."""
    root = Path(dataset_dir)
    volumes = _volume_files(root)
    if not volumes:
        raise InputError(f"{root}: no volume files found (ext: {', '.join(VOLUME_SUFFIXES)})")
    cases: dict[str, Path] = {}
    for path in volumes:
        case_id = file_case_id(path)
        if case_id in cases:
            raise InputError(f"{path}: case {case_id!r} also found at {cases[case_id]} (case ids must be unique)")
        cases[case_id] = path
    return [_volume_item(case_id, path, _find_seg(path, ""), _find_seg(path, "", BRAIN_MASK_SUFFIX))
            for case_id, path in sorted(cases.items())]


def _volume_files(root: Path) -> list[Path]:
    """Volume files below ``root``, one per stem (NIfTI preferred), without the masks that sit beside them."""
    found: dict[tuple[Path, str], Path] = {}
    for path in sorted(root.rglob("*"), key=_volume_priority):
        stem = strip_suffix(path.name, VOLUME_SUFFIXES)
        if stem is None or not _visible(path) or not path.is_file() or stem.lower().endswith(MASK_SUFFIXES):
            continue
        found.setdefault((path.parent, stem), path)
    return sorted(found.values())


def _volume_item(case_id: str, image: Path, seg: Path | None, brainmask: Path | None = None) -> dict[str, Any]:
    """A case item; the label comes from the mask, and a mask that cannot be read is kept (its case then fails on
    its own, with the file named) rather than stopping the whole datalist. A ``<case>_brainmask`` beside the
    volume is listed for ``brain_mask: "file"``."""
    item: dict[str, Any] = {"case_id": case_id, "image": str(image)}
    if brainmask is not None:
        item["brainmask"] = str(brainmask)
    if seg is not None:
        item["seg"] = str(seg)
        try:
            item["label"] = _has_lesion(seg)
        except InputError as error:
            logger.error("case %s: lesion mask unreadable, case kept without a label: %s", case_id, error)
    return item


def find_msd_cases(dataset_dir: str | os.PathLike, channel: int = 0) -> list[dict[str, Any]]:
    """One item per ``imagesTr/*.nii.gz`` of an MSD task (macOS ``._*`` files skipped), FLAIR ``channel`` set."""
    root = Path(dataset_dir)
    nifti = (".nii.gz", ".nii")
    images = sorted(p for p in (root / "imagesTr").glob("*.nii*") if _visible(p) and strip_suffix(p.name, nifti))
    if not images:
        raise InputError(f"{root / 'imagesTr'}: no .nii.gz images found (MSD layout)")
    items = []
    for image in images:
        case_id = strip_suffix(image.name, nifti)
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
        image_id = strip_suffix(row[0].strip(), IMAGE_SUFFIXES) or row[0].strip()
        labels[image_id] = _parse_label(path, line, row[1])
    return labels


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


def _find_seg(image: Path, image_suffix: str, mask: str = "_seg") -> Path | None:
    """``<case>_seg.<ext>`` (or another ``mask`` suffix) beside a volume named ``<case><image_suffix>.<ext>``, any of
    the volume extensions."""
    stem = strip_suffix(image.name, VOLUME_SUFFIXES)
    prefix = stem[: len(stem) - len(image_suffix)]
    for suffix in VOLUME_SUFFIXES:
        candidate = image.parent / f"{prefix}{mask}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _find_mask_2d(masks: Path, case_id: str) -> Path | None:
    for pattern in MASK_NAME_PATTERNS:
        candidate = masks / pattern.format(case_id)
        if candidate.is_file():
            return candidate
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
