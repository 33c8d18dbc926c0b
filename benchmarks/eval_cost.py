"""What evaluation costs a round (issue 12): the median wall time of a round that evaluates
(``eval_every`` 1) against one that does not (``eval_every`` 10, rounds 1-9 of each ten), for a
Transformer on Synthetic-m10-h5 with 10 clients and one seed. Evaluation is a ``lax.cond`` on
the round counter, so skipped rounds must be cheaper; over seeds too, since the counter stays
unbatched.

  python benchmarks/eval_cost.py
"""

import time

import jax
import numpy as np

from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import prepare
from fedvp_jax.rounds import iterate_rounds


def median_round(eval_every: int, evaluated: bool, rounds: int = 31) -> float:
  config = RunConfig.of(
    dataset="Synthetic-m10-h5",
    model="transformer",
    num_clients=10,
    rounds=rounds,
    local_steps=10,
    batch_size=64,
    eval_every=eval_every,
  )
  experiment = prepare(config)
  times, start = [], time.perf_counter()
  for r, (_, metrics) in enumerate(
    iterate_rounds(experiment.algorithm, experiment.data, [0], rounds)
  ):
    jax.block_until_ready(metrics)
    if r > 0 and (r % eval_every == 0) == evaluated:  # round 0 compiles
      times.append(time.perf_counter() - start)
    start = time.perf_counter()
  return float(np.median(times))


def main() -> None:
  every = median_round(1, evaluated=True)
  skipped = median_round(10, evaluated=False)
  print("| rounds | median s/round |")
  print("|---|---|")
  print(f"| evaluating (eval_every 1) | {every:.3f} |")
  print(f"| not evaluating (eval_every 10) | {skipped:.3f} |")
  print(f"| evaluation's share of a round | {100 * (every - skipped) / every:.0f} % |")


if __name__ == "__main__":
  main()
