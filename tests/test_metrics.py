"""Error sums and the Average Global Loss against plain loops."""

import jax
import jax.numpy as jnp
import numpy as np

from fedvp_jax.metrics import error_sums, mse, orthodromic_loss, summarize


def unit(rng, shape):
  v = rng.normal(size=(*shape, 3))
  return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_error_sums_and_summary_match_loops():
  rng = np.random.default_rng(0)
  pred, target = unit(rng, (3, 5, 2)), unit(rng, (3, 5, 2))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  sums = error_sums(pred, target, mask)
  total_se, total_od, count = 0.0, np.zeros(2), 0
  for c in range(3):
    se, od = 0.0, np.zeros(2)
    for n in range(5):
      if mask[c, n]:
        se += np.mean((pred[c, n] - target[c, n]) ** 2)
        for h in range(2):
          od[h] += np.arccos(np.clip(np.dot(pred[c, n, h], target[c, n, h]), -1, 1))
    np.testing.assert_allclose(sums.squared_error[c], se, rtol=1e-5)
    np.testing.assert_allclose(sums.orthodromic[c], od, rtol=1e-4)
    assert sums.num_windows[c] == mask[c].sum()
    total_se, total_od, count = total_se + se, total_od + od, count + mask[c].sum()
  summary = summarize(sums)
  np.testing.assert_allclose(summary.loss, total_se / count, rtol=1e-5)
  np.testing.assert_allclose(summary.orthodromic_deg, np.degrees(total_od / count), rtol=1e-4)
  np.testing.assert_allclose(mse(pred, target), np.mean((pred - target) ** 2), rtol=1e-5)


def test_a_prediction_that_is_no_direction_scores_the_worst_error():
  rng = np.random.default_rng(1)
  target = unit(rng, (1, 4, 1))
  pred = target.copy()
  pred[0, 0] = 0.0  # what a diverged model outputs after normalising a zero vector
  sums = error_sums(pred, target, np.ones((1, 4), bool))
  np.testing.assert_allclose(sums.orthodromic[0, 0], np.pi, rtol=1e-6)


def test_the_orthodromic_loss_is_the_mean_great_circle_distance_with_finite_gradients():
  rng = np.random.default_rng(2)
  pred, target = unit(rng, (4, 3)), unit(rng, (4, 3))
  angles = np.arccos(np.clip(np.sum(pred.astype(np.float64) * target, axis=-1), -1, 1))
  np.testing.assert_allclose(orthodromic_loss(pred, target), np.mean(angles), rtol=1e-5)
  # A perfect prediction: the distance is 0 and its gradient finite (|a x b| is 0 there,
  # where a plain norm's gradient is NaN).
  assert float(orthodromic_loss(target, target)) < 1e-5
  gradient = jax.grad(orthodromic_loss)(jnp.asarray(target), jnp.asarray(target))
  assert bool(jnp.all(jnp.isfinite(gradient)))
  # ... while a NaN prediction (a diverged model) still gives a NaN loss, never a 0.
  broken = pred.copy()
  broken[0, 0] = np.nan
  assert np.isnan(float(orthodromic_loss(broken, target)))
  # Away from 0, moving a prediction along the great circle towards its target by a small
  # angle lowers the loss by that angle (divided by the number of vectors averaged).
  step = 1e-3
  towards = pred + step * (target - pred * np.sum(pred * target, axis=-1, keepdims=True))
  towards /= np.linalg.norm(towards, axis=-1, keepdims=True)
  moved = np.arccos(np.clip(np.sum(towards.astype(np.float64) * target, axis=-1), -1, 1))
  np.testing.assert_allclose(
    orthodromic_loss(pred, target) - orthodromic_loss(towards, target),
    np.mean(angles - moved),
    rtol=2e-2,
  )
