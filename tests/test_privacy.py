"""Differential privacy: client-side heatmaps, DP-FedAvg's clip and noise, the accounting,
and the errors for bad settings."""

import csv
import importlib.util
import json

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, tiny_client_data
from dp_accounting.rdp import RdpAccountant

from fedvp_jax.algorithms import build_algorithm, dp
from fedvp_jax.algorithms.aggregation import receive
from fedvp_jax.algorithms.core import select_clients
from fedvp_jax.config import ALGORITHMS, FedGenConfig, PrivacyConfig, RoundConfig, RunConfig
from fedvp_jax.data.federated import sample_batches
from fedvp_jax.errors import SettingError
from fedvp_jax.geometry import normalize
from fedvp_jax.models import build_model
from fedvp_jax.privacy import account, dp_event, epsilon
from fedvp_jax.report import write_report

LR = 0.05


def random_points(key, clients, n):
  return normalize(jax.random.normal(key, (clients, n, 3)))


# --- label upload -------------------------------------------------------------------------


def test_client_side_heatmaps_equal_the_servers_without_noise():
  """heatmap, and dp-heatmap with noise 0 and a bound that never binds, hand the generator
  exactly what the points upload does."""
  points = random_points(jax.random.key(0), 3, 40)
  key = jax.random.key(1)
  upload = dp.HeatmapUpload("points", grain=16, sigma_deg=20.0)
  server_side = jax.jit(dp.uploaded_heatmaps, static_argnums=1)(points, upload, key)
  for mode in ("heatmap", "dp-heatmap"):
    client_side = jax.jit(dp.uploaded_heatmaps, static_argnums=1)(
      points, upload._replace(mode=mode, clip=1e30, noise_std=0.0), key
    )
    np.testing.assert_array_equal(np.asarray(client_side), np.asarray(server_side))


def test_dp_heatmap_is_clipped_noised_per_client_like_a_loop():
  points = random_points(jax.random.key(2), 8, 30)
  upload = dp.HeatmapUpload("dp-heatmap", grain=32, sigma_deg=15.0, clip=0.5, noise_std=0.3)
  key = jax.random.key(3)
  uploaded = jax.jit(dp.uploaded_heatmaps, static_argnums=1)
  got = np.asarray(uploaded(points, upload, key))
  clean = np.asarray(uploaded(points, upload._replace(mode="heatmap"), key))
  keys = jax.random.split(key, 8)
  noises = []
  for k in range(8):  # the plain loop: clip to 0.5, add N(0, 0.3^2) from client k's key
    clipped = clean[k] * min(1.0, 0.5 / np.linalg.norm(clean[k]))
    noise = 0.3 * np.asarray(jax.random.normal(keys[k], clean[k].shape))
    np.testing.assert_allclose(got[k], np.maximum(clipped + noise, 0.0), rtol=1e-5, atol=1e-6)
    noises.append(got[k] - clipped)
  # The noise has the calibrated standard deviation, seen where the server's zero floor did not
  # act: a half-normal of scale 0.3 has RMS 0.3 (8 x 512 cells, about 2000 kept: sd 1.6%).
  kept = np.concatenate([n[g > 0] for n, g in zip(noises, got)])
  positive = kept[kept > 0]
  assert abs(np.sqrt(np.mean(positive**2)) / 0.3 - 1) < 0.07


# --- DP-FedAvg ----------------------------------------------------------------------------


