"""Gaussian viewpoint heatmaps on the equirectangular grid, and FedGen label sampling.

A client's heatmap is the distribution of its viewpoints blurred by a Gaussian in
great-circle distance, ``exp(-d^2 / (2 sigma^2))``, given as probability mass per cell of the
grid of ``grid.py``. The exact heatmap evaluates that Gaussian from every viewpoint to every
cell centre and weighs it by the cell's area, which costs ``n G^2`` distances per client.
``heatmaps`` approximates it in ``O(n + G^3)`` per client, a ``[G/2, G/2]`` matrix product
on each of the ``G/2 + 1`` longitude frequencies, with no ``[n, G/2, G]`` intermediate:

1. Every viewpoint is splatted bilinearly onto the four nearest cell centres (wrapping in
   longitude). Unlike rounding to the nearest cell, this keeps each point's mean position.
2. The splat is blurred in three passes, each of which conserves mass exactly:

   a. along longitude within each source row, circularly, with half of the variance;
   b. across rows, with a ``[G/2, G/2]`` matrix whose columns sum to one;
   c. along longitude within each target row, with the other half of the variance.

   The longitude kernel of a row is the Gaussian in the great-circle distance between two
   points of that row, ``2 arcsin(cos(lat) sin(dlon / 2))``: it widens as ``1 / cos(lat)``
   and, near the poles, flattens into the whole row rather than growing without bound. The
   true longitude variance between a source row r and a target row i is about
   ``sigma^2 / (cos lat_r cos lat_i)``; splitting the blur between the two rows gives
   ``sigma^2 (1 / cos^2 lat_r + 1 / cos^2 lat_i) / 2``, wrong only at second order in the
   latitude difference, whereas one pass with either row's width is wrong at first order.
   The matrix sends to row i the share ``area_i exp(-dlat^2 / (2 sigma^2))
   i0e(cos lat_r cos lat_i / sigma^2)`` of row r's mass; the Bessel factor is the kernel's
   integral over longitude between the two rows (exact for the chord-distance form
   ``exp(-|a - b|^2 / (2 sigma^2))``), without which rows near a pole get too much mass.
   The bilinear splat itself adds about ``cell^2 / 6`` of variance along each axis (less,
   in arc length, along longitude away from the equator); that much is taken off the blur,
   but never more than half of it.

All three passes act on one real FFT along longitude, since the row mixing commutes with it.

Tolerance, measured against the exact heatmap (the reference in ``tests/test_heatmap.py``) on
random clients of 40 points each (clustered, on the dateline, above 80 degrees of latitude,
uniform; 5 seeds), as the total-variation distance per client and the largest cell error
relative to the largest cell:

  ====== ===== ======== =============
  grain  sigma TV       max err / max
  ====== ===== ======== =============
  32     15    <= 0.020 <= 0.07
  64     15    <= 0.020 <= 0.07
  128    15    <= 0.022 <= 0.07
  128    5     <= 0.015 <= 0.05
  64     5     <= 0.037 <= 0.23
  ====== ===== ======== =============

The polar clients are the worst. An isolated point is worst at 80-85 degrees of latitude
(TV about 0.07 with sigma 15 degrees), where the two-row split of the longitude blur is least
exact; at low latitudes it stays below 0.02 once sigma spans a cell or more. With sigma below
one cell (``360 / G`` degrees, as for grain 64 and sigma 5) the position of a point inside
its cell matters and no blur of cell centres reproduces it, hence the last row.
"""

import math

import jax
import jax.numpy as jnp
from jax.scipy import special

from fedvp_jax import geometry
from fedvp_jax.errors import ConfigError
from fedvp_jax.heatmap import grid

_EDGE_MARGIN = 1e-3
"""Fraction of a cell kept clear at its edges by ``sample_labels``; see there."""


def heatmaps(
  points: jnp.ndarray,
  grain: int,
  sigma_deg: float | jnp.ndarray,
  mask: jnp.ndarray | None = None,
  normalize: bool = True,
) -> jnp.ndarray:
  """Every client's viewpoint distribution, blurred by a Gaussian on the sphere.

  Jittable with ``grain`` and ``normalize`` static; ``sigma_deg`` may be traced.

  Args:
    points: ``f32[clients, n, 3]`` unit viewpoint vectors of each client.
    grain: the grid's grain G, an even Python int >= 4.
    sigma_deg: standard deviation of the Gaussian in great-circle degrees, positive. The
      approximation (see the module docstring) needs it to be at least about one cell,
      ``360 / G`` degrees.
    mask: ``bool[clients, n]``, False for padding points that must not count; ``None``
      counts every point.
    normalize: whether to scale each client's heatmap to sum to 1. With False the heatmap
      holds expected viewpoint counts and sums to the client's number of unmasked points,
      which is what FedGen's label weights use to favour clients with more data.

  Returns:
    ``f32[clients, G/2, G]`` mass per cell (see ``grid.py`` for the layout). A client
    without unmasked points gets all zeros.
  """
  if isinstance(sigma_deg, (int, float)) and not sigma_deg > 0:
    raise ConfigError(f"sigma_deg must be positive, got {sigma_deg}")
  weights = jnp.ones(points.shape[:-1]) if mask is None else mask.astype(jnp.float32)
  counts = jax.vmap(_splat, in_axes=(0, 0, None))(points, weights, grain)
  # FFT round-off leaves values of about -1e-7 where there is no mass; negative mass would
  # break sampling and label weights.
  mass = jnp.maximum(_blur(counts, grain, sigma_deg), 0.0)
  if not normalize:
    return mass
  total = jnp.sum(mass, axis=(-2, -1), keepdims=True)
  return mass / jnp.where(total > 0, total, 1.0)


