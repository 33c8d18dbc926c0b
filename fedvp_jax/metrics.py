"""Losses and error metrics of viewport predictions, masked and summed per client."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedvp_jax.config import require
from fedvp_jax.geometry import orthodromic_distance


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over every coordinate of ``f32[..., H, 3]``: the Average Global Loss's
  measure and the ``"mse"`` training loss."""
  return jnp.mean(jnp.square(prediction - target))


def orthodromic_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Mean great-circle distance in radians between ``prediction`` and ``target: f32[..., H,
  3]`` (:func:`~fedvp_jax.geometry.orthodromic_distance`, whose gradient is finite even at a
  perfect prediction): the ``"orthodromic"`` training loss, the metric itself."""
  return jnp.mean(orthodromic_distance(prediction, target))


def training_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The clients' training loss named by the setting ``loss`` (``RoundConfig.loss``):
  ``"mse"`` (:func:`mse`) or ``"orthodromic"`` (:func:`orthodromic_loss`), as
  ``(prediction, target) -> f32[]``.

  Raises:
    SettingError: for another name.
  """
  require("loss", name)
  return {"mse": mse, "orthodromic": orthodromic_loss}[name]


class ErrorSums(NamedTuple):
  """Per-client error sums over real windows; divide by ``num_windows`` for means.

  Attributes:
    squared_error: ``f32[clients]`` sum over windows of each window's MSE (mean over H and
      the 3 coordinates).
    orthodromic: ``f32[clients, H]`` sum over windows of great-circle error in radians, per
      horizon step (pi for a prediction that is not a direction).
    num_windows: ``f32[clients]`` number of real windows.
  """

  squared_error: jax.Array
  orthodromic: jax.Array
  num_windows: jax.Array


def error_sums(prediction: jax.Array, target: jax.Array, mask: jax.Array) -> ErrorSums:
  """Per-client error sums of ``prediction, target: f32[clients, n, H, 3]``.

  Only windows where ``mask: bool[clients, n]`` is True count.
  """
  weight = mask.astype(prediction.dtype)
  window_mse = jnp.mean(jnp.square(prediction - target), axis=(-2, -1))
  # A diverged model can output zero vectors, whose direction is undefined: score them as the
  # worst possible error (pi), never as the 0 that atan2(0, 0) would give.
  defined = jnp.linalg.norm(prediction, axis=-1) > 0.5
  distance = jnp.where(defined, orthodromic_distance(prediction, target), jnp.pi)
  return ErrorSums(
    squared_error=jnp.sum(window_mse * weight, axis=1),
    orthodromic=jnp.sum(distance * weight[..., None], axis=1),
    num_windows=jnp.sum(weight, axis=1),
  )


class Summary(NamedTuple):
  """Errors over all clients, every window counting once.

  Attributes:
    loss: the Average Global Loss: test MSE averaged over clients weighted by their number
      of test windows (equal to the MSE over all test windows).
    orthodromic_deg: ``f32[H]`` mean great-circle error in degrees per horizon step.
  """

  loss: jax.Array
  orthodromic_deg: jax.Array


def summarize(sums: ErrorSums) -> Summary:
  """The sample-weighted means over clients of :class:`ErrorSums`."""
  total = jnp.maximum(jnp.sum(sums.num_windows), 1.0)
  return Summary(
    loss=jnp.sum(sums.squared_error) / total,
    orthodromic_deg=jnp.degrees(jnp.sum(sums.orthodromic, axis=0) / total),
  )
