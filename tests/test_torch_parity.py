"""The PyTorch twins in benchmarks/ (torch_models, torch_seed, torch_vmap) against fedvp_jax:
same forward outputs, same heatmaps, same local updates, same FedAvg training."""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip(
  "torch", reason="the PyTorch benchmark twins need torch (pip install -e '.[bench]')"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from conftest import tiny_client_data  # noqa: E402

from fedvp_jax.algorithms import fedavg  # noqa: E402
from fedvp_jax.config import RoundConfig  # noqa: E402
from fedvp_jax.data.federated import sample_batches  # noqa: E402
from fedvp_jax.heatmap import heatmaps, label_weights  # noqa: E402
from fedvp_jax.metrics import summarize  # noqa: E402
from fedvp_jax.models import build_generator, build_model  # noqa: E402

# Appended, not prepended: benchmarks/ also holds scripts (run.py...) that must not shadow
# anything else the test session imports.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_models as tm  # noqa: E402
import torch_seed  # noqa: E402
import torch_vmap  # noqa: E402

# The tensors here are tiny: threads buy nothing, and on a busy machine PyTorch's OpenMP
# workers spin against other processes (10x slower rounds were seen on 2 shared cores).
torch.set_num_threads(1)

LATENT = 12
LR = 0.05
STEPS, BATCH = 3, 8
# Few, cheap generator steps on a coarse grid: the test is about arithmetic, not quality.
FEDGEN = {"grain": 16, "heatmap_sigma": 30.0, "gen_batch_size": 16, "gen_steps": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Tiny-m4-h2 with ragged clients: client 2 loses half of its train windows to padding."""
  spec, data = tiny_client_data(tmp_path_factory.mktemp("torch"), users=4, length=30)
  n = data.train_mask.shape[1]
  return spec, data.replace(train_mask=data.train_mask.at[2, n // 2 :].set(False))


def _randomised(params, seed):
  """``params`` plus noise on every leaf, so that the zero-initialised head layer and the unit
  gains cannot hide a wrongly copied parameter."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda leaf: np.asarray(leaf) + 0.1 * rng.standard_normal(leaf.shape).astype(np.float32),
    params,
  )


def _init(model, seed):
  """``model``'s params; jitted, since op-by-op initialisation compiles every op on its own."""
  return jax.jit(model.init)(jax.random.key(seed))


def _unit(rng, shape):
  v = rng.standard_normal(shape).astype(np.float32)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


# --- (a) Forward parity. ---


@pytest.mark.parametrize("name", ["transformer", "lstm"])
@pytest.mark.parametrize("fused", [True, False])
def test_model_outputs_match_jax(name, fused):
  model = build_model(name, 10, 3)
  params = _randomised(_init(model, 0), 1)
  history = _unit(np.random.default_rng(2), (5, 10, 3))
  twin = tm.load_from_jax(tm.build_torch_model(name, 10, 3, fused=fused), params)
  with torch.no_grad():
    x = torch.from_numpy(history)
    out, z = twin(x).numpy(), twin.encode(x).numpy()
  np.testing.assert_allclose(z, jax.jit(model.encode)(params, history), atol=1e-5)
  np.testing.assert_allclose(out, jax.jit(model.apply)(params, history), atol=1e-5)


def test_generator_outputs_match_jax():
  generator = build_generator("simple", 32)
  params = _randomised(_init(generator, 0), 1)
  rng = np.random.default_rng(2)
  noise = rng.standard_normal((7, 32)).astype(np.float32)
  y = _unit(rng, (7, 3))
  twin = tm.load_from_jax(tm.build_torch_generator(32), params)
  with torch.no_grad():
    out = twin(torch.from_numpy(noise), torch.from_numpy(y)).numpy()
  np.testing.assert_allclose(out, jax.jit(generator.apply)(params, noise, y), atol=1e-5)


def test_flax_like_init_is_a_constant_velocity_predictor():
  twin = tm.init_like_flax(tm.build_torch_model("lstm", 4, 2, fused=False), seed=0)
  history = torch.from_numpy(_unit(np.random.default_rng(0), (3, 4, 3)))
  step = history[:, -1] - history[:, -2]
  expected = tm.normalize(history[:, -1:] + torch.arange(1.0, 3.0)[:, None] * step[:, None])
  with torch.no_grad():
    torch.testing.assert_close(twin(history), expected)


# --- (b) Heatmaps. ---


def _clients(seed, n=40):
  """A cluster, the dateline and uniform points."""
  rng = np.random.default_rng(seed)
  cluster = _unit(rng, (1, 3)) + 0.2 * rng.standard_normal((n, 3))
  lon = np.pi + rng.uniform(-0.05, 0.05, n)
  lat = rng.uniform(-1.0, 1.0, n)
  dateline = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)
  points = np.stack([cluster, dateline, rng.standard_normal((n, 3))]).astype(np.float32)
  return points / np.linalg.norm(points, axis=-1, keepdims=True)


