"""Tests of the no-motion and constant-velocity baselines and of the sphere geometry."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smooth_trace

from fedvp_jax import baselines, geometry
from fedvp_jax.baselines import BASELINES

# Jitted once per shape: much faster on CPU than op-by-op dispatch of many small shapes.
constant_velocity = jax.jit(baselines.constant_velocity, static_argnums=1)
no_motion = jax.jit(baselines.no_motion, static_argnums=1)
orthodromic_distance = jax.jit(geometry.orthodromic_distance)
lonlat_to_vec = jax.jit(geometry.lonlat_to_vec)
vec_to_lonlat = jax.jit(geometry.vec_to_lonlat)
normalize = jax.jit(geometry.normalize)


def random_histories(seed: int, shape: tuple[int, ...], m: int) -> np.ndarray:
  """``f32[*shape, m, 3]`` windows of smooth random head motion."""
  rng = np.random.default_rng(seed)
  n = int(np.prod(shape))
  out = np.stack([smooth_trace(rng, m) for _ in range(n)])
  return out.reshape(*shape, m, 3).astype(np.float32)


def axis_angle_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
  """Rotation matrix about unit ``axis`` by ``angle`` (matrix form of Rodrigues' formula)."""
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def reference_constant_velocity(history: np.ndarray, horizon: int) -> np.ndarray:
  """Per window: the rotation taking the second-to-last position to the last, applied k times."""
  history = history.astype(np.float64)
  # float32 inputs are unit only to ~1e-7, which would bias arccos of small angles.
  history = history / np.linalg.norm(history, axis=-1, keepdims=True)
  flat = history.reshape(-1, *history.shape[-2:])
  out = np.empty((len(flat), horizon, 3))
  for n, window in enumerate(flat):
    prev, last = window[-2], window[-1]
    cross = np.cross(prev, last)
    angle = np.arccos(np.clip(prev @ last, -1, 1))
    if np.linalg.norm(cross) < 1e-12:
      out[n] = last
      continue
    rot = axis_angle_matrix(cross / np.linalg.norm(cross), angle)
    p = last
    for k in range(horizon):
      p = rot @ p
      out[n, k] = p
  return out.reshape(*history.shape[:-2], horizon, 3)


# --- no motion -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, m, h", [((), 5, 3), ((7,), 1, 4), ((2, 3), 4, 1)])
def test_no_motion(batch, m, h):
  history = random_histories(0, batch, m)
  pred = no_motion(jnp.asarray(history), h)
  chex.assert_shape(pred, (*batch, h, 3))
  for k in range(h):
    np.testing.assert_array_equal(np.asarray(pred)[..., k, :], history[..., -1, :])


# --- constant velocity -----------------------------------------------------------------------


@pytest.mark.parametrize("batch, m, h", [((16,), 5, 6), ((3, 4), 2, 3), ((), 10, 25)])
def test_constant_velocity_matches_reference(batch, m, h):
  history = random_histories(1, batch, m)
  pred = np.asarray(constant_velocity(jnp.asarray(history), h))
  chex.assert_shape(pred, (*batch, h, 3))
  ref = reference_constant_velocity(history, h)
  np.testing.assert_allclose(pred, ref, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(pred, axis=-1), 1.0, atol=1e-5)


def test_constant_velocity_fast_turn_matches_reference():
  rng = np.random.default_rng(2)
  prev = rng.normal(size=(20, 3))
  prev /= np.linalg.norm(prev, axis=-1, keepdims=True)
  turn = rng.normal(size=(20, 3))
  last = prev + rng.uniform(0.3, 1.5, (20, 1)) * turn / np.linalg.norm(turn, axis=-1, keepdims=True)
  last /= np.linalg.norm(last, axis=-1, keepdims=True)
  history = np.stack([prev, last], axis=1).astype(np.float32)
  pred = np.asarray(constant_velocity(jnp.asarray(history), 8))
  np.testing.assert_allclose(pred, reference_constant_velocity(history, 8), atol=5e-5)


@pytest.mark.parametrize("omega", [0.01, 0.1, 0.35])
def test_constant_velocity_exact_on_great_circle(omega):
  rng = np.random.default_rng(int(omega * 1000))
  e1, e2 = np.linalg.qr(rng.normal(size=(3, 2)))[0].T  # orthonormal pair: a random great circle
  m, h = 6, 25
  t = np.arange(m + h)
  path = np.cos(omega * t)[:, None] * e1 + np.sin(omega * t)[:, None] * e2
  pred = np.asarray(constant_velocity(jnp.asarray(path[:m], jnp.float32), h))
  dist = np.arccos(np.clip(np.sum(pred * path[m:], -1), -1, 1))
  # Error grows at most linearly with k from the float32 error of the first step's angle.
  assert dist.max() < 2e-4 * max(1.0, 0.01 / omega) + 1e-5 * h, dist


def test_constant_velocity_with_one_sample_is_no_motion():
  history = jnp.asarray(random_histories(3, (5,), 1))
  chex.assert_trees_all_equal(constant_velocity(history, 4), no_motion(history, 4))


def test_constant_velocity_without_motion_stays_put():
  history = random_histories(4, (6,), 4)
  history[:, -2] = history[:, -1]  # no motion over the last step
  history[0] = history[0, -1]  # no motion at all
  pred = np.asarray(constant_velocity(jnp.asarray(history), 5))
  assert np.isfinite(pred).all()
  for k in range(5):
    np.testing.assert_allclose(pred[:, k], history[:, -1], atol=1e-6)


def test_constant_velocity_without_motion_has_finite_gradient():
  history = jnp.asarray(random_histories(5, (), 3))
  history = history.at[-2].set(history[-1])
  grad = jax.jit(jax.grad(lambda h: baselines.constant_velocity(h, 3).sum()))(history)
  chex.assert_tree_all_finite(grad)


def test_baselines_registry():
  history = jnp.asarray(random_histories(6, (4,), 3))
  assert set(BASELINES) == {"no-motion", "constant-velocity", "linear"}
  assert BASELINES["linear"] is baselines.linear_extrapolation
  assert BASELINES["no-motion"] is baselines.no_motion
  assert BASELINES["constant-velocity"] is baselines.constant_velocity
  chex.assert_trees_all_close(
    constant_velocity(history, 2), baselines.constant_velocity(history, 2), atol=1e-6
  )


def reference_linear(history: np.ndarray, horizon: int) -> np.ndarray:
  """Straight-line extrapolation written per window and step, in float64."""
  history = np.asarray(history, np.float64)
  out = np.zeros((*history.shape[:-2], horizon, 3))
  for index in np.ndindex(*history.shape[:-2]):
    last, prev = history[index][-1], history[index][-2]
    for k in range(1, horizon + 1):
      point = last + k * (last - prev)
      out[index][k - 1] = point / np.linalg.norm(point)
  return out


@pytest.mark.parametrize("batch, m, h", [((), 2, 1), ((7,), 5, 25), ((3, 4), 10, 5)])
def test_linear_extrapolation_matches_reference(batch, m, h):
  history = random_histories(m + 20, batch, m)
  pred = np.asarray(baselines.linear_extrapolation(jnp.asarray(history), h))
  np.testing.assert_allclose(pred, reference_linear(history, h), atol=2e-6)


def test_linear_extrapolation_with_one_sample_is_no_motion():
  history = jnp.asarray(random_histories(2, (4,), 1))
  chex.assert_trees_all_close(
    baselines.linear_extrapolation(history, 3), baselines.no_motion(history, 3)
  )


def test_best_trivial_is_the_lowest_error_at_each_step():
  degrees = {"a": [1.0, 5.0, None], "b": [2.0, 4.0, 3.0], "c": [3.0, 6.0, None]}
  assert baselines.best_trivial(degrees) == [1.0, 4.0, 3.0]


# --- geometry --------------------------------------------------------------------------------


def arccos_reference(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return np.arccos(np.clip(np.sum(a * b, -1), -1.0, 1.0))


def test_orthodromic_distance_random_points():
  rng = np.random.default_rng(7)
  a = rng.normal(size=(500, 3))
  b = rng.normal(size=(500, 3))
  a = (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)
  b = (b / np.linalg.norm(b, axis=-1, keepdims=True)).astype(np.float32)
  got = np.asarray(orthodromic_distance(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(got, arccos_reference(a, b), atol=2e-6)
  np.testing.assert_allclose(
    got, np.asarray(orthodromic_distance(jnp.asarray(b), jnp.asarray(a))), atol=1e-6
  )


@pytest.mark.parametrize(
  "angle", [0.0, 1e-4, 1e-3, 0.01, np.pi / 2, np.pi - 0.01, np.pi - 1e-3, np.pi]
)
def test_orthodromic_distance_near_equal_and_antipodal(angle):
  rng = np.random.default_rng(8)
  e1, e2 = np.linalg.qr(rng.normal(size=(3, 2)))[0].T
  a = e1
  b = np.cos(angle) * e1 + np.sin(angle) * e2
  a32, b32 = a.astype(np.float32), b.astype(np.float32)
  got = float(orthodromic_distance(jnp.asarray(a32), jnp.asarray(b32)))
  ref = float(arccos_reference(a32, b32))  # float64 arccos of the same float32 inputs
  # float32 inputs are only accurate to ~6e-8; allow a little more than that.
  assert abs(got - ref) < 3e-7 + 1e-6 * ref, (got, ref)
  assert abs(got - angle) < 5e-7 + 1e-6 * angle, (got, angle)


def test_orthodromic_distance_exact_pairs():
  x, y, z = np.eye(3, dtype=np.float32)
  a = jnp.asarray([x, x, x, z, x])
  b = jnp.asarray([x, y, -x, -z, (x + y) / np.sqrt(2)])
  np.testing.assert_allclose(
    orthodromic_distance(a, b), [0, np.pi / 2, np.pi, np.pi, np.pi / 4], atol=1e-6
  )


def test_lonlat_to_vec_known_points():
  lon = jnp.asarray([0.0, np.pi / 2, -np.pi / 2, 0.0, 1.0, np.pi / 4])
  lat = jnp.asarray([0.0, 0.0, 0.0, np.pi / 2, -np.pi / 2, np.pi / 4])
  expected = [[1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1], [0.5, 0.5, np.sqrt(0.5)]]
  np.testing.assert_allclose(lonlat_to_vec(lon, lat), expected, atol=1e-6)


def test_lonlat_round_trip():
  rng = np.random.default_rng(9)
  lon = rng.uniform(-np.pi, np.pi - 1e-3, 1000).astype(np.float32)
  lat = rng.uniform(-1.5, 1.5, 1000).astype(np.float32)
  v = lonlat_to_vec(jnp.asarray(lon), jnp.asarray(lat))
  chex.assert_shape(v, (1000, 3))
  np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-6)
  lon2, lat2 = vec_to_lonlat(v)
  # Longitude is only defined modulo 2 pi (and badly conditioned near the poles).
  dlon = (np.asarray(lon2) - lon + np.pi) % (2 * np.pi) - np.pi
  np.testing.assert_allclose(dlon * np.cos(lat), 0.0, atol=2e-6)
  np.testing.assert_allclose(lat2, lat, atol=2e-3)  # arcsin near +-1: large relative error
  np.testing.assert_allclose(np.asarray(lat2)[np.abs(lat) < 1.0], lat[np.abs(lat) < 1.0], atol=2e-6)


def test_vec_round_trip():
  rng = np.random.default_rng(10)
  v = rng.normal(size=(1000, 3)) * rng.uniform(0.5, 3.0, (1000, 1))  # not unit: normalised first
  lon, lat = vec_to_lonlat(jnp.asarray(v, jnp.float32))
  assert (np.asarray(lon) >= -np.pi).all() and (np.asarray(lon) <= np.pi).all()
  assert (np.abs(np.asarray(lat)) <= np.pi / 2).all()
  back = np.asarray(lonlat_to_vec(lon, lat))
  np.testing.assert_allclose(back, v / np.linalg.norm(v, axis=-1, keepdims=True), atol=2e-3)
  np.testing.assert_allclose(
    np.asarray(orthodromic_distance(jnp.asarray(back), normalize(jnp.asarray(v, jnp.float32)))),
    0.0,
    atol=5e-3,
  )
