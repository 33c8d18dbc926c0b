"""The FedAvg family's compiled round against a plain Python loop over clients and steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_client_data

from fedvp_jax.algorithms import build_algorithm, prediction_loss
from fedvp_jax.algorithms.core import select_clients
from fedvp_jax.config import ALGORITHMS, RoundConfig
from fedvp_jax.data.federated import sample_batches
from fedvp_jax.errors import SettingError
from fedvp_jax.geometry import orthodromic_distance
from fedvp_jax.metrics import error_sums
from fedvp_jax.models import build_model

LR = 0.05


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  spec, data = tiny_client_data(tmp_path_factory.mktemp("fedavg"), users=4, length=30)
  # Ragged clients: client 2 loses half of its train windows to padding.
  n = data.train_mask.shape[1]
  data = data.replace(train_mask=data.train_mask.at[2, n // 2 :].set(False))
  model = build_model("lstm", spec.history, spec.horizon, latent_dim=12)
  return data, model


def perturbed_state(algorithm, data, key):
  """A state whose server and clients all differ, so every mode's arithmetic is exercised."""
  state = algorithm.init(key, data)
  noise = lambda tree, k: jax.tree.map(
    lambda leaf: leaf + 0.05 * jax.random.normal(jax.random.fold_in(k, leaf.size), leaf.shape), tree
  )
  return state.replace(
    server_params=noise(state.server_params, jax.random.key(11)),
    client_params=noise(state.client_params, jax.random.key(12)),
  )


def reference_round(model, config, state, data, key):
  """One round written plainly: per-client receive, per-step gradient descent, weighted mean."""
  select_key, batch_key, _ = jax.random.split(key, 3)
  selected = np.asarray(select_clients(select_key, data.num_clients, config.clients_per_round))
  xs, ys = sample_batches(
    batch_key, data, config.local_steps, config.batch_size, jnp.asarray(selected)
  )
  measures = {
    "mse": lambda p, x, y: jnp.mean((model.apply(p, x) - y) ** 2),
    # The great-circle distance as the geometry module writes it (its own test checks it
    # against arccos), independent of the loss's gradient-safe form.
    "orthodromic": lambda p, x, y: jnp.mean(orthodromic_distance(model.apply(p, x), y)),
  }
  grad = jax.jit(jax.grad(measures[config.loss]))
  server = state.server_params
  clients = []
  for k in range(data.num_clients):
    own = jax.tree.map(lambda leaf: leaf[k], state.client_params)
    b = config.beta
    mix = lambda s, o: jax.tree.map(lambda u, v: b * u + (1 - b) * v, s, o)
    if config.send == "full":
      own = mix(server, own)
    elif config.send == "partial":
      own = {"encoder": own["encoder"], "head": mix(server["head"], own["head"])}
    clients.append(own)
  trained = []
  for i, k in enumerate(selected):
    params = clients[k]
    for s in range(config.local_steps):
      g = grad(params, xs[i, s], ys[i, s])
      params = jax.tree.map(lambda p, d: p - LR * d, params, g)
    clients[k] = params
    trained.append(params)
  weights = np.asarray(data.train_counts)[selected]
  new_server = jax.tree.map(
    lambda *leaves: sum(w * leaf for w, leaf in zip(weights, leaves)) / weights.sum(), *trained
  )
  return new_server, jax.tree.map(lambda *leaves: jnp.stack(leaves), *clients)


CASES = [
  ("fedavg", 1.0, None, "mse"),
  ("fedavg", 0.5, None, "mse"),
  ("partial-fedavg", 1.0, None, "mse"),
  ("partial-fedavg", 0.5, None, "mse"),
  ("local", 1.0, None, "mse"),
  ("fedavg", 0.5, 2, "mse"),
  ("fedavg", 1.0, None, "orthodromic"),
  ("local", 1.0, None, "orthodromic"),
]


