"""Aggregation and receiving, checked against hand computation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedvp_jax.algorithms.aggregation import (
  aggregate,
  receive,
  receive_sent,
  send_mask,
  weighted_mean,
)
from fedvp_jax.config import RoundConfig
from fedvp_jax.errors import ConfigError, SettingError


def stacked_params(rng, clients=3):
  return {
    "encoder": {"w": jnp.asarray(rng.normal(size=(clients, 2, 3)), jnp.float32)},
    "head": {
      "w": jnp.asarray(rng.normal(size=(clients, 4)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(clients,)), jnp.float32),
    },
  }


def test_weighted_mean_by_hand():
  rng = np.random.default_rng(0)
  stacked = stacked_params(rng)
  weights = jnp.array([900.0, 450.0, 150.0])
  mean = weighted_mean(stacked, weights)
  for path in (("encoder", "w"), ("head", "w"), ("head", "b")):
    leaf = np.asarray(stacked[path[0]][path[1]])
    expected = (900 * leaf[0] + 450 * leaf[1] + 150 * leaf[2]) / 1500
    np.testing.assert_allclose(mean[path[0]][path[1]], expected, rtol=1e-5)


def test_aggregate_leaves_out_non_finite_and_padding():
  rng = np.random.default_rng(1)
  stacked = stacked_params(rng)
  stacked["encoder"]["w"] = stacked["encoder"]["w"].at[1, 0, 0].set(jnp.nan)
  server = jax.tree.map(lambda leaf: leaf[0] * 0 + 7.0, stacked)
  new, used = aggregate(server, stacked, jnp.array([2.0, 5.0, 1.0]))
  np.testing.assert_array_equal(used, [True, False, True])
  expected = jax.tree.map(lambda leaf: (2 * leaf[0] + 1 * leaf[2]) / 3, stacked)
  chex.assert_trees_all_close(new, expected, rtol=1e-5)
  # Zero weight (padding) never counts either.
  new, used = aggregate(server, stacked, jnp.array([0.0, 5.0, 1.0]))
  np.testing.assert_array_equal(used, [False, False, True])
  chex.assert_trees_all_close(new, jax.tree.map(lambda leaf: leaf[2], stacked))


def test_aggregate_keeps_server_when_no_client_is_usable():
  stacked = stacked_params(np.random.default_rng(2))
  poisoned = jax.tree.map(lambda leaf: leaf * jnp.nan, stacked)
  server = jax.tree.map(lambda leaf: leaf[0], stacked)
  new, used = aggregate(server, poisoned, jnp.ones(3))
  assert not bool(used.any())
  chex.assert_trees_all_equal(new, server)


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.2])
def test_receive_modes_by_hand(beta):
  rng = np.random.default_rng(3)
  clients = stacked_params(rng)
  server = jax.tree.map(lambda leaf: leaf[0] + 10.0, stacked_params(rng))
  full = receive(server, clients, "full", beta)
  partial = receive(server, clients, "partial", beta)
  none = receive(server, clients, "none", beta)
  for k in range(3):
    for part, name in (("encoder", "w"), ("head", "w"), ("head", "b")):
      own = np.asarray(clients[part][name][k])
      blended = beta * np.asarray(server[part][name]) + (1 - beta) * own
      np.testing.assert_allclose(full[part][name][k], blended, rtol=1e-6)
      np.testing.assert_allclose(
        partial[part][name][k], blended if part == "head" else own, rtol=1e-6
      )
      np.testing.assert_array_equal(none[part][name][k], own)
  # Partial leaves every encoder bit-for-bit untouched.
  chex.assert_trees_all_equal(partial["encoder"], clients["encoder"])
  # The send mode as data (per-leaf masks, what the vmapped round holds in its state) gives
  # exactly the same models: the server's layer where sent with beta 1, the client's where not.
  for send, by_name in (("full", full), ("partial", partial), ("none", none)):
    masked = jax.jit(receive_sent)(server, clients, send_mask(server, send), beta)
    chex.assert_trees_all_close(masked, by_name, rtol=1e-6)
    if beta == 1.0 or send == "none":
      chex.assert_trees_all_equal(masked, by_name)


def test_bad_send_settings():
  # The round's send mode and beta are checked when its RoundConfig is built.
  with pytest.raises(SettingError, match=r"^beta 0\.0: must be in \(0, 1\]"):
    RoundConfig(send="full", beta=0.0)
  with pytest.raises(SettingError, match=r"^beta 1\.5: must be in \(0, 1\]"):
    RoundConfig(send="full", beta=1.5)
  with pytest.raises(ConfigError, match=r"^send 'half': choose one of full, partial, none"):
    RoundConfig(send="half", beta=1.0)
