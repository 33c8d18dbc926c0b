"""The equirectangular grid on which viewpoint heatmaps live.

A grid of ``grain`` G (an even integer, at least 4) has G longitude cells by G/2 latitude
cells, all spanning the same angle ``2 pi / G`` in both directions. Rows run from north to
south, as in an equirectangular video frame: row 0 touches the north pole (latitudes
``[pi/2 - 2 pi/G, pi/2]``) and row G/2 - 1 the south pole. Columns run eastwards from the
dateline: column 0 covers longitudes ``[-pi, -pi + 2 pi/G)``. A heatmap is therefore an
array ``f32[..., G/2, G]`` that displays the right way up with ``imshow``.

Everything that depends only on ``grain`` is computed in float64 numpy and handed out as
float32 constants, so ``grain`` must be a static Python int under ``jit``.
"""

import math

import jax.numpy as jnp
import numpy as np

from fedvp_jax import geometry
from fedvp_jax.config import require
from fedvp_jax.errors import SettingError


def check_grain(grain: int) -> None:
  """Raises ``SettingError`` unless ``grain`` is an even Python int of at least 4."""
  if isinstance(grain, bool) or not isinstance(grain, (int, np.integer)):
    raise SettingError("grain", grain, "must be a static Python int")
  require("grain", grain)


def cell_size(grain: int) -> float:
  """Angle in radians spanned by one cell, in longitude and in latitude alike."""
  check_grain(grain)
  return 2.0 * math.pi / grain


def lat_edges(grain: int) -> jnp.ndarray:
  """Latitudes ``f32[G/2 + 1]`` of the row boundaries, from ``pi/2`` down to ``-pi/2``.

  Row ``i`` lies between ``lat_edges[i + 1]`` (south) and ``lat_edges[i]`` (north).
  """
  return jnp.asarray(_lat_edges64(grain), jnp.float32)


def cell_centers(grain: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Longitudes ``f32[G]`` of the column centres and latitudes ``f32[G/2]`` of the row centres.

  Radians; longitudes increase from ``-pi + pi/G``, latitudes decrease from ``pi/2 - pi/G``.
  """
  lon, lat = _cell_centers64(grain)
  return jnp.asarray(lon, jnp.float32), jnp.asarray(lat, jnp.float32)


def cell_center_vectors(grain: int) -> jnp.ndarray:
  """Unit vectors ``f32[G/2, G, 3]`` pointing at the centre of every cell."""
  lon, lat = _cell_centers64(grain)
  lon, lat = np.meshgrid(lon, lat)
  return geometry.lonlat_to_vec(jnp.asarray(lon, jnp.float32), jnp.asarray(lat, jnp.float32))


def cell_areas(grain: int) -> jnp.ndarray:
  """Area ``f32[G/2, G]`` of every cell as a fraction of the sphere; the whole grid sums to 1."""
  return jnp.asarray(_row_areas64(grain)[:, None] * np.ones(grain), jnp.float32)


def cell_index(points: jnp.ndarray, grain: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Row and column of the cell that contains each point.

  Args:
    points: ``f32[..., 3]`` directions; they need not be exactly unit length.
    grain: the grid's grain G.

  Returns:
    ``(row, col)``, both ``i32[...]``. A point on the boundary between two cells belongs to
    the cell east or south of it; ``lon = +pi`` wraps around to column 0, and the poles
    land in the first and last rows.
  """
  size = cell_size(grain)
  lon, lat = geometry.vec_to_lonlat(points)
  # The modulo also catches lon + pi rounding up to exactly 2 pi in float32.
  col = jnp.mod(jnp.floor((lon + math.pi) / size).astype(jnp.int32), grain)
  row = jnp.clip(jnp.floor((math.pi / 2 - lat) / size).astype(jnp.int32), 0, grain // 2 - 1)
  return row, col


def _lat_edges64(grain: int) -> np.ndarray:
  return math.pi / 2 - np.arange(grain // 2 + 1) * cell_size(grain)


def _cell_centers64(grain: int) -> tuple[np.ndarray, np.ndarray]:
  size = cell_size(grain)
  lon = -math.pi + (np.arange(grain) + 0.5) * size
  lat = math.pi / 2 - (np.arange(grain // 2) + 0.5) * size
  return lon, lat


def _row_areas64(grain: int) -> np.ndarray:
  """Area of one cell of each row, float64[G/2], as a fraction of the sphere."""
  sin_edges = np.sin(_lat_edges64(grain))
  # A band between two latitudes covers (sin north - sin south) / 2 of the sphere.
  return (sin_edges[:-1] - sin_edges[1:]) / (2 * grain)