@pytest.mark.parametrize("normalize", [True, False])
def test_heatmaps_match_jax(normalize):
  grain, sigma = 32, 15.0
  points = _clients(0)
  jitted = jax.jit(heatmaps, static_argnames=("grain", "normalize"))
  reference = np.asarray(jitted(points, grain=grain, sigma_deg=sigma, normalize=normalize))
  scale = reference.max()
  # torch_vmap reproduces fedvp_jax's splat-and-blur: equal up to float32 round-off.
  vectorised = torch_vmap.heatmaps(points, grain, sigma, normalize=normalize).numpy()
  np.testing.assert_allclose(vectorised / scale, reference / scale, atol=1e-5)
  # torch_seed adds the exact Gaussian of each viewpoint, which fedvp_jax approximates to a
  # total-variation distance of at most 0.02 at this grain and sigma (gaussian.py's table).
  exact = torch_seed.heatmaps(points, grain, sigma, normalize=normalize).numpy()
  mass = reference.sum(axis=(1, 2))
  tv = 0.5 * np.abs(exact - reference).sum(axis=(1, 2)) / mass
  assert np.all(tv < 0.02), tv
  np.testing.assert_allclose(exact.sum(axis=(1, 2)), mass, rtol=1e-4)


def test_label_sampling_and_weights_follow_the_heatmap():
  heat = torch_vmap.heatmaps(_clients(1), 16, 30.0, normalize=False)
  pooled = tm.combined(heat)
  labels = tm.sample_labels(torch.Generator().manual_seed(0), pooled, 40_000)
  row, col = tm.cell_index(labels, 16)
  # Every label lies in the cell it was drawn from, so cell frequencies follow the heatmap.
  counts = torch.bincount(row * 16 + col, minlength=pooled.numel()).float() / 40_000
  assert float(torch.abs(counts - pooled.reshape(-1)).sum()) < 0.1
  weights = tm.label_weights(heat, labels)
  expected = np.asarray(label_weights(heat.numpy(), labels.numpy()))
  np.testing.assert_allclose(weights.numpy(), expected, atol=1e-6)


# --- (c) torch_vmap's batched round equals torch_seed's loops on the same batches. ---


@pytest.mark.parametrize(
  ("name", "algo", "send"),
  [("lstm", "fedavg", "full"), ("transformer", "fedavg", "partial"), ("lstm", "fedgen", "full")],
)
def test_vmap_round_equals_seed_loops(tiny, name, algo, send):
  """Plain SGD, as the runs use. Under Adam the two drift apart by up to ~1e-3 in single
  parameters: where a gradient is round-off sized (about Adam's eps), Adam's normalisation
  turns float32 summation-order noise into steps of about the learning rate."""
  spec, data = tiny
  init = _randomised(_init(build_model(name, spec.history, spec.horizon, latent_dim=LATENT), 0), 3)
  g_init = _init(build_generator("simple", LATENT), 1)
  settings = dict(
    model=name, algo=algo, learning_rate=LR, local_steps=STEPS, batch_size=BATCH, send=send,
    beta=0.5, init_params=init, generator_params=g_init, latent_dim=LATENT,
    latent_weight=0.5, **FEDGEN,
  )  # fmt: skip
  seed_style = torch_seed.make_federation(data, **settings)
  vectorised = torch_vmap.make_federation(data, **settings)
  if algo == "fedgen":
    # Round 1, where the clients' losses include both generator terms.
    seed_style.round_index = vectorised.round_index = 1
  for _ in range(2):
    inputs = vectorised.sample_inputs()
    seed_metrics, vmap_metrics = seed_style.round(inputs), vectorised.round(inputs)
    assert seed_metrics["train_loss"] == pytest.approx(vmap_metrics["train_loss"], rel=1e-5)
    if algo == "fedgen":
      break  # the generators then differ: their heatmaps and label draws do
  torch.testing.assert_close(
    seed_style.server_state(), vectorised.server_state(), atol=1e-6, rtol=0
  )
  for k in range(data.num_clients):
    torch.testing.assert_close(
      seed_style.client_state(k), vectorised.client_state(k), atol=1e-6, rtol=0
    )
  assert seed_style.evaluate() == pytest.approx(vectorised.evaluate(), rel=1e-5)


