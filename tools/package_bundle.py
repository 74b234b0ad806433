"""Package the bundle as the zip MONAI expects: ``<name>_v<version>.zip`` holding one folder ``<name>/``.

The name and version come from ``configs/metadata.json``. The zip holds ``configs/``, ``scripts/`` (without
``__pycache__`` or compiled files), ``docs/``, ``models/``, ``LICENSE``, ``metadata.json`` (a real copy of
``configs/metadata.json``, never a link), ``README.md`` and ``requirements.txt``.

``models/`` receives the files found in the bundle's ``models/`` folder (``model.pt``, the reconstructor that
``configs/inference.json`` loads; ``checkpoint_best.pt``, read for the critic score map when training kept no
snapshots; ``critic_snapshots.pt``, the critics that map averages when it did; ``normal_stats.pt``;
``residual_calibration.pt``, which the default residual maps read) except the
checkpoints that only resume training (``checkpoint_final.pt`` and the periodic ``*epoch=*`` / ``*iteration=*``
saves: pass one with ``--weights`` to ship it anyway), and every ``--weights`` file, which replaces a file of the
same name. ``--require-weights`` fails unless ``models/model.pt`` is packaged. A model
file over the size limit (25 MiB by default) is not stored in the zip; it is listed instead in
``large_files.yml`` (``path``, ``url``, ``hash_val``, ``hash_type``: sha256), the model-zoo convention, so that
it can be hosted elsewhere and fetched on download. ``--large-file-url-base`` is the folder URL that the files
will be uploaded to; without it the URLs are an obviously invalid placeholder to be filled in.

The zip is written to a temporary file in the output folder and moved into place, so a reader never sees a
half-written archive. Entries are sorted and carry a fixed timestamp, so the same inputs give the same zip.

CLI::

    python -m tools.package_bundle --output DIR [--bundle-root .] [--weights models/model.pt ...]
        [--require-weights] [--large-file-url-base URL] [--large-file-limit-mb 25]
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml

from scripts.data.io import write_atomic

METADATA = Path("configs") / "metadata.json"
FOLDERS = ("configs", "scripts", "docs")
REQUIRED_FILES = ("LICENSE", "README.md", "requirements.txt")
MODELS = "models"
SKIPPED_DIRS = frozenset({"__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints"})
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".tmp", "~")
RESUME_ONLY_PATTERNS = ("checkpoint_final*", "*epoch=*", "*iteration=*")
MAIN_WEIGHTS = "model.pt"
DEFAULT_LIMIT_MB = 25.0
PLACEHOLDER_URL_BASE = "https://replace-with-download-location.invalid"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PackagingError(RuntimeError):
    """The bundle cannot be packaged as asked; the message says why."""


@dataclass(frozen=True)
class Entry:
    """One file of the bundle: where it is read from and its path inside the bundle folder."""

    source: Path
    arcname: str


@dataclass(frozen=True)
class LargeFile:
    """A model file kept out of the zip and listed in ``large_files.yml``."""

    path: str
    url: str
    hash_val: str
    hash_type: str = "sha256"


def read_name_version(bundle_root: Path) -> tuple[str, str]:
    """Return ``(name, version)`` from ``configs/metadata.json``, checked to be safe in a file name."""
    meta_path = bundle_root / METADATA
    if not meta_path.is_file():
        raise PackagingError(f"{meta_path} not found: is {bundle_root} a bundle root?")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PackagingError(f"{meta_path} is not valid JSON: {error}") from error
    name, version = meta.get("name"), meta.get("version")
    for key, value in (("name", name), ("version", version)):
        if not isinstance(value, str) or not SAFE_NAME.match(value):
            raise PackagingError(f"{meta_path}: '{key}' must be a non-empty string of [A-Za-z0-9_.-], got {value!r}")
    return name, version


def _skipped(path: Path) -> bool:
    """True for caches, compiled Python, temporary and hidden files."""
    if any(part in SKIPPED_DIRS or part.startswith(".") for part in path.parts):
        return True
    return path.name.endswith(SKIPPED_SUFFIXES)


def folder_entries(bundle_root: Path, folder: str) -> Iterator[Entry]:
    """Every packaged file under ``bundle_root/folder``, in sorted order."""
    base = bundle_root / folder
    for path in sorted(base.rglob("*")):
        relative = path.relative_to(bundle_root)
        if path.is_file() and not _skipped(path.relative_to(base)):
            yield Entry(path, relative.as_posix())


def top_level_entries(bundle_root: Path) -> list[Entry]:
    """Required top-level files, plus ``metadata.json`` copied from ``configs/metadata.json``."""
    missing = [name for name in REQUIRED_FILES if not (bundle_root / name).is_file()]
    if missing:
        raise PackagingError(f"missing in the bundle root {bundle_root}: {', '.join(missing)}")
    entries = [Entry(bundle_root / name, name) for name in REQUIRED_FILES]
    return entries + [Entry(bundle_root / METADATA, "metadata.json")]


def model_sources(bundle_root: Path, weights: Sequence[Path]) -> dict[str, Path]:
    """Model files by name: ``models/`` of the bundle (no resume-only checkpoints), then ``--weights`` (these win)."""
    found: dict[str, Path] = {}
    models_dir = bundle_root / MODELS
    if models_dir.is_dir():
        for path in sorted(models_dir.iterdir()):
            if path.is_file() and not _skipped(Path(path.name)) and not _resume_only(path.name):
                found[path.name] = path
    for path in weights:
        if not path.is_file():
            raise PackagingError(f"--weights {path}: no such file")
        found[path.name] = path
    return found


def _resume_only(name: str) -> bool:
    """True for checkpoints that only serve to resume training."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in RESUME_ONLY_PATTERNS)


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def split_models(
    models: dict[str, Path], limit_bytes: int, url_base: str
) -> tuple[list[Entry], list[LargeFile]]:
    """Models at most ``limit_bytes`` go into the zip; larger ones become ``large_files.yml`` entries."""
    small: list[Entry] = []
    large: list[LargeFile] = []
    for name, path in sorted(models.items()):
        arcname = f"{MODELS}/{name}"
        if path.stat().st_size > limit_bytes:
            large.append(LargeFile(arcname, f"{url_base.rstrip('/')}/{name}", sha256(path)))
        else:
            small.append(Entry(path, arcname))
    return small, large


