"""The embedded demo dataset: deterministic brain-like FLAIR phantoms in the BraTS layout.

Real brain MRI cannot ship with the bundle, yet the demo, the tests and a first training run need volumes that
behave like skull-stripped FLAIR: a brain of varying size and shape on an exactly-zero background, grey/white
matter contrast, dark CSF ventricles lined by a thin bright rim (normal FLAIR has bright tissue too), smooth
texture, a multiplicative bias field and noise. Abnormal cases get one or two irregular lesions at any axial level
of the brain, of varied size, shape, texture and contrast, from nearly iso-intense to grey matter to brighter than
the ventricle lining, as real FLAIR lesions are; a lesion replaces the anatomy it covers. The same volume then
has normal slices (away from the lesion) and abnormal ones, and neither the brightest voxel nor the slice's
position gives the answer away.

Odd-numbered cases are stored in LPS orientation (the array flipped in x and y, affine ``diag(-1, -1, 1)``), even
ones in RAS, so that reorientation code is exercised; after reorientation to RAS both look alike.

CLI::

    python -m scripts.data.synthetic --output DIR [--cases 12] [--shape 96 96 48] [--seed 0] [--abnormal-fraction 0.5]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from scripts.data.io import save_nifti_atomic

LESION_LABEL = 2
WHITE_MATTER, GREY_MATTER, CSF = 1.0, 1.2, 0.3


def generate_dataset(
    output_dir: str | os.PathLike,
    n_cases: int = 12,
    shape: Sequence[int] = (96, 96, 48),
    seed: int = 0,
    abnormal_fraction: float = 0.5,
) -> list[str]:
    """Write ``n_cases`` phantoms as ``output_dir/SYN_XXX/SYN_XXX_{flair,seg}.nii.gz``; returns the case ids.

    ``round(abnormal_fraction * n_cases)`` cases, chosen with ``seed``, have lesions; the others have an all-zero
    seg. Each case draws from its own generator seeded by ``(seed, index)``, so the files are byte-identical
    between runs.
    """
    if n_cases < 1 or not 0.0 <= abnormal_fraction <= 1.0:
        raise ValueError(f"need n_cases >= 1 and 0 <= abnormal_fraction <= 1, got {n_cases}, {abnormal_fraction}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes of at least 16 voxels, got {shape}")
    n_abnormal = int(np.floor(abnormal_fraction * n_cases + 0.5))
    abnormal = set(np.random.default_rng(seed).permutation(n_cases)[:n_abnormal].tolist())
    case_ids = []
    for index in range(n_cases):
        case_id = f"SYN_{index:03d}"
        flair, seg = make_phantom(shape, np.random.default_rng([seed, index]), index in abnormal)
        affine = case_affine(shape, lps=index % 2 == 1)
        if index % 2 == 1:  # same anatomy stored LPS: flip the array along x and y
            flair, seg = flair[::-1, ::-1].copy(), seg[::-1, ::-1].copy()
        folder = Path(output_dir) / case_id
        save_nifti_atomic(flair, affine, folder / f"{case_id}_flair.nii.gz")
        save_nifti_atomic(seg, affine, folder / f"{case_id}_seg.nii.gz")
        case_ids.append(case_id)
    return case_ids


def case_affine(shape: Sequence[int], lps: bool) -> np.ndarray:
    """1 mm affine centred on the volume: RAS (identity directions) or LPS (x and y reversed)."""
    flip = np.array([-1.0, -1.0, 1.0]) if lps else np.ones(3)
    affine = np.diag([*flip, 1.0])
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    affine[:3, 3] = -flip * centre  # the centre voxel sits at world (0, 0, 0) in both orientations
    return affine


def make_phantom(shape: tuple[int, int, int], rng: np.random.Generator, abnormal: bool) -> tuple[np.ndarray, np.ndarray]:
    """One RAS-ordered phantom: float32 FLAIR (0 outside the brain) and uint8 seg (``LESION_LABEL`` on lesions)."""
    grid = _unit_grid(shape, rng)
    brain = _brain_mask(grid, shape, rng)
    tissue = _tissue(grid, shape, rng, brain)
    seg = np.zeros(shape, dtype=np.uint8)
    if abnormal:
        for _ in range(int(rng.integers(1, 3))):
            tissue, seg = _add_lesion(tissue, seg, brain, shape, rng)
    bias = np.exp(0.08 * smooth_noise(shape, (3, 3, 2), rng))
    noise = rng.normal(0.0, 0.03, size=shape)
    flair = (tissue * bias + noise) * rng.uniform(300.0, 600.0)
    flair = np.where(brain, np.maximum(flair, 1.0), 0.0).astype(np.float32)
    return flair, seg


def smooth_noise(shape: Sequence[int], coarse: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std random field varying over about ``shape / coarse`` voxels.

    Random values on a coarse lattice are spread with separable Gaussian weights (three small matrix products),
    which is much faster than spline zooming and just as smooth.
    """
    nodes = tuple(int(c) + 3 for c in coarse)
    field = rng.normal(size=nodes)
    for axis, (n, c) in enumerate(zip(shape, coarse)):
        weights = _spread_weights(int(n), int(c))
        field = np.moveaxis(np.tensordot(weights, field, axes=([1], [axis])), 0, axis)
    return (field - field.mean()) / (field.std() + 1e-8)


