"""Packaging tools (not shipped in the bundle zip)."""
