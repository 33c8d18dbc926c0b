"""Geometry on the unit sphere: head directions as unit vectors.

Conventions follow the trace files: ``x = cos(lat) cos(lon)``, ``y = cos(lat) sin(lon)``,
``z = sin(lat)``, longitude in ``[-pi, pi)`` and latitude in ``[-pi/2, pi/2]``, radians.
"""

import jax.numpy as jnp

_EPS = 1e-12


def normalize(v: jnp.ndarray) -> jnp.ndarray:
  """Projects ``v: f32[..., 3]`` onto the unit sphere (zero vectors map to zero)."""
  norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
  return v / jnp.maximum(norm, _EPS)


def lonlat_to_vec(lon: jnp.ndarray, lat: jnp.ndarray) -> jnp.ndarray:
  """Unit vectors ``f32[..., 3]`` for longitudes and latitudes ``f32[...]`` in radians."""
  cos_lat = jnp.cos(lat)
  return jnp.stack([cos_lat * jnp.cos(lon), cos_lat * jnp.sin(lon), jnp.sin(lat)], axis=-1)


def vec_to_lonlat(v: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Longitude and latitude ``f32[...]`` in radians of vectors ``v: f32[..., 3]``."""
  v = normalize(v)
  lon = jnp.arctan2(v[..., 1], v[..., 0])
  lat = jnp.arcsin(jnp.clip(v[..., 2], -1.0, 1.0))
  return lon, lat


def orthodromic_distance(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Great-circle distance in radians between unit vectors ``a, b: f32[..., 3]``.

  Uses ``atan2(|a x b|, a . b)``, which stays accurate for nearly equal and nearly opposite
  directions where ``arccos(a . b)`` loses precision. Differentiable everywhere, so it is also
  a training loss: where ``a x b`` is exactly zero (a perfect prediction) the norm's undefined
  gradient is taken as zero, while a NaN still passes through.
  """
  squared = jnp.sum(jnp.square(jnp.cross(a, b)), axis=-1)
  exact = squared == 0
  # The double where keeps sqrt's infinite derivative at 0 out of the gradient.
  sine = jnp.where(exact, 0.0, jnp.sqrt(jnp.where(exact, 1.0, squared)))
  return jnp.arctan2(sine, jnp.sum(a * b, axis=-1))


def rotate(v: jnp.ndarray, axis: jnp.ndarray, angle: jnp.ndarray) -> jnp.ndarray:
  """Rotates ``v: f32[..., 3]`` by ``angle: f32[...]`` about unit ``axis: f32[..., 3]``.

  Rodrigues' formula; broadcasting follows numpy rules.
  """
  cos = jnp.cos(angle)[..., None]
  sin = jnp.sin(angle)[..., None]
  dot = jnp.sum(axis * v, axis=-1, keepdims=True)
  return v * cos + jnp.cross(axis, v) * sin + axis * dot * (1.0 - cos)


def turn_about_vertical(v: jnp.ndarray, angle: jnp.ndarray) -> jnp.ndarray:
  """Turns ``v: f32[..., 3]`` by ``angle: f32[...]`` radians about the vertical z axis (a
  change of yaw, latitude kept); broadcasting follows numpy rules."""
  cos, sin = jnp.cos(angle)[..., None], jnp.sin(angle)[..., None]
  x, y, z = v[..., 0:1], v[..., 1:2], v[..., 2:3]
  return jnp.concatenate([cos * x - sin * y, sin * x + cos * y, z], axis=-1)