def large_files_yaml(large: Sequence[LargeFile]) -> str:
    """``large_files.yml`` text in the model-zoo layout."""
    rows = [{"path": f.path, "url": f.url, "hash_val": f.hash_val, "hash_type": f.hash_type} for f in large]
    return yaml.safe_dump({"large_files": rows}, sort_keys=False)


def _zip_info(arcname: str) -> zipfile.ZipInfo:
    """A regular-file entry (rw-r--r--) with the fixed timestamp, deflated."""
    info = zipfile.ZipInfo(arcname, date_time=ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o100644 << 16
    return info


def _dir_info(arcname: str) -> zipfile.ZipInfo:
    """A directory entry (rwxr-xr-x) with the fixed timestamp."""
    info = zipfile.ZipInfo(arcname.rstrip("/") + "/", date_time=ZIP_TIME)
    info.external_attr = (0o040755 << 16) | 0x10
    return info


def write_zip(target: Path, folder: str, entries: Sequence[Entry], extra: dict[str, str]) -> None:
    """Write ``entries`` (streamed from disk) and ``extra`` (text) under ``folder/``, atomically."""

    def fill(handle: BinaryIO) -> None:
        with zipfile.ZipFile(handle, "w", allowZip64=True) as archive:
            for entry in sorted(entries, key=lambda e: e.arcname):
                with open(entry.source, "rb") as src, archive.open(_zip_info(f"{folder}/{entry.arcname}"), "w") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            for arcname, text in sorted(extra.items()):
                archive.writestr(_zip_info(f"{folder}/{arcname}"), text.encode("utf-8"))
            archive.writestr(_dir_info(f"{folder}/{MODELS}"), b"")

    write_atomic(target, fill)


def collect_entries(bundle_root: Path) -> list[Entry]:
    """All non-model files of the bundle."""
    for folder in ("configs", "scripts"):
        if not (bundle_root / folder).is_dir():
            raise PackagingError(f"missing folder {bundle_root / folder}")
    entries = top_level_entries(bundle_root)
    for folder in FOLDERS:
        if (bundle_root / folder).is_dir():
            entries.extend(folder_entries(bundle_root, folder))
    return entries


def package_bundle(
    output: Path,
    bundle_root: Path = Path("."),
    weights: Sequence[Path] = (),
    require_weights: bool = False,
    large_file_url_base: str | None = None,
    large_file_limit_mb: float = DEFAULT_LIMIT_MB,
) -> tuple[Path, list[LargeFile]]:
    """Build ``output/<name>_v<version>.zip`` and return its path and the files listed in ``large_files.yml``."""
    bundle_root = bundle_root.resolve()
    name, version = read_name_version(bundle_root)
    models = model_sources(bundle_root, [Path(w) for w in weights])
    if require_weights and MAIN_WEIGHTS not in models:
        raise PackagingError(
            f"--require-weights: no trained weights: {bundle_root / MODELS / MAIN_WEIGHTS} does not exist and no "
            f"--weights file is named {MAIN_WEIGHTS}; train first or pass --weights PATH/{MAIN_WEIGHTS}"
        )
    url_base = large_file_url_base or f"{PLACEHOLDER_URL_BASE}/{name}/v{version}"
    small, large = split_models(models, int(large_file_limit_mb * 1024 * 1024), url_base)
    extra = {"large_files.yml": large_files_yaml(large)} if large else {}
    target = output / f"{name}_v{version}.zip"
    write_zip(target, name, collect_entries(bundle_root) + small, extra)
    return target, large


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.package_bundle", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to write <name>_v<version>.zip into")
    parser.add_argument("--bundle-root", type=Path, default=Path("."), help="bundle root (default: .)")
    parser.add_argument("--weights", type=Path, nargs="+", action="extend", default=[],
                        help="model files to ship as models/<file name> (override files of the same name)")
    parser.add_argument("--require-weights", action="store_true", help="fail unless models/model.pt is packaged")
    parser.add_argument("--large-file-url-base", default=None,
                        help="URL folder the large model files will be uploaded to (large_files.yml url)")
    parser.add_argument("--large-file-limit-mb", type=float, default=DEFAULT_LIMIT_MB,
                        help="model files larger than this many MiB go to large_files.yml (default: 25)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print the zip path; on a packaging error print it and return 1."""
    args = _parser().parse_args(argv)
    try:
        target, large = package_bundle(
            args.output, args.bundle_root, args.weights, args.require_weights,
            args.large_file_url_base, args.large_file_limit_mb,
        )
    except PackagingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for item in large:
        print(f"large file kept out of the zip, listed in large_files.yml: {item.path} -> {item.url}", file=sys.stderr)
    if large and not args.large_file_url_base:
        print("warning: no --large-file-url-base given; large_files.yml holds placeholder URLs", file=sys.stderr)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
