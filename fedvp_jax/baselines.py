"""Trivial predictors every trained model must beat: no-motion and constant velocity."""

import jax.numpy as jnp

from fedvp_jax.geometry import normalize, orthodromic_distance, rotate


def no_motion(history: jnp.ndarray, horizon: int) -> jnp.ndarray:
  """Repeats the last observed position.

  Args:
    history: ``f32[..., M, 3]`` past unit vectors, oldest first.
    horizon: H.

  Returns:
    ``f32[..., H, 3]``.
  """
  last = history[..., -1:, :]
  return jnp.broadcast_to(last, (*history.shape[:-2], horizon, 3))


def constant_velocity(history: jnp.ndarray, horizon: int) -> jnp.ndarray:
  """Continues the last step's rotation at constant angular velocity along its great circle.

  Step k ahead rotates the last position by ``k`` times the angle between the last two
  positions, about their common axis. With a single past sample, or no motion between the
  last two, this is :func:`no_motion`.

  Args:
    history: ``f32[..., M, 3]`` past unit vectors, oldest first.
    horizon: H.

  Returns:
    ``f32[..., H, 3]``.
  """
  if history.shape[-2] < 2:
    return no_motion(history, horizon)
  prev, last = history[..., -2, :], history[..., -1, :]
  axis = jnp.cross(prev, last)
  axis_norm = jnp.linalg.norm(axis, axis=-1, keepdims=True)
  angle = orthodromic_distance(prev, last)
  # Without motion the axis is undefined; any unit axis with angle 0 gives the last position.
  axis = jnp.where(
    axis_norm > 1e-9, axis / jnp.maximum(axis_norm, 1e-12), jnp.array([0.0, 0.0, 1.0])
  )
  steps = jnp.arange(1, horizon + 1, dtype=history.dtype)
  angles = angle[..., None] * steps  # [..., H]
  return normalize(rotate(last[..., None, :], axis[..., None, :], angles))


BASELINES = {"no-motion": no_motion, "constant-velocity": constant_velocity}
"""The baseline predictors by name: ``(history: f32[..., M, 3], horizon) -> f32[..., H, 3]``."""
