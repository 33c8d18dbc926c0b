#!/usr/bin/env python3
"""FedProx (Li et al., 2020) built from fedvp_jax's pieces, compared with FedAvg.

FedProx is FedAvg whose clients minimise their prediction loss plus a proximal term that
keeps them near the model they received at the start of the round::

    loss_k(w) = L_k(w) + mu / 2 * ||w - w_received||^2      (L: the run's --loss)

With ``send="full"`` and ``beta=1`` (the defaults) every client receives the server's model,
so ``w_received`` is the global model ``w^t`` of the paper; with ``beta < 1`` or
``send="partial"`` it is each client's own blend of server and local model. ``mu = 0`` is
exactly FedAvg.

The algorithm is the section between the two ``----`` rules (``proximal_loss`` and
``fedprox``); the rest is the command line. Run::

    python examples/fedprox.py                    # FedAvg vs FedProx(mu=0.1, 1, 10) on Synthetic
    python examples/fedprox.py --mu 0,1 --rounds 50 --local-steps 40
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

import fedvp_jax as fv
from fedvp_jax.algorithms import (
  LossFn,
  augmented,
  clients_round,
  evaluate_deployed,
  init_clients,
  local_update,
  prediction_loss,
)
from fedvp_jax.data import SAMPLE_PERIOD

# ---- FedProx: the algorithm ------------------------------------------------------------------


def proximal_loss(model: fv.Model, mu: float, loss: str) -> LossFn:
  """FedProx's client loss: the prediction loss plus ``mu / 2 * ||w - w_received||^2``.

  ``local_update`` hands the same ``context`` to every client, so the context is the received
  models of all K training clients stacked (leaves ``f32[K, ...]``) and every batch carries
  its client's row in that stack.

  Args:
    model: the viewport model.
    mu: the proximal coefficient, >= 0.
    loss: the prediction loss's name (``RoundConfig.loss``).

  Returns:
    A ``LossFn`` over batches ``(history: f32[B, M, 3], future: f32[B, H, 3], row: i32[])``.
  """
  prediction = prediction_loss(model, loss)

  def proximal(
    params: Any, batch: tuple[jax.Array, ...], key: jax.Array, received: Any
  ) -> jax.Array:
    history, future, row = batch
    anchor = jax.tree.map(lambda leaf: leaf[row], received)
    distance = optax.tree.norm(optax.tree.sub(params, anchor), squared=True)
    return prediction(params, (history, future), key, None) + 0.5 * mu * distance

  return proximal


def fedprox(
  model: fv.Model, optimizer: optax.GradientTransformation, config: fv.RoundConfig, mu: float
) -> fv.FederatedAlgorithm:
  """FedProx: FedAvg's round whose clients train on :func:`proximal_loss`.

  The state is a :class:`fedvp_jax.ClientsState`; ``RoundMetrics.train_loss`` includes the
  proximal term.

  Args:
    model: the viewport model.
    optimizer: every client's local optimizer.
    config: the round's settings (``send="full"``, ``beta=1`` for the published algorithm).
    mu: the proximal coefficient, >= 0; 0 is FedAvg.

  Raises:
    SettingError: for a negative ``mu`` (``config``'s round settings were checked when it was
      built).
  """
  if not mu >= 0:
    raise fv.SettingError("mu", mu, "must be >= 0 (0 is FedAvg)")
  # Augmented and with the loss of FedAvg's clients (config.augment, config.loss), so that
  # mu = 0 is exactly FedAvg.
  train = local_update(augmented(proximal_loss(model, mu, config.loss), config.augment), optimizer)

  def update(params, opt_state, batches, key, context):
    # A LocalUpdate (context is None here). `params` are the K training clients' models as
    # received this round: they become the context, and each client's batches its row in it.
    num_clients, num_steps = batches[0].shape[:2]
    rows = jnp.broadcast_to(jnp.arange(num_clients)[:, None], (num_clients, num_steps))
    return train(params, opt_state, (*batches, rows), key, params)

  def init(key: jax.Array, data: fv.ClientData) -> fv.ClientsState:
    return init_clients(model, optimizer, config, key, data.num_clients)

  def apply(state: fv.ClientsState, data: fv.ClientData, key: jax.Array):
    outcome = clients_round(model, config, update, state, data, key)
    return outcome.state, outcome.metrics

  def evaluate(
    state: fv.ClientsState, data: fv.ClientData, part: str = "test", best: bool = False
  ) -> fv.ErrorSums:
    return evaluate_deployed(model, state, data, part, best)

  return fv.FederatedAlgorithm(init, apply, evaluate)


# ---- The comparison ---------------------------------------------------------------------------


def run_rounds(
  algorithm: fv.FederatedAlgorithm, data: fv.ClientData, rounds: int, seed: int
) -> fv.Summary:
  """Runs ``rounds`` jitted rounds from ``seed`` (keys as in ``fedvp_jax.rounds``) and returns
  the final evaluation of the deployed models."""
  state = fv.run_rounds(algorithm, data, seed, rounds)
  return fv.summarize(jax.jit(algorithm.evaluate)(state, data))


def mu_list(text: str) -> list[float]:
  """Parses ``--mu 0.1,1``."""
  try:
    return [float(m) for m in text.split(",") if m.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--mu", type=mu_list, default="0.1,1,10", help="comma-separated FedProx coefficients"
  )
  parser.add_argument("--dataset", default="Synthetic-m10-h5", help="<Name>-m<M>-h<H>")
  parser.add_argument("--data-dir", default=None, help="data root for real datasets")
  parser.add_argument("--model", default="lstm", choices=fv.config.MODELS)
  parser.add_argument("--latent-dim", type=int, default=32)
  parser.add_argument("--num-clients", "--num-users", dest="num_clients", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--local-steps", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=0.05)
  parser.add_argument("--beta", type=float, default=1.0)
  parser.add_argument("--clients-per-round", type=int, default=None, help="default: all")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Runs FedAvg and FedProx for every ``--mu`` with the same seed, model and data.

  Returns:
    One row per algorithm: ``{"algorithm", "mu", "loss", "orthodromic_deg"}`` where
    ``orthodromic_deg`` is the mean great-circle error per horizon step.
  """
  args = parse_args(argv)
  spec = fv.parse_spec(args.dataset)
  traces = fv.load_traces(spec, args.data_dir, seed=args.seed)
  users = fv.select_users(traces, args.num_clients, seed=args.seed)
  data = fv.build_client_data(traces, spec, users, seed=args.seed)
  model = fv.build_model(args.model, spec.history, spec.horizon, latent_dim=args.latent_dim)
  optimizer = optax.sgd(args.learning_rate)
  config = fv.RoundConfig(
    send="full",
    beta=args.beta,
    local_steps=args.local_steps,
    batch_size=args.batch_size,
    clients_per_round=args.clients_per_round,
  )
  algorithms: list[tuple[str, float | None, fv.FederatedAlgorithm]] = [
    ("FedAvg", None, fv.fedavg(model, optimizer, config))
  ]
  algorithms += [("FedProx", mu, fedprox(model, optimizer, config, mu)) for mu in args.mu]
  print(
    f"{spec}: {len(users)} clients, {args.model}, {args.rounds} rounds x "
    f"{args.local_steps} local steps, lr {args.learning_rate}, seed {args.seed}"
  )
  rows: list[dict[str, Any]] = []
  for name, mu, algorithm in algorithms:
    summary = run_rounds(algorithm, data, args.rounds, args.seed)
    degrees = [float(d) for d in summary.orthodromic_deg]
    rows.append(
      {"algorithm": name, "mu": mu, "loss": float(summary.loss), "orthodromic_deg": degrees}
    )
  print(
    f"{'algorithm':<10} {'mu':>6} {'Average Global Loss':>20} {'orthodromic mean':>17} "
    f"{'at ' + format(SAMPLE_PERIOD * spec.horizon, '.1f') + ' s':>9}"
  )
  for row in rows:
    mu_text = "-" if row["mu"] is None else f"{row['mu']:g}"
    degrees = row["orthodromic_deg"]
    mean = sum(degrees) / len(degrees)
    print(
      f"{row['algorithm']:<10} {mu_text:>6} {row['loss']:>20.6f} {mean:>16.3f}° "
      f"{degrees[-1]:>8.3f}°"
    )
  return rows


if __name__ == "__main__":
  try:
    main()
  except fv.FedVPError as err:
    sys.exit(f"error: {err}")
