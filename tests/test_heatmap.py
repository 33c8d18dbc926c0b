"""Tests of fedvp_jax.heatmap against a plain reference implementation."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedvp_jax.errors import ConfigError, SettingError
from fedvp_jax.heatmap import (
  cell_areas,
  cell_center_vectors,
  cell_centers,
  cell_index,
  check_grain,
  combined,
  heatmaps,
  label_weights,
  lat_edges,
  sample_labels,
)

# Jitted once here: op-by-op dispatch would spend most of the test time compiling.
_heatmaps = jax.jit(heatmaps, static_argnames=("grain", "normalize"))
_cell_index = jax.jit(cell_index, static_argnums=1)
_sample_labels = jax.jit(sample_labels, static_argnums=2)
_label_weights = jax.jit(label_weights)


# --- The reference: the researcher's slow loop, written from the documented grid layout. ---


def _ref_grid(grain):
  """Cell centre vectors [G/2, G, 3] and areas [G/2, G] in float64, rows north to south."""
  size = 2 * math.pi / grain
  lon = -math.pi + (np.arange(grain) + 0.5) * size
  north = math.pi / 2 - np.arange(grain // 2) * size
  lat = north - size / 2
  lon, lat = np.meshgrid(lon, lat)
  centers = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)
  band = np.sin(north) - np.sin(north - size)
  areas = np.repeat((band / (2 * grain))[:, None], grain, axis=1)
  return centers, areas


def reference_heatmaps(points, grain, sigma_deg):
  """Mass per cell of the spherical Gaussian around every viewpoint, one viewpoint at a time."""
  centers, areas = _ref_grid(grain)
  sigma = math.radians(sigma_deg)
  out = []
  for client in np.asarray(points, np.float64):
    density = np.zeros(areas.shape)
    for p in client:
      p = p / np.linalg.norm(p)
      dist = np.arctan2(np.linalg.norm(np.cross(centers, p), axis=-1), centers @ p)
      density += np.exp(-(dist**2) / (2 * sigma**2))
    mass = density * areas
    out.append(mass / mass.sum())
  return np.stack(out)


# --- Helpers. ---


def _vec(lon_deg, lat_deg):
  """Unit vectors f32[..., 3] for longitudes and latitudes in degrees."""
  lon, lat = np.broadcast_arrays(np.radians(lon_deg), np.radians(lat_deg))
  v = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)
  return v.astype(np.float32)


def _lonlat(v):
  """Longitudes and latitudes in radians (float64) of vectors v[..., 3]."""
  v = np.asarray(v, np.float64)
  v = v / np.linalg.norm(v, axis=-1, keepdims=True)
  return np.arctan2(v[..., 1], v[..., 0]), np.arcsin(np.clip(v[..., 2], -1, 1))


def _tv(a, b):
  """Total-variation distance between distributions over the last two axes."""
  return 0.5 * np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).sum((-2, -1))


def _random_clients(seed, n=40):
  """Four clients: a cluster, the dateline, the polar caps (|lat| > 80), uniform."""
  rng = np.random.default_rng(seed)
  center = _vec(rng.uniform(-180, 180), rng.uniform(-50, 50))
  cluster = center + rng.normal(0, 0.25, (n, 3))
  cluster = (cluster / np.linalg.norm(cluster, axis=-1, keepdims=True)).astype(np.float32)
  dateline = _vec(180 + rng.uniform(-4, 4, n), rng.uniform(-60, 60, n))
  polar = _vec(rng.uniform(-180, 180, n), rng.choice([-1, 1], n) * rng.uniform(80, 90, n))
  uniform = _vec(rng.uniform(-180, 180, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n))))
  return np.stack([cluster, dateline, polar, uniform])


def _circular_spread_deg(row_mass, lon):
  """Circular standard deviation in degrees of a mass distribution over longitudes."""
  r = np.abs(np.sum(row_mass * np.exp(1j * lon))) / np.sum(row_mass)
  return math.degrees(math.sqrt(-2 * math.log(r)))


# --- Grid. ---


@pytest.mark.parametrize("grain", [3, 2, 0, 7.0, True])
def test_check_grain_rejects_bad_grains(grain):
  # A SettingError (a ConfigError) naming the quantity, never a flag.
  with pytest.raises(SettingError, match=r"^grain .*: must be") as caught:
    check_grain(grain)
  assert isinstance(caught.value, ConfigError) and "--" not in str(caught.value)


def test_grid_layout_rows_north_to_south_columns_from_dateline():
  grain = 16
  size = math.pi / 8
  lon, lat = cell_centers(grain)
  chex.assert_shape(lon, (16,))
  chex.assert_shape(lat, (8,))
  np.testing.assert_allclose(lon, -math.pi + (np.arange(16) + 0.5) * size, atol=1e-6)
  np.testing.assert_allclose(lat, math.pi / 2 - (np.arange(8) + 0.5) * size, atol=1e-6)
  np.testing.assert_allclose(lat_edges(grain), math.pi / 2 - np.arange(9) * size, atol=1e-6)
  centers = cell_center_vectors(grain)
  chex.assert_shape(centers, (8, 16, 3))
  np.testing.assert_allclose(centers, _ref_grid(grain)[0], atol=1e-6)
  row, col = _cell_index(centers, grain)
  np.testing.assert_array_equal(row, np.repeat(np.arange(8)[:, None], 16, axis=1))
  np.testing.assert_array_equal(col, np.repeat(np.arange(16)[None, :], 8, axis=0))


def test_cell_index_boundaries_wrap_and_clamp():
  # Grain 8: cells of 45 degrees. (-1, +0, 0) has longitude +pi and wraps to column 0, like
  # (-1, -0, 0) at -pi; a point on the equator belongs to the row south of it.
  points = np.array([[-1.0, 0.0, 0.0], [-1.0, -0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
  points = np.concatenate([points, _vec([179.9, -179.9, 44.9, 45.1], [0.1, 0.1, 0.1, -0.1])])
  row, col = _cell_index(jnp.asarray(points, jnp.float32), 8)
  np.testing.assert_array_equal(col, [0, 0, 4, 4, 7, 0, 4, 5])
  np.testing.assert_array_equal(row, [2, 2, 0, 3, 1, 1, 1, 2])


def test_cell_areas_match_monte_carlo_fractions():
  grain = 8
  areas = np.asarray(cell_areas(grain))
  chex.assert_shape(areas, (4, 8))
  np.testing.assert_allclose(areas.sum(), 1.0, rtol=1e-6)
  n = 400_000
  v = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
  row, col = _cell_index(v, grain)
  counts = np.zeros((4, 8))
  np.add.at(counts, (np.asarray(row), np.asarray(col)), 1)
  tolerance = 5 * np.sqrt(areas * (1 - areas) / n)
  assert np.all(np.abs(counts / n - areas) < tolerance)


# --- Heatmaps against the reference. ---

# (grain, sigma_deg, bound on the total-variation distance, bound on max |error| / max mass),
# per client. Largest values measured over seeds 0-4 of `_random_clients`: TV 0.020, 0.037,
# 0.020, 0.015 and max error ratio 0.071, 0.23, 0.068, 0.050; the polar clients are the
# worst but for grain 64 and sigma 5, which is below one cell (5.6 degrees) and where the
# position of an isolated point inside its cell matters most.
_REFERENCE_CASES = [
  (32, 15.0, 0.025, 0.09),
  (64, 5.0, 0.045, 0.27),
  (64, 15.0, 0.025, 0.085),
  (128, 5.0, 0.02, 0.065),
  # The training default (--grain 256 --heatmap-sigma 5): TV <= 0.014, max error ratio <= 0.054
  # over seeds 0-2.
  (256, 5.0, 0.02, 0.07),
]


@pytest.mark.parametrize("grain, sigma, tv_bound, max_bound", _REFERENCE_CASES)
def test_matches_reference(grain, sigma, tv_bound, max_bound):
  points = _random_clients(seed=0)
  fast = np.asarray(_heatmaps(points, grain=grain, sigma_deg=sigma))
  ref = reference_heatmaps(points, grain, sigma)
  chex.assert_shape(fast, (4, grain // 2, grain))
  tv = _tv(fast, ref)
  max_err = np.abs(fast - ref).max((-2, -1)) / ref.max((-2, -1))
  assert np.all(tv < tv_bound), tv
  assert np.all(max_err < max_bound), max_err


def test_longitude_kernel_widens_near_the_pole():
  """Along a row the mass must spread over about sigma / cos(lat) of longitude, as in the
  reference; a kernel that did not widen would keep the spread near sigma at any latitude."""
  grain, sigma = 64, 10.0
  lon = np.asarray(cell_centers(grain)[0])
  spreads = {}
  for lat_deg in [30.0, 75.0]:
    point = _vec([[0.0]], [[lat_deg]])
    row = int(_cell_index(point, grain)[0][0, 0])
    fast = np.asarray(_heatmaps(point, grain=grain, sigma_deg=sigma))[0, row]
    ref = reference_heatmaps(point, grain, sigma)[0, row]
    spreads[lat_deg] = _circular_spread_deg(fast, lon)
    assert spreads[lat_deg] == pytest.approx(_circular_spread_deg(ref, lon), rel=0.1)
  assert spreads[75.0] > 3 * sigma
  assert spreads[75.0] / spreads[30.0] > 2.5


def test_next_to_the_pole_the_first_row_is_nearly_uniform():
  grain, sigma = 64, 10.0
  point = _vec([[37.0]], [[89.5]])
  fast = np.asarray(_heatmaps(point, grain=grain, sigma_deg=sigma))[0, 0]
  ref = reference_heatmaps(point, grain, sigma)[0, 0]
  assert ref.min() / ref.max() > 0.9
  assert fast.min() / fast.max() > 0.9


# --- Heatmap properties. ---


def test_mass_is_conserved_and_masked_points_do_not_count():
  points = _random_clients(seed=1, n=10)
  # Exactly on the poles and on the dateline, where mass could leak off the grid.
  points[:, :4] = _vec([180.0, -180.0, 0.0, 180.0], [90.0, -90.0, 90.0, 0.0])
  mask = np.ones((4, 10), bool)
  mask[1, 5:] = False
  mask[2, :] = False
  counts = np.asarray(_heatmaps(points, grain=32, sigma_deg=8.0, mask=mask, normalize=False))
  assert counts.min() >= 0.0
  np.testing.assert_allclose(counts.sum((1, 2)), mask.sum(1), rtol=1e-5, atol=1e-6)

  heat = np.asarray(_heatmaps(points, grain=32, sigma_deg=8.0, mask=mask))
  np.testing.assert_allclose(heat.sum((1, 2)), [1, 1, 0, 1], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(heat[2], 0.0)
  # Moving the masked points elsewhere must change nothing.
  moved = points.copy()
  moved[~mask] = _vec(-90.0, 10.0)
  np.testing.assert_array_equal(_heatmaps(moved, grain=32, sigma_deg=8.0, mask=mask), heat)
  assert _tv(heat[1], _heatmaps(points, grain=32, sigma_deg=8.0, mask=np.ones_like(mask))[1]) > 0.1


def test_wraps_around_the_dateline_symmetrically():
  grain = 32
  points = _vec([[179.9], [-179.9], [0.0], [180.0]], [[30.0], [30.0], [-20.0], [-20.0]])
  east, west, center, dateline = np.asarray(_heatmaps(points, grain=grain, sigma_deg=10.0))
  # Longitude -> -longitude maps column j onto column G - 1 - j.
  np.testing.assert_allclose(west, east[:, ::-1], rtol=1e-5, atol=1e-8)
  assert east[:, 0].sum() > 0.2 and east[:, -1].sum() > 0.2
  np.testing.assert_allclose(center, center[:, ::-1], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(dateline, np.roll(center, grain // 2, axis=1), rtol=1e-5, atol=1e-8)


def test_batched_equals_per_client():
  points = _random_clients(seed=2, n=10)
  batched = _heatmaps(points, grain=32, sigma_deg=12.0)
  for c in range(points.shape[0]):
    single = _heatmaps(points[c : c + 1], grain=32, sigma_deg=12.0)[0]
    np.testing.assert_allclose(batched[c], single, rtol=1e-5, atol=1e-8)


def test_jit_with_traced_sigma_compiles_once():
  traces = []

  @jax.jit
  def heat(points, sigma):
    traces.append(None)
    return heatmaps(points, 32, sigma)

  points = _random_clients(seed=3, n=10)
  # Measured: TV at most 0.028 (sigma about one cell, polar client) and 0.019.
  for sigma, bound in [(12.0, 0.035), (25.0, 0.025)]:
    tv = _tv(heat(points, jnp.float32(sigma)), reference_heatmaps(points, 32, sigma))
    assert np.all(tv < bound), (sigma, tv)
  assert len(traces) == 1


def test_rejects_non_positive_sigma():
  with pytest.raises(ConfigError):
    heatmaps(_vec([[0.0]], [[0.0]]), 16, 0.0)


# --- Sampling labels and weighing clients. ---

_NUM_LABELS = 20_000


def test_sample_labels_follow_the_heatmap():
  grain = 8
  rng = np.random.default_rng(7)
  heat = rng.gamma(0.5, size=(4, 8)) * (rng.uniform(size=(4, 8)) < 0.7)
  labels = _sample_labels(jax.random.PRNGKey(1), jnp.asarray(heat, jnp.float32), _NUM_LABELS)
  chex.assert_shape(labels, (_NUM_LABELS, 3))
  np.testing.assert_allclose(np.linalg.norm(labels, axis=-1), 1.0, atol=1e-5)
  row, col = _cell_index(labels, grain)
  hist = np.zeros((grain // 2, grain))
  np.add.at(hist, (np.asarray(row), np.asarray(col)), 1.0 / _NUM_LABELS)
  assert np.all(hist[heat == 0] == 0)
  # The expected TV of 20k draws over 32 cells is below 0.016.
  assert _tv(hist, heat / heat.sum()) < 0.025


def test_sample_labels_stay_in_their_cell_uniform_in_area():
  grain = 8
  heat = jnp.zeros((4, 8)).at[0, 5].set(1.0)
  labels = _sample_labels(jax.random.PRNGKey(2), heat, _NUM_LABELS)
  row, col = _cell_index(labels, grain)
  assert np.all(np.asarray(row) == 0) and np.all(np.asarray(col) == 5)
  lon, lat = _lonlat(labels)
  # Row 0 spans latitudes 45-90 degrees: uniform in area means sin(lat) uniform on
  # [sin 45, 1], mean 0.854; uniform in latitude would give a mean sin(lat) of 0.900.
  np.testing.assert_allclose(
    np.quantile(np.sin(lat), [0.25, 0.5, 0.75]),
    math.sqrt(0.5) + np.array([0.25, 0.5, 0.75]) * (1 - math.sqrt(0.5)),
    atol=0.005,
  )
  np.testing.assert_allclose(
    np.quantile(lon, [0.25, 0.5, 0.75]),
    math.radians(45) + np.array([0.25, 0.5, 0.75]) * math.radians(45),
    atol=0.005,
  )


def test_label_weights_by_hand():
  # Grain 4: 2 rows x 4 columns of 90 degrees. Clients 0 and 1 share cell (0, 1) as 1:4,
  # cell (1, 2) is client 1's alone and cell (1, 3) no one's.
  heat = np.zeros((2, 2, 4), np.float32)
  heat[0, 0, 1], heat[1, 0, 1] = 0.1, 0.4
  heat[1, 1, 2] = 0.6
  labels = _vec([-65.0, 55.0, 135.0], [40.0, -40.0, -70.0])
  weights = _label_weights(jnp.asarray(heat), labels)
  np.testing.assert_allclose(weights, [[0.2, 0.0, 0.5], [0.8, 1.0, 0.5]], atol=1e-6)


def test_label_weights_columns_sum_to_one():
  mask = np.ones((4, 10), bool)
  heat = _heatmaps(
    _random_clients(seed=5, n=10), grain=32, sigma_deg=5.0, mask=mask, normalize=False
  )
  labels = _random_clients(seed=6, n=50).reshape(-1, 3)
  weights = np.asarray(_label_weights(heat, labels))
  chex.assert_shape(weights, (4, 200))
  assert np.all(np.isfinite(weights)) and weights.min() >= 0
  np.testing.assert_allclose(weights.sum(0), 1.0, atol=1e-5)


def test_combined_by_hand():
  heat = np.zeros((2, 2, 4), np.float32)
  heat[0, 0, :2] = 0.5
  heat[1, 1, 3] = 1.0
  expected = np.zeros((2, 4))
  expected[0, :2], expected[1, 3] = 0.25, 0.5
  np.testing.assert_allclose(combined(jnp.asarray(heat)), expected, atol=1e-7)
  expected[0, :2], expected[1, 3] = 0.375, 0.25
  np.testing.assert_allclose(
    combined(jnp.asarray(heat), jnp.array([3.0, 1.0])), expected, atol=1e-7
  )
  np.testing.assert_array_equal(combined(jnp.zeros((2, 2, 4))), 0.0)
