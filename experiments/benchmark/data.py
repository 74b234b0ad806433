"""The benchmark's inputs: BraTS-size phantom volumes on disk and normalised phantom slices in memory."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from experiments.benchmark.common import lazy_torch


def _generate_one(folder: str, index: int, shape: tuple[int, int, int]) -> None:
    """One phantom (``scripts.data.synthetic``) as ``BENCH_XXX/BENCH_XXX_{flair,seg}.nii.gz`` in ``folder``."""
    from scripts.data.synthetic import generate_dataset

    case_id = f"BENCH_{index:03d}"
    final = Path(folder) / case_id
    if (final / f"{case_id}_flair.nii.gz").exists():
        return
    scratch = Path(tempfile.mkdtemp(dir=folder, prefix=f".{case_id}."))
    try:
        generate_dataset(scratch, n_cases=1, shape=shape, seed=index, abnormal_fraction=float(index % 2))
        (scratch / "SYN_000" / "SYN_000_flair.nii.gz").rename(scratch / "SYN_000" / f"{case_id}_flair.nii.gz")
        (scratch / "SYN_000" / "SYN_000_seg.nii.gz").rename(scratch / "SYN_000" / f"{case_id}_seg.nii.gz")
        shutil.rmtree(final, ignore_errors=True)
        (scratch / "SYN_000").rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def default_data_dir(shape: Sequence[int]) -> Path:
    return Path(tempfile.gettempdir()) / "patchgan_benchmark" / f"volumes_{'x'.join(map(str, shape))}"


def ensure_volumes(args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    """The first ``--volumes`` cases of ``--data-dir``; synthetic BraTS-size phantoms are generated (in parallel,
    kept for the next run) when no folder is given. Returns the items and the seconds spent generating."""
    from scripts.data.datalist import inference_items

    seconds = 0.0
    if args.data_dir is None:
        folder = default_data_dir(args.volume_shape)
        folder.mkdir(parents=True, exist_ok=True)
        missing = [i for i in range(args.volumes) if not (folder / f"BENCH_{i:03d}" / f"BENCH_{i:03d}_flair.nii.gz").exists()]
        if missing:
            start = time.perf_counter()
            workers = max(1, min(len(missing), os.cpu_count() or 1))
            print(f"benchmark: generating {len(missing)} synthetic volumes {tuple(args.volume_shape)} in {folder}",
                  file=sys.stderr)
            if workers == 1:
                for i in missing:
                    _generate_one(str(folder), i, tuple(args.volume_shape))
            else:
                with ProcessPoolExecutor(workers) as pool:
                    list(pool.map(_generate_one, [str(folder)] * len(missing), missing,
                                  [tuple(args.volume_shape)] * len(missing)))
            seconds = time.perf_counter() - start
        args.data_dir = str(folder)
    items = [item for item in inference_items(args.data_dir, split="training") if item.get("image")]
    items = sorted(items, key=lambda item: item["case_id"])
    if len(items) < args.volumes:
        raise SystemExit(f"{args.data_dir}: {len(items)} cases, --volumes asks for {args.volumes}")
    return items[: args.volumes], seconds


def write_datalist(path: Path, items: Sequence[dict[str, Any]], split: str, keep_seg: bool) -> Path:
    keys = ("case_id", "image", "seg", "label", "channel") if keep_seg else ("case_id", "image", "channel")
    rows = [{k: item[k] for k in keys if k in item} for item in items]
    path.write_text(json.dumps({"name": "benchmark", "layout": "brats", "dataset_dir": "", split: rows}, indent=1))
    return path


def phantom_slices(image_size: int, n: int, seed: int = 0):
    """``n`` normalised brain-like axial slices ``(n, 1, S, S)`` (background 0), from a ``scripts.data.synthetic``
    phantom at ``image_size``: inputs with real structure and a real foreground for the inferer."""
    torch = lazy_torch()
    from scripts.data.synthetic import make_phantom
    from scripts.data.transforms import BrainPercentileNormalized

    depth = max(16, 2 * n)
    flair, _ = make_phantom((image_size, image_size, depth), np.random.default_rng(seed), abnormal=True)
    volume = BrainPercentileNormalized("image").normalise(flair[None])
    middle = depth // 2 - n // 2
    return torch.as_tensor(volume[..., middle : middle + n]).permute(3, 0, 1, 2).contiguous()
