"""Every example in examples/ runs, with tiny settings, so that none can rot."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO
from matplotlib import image

import fedvp_jax as fv

TINY_FEDERATED = [
  "--dataset",
  "Synthetic-m2-h2",
  "--num-clients",
  "3",
  "--rounds",
  "2",
  "--local-steps",
  "4",
  "--batch-size",
  "8",
  "--latent-dim",
  "10",
]


def load_example(name: str):
  """Imports ``examples/<name>.py`` as a module."""
  spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def fedprox():
  return load_example("fedprox")


@pytest.fixture(scope="module")
def custom_model():
  return load_example("custom_model")


@pytest.fixture(scope="module")
def heatmap_only():
  return load_example("heatmap_only")


# ---- fedprox.py ---------------------------------------------------------------------------------


def test_fedprox_compares_with_fedavg(fedprox, capsys):
  rows = fedprox.main(TINY_FEDERATED + ["--mu", "0,10"])
  out = capsys.readouterr().out
  assert [(r["algorithm"], r["mu"]) for r in rows] == [
    ("FedAvg", None),
    ("FedProx", 0.0),
    ("FedProx", 10.0),
  ]
  table = [line.split() for line in out.splitlines() if line.startswith(("FedAvg", "FedProx"))]
  assert [line[:2] for line in table] == [["FedAvg", "-"], ["FedProx", "0"], ["FedProx", "10"]]
  for line, row in zip(table, rows, strict=True):
    assert math.isfinite(float(line[2])) and float(line[2]) == pytest.approx(row["loss"], abs=5e-7)
    assert (
      all(math.isfinite(d) for d in row["orthodromic_deg"]) and len(row["orthodromic_deg"]) == 2
    )
  fedavg, prox0, prox10 = rows
  # mu = 0 is FedAvg: same batches, same keys, a proximal gradient of exactly zero.
  np.testing.assert_allclose(prox0["loss"], fedavg["loss"], rtol=1e-6)
  np.testing.assert_allclose(prox0["orthodromic_deg"], fedavg["orthodromic_deg"], rtol=1e-5)
  # mu > 0 changes the local training, hence the result.
  assert abs(prox10["loss"] - fedavg["loss"]) > 1e-4 * fedavg["loss"]


def toy_model() -> fv.Model:
  """A model with parameters of two shapes that predicts ``normalize(last + shift)``."""

  def apply(params, history):
    shift = params["head"]["shift"] + jnp.sum(params["encoder"]["w"])
    return fv.normalize(history[..., -1:, :] + shift)

  def init(key):
    return {"encoder": {"w": jnp.zeros((2, 2))}, "head": {"shift": jnp.zeros(3)}}

  def encode(params, history):
    return history[..., -1, :]

  def head(params, z):
    return z[..., None, :]

  return fv.Model(init, apply, encode, head, 3, 1)


def test_proximal_term_uses_each_clients_received_model(fedprox):
  model = toy_model()
  base = {"encoder": {"w": jnp.full((2, 2), 0.01)}, "head": {"shift": jnp.array([0.0, 0.1, 0.0])}}
  received = jax.tree.map(lambda p: jnp.stack([p, p + 0.1, p - 0.2]), base)  # 3 clients
  params = jax.tree.map(lambda p: p + 0.05, base)
  history = fv.lonlat_to_vec(jnp.linspace(0.0, 0.2, 3), jnp.zeros(3))[None]
  future = fv.lonlat_to_vec(jnp.array([0.3]), jnp.zeros(1))[None]
  mse = fv.mse(model.apply(params, history), future)
  loss = fedprox.proximal_loss(model, mu=2.0, loss="mse")
  for row, offset in enumerate([0.0, 0.1, -0.2]):
    value = loss(params, (history, future, jnp.int32(row)), jax.random.key(1), received)
    # 7 parameters, each 0.05 - offset away from this client's received model.
    np.testing.assert_allclose(value, mse + 0.5 * 2.0 * 7 * (0.05 - offset) ** 2, rtol=1e-5)
  gradient = jax.grad(loss)(params, (history, future, jnp.int32(1)), None, received)
  no_prox = jax.grad(fedprox.proximal_loss(model, mu=0.0, loss="mse"))(
    params, (history, future, 1), None, received
  )
  # The proximal term's gradient is mu * (w - w_received).
  for g, g0 in zip(jax.tree.leaves(gradient), jax.tree.leaves(no_prox), strict=True):
    np.testing.assert_allclose(g - g0, 2.0 * (0.05 - 0.1), rtol=1e-4)


def test_fedprox_rejects_negative_mu(fedprox):
  model = fv.build_model("lstm", 3, 2, latent_dim=10)
  with pytest.raises(fv.SettingError, match=r"^mu -1\.0: must be >= 0") as caught:
    fedprox.fedprox(model, optax.sgd(0.1), fv.RoundConfig(), mu=-1.0)
  assert isinstance(caught.value, fv.ConfigError) and "--" not in str(caught.value)


# ---- custom_model.py ----------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["gru", "mlp"])
def test_custom_encoders_fit_the_engine(custom_model, encoder):
  model = custom_model.custom_model(encoder, history=4, horizon=3, latent_dim=12)
  params = jax.jit(model.init)(jax.random.key(0))
  assert set(params) == {"encoder", "head"}
  history = fv.lonlat_to_vec(jnp.linspace(0.0, 0.3, 8).reshape(2, 4), jnp.zeros((2, 4)))
  assert jax.eval_shape(model.encode, params, history).shape == (2, 12)
  prediction = jax.jit(model.apply)(params, history)
  assert prediction.shape == (2, 3, 3)
  np.testing.assert_allclose(jnp.linalg.norm(prediction, axis=-1), 1.0, rtol=1e-5)


def test_custom_model_trains_next_to_baselines(custom_model, capsys):
  rows = custom_model.main(TINY_FEDERATED + ["--models", "mlp"])
  out = capsys.readouterr().out
  assert [r["model"] for r in rows] == [*fv.BASELINES, "mlp (custom)"]
  assert rows[-1]["params"] > 0 and all(r["params"] is None for r in rows[:-1])
  for row in rows:
    assert math.isfinite(row["loss"]) and all(math.isfinite(d) for d in row["orthodromic_deg"])
    assert row["model"] in out
  assert "Average Global Loss" in out


def test_custom_model_rejects_unknown_model(custom_model):
  with pytest.raises(fv.ConfigError, match="unknown"):
    custom_model.main(["--models", "cnn"])


# ---- heatmap_only.py ----------------------------------------------------------------------------


@pytest.mark.real_data
def test_heatmap_png_of_real_video(heatmap_only, david_root, tmp_path, capsys):
  out_png = tmp_path / "heat.png"
  argv = [
    "--data-dir",
    str(david_root),
    "--grain",
    "16",
    "--sigma",
    "20",
    "--windows",
    "2",
    "--window-seconds",
    "2",
    "--dpi",
    "50",
    "--points",
    "--out",
    str(out_png),
  ]
  heat = heatmap_only.main(argv)
  assert heat.shape == (2, 8, 16)
  np.testing.assert_allclose(heat.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  pixels = image.imread(out_png)  # a valid PNG, (3.5 * windows + 1) x 2.6 inches at --dpi
  assert pixels.shape[:2] == (round(2.6 * 50), round((3.5 * 2 + 1) * 50))
  assert pixels[..., :3].std() > 0.05  # not blank
  out = capsys.readouterr().out
  assert "1_PortoRiverside" in out and f"wrote {out_png}" in out
  assert sum(line.split()[0] in ("0", "1") for line in out.splitlines() if line.strip()) == 2

  with pytest.raises(fv.DataError, match=r"no video 'nope'.*1_PortoRiverside"):
    heatmap_only.main(["--data-dir", str(david_root), "--video", "nope", "--out", str(out_png)])


def test_heatmap_example_without_data_root_says_what_to_do(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "FEDVP_DATA"}
  result = subprocess.run(
    [sys.executable, str(REPO / "examples" / "heatmap_only.py"), "--out", str(tmp_path / "x.png")],
    capture_output=True,
    check=False,
    text=True,
    env=env,
    timeout=120,
  )
  assert result.returncode == 1
  assert "error: --data-dir: no data root: give one or set FEDVP_DATA=DIR" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "x.png").exists()


def test_heatmap_example_with_missing_folder(heatmap_only, tmp_path):
  with pytest.raises(fv.DataError, match="is not a folder"):
    heatmap_only.main(["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])


# ---- lr_grid.py ---------------------------------------------------------------------------------


def test_a_learning_rate_grid_in_one_program_equals_each_rate_alone(capsys):
  """Every row of the grid equals plain FedAvg with optax.sgd at that rate (no injected
  hyperparameters), run alone for each seed, to float rounding."""
  lr_grid = load_example("lr_grid")
  args = ["--num-clients", "3", "--rounds", "2", "--local-steps", "3", "--batch-size", "8"]
  rows = lr_grid.main([*args, "--learning-rates", "0.02,0.2", "--seeds", "2"])
  assert "2 learning rates in one program" in capsys.readouterr().out
  spec = fv.parse_spec("Synthetic-m10-h5")
  traces = fv.load_traces(spec, None, seed=0)
  data = fv.build_client_data(traces, spec, fv.select_users(traces, 3, seed=0), seed=0)
  model = fv.build_model("lstm", spec.history, spec.horizon, latent_dim=32)
  config = fv.RoundConfig(local_steps=3, batch_size=8)
  for row, rate in zip(rows, [0.02, 0.2], strict=True):
    alone = fv.fedavg(model, optax.sgd(rate), config)
    sums = [jax.jit(alone.evaluate)(fv.run_rounds(alone, data, seed, 2), data) for seed in (0, 1)]
    summary = fv.summarize(jax.tree.map(lambda a, b: a + b, *sums))
    np.testing.assert_allclose(row["loss"], float(summary.loss), rtol=1e-5)
    np.testing.assert_allclose(row["orthodromic_deg"], summary.orthodromic_deg, rtol=1e-4)
  assert rows[0]["loss"] != rows[1]["loss"]
