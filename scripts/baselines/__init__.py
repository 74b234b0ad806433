"""Baseline methods compared with the bundle's masked-reconstruction detector."""
