#!/usr/bin/env python3
"""Plugging a new Flax NNX model into fedvp_jax's federated engine.

A viewport model is an encoder followed by the shared :class:`fedvp_jax.models.Head`. A new
encoder only has to map a history ``f32[batch, M, 3]`` of unit vectors to
``f32[batch, latent_dim - MOTION_DIM]`` learned features: :class:`ViewportModel` puts the
motion state (last position and displacement, ``MOTION_DIM = 6`` numbers) in front of them,
and the head turns the whole ``z`` into ``H`` future unit vectors. ``functional`` splits the
NNX module into the pure functions (``fedvp_jax.Model``) that every algorithm takes.

This example defines a GRU and an MLP encoder, trains each with FedAvg on the Synthetic
dataset through the same jitted round loop as the library's models, and prints their test
errors next to the library's LSTM and the trivial predictors (no-motion, constant velocity,
straight line). Run::

    python examples/custom_model.py
    python examples/custom_model.py --models gru --rounds 50 --dataset Synthetic-m10-h5
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import fedvp_jax as fv
from fedvp_jax.config import MOTION_DIM
from fedvp_jax.data import SAMPLE_PERIOD
from fedvp_jax.models import Head, ViewportModel, functional, motion_features

INPUT_FEATURES = 6
"""Per-step inputs from ``motion_features``: position (3) and displacement (3)."""


class GRUEncoder(nnx.Module):
  """One GRU layer over the history's motion features, then Dense.

  Maps ``f32[batch, M, 3]`` to ``f32[batch, features]``.
  """

  def __init__(self, features: int, hidden: int = 32, *, rngs: nnx.Rngs):
    self.hidden = hidden
    self.cell = nnx.GRUCell(INPUT_FEATURES, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, features, rngs=rngs)

  def __call__(self, history: jax.Array) -> jax.Array:
    inputs = motion_features(history)
    carry = jnp.zeros((*history.shape[:-2], self.hidden), history.dtype)
    for t in range(history.shape[-2]):  # M is small and static: unroll
      carry, _ = self.cell(carry, inputs[..., t, :])
    return self.out(carry)


class MLPEncoder(nnx.Module):
  """Dense -> ReLU -> Dense on the flattened motion features of the whole history.

  Maps ``f32[batch, M, 3]`` to ``f32[batch, features]``; M is fixed at construction.
  """

  def __init__(self, features: int, history: int, hidden: int = 64, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(history * INPUT_FEATURES, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, features, rngs=rngs)

  def __call__(self, history: jax.Array) -> jax.Array:
    inputs = motion_features(history).reshape(*history.shape[:-2], -1)
    return self.out(jax.nn.relu(self.hidden(inputs)))


def custom_model(
  encoder: str, history: int, horizon: int, latent_dim: int = 32, head_hidden: int = 64
) -> fv.Model:
  """A ``fedvp_jax.Model`` with a ``"gru"`` or ``"mlp"`` encoder and the standard head.

  Args:
    encoder: ``"gru"`` or ``"mlp"``.
    history: M, past samples in.
    horizon: H, future samples out.
    latent_dim: size of z (> ``MOTION_DIM``); the encoder gives ``latent_dim - MOTION_DIM``.
    head_hidden: width of the head's hidden layer.
  """
  features = latent_dim - MOTION_DIM
  encoders = {
    "gru": lambda rngs: GRUEncoder(features, rngs=rngs),
    "mlp": lambda rngs: MLPEncoder(features, history, rngs=rngs),
  }

  def make(rngs: nnx.Rngs) -> ViewportModel:
    return ViewportModel(encoders[encoder](rngs), Head(latent_dim, head_hidden, horizon, rngs=rngs))

  return functional(make, latent_dim, horizon)


def run_rounds(
  algorithm: fv.FederatedAlgorithm, data: fv.ClientData, rounds: int, seed: int
) -> Any:
  """Runs ``rounds`` jitted rounds from ``seed`` (keys as in ``fedvp_jax.rounds``).

  Returns:
    ``(state, summary)``: the final state and the final evaluation of the deployed models.
  """
  state = fv.run_rounds(algorithm, data, seed, rounds)
  return state, fv.summarize(jax.jit(algorithm.evaluate)(state, data))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--models",
    default="lstm,gru,mlp",
    help="comma-separated: gru, mlp (this example's) and lstm (the library's)",
  )
  parser.add_argument("--dataset", default="Synthetic-m10-h5", help="<Name>-m<M>-h<H>")
  parser.add_argument("--data-dir", default=None, help="data root for real datasets")
  parser.add_argument("--latent-dim", type=int, default=32)
  parser.add_argument("--num-clients", "--num-users", dest="num_clients", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--local-steps", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Trains every ``--models`` entry with FedAvg and prints a table with the baselines.

  Returns:
    One row per baseline and model: ``{"model", "params", "loss", "orthodromic_deg"}``
    (``params`` is None for the baselines).
  """
  args = parse_args(argv)
  names = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = set(names) - {"lstm", "gru", "mlp"}
  if unknown:
    raise fv.ConfigError(
      f"--models: unknown {', '.join(sorted(unknown))}; choose from lstm, gru, mlp"
    )
  spec = fv.parse_spec(args.dataset)
  traces = fv.load_traces(spec, args.data_dir, seed=args.seed)
  users = fv.select_users(traces, args.num_clients, seed=args.seed)
  data = fv.build_client_data(traces, spec, users, seed=args.seed)
  config = fv.RoundConfig(send="full", local_steps=args.local_steps, batch_size=args.batch_size)
  print(
    f"{spec}: {len(users)} clients, FedAvg, {args.rounds} rounds x {args.local_steps} local "
    f"steps, lr {args.learning_rate}, seed {args.seed}"
  )

  rows: list[dict[str, Any]] = []
  for name, predict in fv.BASELINES.items():
    summary = fv.summarize(
      fv.error_sums(predict(data.test_x, spec.horizon), data.test_y, data.test_mask)
    )
    rows.append(
      {
        "model": name,
        "params": None,
        "loss": float(summary.loss),
        "orthodromic_deg": [float(d) for d in summary.orthodromic_deg],
      }
    )
  for name in names:
    if name == "lstm":
      model = fv.build_model("lstm", spec.history, spec.horizon, latent_dim=args.latent_dim)
    else:
      model = custom_model(name, spec.history, spec.horizon, latent_dim=args.latent_dim)
    algorithm = fv.fedavg(model, optax.sgd(args.learning_rate), config)
    state, summary = run_rounds(algorithm, data, args.rounds, args.seed)
    size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.server_params))
    label = "lstm (library)" if name == "lstm" else f"{name} (custom)"
    rows.append(
      {
        "model": label,
        "params": size,
        "loss": float(summary.loss),
        "orthodromic_deg": [float(d) for d in summary.orthodromic_deg],
      }
    )

  print(
    f"{'model':<18} {'params':>7} {'Average Global Loss':>20} {'orthodromic mean':>17} "
    f"{'at ' + format(SAMPLE_PERIOD * spec.horizon, '.1f') + ' s':>9}"
  )
  for row in rows:
    size = "-" if row["params"] is None else str(row["params"])
    degrees = row["orthodromic_deg"]
    print(
      f"{row['model']:<18} {size:>7} {row['loss']:>20.6f} {sum(degrees) / len(degrees):>16.3f}° "
      f"{degrees[-1]:>8.3f}°"
    )
  return rows


if __name__ == "__main__":
  try:
    main()
  except fv.FedVPError as err:
    sys.exit(f"error: {err}")