# --- (d) The same FedAvg as fedvp_jax. ---


# Both tests compile the same fedvp_jax round, which the session's compilation cache then holds.
JAX_STEPS, JAX_BATCH = 5, 16


def _jax_fedavg(spec):
  model = build_model("lstm", spec.history, spec.horizon, latent_dim=LATENT)
  config = RoundConfig(local_steps=JAX_STEPS, batch_size=JAX_BATCH, augment="none", loss="mse")
  return model, fedavg(model, optax.sgd(LR), config)


def test_one_fedavg_round_equals_jax_on_jax_batches(tiny):
  """fedvp_jax's own minibatches, injected into both torch federations: same server model."""
  spec, data = tiny
  _, algorithm = _jax_fedavg(spec)
  state = jax.jit(algorithm.init)(jax.random.key(0), data)
  key = jax.random.key(5)
  new_state, _ = jax.jit(algorithm.apply)(state, data, key)
  # clients_round's key split: (select, batches, train).
  batch_key = jax.random.split(key, 3)[1]
  x, y = sample_batches(batch_key, data, JAX_STEPS, JAX_BATCH)
  inputs = tm.RoundInputs(
    torch.arange(data.num_clients), torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y))
  )
  expected = tm.flat_from_jax(
    tm.build_torch_model("lstm", spec.history, spec.horizon, latent_dim=LATENT),
    new_state.server_params,
  )
  for module in (torch_seed, torch_vmap):
    fed = module.make_federation(
      data, model="lstm", learning_rate=LR, local_steps=JAX_STEPS, batch_size=JAX_BATCH,
      init_params=state.server_params, latent_dim=LATENT,
    )  # fmt: skip
    fed.round(inputs)
    torch.testing.assert_close(fed.server_state(), expected, atol=1e-5, rtol=0)


def test_fedavg_training_matches_jax(tiny):
  """Several rounds with each framework's own random batches: the test loss improves alike."""
  spec, data = tiny
  rounds = 6
  model, algorithm = _jax_fedavg(spec)
  state = jax.jit(algorithm.init)(jax.random.key(0), data)
  initial = float(summarize(algorithm.evaluate(state, data)).loss)
  apply = jax.jit(algorithm.apply)
  for r in range(rounds):
    state, _ = apply(state, data, jax.random.key(r + 1))
  jax_loss = float(summarize(algorithm.evaluate(state, data)).loss)
  fed = torch_seed.make_federation(
    data, model="lstm", learning_rate=LR, local_steps=JAX_STEPS, batch_size=JAX_BATCH,
    init_params=_init(model, 0), latent_dim=LATENT,
  )  # fmt: skip
  assert fed.evaluate() == pytest.approx(initial, rel=1e-5)
  for _ in range(rounds):
    fed.round()
  torch_loss = fed.evaluate()
  assert jax_loss < initial and torch_loss < initial
  # Different batches, so not equal: the improvements agree within 20%.
  assert torch_loss == pytest.approx(jax_loss, rel=0.2)
  assert initial - torch_loss == pytest.approx(initial - jax_loss, rel=0.2)
