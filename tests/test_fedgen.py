"""FedGen: schedules, losses, generator training, and the compiled round against plain loops."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_client_data

from fedvp_jax.algorithms import build_algorithm
from fedvp_jax.algorithms.core import select_clients
from fedvp_jax.algorithms.fedgen import (
  SCHEDULE_DECAY,
  diversity_loss,
  generator_update,
  generator_weights,
  teacher_loss,
)
from fedvp_jax.config import FedGenConfig, RoundConfig
from fedvp_jax.data.federated import sample_batches, sample_final_targets
from fedvp_jax.geometry import normalize, orthodromic_distance
from fedvp_jax.heatmap import combined, heatmaps, label_weights, sample_labels
from fedvp_jax.models import build_model
from fedvp_jax.models.generator import build_generator

LR = 0.05
SMALL = FedGenConfig(
  grain=16, heatmap_sigma=30.0, gen_batch_size=6, gen_steps=3, generator_hidden=16, noise_dim=4
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  spec, data = tiny_client_data(tmp_path_factory.mktemp("fedgen"), users=3, length=24)
  model = build_model("lstm", spec.history, spec.horizon, latent_dim=10)
  return data, model


def test_generator_weights_schedule_by_hand():
  config = FedGenConfig(alpha=2.0, latent_weight=3.0, pretrain_rounds=5, gen_warmup=4)
  for r in range(5):
    assert [float(w) for w in generator_weights(config, jnp.array(r))] == [0.0, 0.0]
  for t in range(6):
    alpha, beta = generator_weights(config, jnp.array(5 + t))
    ramp = min(1.0, (t + 1) / 4)
    np.testing.assert_allclose(alpha, 2.0 * SCHEDULE_DECAY**t * ramp, rtol=1e-6)
    np.testing.assert_allclose(beta, 3.0 * SCHEDULE_DECAY**t * ramp, rtol=1e-6)
  # Without pretraining the generator is off in round 0 only; the floor holds late on.
  plain = FedGenConfig(alpha=1.0)
  assert float(generator_weights(plain, jnp.array(0))[0]) == 0.0
  assert float(generator_weights(plain, jnp.array(1))[0]) == 1.0
  np.testing.assert_allclose(generator_weights(plain, jnp.array(2000))[0], 1e-4)
  # Another decay and floor.
  slow = FedGenConfig(alpha=2.0, alpha_decay=0.5, alpha_floor=0.3)
  weights = [float(generator_weights(slow, jnp.array(1 + t))[0]) for t in range(4)]
  np.testing.assert_allclose(weights, [2.0, 1.0, 0.5, 0.3], rtol=1e-6)


def test_diversity_loss_matches_loop():
  rng = np.random.default_rng(0)
  noise, z = rng.normal(size=(5, 3)), rng.normal(size=(5, 4))
  total = 0.0
  for i in range(5):
    for j in range(5):
      total += -np.mean((noise[i] - noise[j]) ** 2) * np.mean(np.abs(z[i] - z[j]))
  expected = np.exp(total / 25)
  np.testing.assert_allclose(
    diversity_loss(jnp.asarray(noise), jnp.asarray(z)), expected, rtol=1e-5
  )


def random_heads(model, key, clients):
  """Clients' params with distinct, non-trivial heads."""
  keys = jax.random.split(key, clients)
  params = jax.vmap(model.init)(keys)
  out = params["head"]["out"]
  out["kernel"] = 0.3 * jax.random.normal(jax.random.fold_in(key, 1), out["kernel"].shape)
  return params


def test_generator_training_lowers_teacher_loss(setup):
  _, model = setup
  generator = build_generator("simple", model.latent_dim, grain=16, hidden=32, noise_dim=4)
  heads = random_heads(model, jax.random.key(0), 3)
  points = normalize(jax.random.normal(jax.random.key(1), (3, 40, 3)) + jnp.array([1.0, 0, 0]))
  heat = heatmaps(points, 16, 30.0, normalize=False)
  usable = jnp.ones(3, bool)
  g_opt = optax.adam(1e-2)
  train = jax.jit(generator_update(model, generator, g_opt, 200, 32, 0.0))
  g_params = generator.init(jax.random.key(2))
  labels = sample_labels(jax.random.key(3), combined(heat), 64)
  weights = label_weights(heat, labels)
  np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=1e-6)
  noise = jax.random.normal(jax.random.key(4), (64, 4))
  before, _ = teacher_loss(model, generator, g_params, heads, usable, labels, weights, noise)
  g_params, _, _, _ = train(g_params, g_opt.init(g_params), heads, usable, heat, jax.random.key(5))
  after, _ = teacher_loss(model, generator, g_params, heads, usable, labels, weights, noise)
  assert float(after) < 0.5 * float(before)


