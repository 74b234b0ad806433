"""Lesion-centred crops of a dermoscopy folder: the data of the "benign lesion tissue is normal" malignancy probe.

::

    python -m experiments.lesion_crops --dataset ../shared/data/isic2016/train \
        --labels-csv ../shared/data/isic2016/train_labels.csv --masks-dir ../shared/data/isic2016/train_masks \
        --output /tmp/isic_crops --margin 0.25

Each picture with a non-empty lesion mask is cut to the square around its lesion's bounding box, widened by
``margin`` of the box's longer side on each side (clipped at the picture's edge), and resized to ``--size``. The
output is a folder in the bundle's ``images`` layout (``OUT/train/<id>.png``, ``OUT/train_masks/<id>_segmentation.png``,
``OUT/train_labels.csv``), so ``python -m experiments.compare --dataset OUT/train`` trains on the benign crops and
scores benign against malignant lesions (docs/results.md, "Malignancy"). Pictures without a mask, or with an empty
one, are listed and left out: the crop needs the lesion. The masks are read for the crop only, never the labels.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Resize
from monai.transforms.utils import generate_spatial_bounding_box

from scripts.data.io import make_folder, read_image_2d, read_mask_2d, save_png_atomic
from scripts.data.layouts import find_image_cases
from scripts.outputs.formats import write_table

logger = logging.getLogger("experiments.lesion_crops")


def lesion_box(lesion: np.ndarray, margin: float) -> tuple[slice, slice]:
    """The square ``(rows, cols)`` window around the lesion of ``lesion`` ``(1, H, W)``, widened by ``margin`` of
    its longer side on each side and clipped at the picture's edge."""
    start, end = generate_spatial_bounding_box(lesion)
    centre = [(s + e) / 2 for s, e in zip(start, end)]
    half = max(e - s for s, e in zip(start, end)) * (0.5 + margin)
    window = []
    for c, size in zip(centre, lesion.shape[1:]):
        window.append(slice(max(0, int(np.floor(c - half))), min(size, int(np.ceil(c + half)))))
    return window[0], window[1]


def crop_case(image_path: str, mask_path: str, margin: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The picture and its mask cut to ``lesion_box`` and resized to ``size``: uint8 ``(C, size, size)`` and
    ``(size, size)`` (0/255)."""
    image = read_image_2d(image_path)
    lesion = read_mask_2d(mask_path, image.shape)
    if not lesion.any():
        raise ValueError(f"{mask_path}: the lesion mask is empty")
    rows, cols = lesion_box(lesion, margin)
    picture = Resize((size, size), mode="bilinear", anti_aliasing=True)(torch.as_tensor(image[:, rows, cols]))
    mask = Resize((size, size), mode="nearest")(torch.as_tensor(lesion[:, rows, cols]))
    picture = np.clip(np.asarray(picture) * 255 + 0.5, 0, 255).astype(np.uint8)
    return picture, (np.asarray(mask)[0] > 0).astype(np.uint8) * 255


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="a folder of dermoscopy pictures")
    parser.add_argument("--labels-csv", required=True, help="its image_id,label CSV")
    parser.add_argument("--masks-dir", required=True, help="its lesion masks")
    parser.add_argument("--output", required=True)
    parser.add_argument("--margin", type=float, default=0.25, help="skin kept around the lesion, share of its size")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.output)
    pictures, masks = make_folder(out / "train"), make_folder(out / "train_masks")
    rows, skipped = [], []
    for item in find_image_cases(args.dataset, args.labels_csv, args.masks_dir):
        missing = [what for key, what in (("seg", "lesion mask"), ("label", "label")) if key not in item]
        if missing:
            skipped.append(f"{item['case_id']}: no {' and no '.join(missing)}")
            continue
        try:
            picture, mask = crop_case(item["image"], item["seg"], args.margin, args.size)
        except ValueError as error:  # InputError included: named in the list, the others are cropped
            skipped.append(f"{item['case_id']}: {error}")
            continue
        save_png_atomic(picture, pictures / f"{item['case_id']}.png")
        save_png_atomic(mask, masks / f"{item['case_id']}_segmentation.png")
        rows.append((item["case_id"], "malignant" if item["label"] else "benign"))
    write_table(out / "train_labels.csv", ["image_id", "label"], rows)
    for line in skipped:
        logger.warning("left out %s", line)
    logger.info("%d lesion crops (%d malignant) in %s; %d pictures left out", len(rows),
                sum(label == "malignant" for _, label in rows), out / "train", len(skipped))
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
