"""The programs of a grouped sweep (issue 12): for each group the sweep would run as one
program (``sweep.run_groups``), its compile time, its time per round (every run of the group,
every seed, together) and its memory, measured on a few rounds; and the sweep's wall time
projected from them (compile + the longest run's rounds x time per round).

  python benchmarks/sweep_programs.py weekly-table --data-dir ../shared/data --rounds 5
"""

from __future__ import annotations

import argparse
import time

import jax

from fedvp_jax.experiment import prepare, with_config
from fedvp_jax.rounds import (
  compile_chunks,
  group_algorithm,
  iterate_chunks,
  program_bytes,
)
from fedvp_jax.sweep import expand_spec, read_spec, run_groups


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("spec", help="a preset or a spec file")
  parser.add_argument("--data-dir")
  parser.add_argument("--rounds", type=int, default=5, help="rounds timed per program")
  parser.add_argument("--table-rounds", type=int, default=100, help="the rounds to project to")
  args = parser.parse_args()
  text, label = read_spec(args.spec)
  overrides = {"rounds": args.table_rounds}
  if args.data_dir:
    overrides["data_dir"] = args.data_dir
  runs = expand_spec(text, label, overrides)
  print(f"{label}, {len(runs)} runs, {args.table_rounds} rounds, {jax.devices()[0]}")
  print(
    "| program | runs | compile s | s/round (all runs, all seeds) | memory MiB | rounds | "
    "projected wall s |"
  )
  print("|---|---|---|---|---|---|---|", flush=True)
  total = 0.0
  for group in run_groups(runs):
    configs = [r.config for r in group]
    start = time.perf_counter()
    leader = prepare(configs[0])
    experiments = [leader, *(with_config(leader, c) for c in configs[1:])]
    seeds = [configs[0].seed + k for k in range(configs[0].num_seeds)]
    algorithm = group_algorithm(experiments)
    prepared = time.perf_counter()
    program = compile_chunks(algorithm, leader.data, seeds)
    compiled = time.perf_counter()
    # One round first (the state's creation), then the timed chunk.
    chunks = iterate_chunks(algorithm, leader.data, seeds, [1, 1 + args.rounds], program=program)
    jax.block_until_ready(next(chunks).state)
    timed = time.perf_counter()
    jax.block_until_ready(next(chunks).state)
    per_round = (time.perf_counter() - timed) / args.rounds
    rounds = max(c.total_rounds for c in configs)
    wall = (prepared - start) + (compiled - prepared) + rounds * per_round
    total += wall
    name = group[0].name if len(group) == 1 else f"{group[0].name} ... {group[-1].name}"
    print(
      f"| {name} | {len(group)} | {compiled - prepared:.1f} | {per_round:.3f} | "
      f"{program_bytes(program) / 2**20:.0f} | {rounds} | {wall:.0f} |",
      flush=True,
    )
  print(
    f"projected wall time of the whole sweep: {total / 60:.1f} min (final evaluations not counted)"
  )


if __name__ == "__main__":
  main()