def test_clip_bounds_every_update_and_keeps_small_ones():
  key = jax.random.key(4)
  scales = jnp.array([1e-3, 0.5, 3.0, 100.0, 0.0])
  updates = {
    "a": jax.random.normal(key, (5, 7, 3)) * scales[:, None, None],
    "b": jax.random.normal(jax.random.fold_in(key, 1), (5, 11)) * scales[:, None],
  }
  clipped, norms = dp.clip_by_norm(updates, 1.0)
  for k in range(5):
    before = np.sqrt(sum(np.sum(np.asarray(leaf[k]) ** 2) for leaf in updates.values()))
    after = np.sqrt(sum(np.sum(np.asarray(leaf[k]) ** 2) for leaf in clipped.values()))
    np.testing.assert_allclose(norms[k], before, rtol=1e-5)
    assert after <= 1.0 + 1e-5
    factor = 1.0 if before <= 1.0 else 1.0 / before  # same direction, shortened only if long
    for name in updates:
      np.testing.assert_allclose(clipped[name][k], updates[name][k] * factor, rtol=1e-5)


def test_aggregate_noise_has_the_calibrated_std():
  """Zero updates: the mean is pure noise of standard deviation sigma * C / K."""
  updates = {"w": jnp.zeros((4, 100, 200))}
  used = jnp.array([True, True, False, True])
  mean, _ = jax.jit(dp.private_mean)(updates, used, 0.5, 1.5 * 0.5, jax.random.key(5))
  # 20,000 draws: the sample std is within 0.5% (one sd) of the truth; 3% is six sds.
  assert abs(np.std(mean["w"]) / (1.5 * 0.5 / 4) - 1) < 0.03
  assert abs(np.mean(mean["w"])) < 4 * 1.5 * 0.5 / 4 / np.sqrt(20_000)


def dp_mean_by_loop(server, updates, clip, sigma, key):
  """DP-FedAvg's new server model by a plain loop over the clients' ``updates``: each clipped
  alone to ``clip``, the sum noised by ``sigma * clip`` with the round ``key``'s update noise,
  divided by the number of clients; and the updates' norms before clipping."""
  total = jax.tree.map(jnp.zeros_like, server)
  norms = []
  for update in updates:
    norm = float(np.sqrt(sum(np.sum(np.asarray(u) ** 2) for u in jax.tree.leaves(update))))
    norms.append(norm)
    total = jax.tree.map(lambda t, u, norm=norm: t + u * min(1.0, clip / norm), total, update)
  noise = optax.tree.random_like(jax.random.fold_in(key, dp.UPDATE_NOISE), total)
  count = len(updates)
  expected = jax.tree.map(lambda s, t, z: s + (t + sigma * clip * z) / count, server, total, noise)
  assert min(norms) < clip < max(norms), norms  # the case covers both sides of the bound
  return expected, norms


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  spec, data = tiny_client_data(tmp_path_factory.mktemp("dp"), users=4, length=30)
  return data, build_model("lstm", spec.history, spec.horizon, latent_dim=12)


@pytest.mark.parametrize("algo", ["fedavg", "partial-fedavg"])
def test_dp_round_equals_a_loop_over_clients(setup, algo):
  """The vmapped DP-FedAvg round against a plain loop with the same keys: each sampled client
  trained alone, its update clipped alone, the sum noised, divided by K."""
  data, model = setup
  send = ALGORITHMS[algo].send
  config = RoundConfig(
    send=send, local_steps=2, batch_size=5, clients_per_round=3, augment="none", loss="mse"
  )
  sigma, clip = 0.7, 0.002  # a bound that binds for some clients and not others
  privacy = PrivacyConfig(noise_multiplier=sigma, clip_norm=clip)
  algorithm = build_algorithm(algo, model, optax.sgd(LR), config, privacy=privacy)
  state = algorithm.init(jax.random.key(0), data)
  state = state.replace(
    client_params=jax.tree.map(
      lambda leaf: leaf + 0.05 * jax.random.normal(jax.random.key(leaf.size), leaf.shape),
      state.client_params,
    )
  )
  key = jax.random.key(7)
  new, metrics = jax.jit(algorithm.apply)(state, data, key)

  select_key, batch_key, _ = jax.random.split(key, 3)
  selected = np.asarray(select_clients(select_key, data.num_clients, 3))
  xs, ys = sample_batches(batch_key, data, 2, 5, jnp.asarray(selected))
  grad = jax.jit(jax.grad(lambda p, x, y: jnp.mean((model.apply(p, x) - y) ** 2)))
  starts = receive(state.server_params, state.client_params, send, 1.0)
  part = (lambda t: t) if send == "full" else (lambda t: t["head"])
  updates = []
  for i, k in enumerate(selected):
    params = start = jax.tree.map(lambda leaf: leaf[k], starts)
    for s in range(2):
      params = jax.tree.map(lambda p, d: p - LR * d, params, grad(params, xs[i, s], ys[i, s]))
    updates.append(jax.tree.map(lambda a, b: a - b, part(params), part(start)))
  expected, norms = dp_mean_by_loop(part(state.server_params), updates, clip, sigma, key)
  chex.assert_trees_all_close(part(new.server_params), expected, rtol=1e-4, atol=1e-6)
  if send == "partial":  # the encoder is never sent, so never aggregated or noised
    chex.assert_trees_all_equal(new.server_params["encoder"], state.server_params["encoder"])
  np.testing.assert_allclose(metrics.extra["dp_update_norm"], np.mean(norms), rtol=1e-4)
  np.testing.assert_allclose(metrics.extra["dp_clipped"], np.mean(np.array(norms) > clip))


