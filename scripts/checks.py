"""Argument checks shared by the bundle's components, with messages that tell a command-line user the fix."""

from __future__ import annotations

from typing import Any


def require_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a real boolean, else raise.

    ``python -m monai.bundle run ... --flag false`` passes the *string* ``'false'`` (the command line is parsed as
    Python literals, where only ``False`` is a boolean), and a non-empty string is true: a silently ignored
    ``false`` would train the wrong model.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} (on the command line write False, not false)")
    return value