def combined(heat: jnp.ndarray, weights: jnp.ndarray | None = None) -> jnp.ndarray:
  """The distribution of all clients' viewpoints together.

  Args:
    heat: ``f32[clients, G/2, G]`` heatmaps from ``heatmaps``. Unnormalised ones (counts)
      combine into the distribution of the pooled viewpoints.
    weights: ``f32[clients]`` non-negative weight of each client, e.g. its number of
      samples; ``None`` adds the heatmaps as they are.

  Returns:
    ``f32[G/2, G]`` mass per cell summing to 1, or all zeros if ``heat`` is all zeros.
  """
  if weights is not None:
    heat = heat * weights[:, None, None]
  pooled = jnp.sum(heat, axis=0)
  total = jnp.sum(pooled)
  return pooled / jnp.where(total > 0, total, 1.0)


def sample_labels(key: jax.Array, heat: jnp.ndarray, num: int) -> jnp.ndarray:
  """Draws viewpoints from a heatmap: a cell by its mass, then a uniform point in the cell.

  The point is uniform in area: uniform in longitude and in ``sin(lat)`` across the cell. It
  stays ``_EDGE_MARGIN`` of a cell away from the cell's edges so that float32 round-off in
  the vector round trip cannot move it into a neighbour: ``grid.cell_index`` of a sample is
  the cell it was drawn from. Jittable with ``num`` static.

  Args:
    key: PRNG key.
    heat: ``f32[G/2, G]`` non-negative mass per cell, not necessarily normalised, not all
      zero.
    num: number of viewpoints to draw.

  Returns:
    ``f32[num, 3]`` unit viewpoint vectors.
  """
  grain = _grain_of(heat)
  cell_key, offset_key = jax.random.split(key)
  cells = jax.random.choice(cell_key, heat.size, (num,), p=heat.reshape(-1))
  row, col = jnp.divmod(cells, grain)
  offset = jax.random.uniform(offset_key, (num, 2), minval=_EDGE_MARGIN, maxval=1.0 - _EDGE_MARGIN)
  lon = -math.pi + (col + offset[:, 0]) * grid.cell_size(grain)
  sin_edges = jnp.sin(grid.lat_edges(grain))
  sin_lat = sin_edges[row] + offset[:, 1] * (sin_edges[row + 1] - sin_edges[row])
  return geometry.lonlat_to_vec(lon, jnp.arcsin(sin_lat))