@pytest.mark.parametrize("algo,beta,per_round,loss", CASES)
def test_round_matches_python_loop(setup, algo, beta, per_round, loss):
  data, model = setup
  # The reference trains on the windows as they are; augmentation has its own test.
  config = RoundConfig(
    beta=beta,
    local_steps=3,
    batch_size=5,
    clients_per_round=per_round,
    augment="none",
    loss=loss,
  )
  algorithm = build_algorithm(algo, model, optax.sgd(LR), config)
  config = RoundConfig(**{**config.__dict__, "send": ALGORITHMS[algo].send})
  state = perturbed_state(algorithm, data, jax.random.key(0))
  apply = jax.jit(algorithm.apply)
  for r in range(2 if (algo, beta) == ("fedavg", 0.5) else 1):  # two rounds: the state carries
    key = jax.random.key(100 + r)
    expected_server, expected_clients = reference_round(model, config, state, data, key)
    state, metrics = apply(state, data, key)
    chex.assert_trees_all_close(state.client_params, expected_clients, rtol=2e-4, atol=1e-6)
    chex.assert_trees_all_close(state.server_params, expected_server, rtol=2e-4, atol=1e-6)
    assert int(state.round) == r + 1
    assert not bool(metrics.excluded.any())


def test_partial_participation_trains_only_the_selected(setup):
  data, model = setup
  config = RoundConfig(send="none", local_steps=2, batch_size=4, clients_per_round=1)
  algorithm = build_algorithm("local", model, optax.sgd(LR), config)
  state = perturbed_state(algorithm, data, jax.random.key(1))
  new, metrics = jax.jit(algorithm.apply)(state, data, jax.random.key(2))
  (chosen,) = np.asarray(metrics.selected)
  for k in range(data.num_clients):
    before = jax.tree.map(lambda leaf: leaf[k], state.client_params)
    after = jax.tree.map(lambda leaf: leaf[k], new.client_params)
    changed = any(
      not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
    )
    assert changed == (k == chosen)


def test_round_is_traced_once(setup):
  data, model = setup
  algorithm = build_algorithm(
    "fedavg", model, optax.sgd(LR), RoundConfig(local_steps=2, batch_size=4)
  )
  apply = jax.jit(chex.assert_max_traces(algorithm.apply, n=1))
  state = algorithm.init(jax.random.key(0), data)
  for r in range(3):
    state, _ = apply(state, data, jax.random.key(r))


def test_evaluation_is_of_the_deployed_models(setup):
  data, model = setup
  config = RoundConfig(send="partial", beta=0.5, local_steps=1, batch_size=4)
  algorithm = build_algorithm("partial-fedavg", model, optax.sgd(LR), config)
  state = perturbed_state(algorithm, data, jax.random.key(3))
  _, metrics = jax.jit(algorithm.apply)(state, data, jax.random.key(4))
  deployed = {
    "encoder": state.client_params["encoder"],
    "head": jax.tree.map(
      lambda s, o: 0.5 * s[None] + 0.5 * o, state.server_params["head"], state.client_params["head"]
    ),
  }
  prediction = jax.vmap(model.apply)(deployed, data.test_x)
  expected = error_sums(prediction, data.test_y, data.test_mask)
  chex.assert_trees_all_close(metrics.test, expected, rtol=1e-5)
  assert bool(metrics.evaluated)
  chex.assert_trees_all_close(jax.jit(algorithm.evaluate)(state, data), expected, rtol=1e-5)


def test_eval_every_skips_rounds(setup):
  data, model = setup
  config = RoundConfig(local_steps=1, batch_size=4, eval_every=2)
  algorithm = build_algorithm("fedavg", model, optax.sgd(LR), config)
  state = algorithm.init(jax.random.key(0), data)
  apply = jax.jit(algorithm.apply)
  evaluated = []
  for r in range(4):
    state, metrics = apply(state, data, jax.random.key(r))
    evaluated.append(bool(metrics.evaluated))
  assert evaluated == [True, False, True, False]


def test_poisoned_client_is_left_out(setup):
  data, model = setup
  poisoned = data.replace(train_x=data.train_x.at[1].set(jnp.nan))
  algorithm = build_algorithm(
    "fedavg", model, optax.sgd(LR), RoundConfig(local_steps=2, batch_size=4)
  )
  state = algorithm.init(jax.random.key(0), data)
  new, metrics = jax.jit(algorithm.apply)(state, poisoned, jax.random.key(1))
  np.testing.assert_array_equal(metrics.excluded, [False, True, False, False])
  chex.assert_tree_all_finite(new.server_params)
  chex.assert_tree_all_finite(new.client_params)
  assert np.isfinite(float(metrics.train_loss))


def test_an_unknown_training_loss_is_refused(setup):
  _, model = setup
  with pytest.raises(SettingError, match=r"^loss .*cosine.*choose one of mse, orthodromic"):
    prediction_loss(model, "cosine")
