"""The bundle's config conventions in one place: value checks, command-line overrides, merged config parsers.

One override rule everywhere, the one ``python -m monai.bundle run`` applies: a value is a Python literal
(``False``, ``3``, ``[16, 32]``, ``'text'``) and anything that is not one stays a string. Every tool of the
bundle and of its experiments parses ``--ID VALUE`` / ``ID=VALUE`` with ``parse_literal``, so the same command
line means the same thing to each of them.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def require_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a real boolean, else raise.

    ``python -m monai.bundle run ... --flag false`` passes the *string* ``'false'`` (the command line is parsed as
    Python literals, where only ``False`` is a boolean), and a non-empty string is true: a silently ignored
    ``false`` would train the wrong model.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} (on the command line write False, not false)")
    return value


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX through oneDNN), where bf16 autocast halves the time
    of a network pass; elsewhere bf16 is emulated and slower than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def uses_bf16(amp: bool, device: str | torch.device) -> bool:
    """Whether ``amp`` means bf16 autocast on ``device``: on CUDA, and on a CPU with native bf16."""
    kind = torch.device(device).type
    return bool(amp) and (kind == "cuda" or (kind == "cpu" and cpu_bf16_supported()))


def parse_literal(text: str) -> Any:
    """A command-line value as ``monai.bundle run`` reads it: a Python literal, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_override(text: str) -> tuple[str, Any]:
    """``ID=VALUE`` -> ``(ID, parse_literal(VALUE))``; ValueError when there is no ``=`` or no id."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected ID=VALUE, got {text!r}")
    return key.strip(), parse_literal(value)


def parse_override_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    """``['--ID', 'VALUE', ...]`` (what argparse leaves over) -> ``{ID: parse_literal(VALUE)}``."""
    if len(pairs) % 2 or any(not key.startswith("--") for key in pairs[::2]):
        raise ValueError(f"overrides must be --ID VALUE pairs, got {list(pairs)}")
    return {key[2:]: parse_literal(value) for key, value in zip(pairs[::2], pairs[1::2])}


def bundle_parser(
    config_files: str | os.PathLike | Sequence[str | os.PathLike],
    overrides: Mapping[str, Any] | None = None,
    meta_file: str | os.PathLike | None = None,
) -> Any:
    """A MONAI ``ConfigParser`` of the merged config files (in order), ``overrides`` applied (ids with ``#``)."""
    from monai.bundle import ConfigParser

    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    if meta_file:
        parser.read_meta(str(meta_file))
    parser.update(dict(overrides or {}))
    return parser