def label_weights(heat: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """FedGen's weight of each client for each label: its share of the mass at the label.

  ``w_k(y) = heat_k(cell(y)) / sum_j heat_j(cell(y))``. Where no client has mass at the
  label's cell the clients share it equally.

  Args:
    heat: ``f32[clients, G/2, G]`` heatmaps from ``heatmaps``: normalised ones weigh every
      client alike, unnormalised ones (counts) favour clients with more viewpoints.
    labels: ``f32[n, 3]`` viewpoint vectors.

  Returns:
    ``f32[clients, n]`` weights; every column sums to 1.
  """
  row, col = grid.cell_index(labels, _grain_of(heat))
  mass = heat[:, row, col]
  total = jnp.sum(mass, axis=0)
  has_mass = total > jnp.finfo(heat.dtype).tiny
  return jnp.where(has_mass, mass / jnp.where(has_mass, total, 1.0), 1.0 / heat.shape[0])


def _grain_of(heat: jnp.ndarray) -> int:
  """The grain of heatmaps ``f32[..., G/2, G]``, checking their shape."""
  rows, grain = heat.shape[-2:]
  if grain != 2 * rows:
    raise ConfigError(f"heatmaps must have shape [..., G/2, G], got {heat.shape}")
  grid.check_grain(grain)
  return grain


def _splat(points: jnp.ndarray, weights: jnp.ndarray, grain: int) -> jnp.ndarray:
  """Bilinear splat ``f32[G/2, G]`` of points ``f32[n, 3]`` with weights ``f32[n]``."""
  rows = grain // 2
  size = grid.cell_size(grain)
  lon, lat = geometry.vec_to_lonlat(points)
  # Coordinates in units of cells in which the cell centres sit on the integers.
  x = (lon + math.pi) / size - 0.5
  y = jnp.clip((math.pi / 2 - lat) / size - 0.5, 0.0, rows - 1)
  col = jnp.floor(x)
  # Points beyond the last row centre lean wholly on the last row, so row + 1 stays inside.
  row = jnp.minimum(jnp.floor(y), rows - 2)
  frac_x, frac_y = x - col, y - row
  share_y = jnp.stack([1.0 - frac_y, frac_y], axis=-1)
  share_x = jnp.stack([1.0 - frac_x, frac_x], axis=-1)
  share = weights[:, None, None] * share_y[:, :, None] * share_x[:, None, :]
  corner = jnp.arange(2)
  row_idx = row.astype(jnp.int32)[:, None, None] + corner[None, :, None]
  col_idx = jnp.mod(col.astype(jnp.int32)[:, None, None] + corner[None, None, :], grain)
  return jnp.zeros((rows, grain)).at[row_idx, col_idx].add(share)


def _blur(counts: jnp.ndarray, grain: int, sigma_deg: float | jnp.ndarray) -> jnp.ndarray:
  """The three-pass Gaussian blur of the module docstring, of ``counts: f32[clients, G/2, G]``."""
  size = grid.cell_size(grain)
  _, lat = grid.cell_centers(grain)
  cos_lat = jnp.cos(lat)
  var = jnp.square(jnp.deg2rad(jnp.asarray(sigma_deg, jnp.float32)))
  splat_var = size**2 / 6
  lat_var = jnp.maximum(var - splat_var, var / 2)
  source_var = jnp.maximum(var / 2 - jnp.square(cos_lat) * splat_var, var / 4)

  # One FFT for the kernels of both longitude passes: source rows, then target rows.
  source_kernel, target_kernel = _lon_kernel_spectra(
    cos_lat, grain, jnp.stack([source_var, jnp.broadcast_to(var / 2, cos_lat.shape)])
  )
  mixing = _row_mixing(lat, cos_lat, grain, lat_var, var)
  spectrum = jnp.fft.rfft(counts, axis=-1) * source_kernel
  # A real matrix times a complex array: two real products beat one complex product.
  spectrum = jax.lax.complex(
    jnp.einsum("ir,crk->cik", mixing, spectrum.real),
    jnp.einsum("ir,crk->cik", mixing, spectrum.imag),
  )
  spectrum = spectrum * target_kernel
  return jnp.fft.irfft(spectrum, n=grain, axis=-1)


def _lon_kernel_spectra(cos_lat: jnp.ndarray, grain: int, var: jnp.ndarray) -> jnp.ndarray:
  """Spectra ``f32[..., G/2, G/2 + 1]`` of the rows' circular longitude kernels.

  Each kernel sums to 1, so convolving with it conserves mass.

  Args:
    cos_lat: ``f32[G/2]`` cosine of each row's latitude.
    grain: the grid's grain G.
    var: ``f32[..., G/2]`` variance of each row's kernel in squared radians of great-circle
      distance.
  """
  steps = jnp.arange(grain)
  dlon = jnp.minimum(steps, grain - steps) * grid.cell_size(grain)
  arc = 2.0 * jnp.arcsin(cos_lat[:, None] * jnp.sin(dlon / 2))
  kernel = jnp.exp(-jnp.square(arc) / (2.0 * var[..., None]))
  kernel = kernel / jnp.sum(kernel, axis=-1, keepdims=True)
  # The kernel is even in longitude, so its spectrum is real.
  return jnp.fft.rfft(kernel, axis=-1).real


def _row_mixing(
  lat: jnp.ndarray, cos_lat: jnp.ndarray, grain: int, lat_var: jnp.ndarray, var: jnp.ndarray
) -> jnp.ndarray:
  """Matrix ``f32[G/2, G/2]`` whose entry ``[i, r]`` is the share of row r's mass sent to row i.

  Args:
    lat: ``f32[G/2]`` latitude of each row.
    cos_lat: ``f32[G/2]`` its cosine.
    grain: the grid's grain G.
    lat_var: variance of the blur along latitude, squared radians.
    var: ``sigma^2``, squared radians, for the longitude integral.
  """
  row_area = grid.cell_areas(grain)[:, 0]
  dlat = lat[:, None] - lat[None, :]
  share = (
    row_area[:, None]
    * jnp.exp(-jnp.square(dlat) / (2.0 * lat_var))
    * special.i0e(cos_lat[:, None] * cos_lat[None, :] / var)
  )
  return share / jnp.sum(share, axis=0, keepdims=True)
