"""Configurations as one program (issue 12): a family of the weekly table run as separate
programs, one after another (each compiled and run alone, as the sweep runs them today), against
the same configurations vmapped into one program with ``over_configs``; and rounds one per
jitted call against chunks of rounds (``rounds.iterate_chunks``).

Each timing includes preparing the data and compiling. Both sides use the same data, seeds and
rounds, measured side by side in one process.

  python benchmarks/config_groups.py --family fedavg --rounds 20
  python benchmarks/config_groups.py --family fedgen --rounds 20
"""

from __future__ import annotations

import argparse
import collections
import time

import jax

from fedvp_jax.algorithms import over_configs
from fedvp_jax.config import TRACED, RunConfig, get
from fedvp_jax.experiment import prepare
from fedvp_jax.rounds import chunk_ends, iterate_chunks

FAMILIES = {
  # The weekly table's runs, by family (fedvp_jax/presets/weekly-table.toml).
  "fedavg": [
    {"algorithm": "local"},
    {"algorithm": "fedavg"},
    {"algorithm": "fedavg", "beta": 0.5},
    {"algorithm": "partial-fedavg"},
    {"algorithm": "partial-fedavg", "beta": 0.5},
  ],
  "fedgen": [
    {"algorithm": "fedgen"},
    {"algorithm": "fedgen", "beta": 0.5},
    {"algorithm": "fedgen", "pretrain_rounds": 5},
    {"algorithm": "local-fedgen"},
    {"algorithm": "partial-fedgen", "beta": 0.5},
  ],
}


def last_state(algorithm, data, seeds, rounds: int, longest: int):
  ends = chunk_ends(0, rounds, longest=longest)
  (last,) = collections.deque(iterate_chunks(algorithm, data, seeds, ends), maxlen=1)
  return last.state


def separately(configs: list[RunConfig], seeds: list[int], longest: int) -> float:
  """Seconds to prepare, compile and run every configuration alone."""
  start = time.perf_counter()
  for config in configs:
    experiment = prepare(config)
    state = last_state(experiment.algorithm, experiment.data, seeds, config.total_rounds, longest)
    jax.block_until_ready(state)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--family", choices=FAMILIES, default="fedavg")
  parser.add_argument("--dataset", default="Synthetic-m10-h1")
  parser.add_argument("--model", default="transformer")
  parser.add_argument("--rounds", type=int, default=20)
  args = parser.parse_args()
  shared = RunConfig.of(
    dataset=args.dataset, model=args.model, num_clients=10, rounds=args.rounds, num_seeds=2
  )
  configs = [shared.replace(**settings) for settings in FAMILIES[args.family]]
  seeds = [0, 1]
  separate = {longest: separately(configs, seeds, longest) for longest in (1, 10)}
  start = time.perf_counter()
  leader = prepare(next(c for c in configs if c.round.send == "full"))
  varied = {
    name: [get(c, name) for c in configs]
    for name in TRACED
    if len({get(c, name) for c in configs}) > 1
  }
  varied["send"] = [c.round.send for c in configs]
  rounds = [c.total_rounds for c in configs]
  group = over_configs(leader.algorithm, varied, rounds)
  jax.block_until_ready(last_state(group, leader.data, seeds, max(rounds), 10))
  together = time.perf_counter() - start
  print(
    f"{args.family} family, {len(configs)} configurations x 2 seeds, {args.dataset}, "
    f"{args.model}, 10 clients, {max(rounds)} rounds (compile included)"
  )
  print("| how | programs | wall s |")
  print("|---|---|---|")
  print(f"| separately, one round per call | {len(configs)} | {separate[1]:.1f} |")
  print(f"| separately, chunks of 10 rounds | {len(configs)} | {separate[10]:.1f} |")
  print(f"| one vmapped group, chunks of 10 | 1 | {together:.1f} |")
  print(f"| speed-up of the group over separate chunked runs | | {separate[10] / together:.2f}x |")


if __name__ == "__main__":
  main()
