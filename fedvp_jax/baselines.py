"""Trivial predictors every trained model must beat: no-motion, great-circle constant velocity
and straight-line extrapolation.

Straight-line extrapolation is the strongest of the three on real head motion at most
horizons: the chord it follows, put back on the sphere, slows down with k where the
great circle keeps turning. It is also what an untrained model computes (see
:mod:`fedvp_jax.models.head`), so a model shows learning only by beating the best of the
three at each horizon (:func:`best_trivial`).
"""

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


def linear_extrapolation(history: jnp.ndarray, horizon: int) -> jnp.ndarray:
  """Continues the last step's displacement along a straight line, renormalised onto the
  sphere: step k ahead is ``normalize(p + k * (p - p_prev))``. With a single past sample this
  is :func:`no_motion`.

  Args:
    history: ``f32[..., M, 3]`` past unit vectors, oldest first.
    horizon: H.

  Returns:
    ``f32[..., H, 3]``.
  """
  if history.shape[-2] < 2:
    return no_motion(history, horizon)
  last = history[..., -1, :]
  step = last - history[..., -2, :]
  ahead = jnp.arange(1, horizon + 1, dtype=history.dtype)[:, None]
  return normalize(last[..., None, :] + ahead * step[..., None, :])


BASELINES = {
  "no-motion": no_motion,
  "constant-velocity": constant_velocity,
  "linear": linear_extrapolation,
}
"""The baseline predictors by name: ``(history: f32[..., M, 3], horizon) -> f32[..., H, 3]``."""


def best_trivial(baseline_degrees: dict[str, list[float | None]]) -> list[float | None]:
  """Per horizon step, the lowest mean error of the baselines (the best trivial predictor).

  Args:
    baseline_degrees: each baseline's mean great-circle error in degrees per horizon step.
  """
  per_step = zip(*baseline_degrees.values(), strict=True)
  return [min((d for d in step if d is not None), default=None) for step in per_step]