def test_teacher_loss_matches_client_loop(setup):
  _, model = setup
  generator = build_generator(
    "deep", model.latent_dim, embedding=True, grain=16, hidden=16, noise_dim=4
  )
  g_params = generator.init(jax.random.key(0))
  heads = random_heads(model, jax.random.key(1), 3)
  labels = normalize(jax.random.normal(jax.random.key(2), (7, 3)))
  weights = jax.nn.softmax(jax.random.normal(jax.random.key(3), (3, 7)), axis=0)
  noise = jax.random.normal(jax.random.key(4), (7, 4))
  usable = jnp.array([True, False, True])
  loss, _ = teacher_loss(model, generator, g_params, heads, usable, labels, weights, noise)
  z = generator.apply(g_params, noise, labels)
  expected = 0.0
  for k in (0, 2):  # the server's loop over clients, as in FedGen's code
    head_k = jax.tree.map(lambda leaf: leaf[k], heads)
    error = np.sum((np.asarray(model.head(head_k, z)[:, -1]) - np.asarray(labels)) ** 2, axis=-1)
    expected += np.mean(np.asarray(weights[k]) * error)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("algo", ["fedgen", "local-fedgen", "partial-fedgen"])
def test_stage_one_client_update_is_the_plain_one(setup, algo):
  data, model = setup
  config = RoundConfig(local_steps=2, batch_size=4)
  gen = build_algorithm(
    algo, model, optax.sgd(LR), config, dataclasses.replace(SMALL, pretrain_rounds=2)
  )
  plain = build_algorithm(
    algo.replace("fedgen", "fedavg").replace("local-fedavg", "local"), model, optax.sgd(LR), config
  )
  state = gen.init(jax.random.key(0), data)
  clients = state.clients
  for r in range(2):
    key = jax.random.key(10 + r)
    state, metrics = jax.jit(gen.apply)(state, data, key)
    clients, _ = jax.jit(plain.apply)(clients, data, jax.random.split(key)[0])
    assert float(metrics.extra["generator_weight"]) == 0.0
    chex.assert_trees_all_close(
      state.clients.client_params, clients.client_params, rtol=1e-6, atol=1e-7
    )
    chex.assert_trees_all_close(
      state.clients.server_params, clients.server_params, rtol=1e-6, atol=1e-7
    )


def reference_fedgen_round(model, generator, cfg, config, state, data, key):
  """One FedGen round written as the researcher's code runs it: clients one after another,
  steps one after another, the server looping over clients for the teacher loss."""
  clients_key, server_key = jax.random.split(key)
  select_key, batch_key, train_key = jax.random.split(clients_key, 3)
  selected = np.asarray(select_clients(select_key, data.num_clients, config.clients_per_round))
  xs, ys = sample_batches(
    batch_key, data, config.local_steps, config.batch_size, jnp.asarray(selected)
  )
  labels = sample_final_targets(
    jax.random.fold_in(batch_key, 1),
    data,
    config.local_steps,
    cfg.gen_batch_size,
    jnp.asarray(selected),
  )
  alpha, beta = (float(w) for w in generator_weights(cfg, state.clients.round))
  g_params = state.generator_params

  def client_loss(params, x, y, y_hat, step_key):
    if config.loss == "mse":
      real = jnp.mean((model.apply(params, x) - y) ** 2)
    else:  # the great-circle distance; the generator terms below stay MSE
      real = jnp.mean(orthodromic_distance(model.apply(params, x), y))
    label_key, latent_key = jax.random.split(step_key)
    z = generator.apply(
      g_params, jax.random.normal(label_key, (y_hat.shape[0], cfg.noise_dim)), y_hat
    )
    teacher = jnp.mean((model.head(params, z)[:, -1] - y_hat) ** 2)
    z_real = generator.apply(
      g_params, jax.random.normal(latent_key, (x.shape[0], cfg.noise_dim)), y[:, -1]
    )
    target = jax.lax.stop_gradient(model.head(params, z_real)[:, -1])
    latent = jnp.mean((model.apply(params, x)[:, -1] - target) ** 2)
    return real + alpha * teacher + beta * latent

  grad = jax.jit(jax.grad(client_loss))
  server = state.clients.server_params
  clients = []
  b = config.beta
  mix = lambda s, o: jax.tree.map(lambda u, v: b * u + (1 - b) * v, s, o)
  for k in range(data.num_clients):
    own = jax.tree.map(lambda leaf: leaf[k], state.clients.client_params)
    if config.send == "full":
      own = mix(server, own)
    elif config.send == "partial":
      own = {"encoder": own["encoder"], "head": mix(server["head"], own["head"])}
    clients.append(own)
  client_keys = jax.random.split(train_key, len(selected))
  trained = []
  for i, k in enumerate(selected):
    params = clients[k]
    step_keys = jax.random.split(client_keys[i], config.local_steps)
    for s in range(config.local_steps):
      g = grad(params, xs[i, s], ys[i, s], labels[i, s], step_keys[s])
      params = jax.tree.map(lambda p, d: p - LR * d, params, g)
    clients[k] = params
    trained.append(params)
  weights = np.asarray(data.train_counts)[selected]
  new_server = jax.tree.map(
    lambda *ls: sum(w * leaf for w, leaf in zip(weights, ls)) / weights.sum(), *trained
  )

  heat = heatmaps(
    ys[..., -1, :].reshape(len(selected), -1, 3), cfg.grain, cfg.heatmap_sigma, normalize=False
  )
  g_opt = optax.adam(
    optax.exponential_decay(cfg.gen_learning_rate, cfg.gen_steps, SCHEDULE_DECAY, staircase=True)
  )
  # The state's optimizer holds its initial rate as an injected hyperparameter; inside is
  # plain Adam's state.
  opt_state = state.generator_opt_state.inner_state
  batch = config.batch_size

  def generator_objective(g_params, y, w, noise):
    z = generator.apply(g_params, noise, y)
    total = 0.0
    for i in range(len(selected)):
      head_i = trained[i]
      error = jnp.sum((model.head(head_i, z)[:, -1] - y) ** 2, axis=-1)
      total = total + jnp.mean(w[i] * error)
    return total + cfg.diversity_weight * diversity_loss(noise, z)

  g_grad = jax.jit(jax.grad(generator_objective))
  for step_key in jax.random.split(server_key, cfg.gen_steps):
    label_key, noise_key = jax.random.split(step_key)
    y = sample_labels(label_key, combined(heat), batch)
    w = label_weights(heat, y)
    noise = jax.random.normal(noise_key, (batch, cfg.noise_dim))
    updates, opt_state = g_opt.update(g_grad(g_params, y, w, noise), opt_state, g_params)
    g_params = optax.apply_updates(g_params, updates)
  return new_server, jax.tree.map(lambda *ls: jnp.stack(ls), *clients), g_params


