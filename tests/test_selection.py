"""Model selection on validation, early stopping, the new viewers, and yaw augmentation."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN

from fedvp_jax.algorithms.client import augmented
from fedvp_jax.algorithms.core import (
  NOT_VALIDATED,
  ClientsState,
  RoundHyperparams,
  Selected,
  select_on_validation,
)
from fedvp_jax.experiment import prepare
from fedvp_jax.metrics import ErrorSums
from fedvp_jax.rounds import train

TINY = TINY_RUN.replace(rounds=6, optimizer="adam", learning_rate=0.01)


def planted_state(num_clients: int = 2) -> ClientsState:
  params = {"w": jnp.zeros((3,))}
  stacked = jax.tree.map(lambda x: jnp.zeros((num_clients, *x.shape)), params)
  selected = Selected(stacked, params, jnp.array(NOT_VALIDATED), jnp.array(-1, jnp.int32))
  hyper = RoundHyperparams(jnp.ones(()), jax.tree.map(lambda _: jnp.ones(()), params))
  return ClientsState(params, stacked, (), jnp.zeros((), jnp.int32), selected, hyper)


@pytest.mark.parametrize("curve", [[5.0, 3.0, 4.0, 1.0, 2.0], [1.0, 2.0, 3.0], [3.0, 3.0, 2.0]])
def test_the_selected_models_are_those_of_the_lowest_planted_validation_loss(curve):
  state = planted_state()
  evaluated = [True] * len(curve)
  evaluated[-1] = len(curve) < 5  # an unevaluated round never counts, however low its zeros
  for r, loss in enumerate(curve):
    # Client models marked with their round; validation sums giving `loss` as the weighted MSE.
    params = {"w": jnp.full((2, 3), float(r))}
    sums = ErrorSums(jnp.array([loss * 2, loss * 6]), jnp.zeros((2, 1)), jnp.array([2.0, 6.0]))
    state = state.replace(server_params={"w": jnp.full((3,), 10.0 + r)}, round=jnp.array(r))
    state = state.replace(
      selected=select_on_validation(state, params, sums, jnp.array(evaluated[r]), True)
    )
  counted = [loss for loss, e in zip(curve, evaluated, strict=True) if e]
  best = counted.index(min(counted))  # the first of equal losses stays
  assert int(state.selected.from_round) == best
  assert float(state.selected.validation_loss) == pytest.approx(min(counted))
  np.testing.assert_array_equal(state.selected.client_params["w"], np.full((2, 3), best))
  np.testing.assert_array_equal(state.selected.server_params["w"], np.full((3,), 10.0 + best))


def test_without_validation_windows_the_selection_is_the_latest():
  state = planted_state()
  for r in range(3):
    sums = ErrorSums(jnp.zeros((2,)), jnp.zeros((2, 1)), jnp.zeros((2,)))
    params = {"w": jnp.full((2, 3), float(r))}
    state = state.replace(round=jnp.array(r))
    state = state.replace(
      selected=select_on_validation(state, params, sums, jnp.array(True), False)
    )
  assert int(state.selected.from_round) == 2
  assert float(state.selected.validation_loss) == NOT_VALIDATED


@pytest.fixture(scope="module")
def trained():
  experiment = prepare(TINY)
  rounds = train(experiment, seeds=[0, 1])
  records = []
  while True:
    try:
      records.append(next(rounds).records)
    except StopIteration as stop:
      return experiment, records, stop.value


def test_the_reported_selection_is_the_round_of_lowest_validation_loss(trained):
  _, records, summaries = trained
  for k, summary in enumerate(summaries):
    curve = {per_seed[k]["round"]: per_seed[k]["validation_loss"] for per_seed in records}
    curve[summary["rounds"]] = summary["final_validation_loss"]  # the final models
    best = min(curve, key=lambda r: (curve[r], r))
    assert summary["selected"]["round"] == best
    assert summary["selected"]["validation_loss"] == pytest.approx(curve[best], rel=1e-6)
    # The selected models are the ones round `best` evaluated on test (or the final ones).
    test_loss = (
      summary["final"]["loss"] if best == summary["rounds"] else records[best][k]["test_loss"]
    )
    assert summary["selected"]["loss"] == pytest.approx(test_loss, rel=1e-5)


def test_new_viewers_are_the_viewers_who_are_not_clients(trained):
  experiment, _, summaries = trained
  assert experiment.new_users and not set(experiment.new_users) & set(experiment.users)
  assert experiment.new_viewers.x.shape[0] == len(experiment.new_users)
  for summary in summaries:
    new = summary["new_viewers"]
    assert new["viewers"] == len(experiment.new_users)
    assert set(new["baselines"]) == {"no-motion", "constant-velocity", "linear"}
    assert all(math.isfinite(d) for d in new["selected"]["orthodromic_deg"])


def test_patience_stops_once_no_seed_improves():
  config = TINY.replace(rounds=40, patience=2, learning_rate=0.3)  # overshoots, stops soon
  experiment = prepare(config)
  rounds = train(experiment, seeds=[0])
  losses = []
  while True:
    try:
      losses.append(next(rounds).records[0]["validation_loss"])
    except StopIteration as stop:
      (summary,) = stop.value
      break
  assert summary["stopped_early"] and summary["rounds"] == len(losses) < 40
  # It stopped at the first round after which 2 evaluations in a row did not improve.
  since, best = 0, math.inf
  for r, loss in enumerate(losses):
    since, best = (0, loss) if loss < best else (since + 1, best)
    assert (since >= 2) == (r == len(losses) - 1)


def test_patience_needs_a_validation_split():
  from fedvp_jax.errors import SettingError

  with pytest.raises(SettingError, match=r"patience 3: .*validation_fraction > 0"):
    TINY.replace(patience=3, validation_fraction=0.0)


def _yaw_matrix(angle: float) -> np.ndarray:
  c, s = math.cos(angle), math.sin(angle)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def test_yaw_augmentation_turns_each_window_by_its_own_angle():
  seen = []

  def loss(params, batch, key, context):
    seen.append(batch)
    return jnp.zeros(())

  rng = np.random.default_rng(0)
  history = rng.normal(size=(5, 4, 3)).astype(np.float32)
  future = rng.normal(size=(5, 2, 3)).astype(np.float32)
  labels = rng.normal(size=(7, 3)).astype(np.float32)
  key = jax.random.key(3)
  augmented(loss, "yaw")(None, (history, future, labels), key, None)
  turned_history, turned_future, same_labels = seen[0]
  angles = jax.random.uniform(jax.random.split(key)[0], (5,), maxval=2 * jnp.pi)
  for n, angle in enumerate(np.asarray(angles)):
    rotation = _yaw_matrix(float(angle))
    np.testing.assert_allclose(turned_history[n], history[n] @ rotation.T, atol=1e-5)
    np.testing.assert_allclose(turned_future[n], future[n] @ rotation.T, atol=1e-5)
  np.testing.assert_array_equal(same_labels, labels)
  assert len({round(float(a), 4) for a in np.asarray(angles)}) == 5
  seen.clear()
  augmented(loss, "none")(None, (history, future), key, None)
  chex.assert_trees_all_equal(seen[0], (history, future))
