"""Wall time of a run's first rounds (issue 12): the first round compiles the round program;
a second slow round means it compiled again. Synthetic-m10-h5, 10 clients, 10 local steps of
batch 64, one seed through the same loop every run uses (``rounds.iterate_rounds``).

  python benchmarks/first_rounds.py
"""

import time

import jax

from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import prepare
from fedvp_jax.rounds import iterate_rounds


def round_seconds(algorithm: str, model: str, rounds: int = 3) -> list[float]:
  config = RunConfig.of(
    algorithm=algorithm,
    dataset="Synthetic-m10-h5",
    model=model,
    num_clients=10,
    rounds=rounds,
    local_steps=10,
    batch_size=64,
  )
  experiment = prepare(config)
  times, start = [], time.perf_counter()
  for _, metrics in iterate_rounds(experiment.algorithm, experiment.data, [0], rounds):
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    start = time.perf_counter()
  return times


def main() -> None:
  print("| algorithm | model | round 0 (s) | round 1 (s) | round 2 (s) |")
  print("|---|---|---|---|---|")
  for model in ("lstm", "transformer"):
    for algorithm in ("fedavg", "fedgen"):
      cells = " | ".join(f"{t:.2f}" for t in round_seconds(algorithm, model))
      print(f"| {algorithm} | {model} | {cells} |")


if __name__ == "__main__":
  main()
