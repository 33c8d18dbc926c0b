"""Viewpoint heatmaps on an equirectangular grid, for FedGen-style label generation."""

from .gaussian import combined, heatmaps, label_weights, sample_labels
from .grid import (
  cell_areas,
  cell_center_vectors,
  cell_centers,
  cell_index,
  cell_size,
  check_grain,
  lat_edges,
)

__all__ = [
  "cell_areas",
  "cell_center_vectors",
  "cell_centers",
  "cell_index",
  "cell_size",
  "check_grain",
  "combined",
  "heatmaps",
  "label_weights",
  "lat_edges",
  "sample_labels",
]
