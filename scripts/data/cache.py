"""The slice cache: cases (volumes or 2D images) -> labelled slice records at network resolution.

Decoding a NIfTI volume costs far more than a training step on its slices, so every case is read, normalised,
sliced and resized once; the result is kept in memory and, with ``cache_dir``, in a compact ``.npz`` per case
(float16 images, keyed by the file's content and the slicing parameters) so that the next
run starts at once. A case that cannot be read is reported with its file and skipped; the others are kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from scripts.data.brain import case_preprocessing, describe
from scripts.data.datalist import PATH_KEYS, case_items
from scripts.data.io import InputError, cache_file, write_atomic
from scripts.data.transforms import LoadCased, VolumeToSlicesd

logger = logging.getLogger(__name__)

RECORD_ARRAYS = ("image", "brain", "seg", "slice_index", "label")


def case_to_slices(
    image_size: int, min_brain_fraction: float = 0.1, min_lesion_voxels: int = 20,
    preprocessing: Sequence[Callable] = (), channels: int | None = None,
) -> Compose:
    """The per-case pipeline: read (RAS), ``preprocessing`` (``brain.case_preprocessing``: brain extraction, bias
    field, normalisation), cut into labelled resized slices."""
    steps = [LoadCased(channels=channels), *preprocessing, VolumeToSlicesd(image_size, min_brain_fraction, min_lesion_voxels)]
    return Compose(steps, map_items=False)


class _CaseDataset(Dataset):
    """One item per case; returns the case's slice arrays, or the error that stopped it."""

    def __init__(self, items: Sequence[dict], pipeline: Compose, cache_dir: Path | None, params: dict) -> None:
        self.items, self.pipeline, self.cache_dir, self.params = list(items), pipeline, cache_dir, params

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        cache_file = self._cache_file(item)
        if cache_file is not None and cache_file.exists():
            with np.load(cache_file) as cached:
                return {"case_id": item["case_id"], **{k: cached[k] for k in cached.files}}
        try:
            out = self.pipeline(dict(item))
        except Exception as error:  # reported with the file by the caller; one bad case never stops the rest
            return {"case_id": item["case_id"], "error": _root_message(error)}
        arrays = {k: np.asarray(out[k]) for k in RECORD_ARRAYS if k in out}
        arrays["image"] = arrays["image"].astype(np.float16)
        if cache_file is not None:
            write_atomic(cache_file, lambda handle: np.savez(handle, **arrays))
        return {"case_id": item["case_id"], **arrays}

    def _cache_file(self, item: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        files = [item[key] for key in PATH_KEYS if item.get(key)]
        return cache_file(self.cache_dir, item["case_id"], files, [self.params, [item.get("label"), item.get("channel")]])


def build_slice_records(
    items: Sequence[dict],
    image_size: int,
    min_brain_fraction: float = 0.1,
    min_lesion_voxels: int = 20,
    preprocessing: Sequence[Callable] | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    labels: Sequence[int] | None = None,
    channels: int | None = None,
) -> list[dict[str, Any]]:
    """Slice records (see docs/architecture.md) of every readable case, optionally only some ``labels``.

    ``preprocessing`` defaults to ``brain.case_preprocessing()`` (normalisation only: skull-stripped input).
    """
    steps = case_preprocessing() if preprocessing is None else list(preprocessing)
    params = {"image_size": image_size, "min_brain_fraction": min_brain_fraction,
              "min_lesion_voxels": min_lesion_voxels, "preprocessing": describe(steps), "version": 3}
    cache = Path(cache_dir) if cache_dir else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    pipeline = case_to_slices(image_size, min_brain_fraction, min_lesion_voxels, steps, channels)
    loader = DataLoader(_CaseDataset(items, pipeline, cache, params), batch_size=None, num_workers=num_workers)
    records: list[dict[str, Any]] = []
    failed: list[str] = []
    for case in tqdm(loader, total=len(items), desc="slicing cases", unit="case", disable=len(items) < 2):
        if "error" in case:
            logger.error("skipped case %s: %s", case["case_id"], case["error"])
            failed.append(case["case_id"])
            continue
        records.extend(_case_records(case, labels))
    if items and not records:
        raise RuntimeError(f"no usable slices in {len(items)} cases ({len(failed)} could not be read; see the log)")
    return records


def _case_records(case: dict[str, Any], labels: Sequence[int] | None) -> list[dict[str, Any]]:
    """Split a case's stacked arrays into one record per slice.

    An abnormal record (label 1) is kept only with a lesion in its mask: records serve training and calibration
    on normal tissue, and without a mask nothing says which of its pixels are normal (lesion-free training
    ignores the lesion pixels only where it knows them).
    """
    out = []
    for i, label in enumerate(np.asarray(case["label"]).tolist()):
        if labels is not None and label not in labels:
            continue
        if label == 1 and ("seg" not in case or not np.asarray(case["seg"][i]).any()):
            continue
        record = {"case_id": case["case_id"], "slice_index": int(case["slice_index"][i]), "label": int(label)}
        for key in ("image", "brain", "seg"):
            if key in case:
                record[key] = np.asarray(case[key][i])
        out.append(record)
    return out


class SafeCaseDataset(MonaiDataset):
    """A MONAI ``Dataset`` of cases whose failures become ``{"case_id", "error"}`` items instead of exceptions.

    Inference over an archive must not lose every result because one file is corrupt: the evaluator passes
    error items through and the writer lists them in ``errors.csv``.
    """

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as error:
            item = self.data[index]
            return {"case_id": str(item.get("case_id", index)), "error": _root_message(error)}


def _root_message(error: BaseException) -> str:
    """What went wrong, in the bundle's words: the ``InputError`` (which names the file) inside MONAI's wrapping of
    transform errors, else the innermost cause."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    ours = [e for e in chain if isinstance(e, InputError)]
    found = ours[0] if ours else chain[-1]
    return f"{type(found).__name__}: {found}"


class SliceDataset(MonaiDataset):
    """A MONAI ``Dataset`` of the slice records of cases: ``slicer`` (``build_slice_records`` with its settings,
    the ``slices`` config id) cuts ``data`` (case items, see ``case_items``) into records, ``transform`` applies
    per record. Its ``data`` is the list of cases, so MONAI Label's ``train#dataset#data`` override works.
    ``labels``, when given, replaces the slicer's choice of slice labels (``lesion_free``: ``[0, 1]``)."""

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        slicer: Callable[..., list[dict[str, Any]]],
        transform: Callable | None = None,
        labels: Sequence[int] | None = None,
    ) -> None:
        self.cases = case_items(data)
        records = slicer(self.cases) if labels is None else slicer(self.cases, labels=list(labels))
        super().__init__(records, transform)