@pytest.mark.parametrize("algo", ["fedgen", "partial-fedgen"])
def test_dp_fedgen_round_equals_a_loop_over_clients(setup, algo):
  """FedGen's DP round: the clients train exactly as without DP (the generator term included),
  and the server model is DP-FedAvg's, computed here by a plain loop over the sampled clients
  from the trained models: each update clipped alone, the sum noised, divided by K."""
  data, model = setup
  send = ALGORITHMS[algo].send
  config = RoundConfig(
    send=send, local_steps=2, batch_size=5, clients_per_round=3, augment="none", loss="mse"
  )
  fedgen_config = FedGenConfig(
    grain=16, heatmap_sigma=30.0, gen_batch_size=6, gen_steps=2, pretrain_rounds=0
  )
  sigma, clip = 0.7, 0.002
  privacy = PrivacyConfig(
    label_upload="dp-heatmap", noise_multiplier=sigma, clip_norm=clip, heatmap_clip=1.0
  )
  private = build_algorithm(algo, model, optax.sgd(LR), config, fedgen_config, privacy)
  plain = build_algorithm(algo, model, optax.sgd(LR), config, fedgen_config)
  state = private.init(jax.random.key(0), data)
  clients = state.clients.replace(
    client_params=jax.tree.map(
      lambda leaf: leaf + 0.05 * jax.random.normal(jax.random.key(leaf.size), leaf.shape),
      state.clients.client_params,
    )
  )
  state = state.replace(clients=clients)
  key = jax.random.key(7)
  new, metrics = jax.jit(private.apply)(state, data, key)
  without_dp, _ = jax.jit(plain.apply)(state, data, key)
  # DP changes what the server makes of the updates, not how clients train.
  chex.assert_trees_all_close(
    new.clients.client_params, without_dp.clients.client_params, rtol=1e-6, atol=1e-7
  )

  selected = np.asarray(metrics.selected)
  starts = receive(clients.server_params, clients.client_params, send, 1.0)
  trained = without_dp.clients.client_params
  part = (lambda t: t) if send == "full" else (lambda t: t["head"])
  updates = [jax.tree.map(lambda a, b: a[k] - b[k], part(trained), part(starts)) for k in selected]
  expected, norms = dp_mean_by_loop(part(clients.server_params), updates, clip, sigma, key)
  chex.assert_trees_all_close(part(new.clients.server_params), expected, rtol=1e-4, atol=1e-6)
  if send == "partial":
    chex.assert_trees_all_equal(
      new.clients.server_params["encoder"], clients.server_params["encoder"]
    )
  np.testing.assert_allclose(metrics.extra["dp_update_norm"], np.mean(norms), rtol=1e-4)
  # The generator trained (on the pooled dp-heatmaps, against the DP server head).
  assert not np.allclose(
    jax.tree.leaves(new.generator_params)[0], jax.tree.leaves(state.generator_params)[0]
  )