def _spread_weights(n: int, c: int) -> np.ndarray:
    """``(n, c + 3)`` row-normalised Gaussian weights from lattice nodes ``-1..c+1`` to ``n`` voxel positions."""
    position = np.linspace(0.0, float(c), n)[:, None]
    node = np.arange(-1, c + 2, dtype=np.float64)[None, :]
    weights = np.exp(-0.5 * ((position - node) / 0.6) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------ anatomy


def _unit_grid(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel coordinates centred on a jittered head centre, in voxels, rotated a little in the axial plane."""
    centre = (np.asarray(shape) - 1) / 2 + rng.uniform(-0.04, 0.04, 3) * np.asarray(shape)
    x, y, z = (np.arange(n, dtype=np.float64) - c for n, c in zip(shape, centre))
    x, y, z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    angle = rng.uniform(-0.2, 0.2)
    return (np.cos(angle) * x - np.sin(angle) * y, np.sin(angle) * x + np.cos(angle) * y, z)


def _brain_mask(grid, shape, rng: np.random.Generator) -> np.ndarray:
    """Ellipsoidal brain with a wobbly surface; size and proportions vary per case."""
    x, y, z = grid
    radii = np.asarray(shape) * rng.uniform([0.34, 0.40, 0.38], [0.42, 0.46, 0.46])
    radius = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    return radius * (1 + 0.025 * smooth_noise(shape, (6, 6, 4), rng)) < 1.0


def _tissue(grid, shape, rng: np.random.Generator, brain: np.ndarray) -> np.ndarray:
    """Relative FLAIR intensity: white matter core, grey matter rim with dark sulci, dark ventricles, texture."""
    depth = ndimage.distance_transform_edt(brain)
    cortex = depth < rng.uniform(3.0, 5.0) * (1 + 0.3 * smooth_noise(shape, (8, 8, 5), rng))
    tissue = np.where(cortex, GREY_MATTER, WHITE_MATTER)
    sulci = cortex & (smooth_noise(shape, (14, 14, 8), rng) > 1.2)
    tissue = np.where(sulci, CSF + 0.2, tissue)
    ventricles = _ventricles(grid, shape, rng)
    tissue = np.where(ventricles, CSF, tissue)
    tissue = np.where(_ventricle_lining(ventricles), rng.uniform(1.5, 1.8) * WHITE_MATTER, tissue)
    tissue = ndimage.gaussian_filter(tissue, 0.8)
    return tissue * (1 + 0.06 * smooth_noise(shape, (10, 10, 6), rng))


def _ventricles(grid, shape, rng: np.random.Generator) -> np.ndarray:
    """Two lateral ventricles (elongated front to back, either side of the midline) and a thin third one."""
    x, y, z = grid
    size = np.asarray(shape, dtype=np.float64)
    spread = rng.uniform(0.04, 0.07) * size[0]
    radii = size * rng.uniform([0.04, 0.14, 0.08], [0.07, 0.20, 0.12])
    lift = rng.uniform(0.0, 0.06) * size[2]
    mask = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        r = ((x - side * spread) / radii[0]) ** 2 + (y / radii[1]) ** 2 + ((z - lift) / radii[2]) ** 2
        mask |= r < 1.0
    third = (x / (0.25 * radii[0])) ** 2 + (y / (0.5 * radii[1])) ** 2 + ((z + 0.5 * radii[2]) / radii[2]) ** 2
    return mask | (third < 1.0)


def _ventricle_lining(ventricles: np.ndarray) -> np.ndarray:
    """A thin rim around the ventricles (FLAIR's normal periventricular brightness): bright, and normal, and as
    regular as the ventricles it follows, so the brain's context predicts it where no rule of brightness can."""
    return ndimage.binary_dilation(ventricles) & ~ventricles


def _add_lesion(tissue, seg, brain, shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One irregular lesion inside the brain at any axial level, of random size, shape, contrast and texture.

    The centre's axial level is uniform over the brain's axial extent (a lesion spans a fraction of it, so every
    abnormal case keeps lesion-free slices); the contrast goes from about grey matter (1.1x white matter: iso-intense on FLAIR) to 2x
    white matter, brighter than the normal ventricle lining (1.5-1.8x); a heterogeneous lesion has a coarse texture of its own. The lesion replaces what it covers.
    """
    size = np.asarray(shape, dtype=np.float64)
    radii = size * rng.uniform([0.04, 0.04, 0.05], [0.13, 0.13, 0.14])
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    core = ndimage.binary_erosion(brain, in_plane, iterations=int(np.ceil(radii[:2].max() * 0.6)) + 1)
    levels = np.flatnonzero(brain.any(axis=(0, 1)))
    low, high = levels[0] + 0.05 * len(levels), levels[-1] - 0.05 * len(levels)
    level = int(round(rng.uniform(low, high)))
    band = np.zeros(shape, dtype=bool)
    band[:, :, max(level - 1, 0) : level + 2] = True
    candidates = next(c for c in (np.argwhere(core & band), np.argwhere(brain & band), np.argwhere(brain)) if len(c))
    centre = candidates[rng.integers(len(candidates))]
    x, y, z = (axis - c for axis, c in zip(np.ogrid[: shape[0], : shape[1], : shape[2]], centre))
    radius = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    wobble = np.clip(smooth_noise(shape, (10, 10, 6), rng), -1.5, 1.5)
    lesion = (radius * (1 + rng.uniform(0.1, 0.35) * wobble) < 1.0) & brain
    factor = rng.uniform(1.1, 2.0)
    texture = rng.uniform(0.03, 0.25) * smooth_noise(shape, (24, 24, 12), rng)
    weight = np.maximum(ndimage.gaussian_filter(lesion.astype(np.float64), 1.0), lesion)  # soft rim outside
    bright = factor * WHITE_MATTER * (1 + texture)
    tissue = tissue + weight * (bright - tissue)
    return tissue, np.where(lesion, np.uint8(LESION_LABEL), seg).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: write the synthetic dataset and print where it is."""
    parser = argparse.ArgumentParser(prog="python -m scripts.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write SYN_XXX/ case folders into")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 48), metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--abnormal-fraction", type=float, default=0.5)
    args = parser.parse_args(argv)
    case_ids = generate_dataset(args.output, args.cases, args.shape, args.seed, args.abnormal_fraction)
    print(f"{args.output}: {len(case_ids)} synthetic FLAIR cases {case_ids[0]}..{case_ids[-1]} (shape {tuple(args.shape)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
