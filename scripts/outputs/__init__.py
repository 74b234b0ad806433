"""Outputs: the file formats of a run (written and read), the writer handler, heatmap overlays."""
