"""Time per round of the DP machinery (issue 17): the jitted round with and without DP-FedAvg
(and dp-heatmap for FedGen) on David-m10-h5, 10 clients, LSTM, rounds of the two interleaved,
median of 30 after compilation.

  python benchmarks/dp_overhead.py [DATA_ROOT]   # default $FEDVP_DATA
"""

import sys
import time

import jax
import numpy as np

from fedvp_jax.config import RunConfig
from fedvp_jax.experiment import prepare

FEDGEN = {"grain": 32, "heatmap_sigma": 15.0, "gen_steps": 10, "gen_batch_size": 64}


def compiled_round(config: RunConfig):
  """The jitted round, its state after one (compiling) round, and the data."""
  experiment = prepare(config)
  apply = jax.jit(experiment.algorithm.apply)
  state = experiment.algorithm.init(jax.random.key(0), experiment.data)
  state, _ = jax.block_until_ready(apply(state, experiment.data, jax.random.key(1)))
  return apply, state, experiment.data


def main() -> None:
  data_dir = sys.argv[1] if len(sys.argv) > 1 else None
  for algo in ("fedavg", "fedgen"):
    base = RunConfig.of(
      dataset="David-m10-h5",
      data_dir=data_dir,
      algorithm=algo,
      model="lstm",
      optimizer="adam",
      learning_rate=1e-3,
      num_clients=10,
      eval_every=1000,  # time the training round, not the evaluation
      **(FEDGEN if algo == "fedgen" else {}),
    )
    private = base.replace(noise_multiplier=5.7, clip_norm=0.5)
    if algo == "fedgen":
      private = private.replace(label_upload="dp-heatmap")
    rounds = {"plain": compiled_round(base), "dp": compiled_round(private)}
    times: dict[str, list[float]] = {name: [] for name in rounds}
    for r in range(30):
      for name, (apply, state, data) in rounds.items():
        start = time.perf_counter()
        jax.block_until_ready(apply(state, data, jax.random.key(r + 2)))
        times[name].append(time.perf_counter() - start)
    medians = {name: f"{np.median(t):.4f} s" for name, t in times.items()}
    print(algo, medians, flush=True)


if __name__ == "__main__":
  main()