# --- accounting ---------------------------------------------------------------------------


def replace_one_epsilon(event, delta):
  accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  return accountant.compose(event).get_epsilon(delta)


def test_reported_epsilon_is_the_libraries():
  """Sampled Gaussian, sigma 1.2, 30 rounds, 5 of 20 clients: the library called directly with
  the sensitivity of a replace-one client (2C), and with FedGen's dp-heatmap (sqrt(2) B)."""
  config = RunConfig.of(
    algorithm="fedavg", rounds=30, num_clients=20, clients_per_round=5, noise_multiplier=1.2
  )
  direct = dp_accounting.SelfComposedDpEvent(
    dp_accounting.SampledWithoutReplacementDpEvent(20, 5, dp_accounting.GaussianDpEvent(0.6)), 30
  )
  got = account(config, 20)
  assert got.epsilon == pytest.approx(replace_one_epsilon(direct, 1e-5), rel=1e-12)
  assert (got.noise_multiplier, got.rounds, got.sampling_rate) == (1.2, 30, 0.25)

  both = dp_accounting.SelfComposedDpEvent(
    dp_accounting.SampledWithoutReplacementDpEvent(
      20,
      5,
      dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(0.6), dp_accounting.GaussianDpEvent(1.2 / np.sqrt(2))]
      ),
    ),
    40,  # FedGen's 10 stage-one rounds count too
  )
  fedgen = config.replace(algorithm="fedgen", label_upload="dp-heatmap", pretrain_rounds=10)
  assert account(fedgen, 20).epsilon == pytest.approx(replace_one_epsilon(both, 1e-5), rel=1e-12)
  assert account(fedgen, 20).epsilon > got.epsilon


def test_epsilon_without_sampling_bounds_the_exact_gaussian():
  """Every client each round: T Gaussian rounds are one Gaussian of multiplier
  (sigma / 2) / sqrt(T), whose exact epsilon (analytic Gaussian) RDP may only exceed, and by
  little."""
  sigma, rounds = 3.0, 25
  spent = epsilon(dp_event(sigma, rounds, 10, 10, heatmap=False), 1e-5)
  exact = dp_accounting.get_epsilon_gaussian(sigma / 2 / np.sqrt(rounds), 1e-5)
  assert exact <= spent <= 1.3 * exact


def test_target_epsilon_picks_the_noise_multiplier():
  config = RunConfig.of(algorithm="fedavg", rounds=20, num_clients=10, target_epsilon=4.0)
  got = account(config, 10)
  assert 3.999 <= got.epsilon <= 4.0
  looser = account(config.replace(target_epsilon=8.0), 10)
  assert looser.noise_multiplier < got.noise_multiplier
  fixed = account(config.replace(target_epsilon=None, noise_multiplier=got.noise_multiplier), 10)
  assert fixed.epsilon == pytest.approx(got.epsilon)
  record = got.record()
  for name in ("epsilon", "delta", "noise_multiplier", "clip_norm", "sampling", "sampling_rate"):
    assert name in record


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "settings,name,reason",
  [
    ({"noise_multiplier": 0.0}, "noise_multiplier", "finite number > 0"),
    ({"noise_multiplier": -1.0}, "noise_multiplier", "finite number > 0"),
    ({"noise_multiplier": float("inf")}, "noise_multiplier", "finite number > 0"),
    ({"noise_multiplier": float("nan")}, "noise_multiplier", "finite number > 0"),
    ({"clip_norm": 0.0}, "clip_norm", "finite number > 0"),
    ({"heatmap_clip": -2.0}, "heatmap_clip", "finite number > 0"),
    ({"delta": 0.0}, "delta", "(0, 1)"),
    ({"delta": 1.0}, "delta", "(0, 1)"),
    ({"target_epsilon": 0.0}, "target_epsilon", "finite number > 0"),
    ({"target_epsilon": 1.0, "noise_multiplier": 1.0}, "target_epsilon", "not both"),
    ({"label_upload": "dp-heatmap"}, "label_upload", "needs noise_multiplier"),
    ({"label_upload": "noisy"}, "label_upload", "choose one of points"),
  ],
)
def test_bad_privacy_settings_name_the_setting(settings, name, reason):
  with pytest.raises(SettingError) as err:
    RunConfig.of(**settings)
  assert err.value.setting == name
  assert reason in str(err.value)


