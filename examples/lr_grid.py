#!/usr/bin/env python3
"""A learning-rate grid as one compiled program: ``over_configs`` vmaps FedAvg over learning
rates (and ``fv.run_rounds`` over seeds), so the whole grid compiles once and runs together.

The clients' optimizer is built with ``optax.inject_hyperparams``, which holds the learning
rate in the optimizer state as a value instead of a Python constant; ``over_configs`` gives
each configuration its own value. Configuration c of the grid equals FedAvg built with that
learning rate and run alone with the same seed (tests/test_configs.py checks this). Run::

    python examples/lr_grid.py                              # 0.003, 0.01, 0.03, 0.1
    python examples/lr_grid.py --learning-rates 0.01,0.05 --rounds 50
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

import fedvp_jax as fv


def rates(text: str) -> list[float]:
  """Parses ``--learning-rates 0.01,0.1``."""
  try:
    return [float(r) for r in text.split(",") if r.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--learning-rates", type=rates, default="0.003,0.01,0.03,0.1")
  parser.add_argument("--dataset", default="Synthetic-m10-h5", help="<Name>-m<M>-h<H>")
  parser.add_argument("--data-dir", default=None, help="data root for real datasets")
  parser.add_argument("--num-clients", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--local-steps", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seeds", type=int, default=2, help="seeds 0 .. N-1, run together")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Trains FedAvg at every ``--learning-rates`` value and every seed, as one program.

  Returns:
    One row per learning rate: ``{"learning_rate", "loss", "orthodromic_deg"}``, the means
    over seeds of the final models' Average Global Loss and per-step great-circle error.
  """
  args = parse_args(argv)
  spec = fv.parse_spec(args.dataset)
  traces = fv.load_traces(spec, args.data_dir, seed=0)
  users = fv.select_users(traces, args.num_clients, seed=0)
  data = fv.build_client_data(traces, spec, users, seed=0)
  model = fv.build_model("lstm", spec.history, spec.horizon, latent_dim=32)
  # The rate given here is only the default; over_configs sets each configuration's.
  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=args.learning_rates[0])
  config = fv.RoundConfig(local_steps=args.local_steps, batch_size=args.batch_size)
  grid = fv.over_configs(
    fv.fedavg(model, optimizer, config), {"learning_rate": args.learning_rates}
  )
  seeds = list(range(args.seeds))
  state = fv.run_rounds(grid, data, seeds, args.rounds)  # leaves [seeds, rates, ...]
  evaluate = jax.jit(fv.over_seeds(grid).evaluate)
  # Sums over the seeds, then one summary per learning rate.
  sums = jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), evaluate(state, data))
  rows = []
  for c, rate in enumerate(args.learning_rates):
    summary = fv.summarize(jax.tree.map(lambda leaf, c=c: leaf[c], sums))
    degrees = [float(d) for d in summary.orthodromic_deg]
    rows.append({"learning_rate": rate, "loss": float(summary.loss), "orthodromic_deg": degrees})
  print(
    f"{spec}: {len(users)} clients, FedAvg, {args.rounds} rounds, {len(seeds)} seeds, "
    f"{len(args.learning_rates)} learning rates in one program"
  )
  print(f"{'learning rate':>13} {'Average Global Loss':>20} {'orthodromic mean':>17}")
  for row in rows:
    mean = sum(row["orthodromic_deg"]) / len(row["orthodromic_deg"])
    print(f"{row['learning_rate']:>13g} {row['loss']:>20.6f} {mean:>16.3f}°")
  return rows


if __name__ == "__main__":
  try:
    main()
  except fv.FedVPError as err:
    sys.exit(f"error: {err}")
