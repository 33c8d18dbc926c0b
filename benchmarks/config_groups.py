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
from fedvp_jax.config import RunConfig, as_hyperparams
from fedvp_jax.experiment import prepare, with_config
from fedvp_jax.rounds import (
  chunk_ends,
  compile_chunks,
  group_algorithm,
  iterate_chunks,
  program_bytes,
)

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


def group_bytes(leader, configs: list[RunConfig], seeds: list[int]) -> int:
  """Device memory the group's chunk program needs, as the sweep measures it before splitting
  a group (``rounds.program_bytes``), without running it."""
  experiments = [with_config(leader, config) for config in configs]
  return program_bytes(compile_chunks(group_algorithm(experiments), leader.data, seeds))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--family", choices=FAMILIES, default="fedavg")
  parser.add_argument("--dataset", default="Synthetic-m10-h1")
  parser.add_argument("--model", default="transformer")
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--no-memory", action="store_true", help="skip the memory analysis")
  args = parser.parse_args()
  shared = RunConfig.of(
    dataset=args.dataset, model=args.model, num_clients=10, rounds=args.rounds, num_seeds=2
  )
  configs = [shared.replace(**settings) for settings in FAMILIES[args.family]]
  seeds = [0, 1]
  print(
    f"{args.family} family, {len(configs)} configurations x 2 seeds, {args.dataset}, "
    f"{args.model}, 10 clients, {args.rounds} rounds (compile included), {jax.devices()[0]}"
  )
  print("| how | programs | wall s |")
  print("|---|---|---|", flush=True)
  start = time.perf_counter()
  leader = prepare(next(c for c in configs if c.round.send == "full"))
  rounds = [c.total_rounds for c in configs]
  group = over_configs(leader.algorithm, as_hyperparams(configs), rounds)
  jax.block_until_ready(last_state(group, leader.data, seeds, max(rounds), 10))
  together = time.perf_counter() - start
  print(f"| one vmapped group, chunks of 10 | 1 | {together:.1f} |", flush=True)
  separate = {}
  for longest, how in ((10, "chunks of 10 rounds"), (1, "one round per call")):
    separate[longest] = separately(configs, seeds, longest)
    print(f"| separately, {how} | {len(configs)} | {separate[longest]:.1f} |", flush=True)
  print(f"| speed-up of the group over separate chunked runs | | {separate[10] / together:.2f}x |")
  if args.no_memory:
    return
  print()
  print("| configurations in the group | device memory, MiB | per configuration x seed, MiB |")
  print("|---|---|---|")
  sizes = {}
  for count in (1, 2, len(configs)):
    sizes[count] = group_bytes(leader, (configs * count)[:count], seeds) / 2**20
    print(f"| {count} | {sizes[count]:.0f} | {sizes[count] / (count * len(seeds)):.1f} |")
  step = (sizes[len(configs)] - sizes[1]) / (len(configs) - 1)
  fits = int((24 * 1024 - sizes[1]) / step) + 1
  print(f"each further configuration adds {step:.0f} MiB: about {fits} fit in 24 GiB")


if __name__ == "__main__":
  main()