@pytest.mark.parametrize(
  "settings,name,reason",
  [
    ({"algorithm": "local", "noise_multiplier": 1.0}, "noise_multiplier", "shares nothing"),
    ({"algorithm": "fedgen", "noise_multiplier": 1.0}, "label_upload", "dp-heatmap"),
    ({"rounds": 1000, "target_epsilon": 1e-6}, "target_epsilon", "no noise multiplier"),
  ],
)
def test_settings_dp_cannot_honour_name_the_setting(settings, name, reason):
  with pytest.raises(SettingError) as err:
    account(RunConfig.of(num_clients=10, **settings), 10)
  assert err.value.setting == name
  assert reason in str(err.value)


def test_a_dp_run_records_and_prints_its_privacy(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  argv = (
    "--dataset Synthetic-m4-h2 --num-users 3 --rounds 1 --local-steps 1 --batch-size 4 "
    "--model lstm --latent-dim 8 --no-progress --algorithm fedavg --clients-per-round 2 "
    f"--target-epsilon 8 --delta 1e-4 --out {tmp_path} --name dp"
  ).split()
  assert script.main(argv) == 0
  config = json.loads((tmp_path / "dp" / "config.json").read_text())
  summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
  assert config["config"]["target_epsilon"] == 8.0
  assert summary["privacy"] == config["privacy"]
  privacy = summary["privacy"]
  assert 7.99 <= privacy["epsilon"] <= 8.0
  assert (privacy["delta"], privacy["clients_per_round"], privacy["num_clients"]) == (1e-4, 2, 3)
  assert privacy["sampling"] == "fixed-size, without replacement"
  assert f"noise multiplier {privacy['noise_multiplier']:.4g}" in capsys.readouterr().out
  # A report of it beside a run without DP shows the guarantee of each (∞ without DP).
  at = argv.index("--target-epsilon")
  plain = argv[:at] + argv[at + 4 :]  # without --target-epsilon 8 --delta 1e-4
  assert script.main([*plain[:-1], "plain"]) == 0
  rows = write_report(tmp_path, out_dir=tmp_path / "report")
  table = (tmp_path / "report" / "results.md").read_text()
  assert table.splitlines()[0].endswith("| DP ε (δ; σ) |")
  assert len({line.count("|") for line in table.splitlines()}) == 1  # baselines too
  sigma = f"{privacy['noise_multiplier']:.3g}"
  dp_line = next(line for line in table.splitlines() if line.startswith("| dp |"))
  plain_line = next(line for line in table.splitlines() if line.startswith("| plain |"))
  assert dp_line.endswith(f"| {privacy['epsilon']:.2f} (0.0001; {sigma}) |")
  assert plain_line.endswith("| ∞ |")
  with (tmp_path / "report" / "results.csv").open() as file:
    by_run = {row["run"]: row for row in csv.DictReader(file)}
  assert float(by_run["dp"]["epsilon"]) == privacy["epsilon"]
  assert float(by_run["dp"]["noise_multiplier"]) == privacy["noise_multiplier"]
  assert by_run["plain"]["epsilon"] == "" and len(rows) == 2 + 3  # two runs, three baselines