@pytest.mark.parametrize(
  "algo,per_round,loss",
  [
    ("fedgen", None, "mse"),
    ("partial-fedgen", 2, "mse"),
    ("local-fedgen", None, "mse"),
    ("fedgen", None, "orthodromic"),
  ],
)
def test_round_matches_python_loop(setup, algo, per_round, loss):
  data, model = setup
  cfg = dataclasses.replace(
    SMALL, alpha=0.7, latent_weight=0.4, diversity_weight=0.5, embedding=True
  )
  config = RoundConfig(
    local_steps=2, batch_size=5, clients_per_round=per_round, augment="none", loss=loss
  )
  algorithm = build_algorithm(algo, model, optax.sgd(LR), config, cfg)
  config = dataclasses.replace(
    config, send={"fedgen": "full", "partial-fedgen": "partial", "local-fedgen": "none"}[algo]
  )
  generator = build_generator(
    "simple",
    model.latent_dim,
    embedding=True,
    grain=cfg.grain,
    noise_dim=cfg.noise_dim,
    hidden=cfg.generator_hidden,
  )
  state = algorithm.init(jax.random.key(0), data)
  # Start from round 1 with distinct clients, so the generator terms are on.
  noisy = jax.tree.map(
    lambda leaf: leaf + 0.05 * jax.random.normal(jax.random.key(leaf.size), leaf.shape),
    state.clients.client_params,
  )
  state = state.replace(
    clients=state.clients.replace(client_params=noisy, round=jnp.array(1, jnp.int32))
  )
  key = jax.random.key(42)
  expected_server, expected_clients, expected_g = reference_fedgen_round(
    model, generator, cfg, config, state, data, key
  )
  new, metrics = jax.jit(algorithm.apply)(state, data, key)
  assert float(metrics.extra["generator_weight"]) == pytest.approx(0.7)
  chex.assert_trees_all_close(new.clients.client_params, expected_clients, rtol=5e-4, atol=1e-6)
  chex.assert_trees_all_close(new.clients.server_params, expected_server, rtol=5e-4, atol=1e-6)
  chex.assert_trees_all_close(new.generator_params, expected_g, rtol=5e-4, atol=1e-6)


def test_fedgen_round_is_traced_once(setup):
  data, model = setup
  algorithm = build_algorithm(
    "fedgen", model, optax.sgd(LR), RoundConfig(local_steps=1, batch_size=4), SMALL
  )
  apply = jax.jit(chex.assert_max_traces(algorithm.apply, n=1))
  state = algorithm.init(jax.random.key(0), data)
  for r in range(3):
    state, metrics = apply(state, data, jax.random.key(r))
  assert float(metrics.extra["generator_weight"]) > 0
  chex.assert_tree_all_finite(state)


def test_a_poisoned_client_never_reaches_the_generator(setup):
  data, model = setup
  poisoned = data.replace(train_x=data.train_x.at[1].set(jnp.nan))
  config = RoundConfig(local_steps=1, batch_size=4)
  algorithm = build_algorithm("fedgen", model, optax.sgd(LR), config, SMALL)
  state = algorithm.init(jax.random.key(0), data)
  apply = jax.jit(algorithm.apply)
  for r in range(3):
    state, metrics = apply(state, poisoned, jax.random.key(r))
    np.testing.assert_array_equal(metrics.excluded, [False, True, False])
    chex.assert_tree_all_finite(state.generator_params)
    chex.assert_tree_all_finite(state.clients.server_params)
    assert np.isfinite(float(metrics.extra["teacher_loss"]))
